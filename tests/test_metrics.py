"""Tests for metrics.py (fast: no data, no training)."""
from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, f1_score, precision_score,
                             recall_score, roc_auc_score)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics as M  # noqa: E402


def _random_case(rng: np.random.Generator, n: int, decimals: int | None = None):
    y = np.zeros(n, dtype=int)
    for _ in range(rng.integers(1, 6)):
        a = int(rng.integers(0, n))
        y[a:a + int(rng.integers(1, 20))] = 1
    s = rng.random(n) + y * rng.random() * 1.5
    if decimals is not None:
        s = np.round(s, decimals)  # many ties
    return y, s


# --------------------------------------------------------------------------- vs sklearn
def test_prf_auc_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, s = _random_case(rng, 300)
        thr = float(np.quantile(s, rng.uniform(0.5, 0.99)))
        pred = s > thr
        p, r, f = M.prf(y, pred)
        assert p == pytest.approx(precision_score(y, pred, zero_division=0))
        assert r == pytest.approx(recall_score(y, pred, zero_division=0))
        assert f == pytest.approx(f1_score(y, pred, zero_division=0))
        assert M.auc_roc(s, y) == pytest.approx(roc_auc_score(y, s))
        assert M.auc_pr(s, y) == pytest.approx(average_precision_score(y, s))
        ev = M.evaluate(s, thr, y)
        assert ev["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
        assert ev["n_predicted"] == int(pred.sum()) and ev["n_anomalies"] == int(y.sum())


def _f1(y, pred) -> float:
    tp = np.sum((y == 1) & pred)
    return 2 * tp / (pred.sum() + y.sum()) if tp else 0.0


def _brute_best_f1(s, y, pa: bool) -> float:
    """Max F1 over every distinct threshold, one full pass each (pred = s >= t)."""
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        if pa:
            pred = M.point_adjust(y, pred)
        best = max(best, _f1(y, pred))
    return best


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_best_f1_oracles_equal_brute_force(decimals):
    rng = np.random.default_rng(1 + (decimals or 0))
    for _ in range(15):
        y, s = _random_case(rng, int(rng.integers(30, 200)), decimals)
        f1, thr = M.best_f1_oracle(s, y, return_threshold=True)
        assert f1 == pytest.approx(_brute_best_f1(s, y, False), abs=1e-12)
        assert f1_score(y, s > thr) == pytest.approx(f1, abs=1e-12)  # threshold reproduces it
        f1pa, thr_pa = M.best_f1_pa_oracle(s, y, return_threshold=True)
        assert f1pa == pytest.approx(_brute_best_f1(s, y, True), abs=1e-12)
        assert f1_score(y, M.point_adjust(y, s > thr_pa)) == pytest.approx(f1pa, abs=1e-12)
        assert f1pa >= f1 - 1e-12


def test_best_f1_tie_flips_together():
    # the anomaly ties with two normals: cannot take it alone
    y = np.array([1, 0, 0, 0])
    s = np.array([0.5, 0.5, 0.5, 0.1])
    assert M.best_f1_oracle(s, y) == pytest.approx(2 * 1 / 3 * 1 / (1 / 3 + 1))  # P=1/3, R=1
    # PA: segment max 0.9 ties with one normal
    y = np.array([0, 1, 1, 0, 0])
    s = np.array([0.9, 0.2, 0.9, 0.1, 0.0])
    assert M.best_f1_pa_oracle(s, y) == pytest.approx(2 * 2 / (2 + 1 + 2))


# --------------------------------------------------------------------------- point adjustment by hand
def test_point_adjust_hand_cases():
    #            seg@start  gap  seg  1-gap seg   seg@end
    y = np.array([1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1])
    pred = np.array([0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1])
    adj = M.point_adjust(y, pred)
    assert adj.tolist() == [1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1]
    segs = M.segments(y).tolist()
    assert segs == [[0, 2], [4, 6], [7, 9], [10, 12]]
    ev = M.evaluate(pred.astype(float), 0.5, y)
    # point-wise: TP=3, FP=1, P=8
    assert ev["precision"] == pytest.approx(3 / 4)
    assert ev["recall"] == pytest.approx(3 / 8)
    # adjusted: TP=6 (segments 1,3,4), FP=1
    assert ev["precision_pa"] == pytest.approx(6 / 7)
    assert ev["recall_pa"] == pytest.approx(6 / 8)
    assert ev["f1_pa"] == pytest.approx(2 * (6 / 7) * (6 / 8) / (6 / 7 + 6 / 8))


def test_degenerate_no_anomalies_and_all_anomalies():
    s = np.linspace(0, 1, 50)
    ev = M.evaluate(s, 0.9, np.zeros(50, dtype=int))
    assert ev["n_anomalies"] == 0 and ev["n_predicted"] == 5
    for k in ("recall", "f1", "recall_pa", "f1_pa", "auc_roc", "auc_pr", "best_f1_oracle",
              "best_f1_pa_oracle", "vus_pr"):
        assert math.isnan(ev[k]), k
    assert ev["precision"] == 0.0
    ev = M.evaluate(s, 0.9, np.ones(50, dtype=int))
    assert math.isnan(ev["auc_roc"])
    assert ev["precision"] == 1.0 and ev["recall"] == pytest.approx(0.1)
    assert ev["recall_pa"] == 1.0 and ev["f1_pa"] == 1.0
    assert ev["best_f1_oracle"] == 1.0 and ev["best_f1_pa_oracle"] == 1.0
    assert ev["auc_pr"] == pytest.approx(1.0) and ev["vus_pr"] == pytest.approx(1.0)
    ev = M.evaluate(s, 2.0, None)
    assert ev["n_predicted"] == 0 and "note" in ev and "f1" not in ev


def test_per_fault_and_summarize():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0, 0])
    faults = np.array(["", "", "cpu", "cpu", "", "net", "net", "", "", ""], dtype=object)
    s = np.array([0, 0, 1, 1, 0, 0.2, 0.9, 0.1, 0.3, 0])
    ev = M.evaluate(s, 0.5, y, faults=faults)
    pf = ev["per_fault"]
    assert set(pf) == {"cpu", "net"}
    assert pf["cpu"]["recall"] == 1.0 and pf["cpu"]["auc_roc"] == 1.0
    assert pf["cpu"]["n_points"] == 2
    assert pf["net"]["recall"] == 0.5
    # net vs normals: 0.9 beats all 6 normals, 0.2 beats 4 of 6 (0.3, 0.1 above? 0.1 below)
    assert pf["net"]["auc_roc"] == pytest.approx((6 + 5) / 12)
    summ = M.summarize({"a": ev, "b": dict(ev, f1=float("nan"), auc_roc=0.0)})
    assert set(summ) == {"entities", "mean", "total"}
    assert summ["mean"]["f1"] == pytest.approx(ev["f1"])  # nanmean
    assert summ["mean"]["auc_roc"] == pytest.approx(ev["auc_roc"] / 2)
    assert summ["mean"]["per_fault"]["cpu"]["recall"] == 1.0
    assert summ["mean"]["n_entities"] == 2


