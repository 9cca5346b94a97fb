"""Two-stage training on a real ASD entity, checkpoints, resume, and the NaN guard."""
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

import train_safe
from conftest import args
from puad import PUAD, apply_local_state, build_model, local_path, read_checkpoint, score_series
from utils import Scaler, load_dataset


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_global_stage_lowers_validation_loss(trained):
    tmp, _ = trained
    loss = pd.read_csv(tmp / "loss.csv")
    g = loss[loss.stage == "global"]
    assert list(g.epoch) == [1, 2, 3, 4]
    assert g.val_total.iloc[-1] < g.val_total.iloc[0]
    ckpt = read_checkpoint(tmp / "puad.ckpt")
    assert ckpt["entities"] == ["omi-1", "omi-2"] and len(ckpt["features"]) == 19
    assert set(ckpt["scalers"]) == {"omi-1", "omi-2"}


def test_stage_one_keeps_the_lr_constant(trained):
    """Stage 1 trains at --lr throughout (a cosine decay measured worse: docs/decisions.md), as
    loss.csv records per epoch."""
    tmp, _ = trained
    base = read_checkpoint(tmp / "puad.ckpt")["config"]["lr"]
    assert (pd.read_csv(tmp / "loss.csv").query("stage == 'global'").lr == base).all()


def test_local_stage_changes_only_beta_l(trained):
    tmp, data = trained
    shared_before = sha(tmp / "puad.ckpt")
    train_safe.main(args(tmp, data, "--stage=local", "--entity=omi-3", "--local_epochs=2"))
    assert sha(tmp / "puad.ckpt") == shared_before  # the shared model file is untouched
    shared = read_checkpoint(tmp / "puad.ckpt")
    local = read_checkpoint(local_path(tmp / "puad.ckpt", "omi-3"))
    model, _ = build_model(shared)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_local_state(model, local)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"pot.beta_l", "pot.g_local"}  # beta_l and its OT potentials, nothing else
    assert local["entity"] == "omi-3" and "scaler" in local
    loss = pd.read_csv(tmp / "loss.csv")
    assert (loss.stage == "local").sum() == 2 and (loss.stage == "global").sum() == 4


def test_checkpoint_round_trip_gives_identical_scores(trained):
    tmp, data = trained
    ckpt = read_checkpoint(tmp / "puad.ckpt")
    ent = load_dataset(data, "omi-1")[0]
    x = Scaler.from_state(ckpt["scalers"]["omi-1"]).transform(ent.test[:300])
    m1, cfg = build_model(ckpt)
    m2, _ = build_model(torch.load(tmp / "puad.ckpt", weights_only=True))
    o1, o2 = score_series(m1, x, cfg.seq_len), score_series(m2, x, cfg.seq_len, batch_size=7)  # batching must not matter
    (s1, p1), (s2, p2) = [(o.mu.sum(1), o.plan) for o in (o1, o2)]
    assert s1.shape == (300,) and p1.shape == (300, cfg.n_global)
    assert np.isfinite(s1).all()
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-4)


def test_resume_continues_an_interrupted_run(tmp_path, asd, capsys):
    base = args(tmp_path, asd, "--entities=omi-1", "--stage=global", "--max_train_windows=256")
    train_safe.main(base + ["--epochs=1"])  # the "interrupted" run: stopped after epoch 1
    train_safe.main(base + ["--epochs=2", "--resume"])
    assert "resuming the global stage after epoch 1" in capsys.readouterr().out
    loss = pd.read_csv(tmp_path / "loss.csv")
    assert list(loss.epoch) == [1, 2]
    assert read_checkpoint(tmp_path / "puad.last.ckpt")["epoch"] == 2


