"""The scorer's second half (scoring.py): normalisation, smoothing, calibration, bounds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scoring
from config import Config, parse_config
from puad import PUAD, latent_memory, score_series


def _cfg(*args):
    return parse_config(["--preset=test", *args])


def _fit(cfg, x=None, mu=None, constant=None, theta0=None, memory=None, scores=None, step_s=None) -> scoring.Scorer:
    x = np.zeros((len(scores), 1)) if x is None else x
    return scoring.Scorer.from_config(cfg).fit(scoring.Reconstruction(x, mu, theta0, scores), constant, memory, step_s)


def _apply(scorer: scoring.Scorer, x=None, mu=None, theta0=None, scores=None):
    rec = scoring.Reconstruction(np.zeros((len(scores), 1)) if x is None else x, mu, theta0, scores)
    return scorer.score(rec), scorer.name(rec)


def test_smooth_is_a_causal_moving_mean():
    x = np.array([0.0, 3, 6, 9, 12])
    np.testing.assert_allclose(scoring.smooth(x, 3), [0, 1.5, 3, 6, 9])
    np.testing.assert_allclose(scoring.smooth(x, 1), x)
    y = x.copy()
    y[-1] = 1e6  # the future never changes the past
    np.testing.assert_allclose(scoring.smooth(y, 3)[:-1], scoring.smooth(x, 3)[:-1])
    two = scoring.smooth(np.stack([x, 2 * x], 1), 2)  # per column for contributions
    np.testing.assert_allclose(two[:, 1], 2 * two[:, 0])


def test_norm_score_measures_each_feature_against_its_own_normal_error():
    rng = np.random.default_rng(0)
    n = 2000
    mu = np.zeros((n, 3))
    x = rng.normal(0, [0.2, 0.02, 0.0], size=(n, 3))  # a noisy, a quiet and a constant feature
    cfg = _cfg("--smooth=1", "--spot_q=1e-3")
    cal = _fit(cfg, x, mu, np.array([False, False, True]))
    assert cal.scale_[0] == pytest.approx(0.2, rel=0.1)
    assert cal.scale_[1] == pytest.approx(cfg.score_floor)  # the floor, not 0.02
    assert cal.scale_[2] == pytest.approx(scoring.CONST_FLOOR)  # constant over train: the smaller floor
    test = np.zeros((4, 3))
    test[1, 0] = 0.6     # 3 sigma of the noisy feature: normal
    test[2, 1] = 2.0     # far outside the quiet feature's floor
    test[3, 2] = -1.0    # a constant feature left its value (a stopped service's `up`)
    s, contrib = _apply(cal, test, np.zeros((4, 3)))
    assert s[1] < cal.threshold_ < s[2] < s[3]
    assert contrib.shape == (4, 3) and contrib[3].argmax() == 2
    np.testing.assert_allclose((contrib * cal.usual_).mean(1), s)  # each over its usual level ...
    as_scored = _fit(_cfg("--smooth=1", "--spot_q=1e-3", "--name_q=0"), x, mu, np.array([False, False, True]))
    s0, c0 = _apply(as_scored, test, np.zeros((4, 3)))
    assert as_scored.usual_ is None
    np.testing.assert_allclose(s0, s)
    np.testing.assert_allclose(c0.mean(1), s)  # ... or as scored: they average to the score


def test_a_feature_is_named_for_leaving_its_own_normal_not_for_being_large():
    rng = np.random.default_rng(4)
    n = 2000
    x = rng.normal(0, [0.05, 0.005], size=(n, 2))  # both under the floor: scored in the same units
    cfg = _cfg("--smooth=1")
    cal = _fit(cfg, x, np.zeros((n, 2)))
    q0 = np.quantile(((x - cal.center_) / cal.scale_) ** 2, cfg.name_q, axis=0)
    np.testing.assert_allclose(cal.usual_, np.maximum(q0, scoring.USUAL_FLOOR))
    test = np.array([[0.08, 0.05]])  # the noisy one at 1.6 x its spread, the quiet one at 10 x its own
    s, contrib = _apply(cal, test, np.zeros((1, 2)))
    c = ((test[0] - cal.center_) / cal.scale_) ** 2
    assert c[0] > c[1]  # the larger contribution to the score ...
    assert scoring.top_features(contrib[0], ["noisy", "quiet"], 1)[0][0] == "quiet"  # ... is not the one named
    off = _fit(_cfg("--smooth=1", "--name_q=0"), x, np.zeros((n, 2)))
    assert scoring.top_features(_apply(off, test, np.zeros((1, 2)))[1][0], ["noisy", "quiet"], 1)[0][0] == "noisy"


def test_a_host_level_feature_is_named_but_not_scored():
    """A host-level feature (a node's CPU, the same in every pod on the node: Scorer.fit's host)
    adds nothing to the score however far it moves, but is still named when it moves with the
    service's own; score_many gives each series what its scorer gives alone, host or not; an
    all-False host is none (the scorer as before)."""
    rng = np.random.default_rng(3)
    n, V = 2000, 3
    x = rng.normal(0, 0.2, size=(n, V))
    cfg = _cfg("--smooth=1", "--latent_weight=0")
    host = np.array([False, False, True])
    plain, hosted = _fit(cfg, x, np.zeros((n, V))), scoring.Scorer.from_config(cfg).fit(
        scoring.Reconstruction(x, np.zeros((n, V))), host=host)
    assert plain.host_ is None and hosted.host_.tolist() == host.tolist()
    assert scoring.Scorer.from_config(cfg).fit(scoring.Reconstruction(x, np.zeros((n, V))), host=np.zeros(V, bool)).host_ is None
    test = np.zeros((3, V))
    test[1, 2] = 5.0                # only the node moved: 25 sigma
    test[2, 0], test[2, 2] = 5.0, 5.0  # the service and its node together
    s_plain, _ = _apply(plain, test, np.zeros((3, V)))
    s_host, named = _apply(hosted, test, np.zeros((3, V)))
    assert s_plain[1] > plain.threshold_  # scored, the node alone alarms the service ...
    assert s_host[1] == pytest.approx(s_host[0]) and s_host[1] < hosted.threshold_  # ... not with host
    assert s_host[2] > hosted.threshold_
    assert named[2, 2] > 1 and named[2, 2] == pytest.approx(named[2, 0], rel=0.2)  # the node is named beside it
    scores, many_named = scoring.score_many([hosted, plain], np.stack([test, test]), np.zeros((2, 3, V)), None)
    np.testing.assert_allclose(scores[0], s_host)
    np.testing.assert_allclose(scores[1], s_plain)
    np.testing.assert_allclose(many_named[0], named)


def test_scalar_scores_get_the_same_smoothing_and_threshold_rule():
    rng = np.random.default_rng(1)
    cfg = _cfg("--smooth=4")
    val = rng.random(1000)
    cal = _fit(cfg, scores=val)
    capped = scoring.smooth_scores(val, 4, val.max())
    assert cal.threshold_ == pytest.approx(scoring.spot_threshold(capped, cfg.spot_q, cfg.spot_level))
    s, contrib = _apply(cal, scores=val)
    assert contrib is None
    np.testing.assert_allclose(s, capped)


def test_a_constant_feature_that_did_not_move_is_never_named():
    rng = np.random.default_rng(3)
    n = 500
    x = np.c_[rng.normal(0, 0.2, n), np.full(n, 0.5)]  # feature 1 constant (0.5) over train
    cfg = _cfg("--smooth=1")
    cal = _fit(cfg, x, np.zeros((n, 2)) + [0, 0.5], np.array([False, True]))
    test = np.array([[0.8, 0.5], [0.8, 0.5], [0.0, 0.2]])
    mu = np.array([[0.0, 0.6], [0.0, 0.6], [0.0, 0.5]])  # the model's reconstruction of it wobbles
    s, contrib = _apply(cal, test, mu)
    assert s[0] > 1 and contrib[0, 1] == 0 and contrib[0, 0] > 0  # scored, but not named
    assert s[0] == pytest.approx((((0.8 - cal.center_[0]) / cal.scale_[0]) ** 2 + (0.1 / scoring.CONST_FLOOR) ** 2) / 2)
    assert scoring.top_features(contrib[2], ["a", "b"], 1)[0][0] == "b"  # it left its value: named
    # the fleet's batched path names the same features
    s2, c2 = scoring.score_many([cal, cal], np.stack([test, test]), np.stack([mu, mu]), None)
    np.testing.assert_allclose(c2[1], contrib)
    np.testing.assert_allclose(s2[0], s)



def _follows_feature_0(w):
    """A model that reconstructs feature 1 from feature 0 (3 x its square: ~0 on normal data) and
    the others as 0."""
    mu = np.zeros_like(w, dtype=np.float64)
    mu[..., 1] = 3 * w[..., 0] ** 2
    return mu


def test_explain_names_the_feature_that_disturbs_the_others_reconstruction():
    rng = np.random.default_rng(5)
    n, T = 1000, 4
    x = rng.normal(0, 0.05, size=(n, 3))
    cal = _fit(_cfg("--smooth=1"), x, _follows_feature_0(x))
    test = rng.normal(0, 0.05, size=(12, 3))
    test[9:, 0] = 1.0  # feature 0 jumps; feature 1 stays normal, but its reconstruction follows feature 0
    rec = scoring.Reconstruction(test, _follows_feature_0(test))
    named = cal.name(rec)
    feats = ["cause", "follower", "other"]
    assert scoring.top_features(named[10], feats, 1)[0][0] == "follower"  # residuals blame the follower
    w = cal.explain(rec, _follows_feature_0, np.array([10, 11]), T)
    assert scoring.top_features(w[10], feats, 1)[0][0] == "cause"  # repairing it repairs the follower
    np.testing.assert_allclose(w[:10], np.log1p(named[:10]))  # rows not asked: their named contributions
    np.testing.assert_allclose(cal.explain(rec, _follows_feature_0, np.array([10]), T)[10], w[10])
    off = _fit(_cfg("--smooth=1", "--repair_weight=0"), x, _follows_feature_0(x))
    np.testing.assert_allclose(off.explain(rec, _follows_feature_0, np.array([10, 11]), T), np.log1p(off.name(rec)))
    # a feature still at its constant training value gets no gain, however it moves the others
    const = np.c_[x[:, :2], np.zeros(n)]
    pinned = _fit(_cfg("--smooth=1"), const, np.zeros((n, 3)), np.array([False, False, True]))
    t2 = np.c_[test[:, :2], np.zeros(12)]

    def follows_feature_2(w):
        mu = np.zeros_like(w, dtype=np.float64)
        mu[..., 0] = w[..., 0] + 5 * (w[..., 2] == 0)  # the model misreads the constant's value
        mu[..., 2] = 0.5  # and reconstructs it elsewhere: repairing it would remove feature 0's residual
        return mu
    rec2 = scoring.Reconstruction(t2, follows_feature_2(t2))
    named2 = pinned.name(rec2)
    w2 = pinned.explain(rec2, follows_feature_2, np.array([10]), T)
    assert named2[10, 2] == 0 and w2[10, 2] == 0
    free = _fit(_cfg("--smooth=1"), const, np.zeros((n, 3)))  # not known as constant
    named3 = free.name(rec2)
    w3 = free.explain(rec2, follows_feature_2, np.array([10]), T)
    assert w3[10, 2] > np.log1p(named3[10, 2]) + 1  # then it would get the gain

def test_drift_guard_follows_a_lasting_level_shift_but_not_a_fault():
    rng = np.random.default_rng(2)
    cfg = _cfg("--smooth=1", "--drift_window=200")
    cal = _fit(cfg, scores=rng.exponential(1.0, 1000))
    assert len(cal.recent_) == 200 and cal.median_ == pytest.approx(np.log(2), rel=0.15)
    test = rng.exponential(1.0, 1200)
    test[100:150] += 50      # a fault: 50 points far above the threshold
    test[400:] += 20         # a level shift that lasts (a new normal, e.g. memory after a restart)
    s, _ = _apply(cal, scores=test)
    thr = cal.thresholds(s)
    assert thr.shape == s.shape and thr.min() == pytest.approx(cal.threshold_)
    assert (s[100:150] > thr[100:150]).all()              # the fault alarms throughout
    assert (thr[:100] < cal.threshold_ + 0.5).all()         # normal scores raise it little
    assert (s[400:450] > thr[400:450]).all()              # the shift alarms at first ...
    assert (s[700:] > thr[700:]).mean() < 0.05             # ... and stops once it is most of the window
    off = _fit(_cfg("--smooth=1", "--drift_window=0"), scores=rng.exponential(1.0, 1000))
    assert (off.thresholds(s) == off.threshold_).all()
    # live: the threshold of the next point from the scores before it is the same number
    history = list(cal.recent_)
    for i, x in enumerate(s[:600]):
        assert cal.next_threshold(np.array(history)) == pytest.approx(thr[i], rel=1e-12)
        history.append(x)


def test_score_stays_finite_for_extreme_inputs():
    torch.manual_seed(0)
    cfg = _cfg()
    model = PUAD(cfg, 4).eval()
    rng = np.random.default_rng(2)
    calib = rng.random((200, 4)).astype(np.float32)
    memory = latent_memory(model, [rng.random((300, 4))], cfg)  # with the latent term
    cal = scoring.Scorer.from_config(cfg).fit(score_series(model, calib, cfg.seq_len), memory=memory)
    assert cal.latent_ > 0 and len(cal.memory_) == len(memory)
    test = rng.random((100, 4))
    test[50, 0], test[60, 1], test[70, 2], test[80, 3] = 1e18, -1e30, 3.4e38, np.finfo(np.float64).max
    out = score_series(model, test, cfg.seq_len)
    s = cal.score(out)
    assert np.isfinite(s).all() and np.isfinite(out.mu).all()
    assert np.abs(out.x).max() <= 10.0  # clipped before the model
    assert s[50:55].min() > cal.threshold_  # and the extreme point still scores as anomalous


def test_knn_distance_is_the_mean_distance_to_the_k_nearest():
    from sklearn.neighbors import NearestNeighbors
    rng = np.random.default_rng(5)
    memory, z = rng.normal(size=(300, 6)), rng.normal(size=(5000, 6))  # more rows than one chunk
    want = NearestNeighbors(n_neighbors=5).fit(memory).kneighbors(z)[0].mean(1)
    np.testing.assert_allclose(scoring.Memory(memory).distance(z, 5), want, rtol=1e-5, atol=1e-5)  # float32
    np.testing.assert_allclose(scoring.Memory(memory[:2]).distance(z[:3], 5),  # k > M: all of them
                               np.linalg.norm(z[:3, None] - memory[None, :2], axis=-1).mean(1), rtol=1e-5)
    assert scoring.Memory(memory).distance(z.reshape(2, 2500, 6), 5).shape == (2, 2500)


def test_latent_term_scores_a_window_unlike_the_entitys_normal_windows():
    """Two points with the same residuals: the one whose theta0 is far from every normal window's
    scores higher. The term is latent_weight x the distance over the calibration rows' median
    distance to the memory; latent_weight=0 is the reconstruction score alone."""
    rng = np.random.default_rng(6)
    n, V, d = 1000, 3, 4
    x, theta0, memory = rng.normal(0, 0.1, (n, V)), rng.normal(0, 1, (n, d)), rng.normal(0, 1, (400, d))
    cfg = _cfg("--smooth=1", "--latent_weight=2")
    cal = _fit(cfg, x, np.zeros((n, V)), theta0=theta0, memory=memory)
    dist = scoring.Memory(memory).distance(theta0, scoring.LATENT_K)
    assert cal.latent_ == pytest.approx(2 / np.median(dist))
    test = scoring.Reconstruction(np.full((2, V), 0.05), np.zeros((2, V)), np.stack([memory[0], np.full(d, 8.0)]))
    s, contrib = cal.score(test), cal.name(test)
    np.testing.assert_allclose(contrib[0], contrib[1])  # the same residuals name the same features ...
    assert s[0] < cal.threshold_ < s[1]  # ... but only the unfamiliar state is anomalous
    np.testing.assert_allclose(s - s[0], cal.latent_ * (scoring.Memory(memory).distance(test.theta0, 5)
                                                        - scoring.Memory(memory).distance(test.theta0[:1], 5)),
                               atol=1e-5)  # float32 distances
    off = _fit(_cfg("--smooth=1", "--latent_weight=0"), x, np.zeros((n, V)), theta0=theta0, memory=memory)
    assert off.latent_ == 0 and off.memory_ is None
    s0, _ = _apply(off, test.x, test.mu)  # no theta0 needed without the term
    assert s0[0] == pytest.approx(s0[1])
    with pytest.raises(ValueError, match="theta0"):
        _apply(cal, test.x, test.mu)
    # the fleet's batched path gives each entity's numbers, each with its own memory
    other = _fit(cfg, x, np.zeros((n, V)), theta0=theta0, memory=memory + 3.0)
    sb, cb = scoring.score_many([cal, other], np.stack([test.x] * 2), np.stack([test.mu] * 2), np.stack([test.theta0] * 2))
    np.testing.assert_allclose(sb[0], s)
    np.testing.assert_allclose(sb[1], other.score(test))
    np.testing.assert_allclose(cb[0], contrib)


def test_fleet_latent_search_equals_each_entitys_own():
    """score_many searches every entity's memory at once (MemoryBank: one baddbmm + top-k for
    all) and gives each entity the latent term, scores and names it has alone: memories of
    different sizes, one smaller than k, one absent (latent_ 0). The stack is built once for a
    list of memories and kept; each Memory then reads its rows of it, with the same numbers."""
    rng = np.random.default_rng(7)
    n, V, d, T = 300, 3, 6, 40
    cfg = _cfg("--smooth=3")
    x, theta0 = rng.normal(0, 0.1, (n, V)), rng.normal(0, 1, (n, d))
    sizes = [1000, 400, 3, None, 1000]
    scorers = [_fit(cfg, x, np.zeros((n, V)), theta0=theta0, memory=None if m is None else rng.normal(0.3 * i, 1, (m, d)))
               for i, m in enumerate(sizes)]
    assert scorers[3].latent_ == 0 and all(s.latent_ > 0 for i, s in enumerate(scorers) if i != 3)
    E = len(scorers)
    tx, tz = rng.normal(0, 0.1, (E, T, V)), rng.normal(0, 2, (E, T, d)).astype(np.float32)
    tz[:, :20] = tz[:, :1]  # a series' first points share its first window's theta0, as in a live poll
    tz[1, 31] = tz[1, 30]  # a repeat in one entity only
    alone = lambda: np.stack([s.latent_term(tz[i]) * np.ones(T) for i, s in enumerate(scorers)])  # noqa: E731
    want = alone()
    got = scoring.latent_many(scorers, tz, T)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got[3] == 0).all() and (got[2] > 0).all()
    bank = scoring._BANK[0]
    np.testing.assert_allclose(alone(), want, rtol=1e-6)  # each Memory, now rows of the stack
    scores, named = scoring.score_many(scorers, tx, np.zeros((E, T, V)), tz)
    assert scoring._BANK[0] is bank  # the same memories: the stack is reused
    for i, s in enumerate(scorers):
        rec = scoring.Reconstruction(tx[i], np.zeros((T, V)), tz[i])
        np.testing.assert_allclose(scores[i], s.score(rec), rtol=1e-5)
        np.testing.assert_allclose(named[i], s.name(rec), rtol=1e-5)
    # blocks of one entity's row at a time give the same numbers
    dist = bank.distance(tz, scoring.LATENT_K, block=1000)
    np.testing.assert_allclose(dist * np.array([s.latent_ for s in scorers])[:, None], want, rtol=1e-5)
    scoring.score_many(scorers[:2], tx[:2], np.zeros((2, T, V)), tz[:2])
    assert scoring._BANK[0] is not bank and len(scoring._BANK[0].memories) == 2  # other entities: a new stack
    with pytest.raises(ValueError, match="theta0"):
        scoring.score_many(scorers, tx, np.zeros((E, T, V)), None)


def test_live_detector_never_reads_a_non_finite_score_as_normal(tmp_path, monkeypatch):
    """A NaN score (impossible with clipped inputs, so forced here) skips the window, counts it as
    reason="non_finite" and leaves puad_anomaly where it was; an extreme input scores finite."""
    import detect_live
    from puad import model_id
    from utils import Scaler
    torch.manual_seed(0)
    cfg = _cfg("--smooth=2", "--alarm_hold=1")
    opts = detect_live.LiveOptions(live_log=str(tmp_path / "events.jsonl"))
    V = 3
    model = PUAD(cfg, V).eval()
    ckpt = {"features": ["a", "b", "c"], "config": {}, "model": model.state_dict()}
    ckpt["model_id"] = model_id(ckpt["model"])
    rng = np.random.default_rng(0)
    scaler = Scaler().fit(rng.random((100, V)))
    cal = scoring.Scorer.from_config(cfg).fit(score_series(model, scaler.transform(rng.random((200, V))), cfg.seq_len))
    states = {"svc": detect_live.EntityState(scaler)}
    det = detect_live.Detector(cfg, opts, ckpt, model, ["svc"], {"rate_window": "1s"}, [], states, {"svc": cal})
    n = cfg.seq_len + cfg.smooth - 1
    window = rng.random((n + 1, V))  # the window and the rate window's point before it
    window[-1, 0] = 1e30
    step = opts.live_step

    def rows(session, prom, metric_set, metrics, entities, first, end, *a, **k):
        ts = range(first, end + step, step)
        return np.stack([window[[(t // step) % (n + 1) for t in ts]]])  # (entities, points, V)
    monkeypatch.setattr(detect_live, "fetch_presence", lambda s, p, grid, *a, **k: {int(t): 1 for t in grid})
    monkeypatch.setattr(detect_live, "fetch_rows", rows)
    end = (n + 1) * step * 10 + n * step  # the newest point is the window's last row (the 1e30)
    det.poll(end)
    g = det.gauges
    assert g.scored.labels("svc")._value.get() == 1 and np.isfinite(g.score.labels("svc")._value.get())
    assert g.anomaly.labels("svc")._value.get() == 1 and g.alert.labels("svc")._value.get() == 1  # 1e30: far out
    # the alarm names its metrics as test.py names a flagged row (scoring.explain on the same rows)
    from puad import window_reconstructor
    x = det.scoring.last_input["svc"][0].x
    weights = cal.explain(score_series(model, x, cfg.seq_len), window_reconstructor(model, False), np.array([len(x) - 1]),
                          cfg.seq_len)
    assert det.top["svc"] == [f for f, _ in scoring.top_features(weights[-1], ["a", "b", "c"], 3)]
    assert det.top["svc"][0] == "a"
    monkeypatch.setattr(det.scoring, "score", lambda ready, before=None: {e: float("nan") for e in ready})
    det.poll(end + step)
    assert g.skipped.labels("svc", "non_finite")._value.get() == 1
    assert g.scored.labels("svc")._value.get() == 1
    assert g.anomaly.labels("svc")._value.get() == 1 and det.alerts.on("svc")  # kept, neither raised nor cleared by a NaN


def test_smoothing_cap_keeps_a_short_faults_scores_off_the_points_after_it():
    """A 4-point fault of raw score 1,000 over normal points at 1: the causal mean of 5 would
    score the 4 points after the fault 200-800, above most of the fault's own; capped at the raw
    score plus the calibration's largest raw score (3 here) they score at most 4."""
    raw = np.ones(20)
    raw[10:14] = 1000.0
    plain = scoring.smooth(raw, 5)
    capped = scoring.smooth_scores(raw, 5, cap=3.0)
    assert plain[14:18].min() >= 200 and capped[14:18].max() <= 4.0
    assert np.array_equal(capped[10:14], plain[10:14])  # the fault itself keeps the mean
    np.testing.assert_allclose(capped[:10], plain[:10])  # normal noise keeps the mean too
    cal = _fit(Config(smooth=5), scores=np.r_[np.ones(50), 3.0])
    assert cal.cap_ == 3.0
    assert np.allclose(_apply(cal, scores=raw)[0], capped)