# --------------------------------------------------------------------------- VUS-PR
def test_range_pr_auc_hand_case_and_perfect():
    # l = 0, one segment: the trapezoid PR area from (R=0, P=1)
    y = np.array([0, 1, 1, 0, 0])
    s = np.array([0.1, 0.9, 0.3, 0.5, 0.2])
    # (R,P): (0,1) (.5,1) (.5,.5) (1,2/3) (1,.5) (1,.4)  -> 0.5 + 0.5 * (0.5 + 2/3) / 2
    assert M.range_pr_auc(s, y, window=0) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)
    # existence ratio: TPR = recall * fraction of segments hit
    y = np.array([1, 0, 0, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.2, 0.0, 0.8, 0.3])
    # (0,1) -> (1/3*1/2, 1) -> (2/3, 1) -> (1, 1) -> rest precision < 1 at TPR 1
    assert M.range_pr_auc(s, y, window=0) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    y = np.zeros(500, dtype=int)
    y[0:10] = y[200:203] = y[207:215] = y[480:500] = 1  # start, adjacent, end
    assert M.range_pr_auc(y + 0.0, y, window=0) == pytest.approx(1.0)
    assert M.vus_pr(y + 0.0, y, max_window=0) == pytest.approx(1.0)
    # a score that also ranks the buffer ramps correctly stays ~1 for all l; a binary
    # score ties buffers with normals, which the reference definition penalises
    dist = np.abs(np.arange(500)[:, None] - np.flatnonzero(y)[None, :]).min(axis=1)
    ramp = np.exp(-dist / 10.0)
    assert M.vus_pr(ramp, y, max_window=20) > 0.99
    assert 0.8 < M.vus_pr(y + 0.0, y, max_window=20) < M.vus_pr(ramp, y, max_window=20)
    noise = rng.random(500)
    assert M.vus_pr(noise, y, max_window=20) < M.vus_pr(noise + y, y, max_window=20)


