"""Each baseline runs end to end on a small real ASD entity and writes a valid metrics.json."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"


def _strict(text: str) -> dict:
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def test_baselines_write_valid_metrics(tmp_path):
    if not (DATA / "ASD" / "omi-1").is_dir():
        pytest.skip(f"{DATA} not available")
    import baselines
    out = tmp_path / "bl"
    res = baselines.main([f"--data={DATA / 'ASD'}", "--entities=omi-1", f"--out_dir={out}",
                          "--methods=pca,iforest,knn,ae", "--ae_epochs=2",
                          "--knn_max_train=2000", "--iforest_trees=50", "--seed=0"])
    assert set(res) == {"pca", "iforest", "knn", "ae"}
    for method in res:
        doc = _strict((out / method / "metrics.json").read_text())
        assert set(doc["entities"]) == {"omi-1"}
        ent, mean = doc["entities"]["omi-1"], doc["mean"]
        for key in ("precision", "recall", "f1", "precision_pa", "recall_pa", "f1_pa",
                    "auc_roc", "auc_pr", "best_f1_oracle", "best_f1_pa_oracle", "vus_pr",
                    "threshold", "n_points", "n_anomalies", "n_predicted"):
            assert key in ent, (method, key)
            assert math.isfinite(ent[key]), (method, key, ent[key])
        assert 0 < ent["auc_pr"] <= 1 and mean["auc_pr"] == pytest.approx(ent["auc_pr"])
        assert ent["n_points"] == 4320 and ent["n_anomalies"] > 0
        assert ent["best_f1_oracle"] >= ent["f1"] - 1e-12  # the oracle bounds the honest F1
        assert doc["method"] == method and doc["config"]["seed"] == 0
        # the test scores as test.py writes them, the flags those of the metrics
        scores = pd.read_csv(out / method / "scores_omi-1.csv")
        assert list(scores.columns) == ["timestamp", "score", "threshold", "prediction", "label"] and len(scores) == 4320
        assert (scores["prediction"] == (scores["score"] > scores["threshold"])).all()
        assert scores["prediction"].sum() == ent["n_predicted"] and scores["label"].sum() == ent["n_anomalies"]
        # interpretation: omi-1 has interpretation.csv; only PCA and the AE score features
        keys = ("hitrate_100", "hitrate_150", "hitrate_100_random", "hitrate_150_random")
        if method in ("pca", "ae"):
            for key in keys:
                assert 0 <= ent[key] <= 1 and mean[key] == pytest.approx(ent[key]), (method, key)
            assert ent["hitrate_100_random"] < ent["hitrate_150_random"]
        else:
            assert not any(key in ent or key in mean for key in keys), method


def test_point_output_aligns_reconstructions_with_points():
    import numpy as np

    import baselines
    import metrics
    T, V = 4, 3
    x = np.random.default_rng(0).random((12, V)).astype(np.float32)
    windows = baselines._flat(x, T)
    # a "reconstruction" that is the window itself shifted by 1: point t must get row t of x + 1
    out = baselines.point_output({"mu": windows.reshape(len(windows), T, V) + 1}, x, T)
    assert out.mu.shape == (12, V)
    np.testing.assert_allclose(out.mu, x + 1)
    res = metrics.interpretation_metrics(out.mu, [(0, 11, [int(np.argmax(x[0]))])])
    assert set(res) == {"hitrate_100", "hitrate_150", "hitrate_100_random", "hitrate_150_random"}
    assert res["hitrate_100_random"] == pytest.approx(1 / 3)


def test_unknown_method_is_an_error(tmp_path):
    import baselines
    with pytest.raises(SystemExit):
        baselines.main([f"--data={tmp_path}", "--methods=nope"])


def test_pca_on_one_window_reconstructs_its_mean_without_warnings():
    import warnings

    import numpy as np

    import baselines
    from config import Config
    cfg = Config(seq_len=4)
    rng = np.random.default_rng(0)
    one = rng.random((1, 4 * 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's PCA warns (0 / 0) on a single sample
        score = baselines.fit_pca(one, cfg, dict(baselines.EXTRA_DEFAULTS))
        mu = score(rng.random((5, 12)))["mu"]
    assert mu.shape == (5, 4, 3)
    np.testing.assert_allclose(mu, np.broadcast_to(one.reshape(1, 4, 3), (5, 4, 3)))
    two = rng.random((2, 12))  # two windows: a real PCA, which reproduces its own training windows
    np.testing.assert_allclose(baselines.fit_pca(two, cfg, dict(baselines.EXTRA_DEFAULTS))(two)["mu"].reshape(2, 12),
                               two, atol=1e-9)


def test_default_out_dir_is_one_folder_per_data_set(tmp_path, monkeypatch):
    """`python baselines.py --data=PATH` (the README's command, no --out_dir) writes under
    res_hr/baselines/<data folder name>; --out_dir is taken as given."""
    if not (DATA / "ASD" / "omi-1").is_dir():
        pytest.skip(f"{DATA} not available")
    import baselines
    monkeypatch.chdir(tmp_path)
    baselines.main([f"--data={DATA / 'ASD'}", "--entities=omi-1", "--methods=random"])
    assert _strict((tmp_path / "res_hr" / "baselines" / "ASD" / "random" / "metrics.json").read_text())["method"] == "random"
    baselines.main([f"--data={DATA / 'ASD'}", "--entities=omi-1", "--methods=random", "--out_dir=mine"])
    assert (tmp_path / "mine" / "random" / "metrics.json").is_file()
