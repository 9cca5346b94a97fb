"""The scorer's second half (scoring.py): normalisation, smoothing, calibration, bounds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scoring
from config import parse_config
from puad import PUAD, score_series


def _cfg(*args):
    return parse_config(["--preset=test", *args])


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
    cal = scoring.calibrate({"x": x, "mu": mu, "constant": np.array([False, False, True])}, cfg)
    assert cal.scale[0] == pytest.approx(0.2, rel=0.1)
    assert cal.scale[1] == pytest.approx(cfg.score_floor)  # the floor, not 0.02
    assert cal.scale[2] == pytest.approx(cfg.const_floor)  # constant over train: the smaller floor
    test = np.zeros((4, 3))
    test[1, 0] = 0.6     # 3 sigma of the noisy feature: normal
    test[2, 1] = 2.0     # far outside the quiet feature's floor
    test[3, 2] = -1.0    # a constant feature left its value (a stopped service's `up`)
    s, contrib = scoring.apply(cal, {"x": test, "mu": np.zeros((4, 3))})
    assert s[1] < cal.threshold < s[2] < s[3]
    assert contrib.shape == (4, 3) and contrib[3].argmax() == 2
    np.testing.assert_allclose(contrib.mean(1), s)  # contributions average to the score


def test_scalar_scores_get_the_same_smoothing_and_threshold_rule():
    rng = np.random.default_rng(1)
    cfg = _cfg("--smooth=4", "--threshold=percentile", "--percentile=99")
    val = rng.random(1000)
    cal = scoring.calibrate({"scores": val}, cfg)
    assert cal.threshold == pytest.approx(np.percentile(scoring.smooth(val, 4), 99))
    s, contrib = scoring.apply(cal, {"scores": val})
    assert contrib is None
    np.testing.assert_allclose(s, scoring.smooth(val, 4))


@pytest.mark.parametrize("score", scoring.SCORES)
def test_score_stays_finite_for_extreme_inputs(score):
    torch.manual_seed(0)
    cfg = _cfg(f"--score={score}")
    model = PUAD(cfg, 4).eval()
    rng = np.random.default_rng(2)
    calib = rng.random((200, 4)).astype(np.float32)
    cal = scoring.calibrate(score_series(model, calib, cfg.seq_len), cfg)
    test = rng.random((100, 4))
    test[50, 0], test[60, 1], test[70, 2], test[80, 3] = 1e18, -1e30, 3.4e38, np.finfo(np.float64).max
    out = score_series(model, test, cfg.seq_len)
    s, _ = scoring.apply(cal, out)
    assert np.isfinite(s).all() and np.isfinite(out["mu"]).all()
    assert np.abs(out["x"]).max() <= 10.0  # clipped before the model
    if score != "nll":
        assert s[50:55].min() > cal.threshold  # and the extreme point still scores as anomalous


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="score must be one of"):
        scoring.contributions(np.zeros((2, 2)), np.zeros((2, 2)), None, "fast")


def test_live_detector_never_reads_a_non_finite_score_as_normal(tmp_path, monkeypatch):
    """A NaN score (impossible with clipped inputs, so forced here) skips the window, counts it as
    reason="non_finite" and leaves puad_anomaly where it was; an extreme input scores finite."""
    import detect_live
    from puad import model_id
    from utils import Scaler
    torch.manual_seed(0)
    cfg = _cfg(f"--live_log={tmp_path / 'events.jsonl'}", "--smooth=2")
    V = 3
    model = PUAD(cfg, V).eval()
    ckpt = {"features": ["a", "b", "c"], "config": {}, "model": model.state_dict()}
    ckpt["model_id"] = model_id(ckpt["model"])
    rng = np.random.default_rng(0)
    scaler = Scaler().fit(rng.random((100, V)))
    cal = scoring.calibrate(score_series(model, scaler.transform(rng.random((200, V))), cfg.seq_len), cfg)
    states = {"svc": {"local": None, "scaler": scaler, "use_local": False}}
    det = detect_live.Detector(cfg, ckpt, model, ["svc"], {"rate_window": "1s"}, [], states, {"svc": cal})
    n = cfg.seq_len + cfg.smooth - 1
    window = rng.random((n + 1, V))  # the window and the rate window's point before it
    window[-1, 0] = 1e30
    step = cfg.live_step

    def rows(session, prom, metric_set, metrics, entities, first, end, *a, **k):
        ts = range(first, end + step, step)
        return np.stack([window[[(t // step) % (n + 1) for t in ts]]])  # (entities, points, V)
    monkeypatch.setattr(detect_live, "fetch_presence", lambda s, p, grid, *a, **k: {int(t): 1 for t in grid})
    monkeypatch.setattr(detect_live, "fetch_rows", rows)
    end = (n + 1) * step * 10 + n * step  # the newest point is the window's last row (the 1e30)
    det.poll(end)
    assert det.c_scored.labels("svc")._value.get() == 1 and np.isfinite(det.g_score.labels("svc")._value.get())
    assert det.g_anomaly.labels("svc")._value.get() == 1  # the 1e30 is far out of range
    monkeypatch.setattr(det, "score_windows", lambda ready: {e: float("nan") for e in ready})
    det.poll(end + step)
    assert det.c_skipped.labels("svc", "non_finite")._value.get() == 1
    assert det.c_scored.labels("svc")._value.get() == 1
    assert det.g_anomaly.labels("svc")._value.get() == 1  # kept, neither raised nor cleared by a NaN