def _reference_range_pr(y, score, window):
    """Loop transcription of TSB-UAD RangeAUC (PR part), 250 sampled thresholds."""
    p = y.sum()
    lab = M.soft_range_labels(y, window)
    segs = M.segments(lab > 0)
    ss = -np.sort(-score)
    tpr, prec = [0.0], [1.0]
    for i in np.linspace(0, len(score) - 1, 250).astype(int):
        pred = score >= ss[i]
        prod = lab * pred
        tp = prod.sum()
        p_new = (p + lab.sum()) / 2
        ex = sum(prod[a:b].sum() > 0 for a, b in segs) / len(segs)
        tpr.append(min(tp / p_new, 1) * ex)
        prec.append(tp / pred.sum())
    tpr.append(1.0)
    tpr, prec = np.array(tpr), np.array(prec)
    return np.sum((tpr[1:-1] - tpr[:-2]) * (prec[1:] + prec[:-1]) / 2)


def test_range_pr_matches_reference_loop():
    rng = np.random.default_rng(4)
    for trial in range(8):
        y, s = _random_case(rng, int(rng.integers(40, 240)), decimals=trial % 3 + 1)
        for w in (0, 1, 4, 9):
            ref = _reference_range_pr(y, s, w)
            assert M.range_pr_auc(s, y, w) == pytest.approx(ref, abs=1e-12)  # n<=250: all thresholds
            assert M.range_pr_auc(s, y, w, n_thresholds=250) == pytest.approx(ref, abs=1e-12)
    y, s = _random_case(rng, 2000)
    assert M.range_pr_auc(s, y, 6, n_thresholds=250) == pytest.approx(
        _reference_range_pr(y, s, 6), abs=1e-12)


def test_soft_labels_ramp():
    y = np.array([0, 0, 0, 1, 0, 0, 0, 0, 1])
    soft = M.soft_range_labels(y, 4)  # 2 points each side, sqrt(1 - d/4)
    r1, r2 = math.sqrt(0.75), math.sqrt(0.5)
    assert soft == pytest.approx([0, r2, r1, 1, r1, r2, r2, r1, 1])


# --------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("dist", ["pareto", "student_t"])
def test_spot_heavy_tail(dist):
    rng = np.random.default_rng(7)
    draw = (lambda n: rng.pareto(2.5, n)) if dist == "pareto" else (lambda n: rng.standard_t(3, n))
    init = draw(20000)
    q, level = 1e-2, 0.9
    z = M.spot_threshold(init, q=q, init_level=level)
    assert z > np.quantile(init, level)
    rate = float(np.mean(draw(400000) > z))
    assert 0.6 * q < rate < 1.6 * q, rate
    z3 = M.spot_threshold(init)  # paper defaults: q=1e-3, init_level=0.99
    assert z3 > np.quantile(init, 0.99) and z3 > z


