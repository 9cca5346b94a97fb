"""Adapting the shared model to new entities from a few windows (issue: meta adaptation)."""
import hashlib
import shutil

import numpy as np
import pandas as pd
import torch

import meta_eval
import test as evaluate_script
import train_safe
from conftest import args
from puad import apply_local_state, build_model, local_path, read_checkpoint, score_series
from utils import Scaler, load_dataset


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adapt_from_one_window_two_entities(trained, tmp_path):
    src, data = trained
    shutil.copy(src / "puad.ckpt", tmp_path / "puad.ckpt")
    before = sha(tmp_path / "puad.ckpt")
    for entity in ("omi-3", "omi-4"):
        train_safe.main(args(tmp_path, data, "--stage=local", f"--entity={entity}", "--adapt_windows=1",
                             "--local_epochs=5"))
    assert sha(tmp_path / "puad.ckpt") == before  # the shared checkpoint is untouched
    shared = read_checkpoint(tmp_path / "puad.ckpt")
    scores, betas = {}, {}
    for entity in ("omi-3", "omi-4"):
        local = read_checkpoint(local_path(tmp_path / "puad.ckpt", entity))
        assert local["adapt_windows"] == 1 and torch.equal(local["scaler"]["shift"], shared["history_scaler"]["shift"])
        assert local_path(tmp_path / "puad.ckpt", entity).stat().st_size < 20_000  # a tiny per-entity file
        model, cfg = build_model(shared)
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        apply_local_state(model, local)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(ref[k], v)}
        assert changed <= {"pot.beta_l", "pot.g_local"} and "pot.beta_l" in changed
        ent = load_dataset(data, entity)[0]
        s = score_series(model, Scaler.from_state(local["scaler"]).transform(ent.test[:500]), cfg.seq_len,
                         use_local=True).mu
        assert np.isfinite(s).all()
        scores[entity], betas[entity] = s, local["beta_l"]
    assert not torch.equal(betas["omi-3"], betas["omi-4"])
    assert not np.allclose(scores["omi-3"], scores["omi-4"])


def test_meta_eval_end_to_end_small(trained, tmp_path, monkeypatch):
    """The whole table-2 pipeline on one history entity, one new entity and N = 1, 20."""
    src, data = trained
    monkeypatch.setattr(meta_eval, "HISTORY", ["omi-1", "omi-2"])
    monkeypatch.setattr(meta_eval, "NEW", ["omi-10"])
    monkeypatch.setattr(meta_eval, "NS", [1, 20])
    monkeypatch.setattr(meta_eval, "ADAPT_STEPS", 3)
    monkeypatch.setattr(meta_eval, "SCRATCH_STEPS", 3)
    (tmp_path / "meta" / "history").mkdir(parents=True)
    shutil.copy(src / "puad.ckpt", tmp_path / "meta" / "history" / "puad.ckpt")  # reuse the session's model
    df = meta_eval.main([f"--data={data}", "--preset=test", f"--out_dir={tmp_path}", "--epochs=1",
                         "--max_train_windows=512"])
    assert set(df.method) == {"full", "adapted", "history-only", "scratch", "pca"}
    assert len(df) == 1 + 2 * 4
    assert df.auc_pr.notna().all() and (df.auc_pr > 0).all()
    saved = pd.read_csv(tmp_path / "meta_eval.csv")
    assert len(saved) == len(df) and (tmp_path / "meta_eval.png").stat().st_size > 0


def test_local_stage_keeps_the_stage_1_potentials(trained, tmp_path):
    """Stage 2 fits beta_l with every window transported alone: the potentials stay where
    init_local_prototypes put them (the global ones, split with their copies), whatever the few
    windows looked like; the entity borrows the history's scaler."""
    src, data = trained
    shutil.copy(src / "puad.ckpt", tmp_path / "puad.ckpt")
    train_safe.main(args(tmp_path, data, "--stage=local", "--entity=omi-5", "--adapt_windows=1",
                         "--local_epochs=3"))
    shared = read_checkpoint(tmp_path / "puad.ckpt")
    local = read_checkpoint(local_path(tmp_path / "puad.ckpt", "omi-5"))
    n_global = shared["config"]["n_global"]
    g = shared["model"]["pot.g_global"]
    split = torch.isclose(local["g_local"][:n_global], g) | torch.isclose(local["g_local"][:n_global], g - 0.1 * np.log(2))
    assert bool(split.all())  # untouched, or halved with a copy (eps = 0.1: g - eps ln 2)
    assert torch.equal(local["scaler"]["shift"], shared["history_scaler"]["shift"])


def test_few_windows_borrow_the_historys_calibration(trained, tmp_path):
    """An entity adapted from fewer calibration rows than --min_calib_rows is calibrated on the
    history's rows stored in the stage-1 checkpoint (the same for test.py, detect_live.py and
    with or without the local prototypes); with enough rows, or --min_calib_rows=0, on its own."""
    import dataclasses

    from config import parse_config
    from puad import calibrate_entity, entity_state, fit_scorer, reconstruct_entity, run_config
    src, data = trained
    shutil.copy(src / "puad.ckpt", tmp_path / "puad.ckpt")
    shared = read_checkpoint(tmp_path / "puad.ckpt")
    hc = shared["history_calib"]
    V = shared["n_features"]
    assert hc["x"].shape == hc["mu"].shape and hc["x"].shape[1] == V and hc["constant"].shape == (V,)
    assert len(hc["x"]) >= 2 * shared["config"]["seq_len"]  # more than one history entity's tail
    d = shared["model_args"]["d_theta"]
    assert hc["theta0"].shape == (len(hc["x"]), d) and hc["memory"].shape[1] == d  # the history's latent memory
    train_safe.main(args(tmp_path, data, "--stage=local", "--entity=omi-5", "--adapt_windows=5", "--local_epochs=2"))
    ent = load_dataset(data, ["omi-5"])[0]
    cfg = run_config(parse_config([f"--ckpt={tmp_path / 'puad.ckpt'}", f"--data={data}"]), shared)
    for use_local in (True, False):
        model, _ = build_model(shared)
        r = reconstruct_entity(model, shared, dataclasses.replace(cfg, use_local=use_local), ent)
        np.testing.assert_array_equal(r.calib.rows.x, hc["x"].numpy())
        np.testing.assert_array_equal(r.calib.rows.mu, hc["mu"].numpy())
        np.testing.assert_array_equal(r.calib.memory, hc["memory"].numpy())
        local, scaler = entity_state(shared, cfg.ckpt, "omi-5")
        live = calibrate_entity(model, shared, cfg, scaler.transform(ent.train), local, use_local, "omi-5")
        assert live.threshold_ == fit_scorer(cfg, r.calib).threshold_ and live.n_rows_ == len(hc["x"])
    own = reconstruct_entity(build_model(shared)[0], shared, dataclasses.replace(cfg, min_calib_rows=0), ent)
    assert len(own.calib.rows) == 5 + cfg.seq_len - 1  # its own N windows ...
    np.testing.assert_array_equal(own.calib.memory, hc["memory"].numpy())  # ... against the history's memory
    # test.py on the adapted entity beside one without local prototypes: both plans drawn
    m = evaluate_script.main([f"--ckpt={tmp_path / 'puad.ckpt'}", f"--data={data}", "--entities=omi-1,omi-5",
                              f"--out_dir={tmp_path / 'res'}", "--plots=True"])
    assert "local_share" in m["entities"]["omi-5"] and "local_share" not in m["entities"]["omi-1"]
    assert (tmp_path / "res" / "transport_plan.png").stat().st_size > 0