def test_repeated_nan_losses_stop_without_saving(tmp_path, asd, monkeypatch):
    def nan_loss(self, x, rho, use_local=False, batch_plan=True):
        out = self(x, use_local, batch_plan=batch_plan)
        out["total"] = out["recon"] * float("nan")
        return out
    monkeypatch.setattr(PUAD, "loss", nan_loss)
    with pytest.raises(SystemExit, match="non-finite losses in a row"):
        monkeypatch.setattr(train_safe, "MAX_BAD_STEPS", 3)
        train_safe.main(args(tmp_path, asd, "--entities=omi-1", "--stage=global"))
    assert not (tmp_path / "puad.ckpt").exists()


def test_plot_loss_draws_both_stages_and_refuses_bad_files(trained, tmp_path):
    import plot_loss
    src, _ = trained
    png = plot_loss.plot_loss(src / "loss.csv", tmp_path / "loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the kept epoch is the one train_safe.py saved: the first lowest finite validation loss
    run = pd.DataFrame({"val_total": [3.0, 1.0, 2.0, 1.0, float("nan")]})
    assert plot_loss.kept_epoch(run) == 1 and plot_loss.kept_epoch(run.iloc[4:]) is None
    loss = pd.read_csv(src / "loss.csv").query("stage == 'global'")
    assert int(loss.epoch.iloc[plot_loss.kept_epoch(loss)]) == read_checkpoint(src / "puad.ckpt")["epoch"]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="bad.csv: not a loss_metrics.csv"):
        plot_loss.plot_loss(tmp_path / "bad.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_checkpoint_records_the_host_level_columns(tmp_path):
    """The lab's services share one machine: stage 1 stores its node_* columns as host-level
    (utils.shared_features), and the calibration puad builds from the checkpoint carries them to
    the Scorer, which then names but does not score them; a checkpoint without "host" has none."""
    from conftest import ROOT
    from puad import calibrate_entity, checkpoint_host
    lab = ROOT / "Dataset" / "lab"
    train_safe.main(args(tmp_path, lab, "--entities=payment,catalogue", "--stage=global", "--epochs=1",
                         "--max_train_windows=256"))
    ckpt = read_checkpoint(tmp_path / "puad.ckpt")
    assert [f for f, m in zip(ckpt["features"], ckpt["host"]) if m] == [
        "node_cpu_user", "node_cpu_system", "node_cpu_idle", "node_load1", "node_memory_available"]
    model, cfg = build_model(ckpt)
    ent = load_dataset(lab, ["payment"])[0]
    x = Scaler.from_state(ckpt["scalers"]["payment"]).transform(ent.train)
    assert calibrate_entity(model, ckpt, cfg, x, None, False, "payment").host_.tolist() == ckpt["host"]
    with pytest.raises(SystemExit, match="checkpoint host has 2 entries for 16 features"):
        build_model(dict(ckpt, host=[True, False]))
    del ckpt["host"]
    assert checkpoint_host(ckpt) is None
    assert calibrate_entity(model, ckpt, cfg, x, None, False, "payment").host_ is None


def test_checkpoint_records_the_level_gauges(tmp_path):
    """Stage 1 marks the features that moved less than 10 % of their magnitude over train (the
    lab's memory columns) as level gauges in the checkpoint, and the model it builds centres them;
    --level_window=0 marks none, and a checkpoint from before them ("level" absent) has none."""
    from conftest import ROOT
    lab = ROOT / "Dataset" / "lab"
    for window, want in (("1800", {"memory_usage", "process_rss", "node_memory_available"}), ("0", set())):
        train_safe.main(args(tmp_path, lab, "--entities=payment", "--stage=global", "--epochs=1",
                             "--max_train_windows=256", f"--level_window={window}"))
        ckpt = read_checkpoint(tmp_path / "puad.ckpt")
        assert {f for f, m in zip(ckpt["features"], ckpt["level"]) if m} == want
        model, _ = build_model(ckpt)
        assert model.has_level == bool(want)
        assert model.level.tolist() == ckpt["level"]
    ckpt["level"] = [True] * len(ckpt["features"])
    assert build_model(ckpt)[0].has_level
    assert not any(ckpt["host"])  # one entity shares nothing
    del ckpt["level"]
    assert not build_model(ckpt)[0].has_level