def test_alarm_budget_sets_spot_risk_from_the_step():
    assert scoring.spot_risk(1.0, 1e-2, 60.0) == pytest.approx(1 / 1440)  # 1 false alarm a day at 60 s steps
    assert scoring.spot_risk(1.0, 1e-2, None) == 1e-2  # row numbers: no day to spread it over
    assert scoring.spot_risk(0.0, 1e-2, 60.0) == 1e-2
    rng = np.random.default_rng(0)
    scores = rng.exponential(size=2000)
    per_day = _fit(Config(smooth=1), scores=scores, step_s=60.0).threshold_
    assert per_day > _fit(Config(smooth=1), scores=scores).threshold_  # q 7e-4 is stricter than 1e-2


def test_explain_of_a_point_does_not_depend_on_the_other_points_asked():
    """A point's repair gain is computed at that point alone, so its weights are the same whether it
    is named alone or among many (test.py names a sample of each run); points not asked for keep
    their contributions."""
    rng = np.random.default_rng(8)
    V, T = 12, 4
    x = rng.normal(0, 0.05, size=(400, V))
    cal = _fit(_cfg("--smooth=3"), x, _follows_feature_0(x))
    test = rng.normal(0, 0.05, size=(40, V))
    test[20:, :] += rng.normal(0, 1.0, size=(20, V))  # many features move, differently at each point
    rec = scoring.Reconstruction(test, _follows_feature_0(test))
    every = cal.explain(rec, _follows_feature_0, np.arange(20, 40), T)
    alone = cal.explain(rec, _follows_feature_0, np.array([30]), T)
    np.testing.assert_allclose(alone[30], every[30], atol=1e-9)
    np.testing.assert_allclose(alone[31], np.log1p(cal.name(rec)[31]))  # not asked: contributions only