def test_spot_short_history_keeps_its_risk():
    """180 calibration rows and a risk of 1 alarm a day at 1 s steps (the quiet fleet's): the
    threshold lies far beyond the rows, and SPOT's tail is the exponential fitted on 10 peaks with
    its scale at the upper 95 % bound (metrics.exponential_scale_bound). On exponential scores,
    whose exceedance is exp(-z), the risk reached exceeds the one asked for in 5 of 100 draws (at
    the mean excess, without the bound: 58 of 100, 23x the risk at the 90th percentile). On
    log-normal scores the GPD's shape fitted on 10 peaks ranges from -1.2 to 0.6 over 20 draws,
    its threshold from the largest row to 20 times it; the bounded exponential stays between 2.7
    and 5.2 times it. A bounded sample gets a threshold beyond its largest row."""
    q = 1 / 86400
    rates = np.array([math.exp(-M.spot_threshold(np.random.default_rng(seed).exponential(1.0, 180), q, 0.98))
                      for seed in range(100)]) / q
    assert np.mean(rates > 1) <= 0.1 and np.median(rates) < 0.05, (np.mean(rates > 1), np.median(rates))
    for seed in range(20):
        s = np.random.default_rng(seed).lognormal(0.0, 1.5, 180)
        assert 2 < M.spot_threshold(s, q, 0.98) / s.max() < 8, seed
    u = np.random.default_rng(0).uniform(0, 1, 180)
    assert M.spot_threshold(u, q, 0.98) > 1.05 * u.max()
    many = np.random.default_rng(1).exponential(1.0, 5000)  # 100 peaks over 0.98 and q n > 1: the GPD as before
    assert M.spot_threshold(many, 1e-3, 0.98) == pytest.approx(M.spot_threshold(many, 1e-3, 0.98, min_peaks=2))
    assert M.spot_threshold(many, 1e-3, 0.98) > np.quantile(many, 0.98)


def test_exponential_scale_bound_is_the_chi_square_bound():
    """The upper bound of an exponential scale from k excesses: 2 k mean / chi2 quantile (tabled
    values: chi2_0.05(20) = 10.851, chi2_0.10(20) = 12.443, chi2_0.05(60) = 43.188), and it
    covers the true scale in about `confidence` of samples."""
    ones = np.ones(10)
    assert M.exponential_scale_bound(ones, 0.95) == pytest.approx(20 / 10.851, rel=2e-3)
    assert M.exponential_scale_bound(ones, 0.90) == pytest.approx(20 / 12.443, rel=2e-3)
    assert M.exponential_scale_bound(np.ones(30), 0.95) == pytest.approx(60 / 43.188, rel=2e-3)
    rng = np.random.default_rng(0)
    covered = np.mean([M.exponential_scale_bound(rng.exponential(2.0, 10)) >= 2.0 for _ in range(2000)])
    assert 0.93 < covered < 0.97, covered


def test_spot_fallbacks_do_not_crash():
    assert M.spot_threshold(np.ones(100)) == 1.0
    z = M.spot_threshold(np.r_[np.zeros(200), np.arange(5.0)])
    assert np.isfinite(z) and z > 0
    assert M.percentile_threshold(np.arange(101.0), 95) == pytest.approx(95.0)


def test_thresholds_take_no_labels():
    for fn in (M.spot_threshold, M.percentile_threshold, M.select_threshold):
        params = inspect.signature(fn).parameters
        assert not any("label" in p or "fault" in p for p in params), fn.__name__
    rng = np.random.default_rng(5)
    s = rng.random(1000)
    thr = M.select_threshold(s[:500], "spot", q=1e-2, level=0.9)
    y1 = (rng.random(1000) < 0.1).astype(int)
    y2 = 1 - y1
    e1, e2 = M.evaluate(s, thr, y1), M.evaluate(s, thr, y2)
    assert e1["threshold"] == e2["threshold"] == thr
    assert e1["n_predicted"] == e2["n_predicted"] == M.evaluate(s, thr, None)["n_predicted"]


def test_oracle_is_fast():
    import time
    rng = np.random.default_rng(6)
    y, s = _random_case(rng, 200_000)
    t0 = time.perf_counter()
    M.best_f1_oracle(s, y)
    M.best_f1_pa_oracle(s, y)
    assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------------------- HitRate@P%
