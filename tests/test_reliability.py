"""No silent wrong answer, no lost data, a one-line error for every bad input (tiny synthetic data)."""
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import test as evaluate_script
import train_safe
from config import ConfigError, parse_config
from puad import PUAD, local_path, read_checkpoint
from utils import DataError, load_entity, output_lock


def make_dataset(root, features=("a", "b", "c"), entities=("e1", "e2"), n=160):
    """Entity folders with a smooth train series and a test series with one labelled bump."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(entities):
        folder = root / name
        folder.mkdir(parents=True)
        t = np.arange(2 * n)
        x = np.stack([np.sin(t / (5 + j + i)) + 0.05 * rng.standard_normal(2 * n) for j in range(len(features))], 1)
        labels = np.zeros(n, int)
        x[n + 100:n + 110] += 3
        labels[100:110] = 1
        frame = pd.DataFrame(x, columns=list(features))
        frame.insert(0, "timestamp", t)
        frame[:n].to_csv(folder / "train.csv", index=False)
        frame[n:].to_csv(folder / "test.csv", index=False)
        pd.DataFrame({"timestamp": t[n:], "label": labels}).to_csv(folder / "test_label.csv", index=False)
    return root


def targs(tmp, data, *extra):
    return [f"--data={data}", "--preset=test", f"--ckpt={tmp}/puad.ckpt", f"--loss_csv={tmp}/loss.csv",
            "--seq_len=10", "--epochs=1", "--num_threads=1", *extra]


def eval_args(tmp, data, *extra):
    return [f"--ckpt={tmp}/puad.ckpt", f"--data={data}", f"--out_dir={tmp}/res", "--plots=False", *extra]


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


# ---- item 5: every Config field range-checked, one line naming the field

@pytest.mark.parametrize("arg, field", [
    ("--grad_clip=-1", "grad_clip"), ("--batch_size=-1", "batch_size"), ("--val_frac=-0.1", "val_frac"),
    ("--seq_len=0", "seq_len"), ("--lr=-1", "lr"), ("--n_global=0", "n_global"),
    ("--n_heads=3", "d_model"), ("--dropout=2", "dropout"),
    ("--spot_q=2", "spot_q"), ("--score_mode=fast", "score_mode"), ("--alarm_hold=0", "alarm_hold"),
    ("--device=gpu", "device"), ("--stage=all", "stage"),
    ("--val_blocks=0", "val_blocks"), ("--alarm_budget=-1", "alarm_budget"), ("--smooth=0", "smooth"),
    ("--sinkhorn_eps=0", "sinkhorn_eps"), ("--lr=1e999", "lr")])
def test_config_field_out_of_range_is_refused(arg, field):
    with pytest.raises(ConfigError, match=f"--{field}="):
        parse_config([arg])


def test_config_choices_are_listed_and_good_values_pass(capsys):
    with pytest.raises(ConfigError, match="point | block"):
        parse_config(["--score_mode=fast"])
    assert parse_config(["--device=cuda:1", "--alarm_hold=3"]).alarm_hold == 3
    with pytest.raises(SystemExit) as e:
        train_safe.main(["--batch_size=-1"])
    assert e.value.code == 2
    assert "--batch_size=-1: must be >= 1" in capsys.readouterr().err


def test_detect_live_bad_port_is_one_line(tmp_path, data, capsys):
    import detect_live
    train_safe.main(targs(tmp_path, data, "--stage=global"))
    for option, message in (("--port=70000", "--port=70000: must be in [0, 65535]"),
                            ("--fixed_threshold=nan", "--fixed_threshold=nan: must be a finite number"),
                            ("--alarm_clear=0", "--alarm_clear=0: must be >= 1"),
                            ("--threshold=3", "unknown option --threshold")):
        with pytest.raises(SystemExit) as e:
            detect_live.main([f"--ckpt={tmp_path}/puad.ckpt", option])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.strip().count("\n") == 0, err


# ---- item 2: a run that learned nothing fails and never says "saved"

def test_all_nonfinite_training_fails_and_keeps_nothing_new(tmp_path, data, monkeypatch, capsys):
    train_safe.main(targs(tmp_path, data, "--stage=global"))
    before = (tmp_path / "puad.ckpt").read_bytes()
    assert "epoch 1 of 1, the lowest validation loss" in capsys.readouterr().out  # the log names the kept epoch

    def nan_loss(self, x, rho, use_local=False, batch_plan=True):
        out = self(x, use_local, batch_plan=batch_plan)
        out["total"] = out["recon"] * float("nan")
        return out
    monkeypatch.setattr(PUAD, "loss", nan_loss)
    with pytest.raises(SystemExit, match="non-finite"):
        monkeypatch.setattr(train_safe, "MAX_BAD_STEPS", 1000)
        train_safe.main(targs(tmp_path, data, "--stage=global"))
    assert "saved" not in capsys.readouterr().out
    assert (tmp_path / "puad.ckpt").read_bytes() == before


def test_nan_validation_loss_does_not_claim_an_old_checkpoint(tmp_path, data, monkeypatch, capsys):
    train_safe.main(targs(tmp_path, data, "--stage=global"))
    capsys.readouterr()
    monkeypatch.setattr(train_safe, "validate", lambda *a, **k: float("nan"))
    with pytest.raises(SystemExit, match="nothing saved.*earlier run"):
        train_safe.main(targs(tmp_path, data, "--stage=global"))
    assert "saved" not in capsys.readouterr().out


# ---- item 4: local files are checked against their shared model and entity

def test_stale_or_foreign_local_file_is_refused(tmp_path, data, caplog):
    train_safe.main(targs(tmp_path, data, "--stage=both", "--entity=e1"))
    evaluate_script.main(eval_args(tmp_path, data, "--entity=e1"))  # matching: accepted
    # a local file copied from another entity
    shutil.copy(local_path(tmp_path / "puad.ckpt", "e1"), local_path(tmp_path / "puad.ckpt", "e2"))
    with pytest.raises(SystemExit, match=r"puad.local-e2.pt: written for entity 'e1', not 'e2'"):
        evaluate_script.main(eval_args(tmp_path, data, "--entity=e2"))
    # the shared model retrained: the old local file no longer fits it
    local_path(tmp_path / "puad.ckpt", "e2").unlink()
    train_safe.main(targs(tmp_path, data, "--stage=global", "--seed=1"))
    assert "puad.local-e1.pt; refit them" in caplog.text  # train_safe warns about the stale file
    with pytest.raises(SystemExit, match=r"puad.local-e1.pt: fitted against another shared model"):
        evaluate_script.main(eval_args(tmp_path, data, "--entity=e1"))


def test_local_file_of_other_features_is_refused_everywhere(tmp_path, data):
    import detect_live
    from puad import entity_state
    train_safe.main(targs(tmp_path, data, "--stage=both", "--entity=e1"))
    lp = local_path(tmp_path / "puad.ckpt", "e1")
    local = torch.load(lp, weights_only=True)
    local["features"] = ["x", "y"]
    local["beta_l"] = torch.zeros(2, 5)
    torch.save(local, lp)
    ckpt = read_checkpoint(tmp_path / "puad.ckpt")
    with pytest.raises(SystemExit, match="other features"):
        entity_state(ckpt, tmp_path / "puad.ckpt", "e1")
    with pytest.raises(SystemExit, match="other features"):
        evaluate_script.main(eval_args(tmp_path, data, "--entity=e1"))
    cfg = parse_config([f"--ckpt={tmp_path}/puad.ckpt"])
    with pytest.raises(SystemExit, match="other features"):
        detect_live.entity_state(ckpt, cfg, "e1")


# ---- checkpoints that are not ours

def test_empty_and_foreign_checkpoints_are_one_line_errors(tmp_path, data):
    (tmp_path / "puad.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"puad.ckpt: not a readable PUAD checkpoint"):
        evaluate_script.main(eval_args(tmp_path, data))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "puad.ckpt")
    with pytest.raises(SystemExit, match=r"puad.ckpt: not a PUAD shared checkpoint \(no config"):
        evaluate_script.main(eval_args(tmp_path, data))


def test_resume_with_other_features_or_sizes_is_one_line(tmp_path, data):
    train_safe.main(targs(tmp_path, data, "--stage=global"))
    with pytest.raises(SystemExit, match=r"--resume: model of other sizes.*d_model"):
        train_safe.main(targs(tmp_path, data, "--stage=global", "--epochs=2", "--resume", "--d_model=32"))
    other = make_dataset(tmp_path / "other", features=("a", "b", "z"))
    with pytest.raises(SystemExit, match=r"--resume: trained on other features"):
        train_safe.main(targs(tmp_path, other, "--stage=global", "--epochs=2", "--resume"))


def test_threshold_number_is_refused_by_test_py(tmp_path, data):
    train_safe.main(targs(tmp_path, data, "--stage=global"))
    for option in ("--threshold=3.5", "--fixed_threshold=3.5"):  # a fixed threshold is detect_live.py's option
        with pytest.raises(SystemExit) as e:
            evaluate_script.main(eval_args(tmp_path, data, option))
        assert e.value.code == 2


# ---- item 6: one run per output

def test_second_run_on_the_same_outputs_is_refused(tmp_path, data):
    train_safe.main(targs(tmp_path, data, "--stage=global"))
    with output_lock(tmp_path / "puad.ckpt.lock"):
        with pytest.raises(SystemExit, match=r"puad.ckpt.lock: another run \(pid \d+\)"):
            train_safe.main(targs(tmp_path, data, "--stage=global"))
    with output_lock(tmp_path / "res" / ".test.lock"):
        with pytest.raises(SystemExit, match=r"res/.test.lock: another run"):
            evaluate_script.main(eval_args(tmp_path, data))
    evaluate_script.main(eval_args(tmp_path, data))  # released: runs again
    assert (tmp_path / "res" / "metrics.json").is_file()


# ---- Ctrl-C during training

def test_ctrl_c_is_one_line_and_exit_130(tmp_path, data, monkeypatch, capsys):
    real, calls = train_safe.validate, []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train_safe, "validate", interrupt_second)
    with pytest.raises(SystemExit) as e:
        train_safe.main(targs(tmp_path, data, "--stage=global", "--epochs=3"))
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "train_safe.py: interrupted; last complete epoch (1) saved to" in err and "--resume" in err


# ---- data files: NaN timestamp, truncated last row

def test_nan_timestamp_is_refused(tmp_path):
    (tmp_path / "train.csv").write_text("timestamp,a\n1,0.5\n,0.7\n3,0.1\n")
    with pytest.raises(DataError, match=r"train.csv: line 3: timestamp"):
        load_entity(tmp_path)


def test_truncated_last_row_is_refused(tmp_path):
    (tmp_path / "train.csv").write_text("timestamp,a,b\n1,0.5,1\n2,0.7,2\n3,0.")
    with pytest.raises(DataError, match=r"train.csv: line 4: 2 fields, the header has 3"):
        load_entity(tmp_path)