def test_named_rows_keeps_the_highest_flagged_runs_and_every_interpretation_segment():
    flagged = np.zeros(100, bool)
    flagged[[10, 20, 30, 40]] = True
    scores = np.zeros(100)
    scores[[10, 20, 30, 40]] = [5.0, 1.0, 9.0, 2.0]
    rows = scoring.named_rows(flagged, [(60, 99, [0])], 5, scores, max_runs=2)
    assert set(rows) & {10, 20, 30, 40} == {10, 30}  # the two runs that peak highest
    assert len(set(rows) & set(range(60, 100))) == 5  # 5 evenly spaced rows of the segment
    assert set(scoring.named_rows(flagged)) == {10, 20, 30, 40}  # no scores: every run


def test_hitrate_sample_weights_count_only_each_segments_own_sample():
    import metrics
    segs = [(10, 109, [0])]  # 100 points, 10 sampled
    w = metrics.sample_weights(200, segs, 10)
    rows = metrics.segment_sample(10, 109, 10)
    assert len(rows) == 10 and rows[0] == 10 and rows[-1] == 109
    assert np.count_nonzero(w) == 10 and np.allclose(w[rows], 10.0)
    contrib = np.zeros((200, 2))
    contrib[:, 0] = np.where(np.arange(200) < 60, 1.0, 0.0)  # feature 0 named in the segment's first half only
    contrib[:, 1] = 0.5
    full = metrics.hitrate(contrib, segs, 100)
    assert metrics.hitrate(contrib, segs, 100, w) == pytest.approx(full, abs=0.1)  # the sample stands for all
    assert np.count_nonzero(metrics.sample_weights(200, segs, 0)) == 100  # 0: every point