def test_hitrate_hand_computed():
    # 4 features; point 0: order 2,0,3,1; point 1: order 1,3,0,2; point 2 is outside segments
    contrib = np.array([[0.5, 0.1, 0.9, 0.2],
                        [0.3, 0.8, 0.1, 0.4],
                        [9.0, 9.0, 9.0, 9.0]])
    segs = [(0, 1, {0, 1})]  # G = {0, 1}
    # P=100: k=2. point 0: top {2, 0} -> 1/2; point 1: top {1, 3} -> 1/2
    assert M.hitrate(contrib, segs, 100) == pytest.approx(0.5)
    # P=150: k=floor(3)=3. point 0: top {2, 0, 3} -> 1/2; point 1: top {1, 3, 0} -> 2/2
    assert M.hitrate(contrib, segs, 150) == pytest.approx(0.75)
    # |G| = 1, P=150: k = floor(1.5) = 1. point 1: top {1} hits G = {1}
    assert M.hitrate(contrib, [(1, 1, [1])], 150) == 1.0
    assert M.hitrate(contrib, [(0, 0, [1])], 150) == 0.0
    # k is capped at V: everything is found
    assert M.hitrate(contrib, [(0, 1, [0, 1, 2, 3])], 150) == 1.0


def test_hitrate_ties_overlaps_and_empty():
    contrib = np.zeros((3, 4))
    # all tied: stable sort ranks feature 0 first, then 1 ...
    assert M.hitrate(contrib, [(0, 2, [0])], 100) == 1.0
    assert M.hitrate(contrib, [(0, 2, [3])], 100) == 0.0
    # overlapping segments unite their sets at the shared point 1: G = {0, 3}, k = 2 -> {0, 1}
    c = np.array([[0, 0, 0, 1.0], [1.0, 0.5, 0, 0], [0, 0, 0, 1.0]])
    segs = [(0, 1, [3]), (1, 2, [0, 3])]
    # point 0: G={3}, top1={3} -> 1; point 1: G={0,3}, top2={0,1} -> 1/2; point 2: G={0,3}, top2={3,0} -> 1
    assert M.hitrate(c, segs, 100) == pytest.approx((1 + 0.5 + 1) / 3)
    assert math.isnan(M.hitrate(c, [], 100))
    assert math.isnan(M.hitrate(c, [(0, 2, [])], 100))
    assert math.isnan(M.hitrate_random([], 4, 100))
    for bad in ([(2, 1, [0])], [(0, 3, [0])], [(0, 1, [4])], [(-1, 1, [0])]):
        with pytest.raises(ValueError):
            M.hitrate(c, bad, 100)
    with pytest.raises(ValueError, match="NaN"):
        M.hitrate(np.full((3, 4), np.nan), [(0, 0, [0])], 100)


def test_hitrate_random_closed_form_and_simulation():
    # V = 10; |G| = 2 on 3 points, |G| = 4 on 1 point
    segs = [(0, 2, [1, 2]), (5, 5, [0, 3, 4, 9])]
    # P=100: k = |G| -> (3 * 2/10 + 4/10) / 4
    assert M.hitrate_random(segs, 10, 100) == pytest.approx((3 * 0.2 + 0.4) / 4)
    # P=150: k = 3 and 6 -> (3 * 3/10 + 6/10) / 4
    assert M.hitrate_random(segs, 10, 150) == pytest.approx((3 * 0.3 + 0.6) / 4)
    assert M.hitrate_random([(0, 0, range(10))], 10, 150) == 1.0  # k capped at V
    rng = np.random.default_rng(0)
    sims = [M.hitrate(rng.random((6, 10)), segs, 150) for _ in range(3000)]
    assert np.mean(sims) == pytest.approx(M.hitrate_random(segs, 10, 150), abs=0.01)


# --------------------------------------------------------------------------- paired comparison
def test_paired_difference_interval_and_counts():
    a = np.array([0.5, 0.6, 0.7, 0.4, 0.9, np.nan])
    b = np.array([0.4, 0.6, 0.5, 0.5, 0.6, 0.3])
    d = M.paired_difference(a, b, n_boot=2000, seed=1)
    assert d["n"] == 5  # the NaN entity is left out
    assert d["mean"] == pytest.approx(np.mean([0.1, 0.0, 0.2, -0.1, 0.3]))
    assert (d["a"], d["b"]) == (pytest.approx(0.62), pytest.approx(0.52))  # over the same 5 entities
    assert d["lo"] < d["mean"] < d["hi"]
    assert (d["higher"], d["lower"], d["level"]) == (3, 1, 1)
    # a constant difference is certain; a difference whose sign flips is not
    c = M.paired_difference(b + 0.05, b[:6], n_boot=500)
    assert c["lo"] == pytest.approx(0.05) and c["hi"] == pytest.approx(0.05)
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    n = M.paired_difference(x, -x, n_boot=2000)  # differences 2x, symmetric about 0
    assert n["lo"] < 0 < n["hi"]
    assert M.paired_difference([np.nan], [1.0])["n"] == 0
    with pytest.raises(ValueError, match="one length"):
        M.paired_difference([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- alert metrics
def test_alert_metrics_on_a_hand_made_series():
    """Two faults (a cpu one caught late, a network one missed) and three alarms, one of them
    touching no labelled point; 60 s rows over 1,440 points = one day."""
    n = 1440
    y = np.zeros(n, int)
    y[100:104] = 1                     # cpu fault, rows 100..103
    y[500:504] = 1                     # net fault, never flagged
    faults = np.array([""] * n, dtype=object)
    faults[100:104], faults[500:504] = "cpu", "net"
    pred = np.zeros(n, int)
    pred[102:106] = 1                  # caught 2 steps late, runs past the fault: one event, not false
    pred[800:803] = 1                  # false alarm
    pred[900] = 1                      # false alarm
    a = M.alert_metrics(pred, y, faults, step_s=60.0)
    assert a["alarm_events"] == 3 and a["false_alarm_events"] == 2
    assert a["days"] == pytest.approx(1.0) and a["false_alarms_per_day"] == pytest.approx(2.0)
    assert a["false_alarms_per_1k"] == pytest.approx(2000 / 1440)
    assert a["fault_events"] == 2 and a["faults_caught"] == 1 and a["faults_caught_share"] == 0.5
    assert a["delay_steps"] == 2 and a["delay_s"] == 120
    assert a["normal_flagged"] == pytest.approx((2 + 3 + 1) / (n - 8))
    assert a["per_fault_events"] == {"cpu": {"events": 1, "caught": 1, "caught_share": 1.0},
                                     "net": {"events": 1, "caught": 0, "caught_share": 0.0}}


def test_alert_metrics_without_a_step_and_an_alarm_already_on():
    y = np.array([0, 0, 1, 1, 0, 0])
    pred = np.array([0, 1, 1, 1, 1, 0])  # on before the fault: caught with delay 0, not false
    a = M.alert_metrics(pred, y)
    assert a["false_alarm_events"] == 0 and a["faults_caught"] == 1 and a["delay_steps"] == 0
    assert math.isnan(a["false_alarms_per_day"]) and math.isnan(a["delay_s"])  # row numbers: no days
    assert "per_fault_events" not in a


def test_evaluate_reports_alerts_and_summarize_sums_them():
    s = np.zeros(288)
    y = np.zeros(288, int)
    y[10:12] = 1
    s[10:12], s[200] = 5, 5
    ev = M.evaluate(s, 1.0, y, step_s=300.0)  # 288 x 5 min = one day
    assert ev["false_alarm_events"] == 1 and ev["false_alarms_per_day"] == pytest.approx(1.0)
    held = M.evaluate(s, 1.0, y, pred=np.zeros(288, bool), step_s=300.0)  # the alarm state given
    assert held["faults_caught"] == 0 and held["f1"] == 0.0
    tot = M.summarize({"a": ev, "b": held})["total"]
    assert tot["false_alarm_events"] == 1 and tot["days"] == pytest.approx(2.0)
    assert tot["false_alarms_per_day"] == pytest.approx(0.5) and tot["faults_caught_share"] == 0.5
    none = M.evaluate(s, 1.0, None, step_s=300.0)  # no labels: only the alarms
    assert none["alarm_events"] == 2 and none["alarms_per_day"] == pytest.approx(2.0) and "f1" not in none


def test_held_alarms_wait_for_the_hold_and_end_with_the_flags():
    pred = np.array([1, 0, 1, 1, 1, 0, 1, 1, 0])
    assert M.held_alarms(pred, 1).tolist() == pred.astype(bool).tolist()
    assert M.held_alarms(pred, 2).astype(int).tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 0]
    assert M.held_alarms(pred, 3).astype(int).tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    y = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0])
    ev = M.evaluate(pred.astype(float), 0.5, y, hold=2)  # the blips at 0 and 6-7: only 6-7 survives
    assert ev["false_alarm_events"] == 1 and ev["faults_caught"] == 1 and ev["delay_steps"] == 1
    assert ev["f1"] == M.evaluate(pred.astype(float), 0.5, y)["f1"]  # point-wise metrics are of the flags


def test_alarm_lifecycle_is_one_for_live_and_offline():
    """metrics.AlertState (detect_live.py's alerts, one poll at a time) and held_alarms (the alarm
    events test.py counts): on after `hold` flags in a row, off after `clear` unflagged in a row.
    With clear=1 the vectorised held_alarms is the state machine's; with clear=C an alarm lasts at
    least C points, so flapping keeps one alarm, and evaluate counts its events that way."""
    def streamed(flags, hold: int, clear: int) -> np.ndarray:
        state, on = M.AlertState(hold, clear), []
        for f in flags:
            state.update(bool(f))
            on.append(state.on)
        return np.array(on, bool)
    flags = np.random.default_rng(0).random(3000) < 0.35
    for hold in (1, 2, 3):
        assert np.array_equal(M.held_alarms(flags, hold), streamed(flags, hold, 1)), hold
        assert np.array_equal(M.held_alarms(flags, hold, 5), streamed(flags, hold, 5)), hold
    state = M.AlertState(2, 5)
    flapping = [1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert [i for i, f in enumerate(flapping) if state.update(bool(f))] == [1, 12]  # raised at the 2nd flag, cleared at the 5th quiet point
    assert M.held_alarms(flapping, 2, 5).astype(int).tolist() == [0] + [1] * 11 + [0] * 4
    runs, held = M.segments(M.held_alarms(flags, 2, 5)), M.segments(M.held_alarms(flags, 2))
    assert all(b - a >= 5 for a, b in runs) and len(runs) < len(held) / 2
    y = np.zeros(16, int)
    y[7:9] = 1  # a fault on the second flagged pair
    flap = np.array(flapping, float)
    once, apart = M.evaluate(flap, 0.5, y, hold=2, clear=5), M.evaluate(flap, 0.5, y, hold=2)
    assert (once["alarm_events"], once["false_alarm_events"], once["faults_caught"]) == (1, 0, 1)
    assert (apart["alarm_events"], apart["false_alarm_events"], apart["faults_caught"]) == (2, 1, 1)
    assert once["f1"] == apart["f1"]  # point-wise metrics are of the flags


def test_false_alarms_during_another_entitys_fault_are_counted_apart():
    import metrics
    ts = np.arange(10) * 60.0
    y_a = np.zeros(10, int)
    y_b = np.zeros(10, int)
    y_b[3:5] = 1  # b's fault at points 3-4
    masks = metrics.elsewhere_masks({"a": (ts, y_a), "b": (ts, y_b)}, 60.0)
    np.testing.assert_array_equal(masks["a"], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0])  # within one step of b's fault
    assert not masks["b"].any()  # a has no fault
    assert metrics.elsewhere_masks({"a": (np.arange(10), y_a)}, None) == {}  # row numbers share no clock
    pred = np.zeros(10, bool)
    pred[[5, 8]] = True  # two false alarms for a: one during b's fault, one not
    m = metrics.alert_metrics(pred, y_a, step_s=60.0, elsewhere=masks["a"])
    assert m["false_alarm_events"] == 2 and m["false_alarms_elsewhere"] == 1
    assert "false_alarms_elsewhere" not in metrics.alert_metrics(pred, y_a, step_s=60.0)
    tot = metrics.alert_totals([m, m])
    assert (tot["false_alarms_elsewhere"], tot["false_alarms_quiet"]) == (2, 2)  # away from every fault
    assert tot["false_alarms_quiet_per_day"] == pytest.approx(2 / (2 * 10 * 60 / 86400))


def _spiked_day(rng: np.random.Generator, spans: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A day of 1,440 uniform(0, 1) scores with, for each kind -> (start, value), a 4-point
    labelled fault of that kind at that value, or a 1-point false spike where the kind is blank
    -> scores, labels, fault kinds."""
    s, y, kinds = rng.uniform(0, 1, 1440), np.zeros(1440, int), np.array([""] * 1440, dtype=object)
    for kind, (a, v) in spans.items():
        n = 4 if kind.strip() else 1
        s[a:a + n] = v
        if kind.strip():
            y[a:a + n], kinds[a:a + n] = 1, kind
    return s, y, kinds


def test_oracle_alert_ceiling_is_a_knapsack_over_entities_and_per_kind():
    """metrics.oracle_alert_ceiling (an ORACLE: labels choose each entity's threshold): with one
    false alarm event per entity-day over two one-day entities (2 in all), A's threshold goes
    below its false spike and catches both of its faults, B's stays above its three spikes; a
    kind counts only its own fault events, and a budget of 2 a day lets B's fault in too."""
    import metrics
    rng = np.random.default_rng(0)
    series = []
    for spans in ({"cpu": (100, 5.0), "net": (800, 3.0), "": (500, 9.0)},
                  {"net": (200, 2.0), " ": (300, 4.0), "  ": (600, 4.5), "   ": (900, 6.0)}):
        s, y, kinds = _spiked_day(rng, spans)
        series.append((s, y, kinds, 60.0))
    assert metrics.oracle_alert_ceiling(series) == (2, 3)
    assert metrics.oracle_alert_ceiling(series, kind="net") == (1, 2)
    assert metrics.oracle_alert_ceiling(series, kind="cpu") == (1, 1)
    assert metrics.oracle_alert_ceiling(series, budget=2.0) == (3, 3)
    assert metrics.oracle_alert_ceiling([(s, y, None, st) for s, y, _, st in series]) == (2, 3)  # no fault column
    # the same through evaluate's frontiers and alert_totals (what test.py and baselines.py report)
    fronts = [metrics.evaluate(s, 0.5, y, kinds, step_s=60.0) for s, y, kinds, _ in series]
    assert fronts[0]["alert_frontier_oracle"] == [[0, 0], [1, 2]]  # the spike tops both faults
    assert fronts[1]["alert_frontier_oracle"] == [[0, 0], [3, 1]]
    assert metrics.alert_totals(fronts)["caught_at_budget_oracle"] == 2


def test_resource_faults_are_counted_and_ceilinged_apart_from_code_defects():
    """Resource faults (CPU, memory, disk, network) summed over their kinds in alert_totals, and
    their own ORACLE ceiling: the thresholds chosen for them alone. One entity-day holds a CPU
    fault that tops everything, an exception just below it and a network delay under three false
    spikes; the other holds only an exception. At 1 false alarm per entity-day (2 in all) the
    thresholds catch both of the first entity's top faults and the second's exception, but the
    network delay would cost 3 false alarms: 1 of the 2 resource faults."""
    import metrics
    assert all(map(metrics.is_resource_fault, ("cpu_contention", "cpu_consumed", "network_delay", "cpu-stress",
                                               "memory-stress", "network-delay", "io_stress", "disk-fill")))
    assert not any(map(metrics.is_resource_fault, ("return", "exception", "pod-failure", "unlabelled", "ratio")))
    rng = np.random.default_rng(0)
    ents, series = [], []
    for spans in ({"cpu_contention": (100, 9.0), "exception": (300, 8.0), "network_delay": (500, 3.0),
                   "": (700, 4.0), " ": (900, 5.0), "  ": (1100, 4.5)},
                  {"exception": (100, 9.0), "": (700, 6.0)}):
        s, y, kinds = _spiked_day(rng, spans)
        ents.append(metrics.evaluate(s, 7.0, y, kinds, step_s=60.0))
        series.append((s, y, kinds, 60.0))
    assert metrics.oracle_alert_ceiling(series, kind=metrics.is_resource_fault) == (1, 2)
    assert metrics.oracle_alert_ceiling(series, budget=3.0, kind=metrics.is_resource_fault) == (2, 2)
    assert ents[0]["alert_frontier_resource_oracle"] == [[0, 1], [3, 2]]
    assert "alert_frontier_resource_oracle" not in ents[1]
    tot = metrics.alert_totals(ents)
    assert tot["resource_faults"] == {"events": 2, "caught": 1, "caught_share": 0.5}  # the label-free 7.0
    assert tot["per_fault_events"]["exception"]["caught"] == 2
    assert tot["caught_at_budget_oracle"] == 3  # both exceptions and the CPU fault, no false alarm
    assert tot["resource_caught_at_budget_oracle"] == 1
