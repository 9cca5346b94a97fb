"""The command line of every script, the checkpoint's model_args, and the import graph."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from config import Config, ConfigError, parse_cli, parse_config, print_config

# script -> options its --help must list
SCRIPTS = {
    "train_safe.py": ["--epochs", "--no-resume", "--preset", "--config", "Transformer hidden size"],
    "test.py": ["--ckpt", "--alarm_budget", "--score_mode", "scoring and thresholds"],
    "plot_loss.py": ["--loss_csv", "--out_dir"],
    "baselines.py": ["--methods", "--knn_k", "--seq_len"],
    "bench.py": ["--presets", "--quick", "--threads"],
    "meta_eval.py": ["--adapt_windows", "--epochs"],
    "detect_live.py": ["--prometheus", "--live_step", "--fixed_threshold", "--alarm_hold", "--alarm_clear",
                       "live detection"],
    "export_metrics.py": ["--start", "--fault_log", "--out"],
    "lab.py": ["--minutes", "--ci", "--out"],
    "ablation.py": ["--ckpt", "--smooth"],
    "compare.py": ["--metrics", "--boot"],
    "-m chaos.inject": ["--plan", "--fault_log", "--dry-run"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    cmd = [sys.executable, *script.split()] if script.startswith("-m") else [sys.executable, script]
    for flag in ("--help", "-h"):
        r = subprocess.run([*cmd, flag], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100"))
        assert r.returncode == 0, r.stderr[-2000:]
        for option in SCRIPTS[script]:
            assert option in r.stdout, (script, option)


def help_text(script: str) -> str:
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="2000"))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_help_is_the_options_a_script_reads_each_with_its_declared_help():
    """--help is built from the help declared with each Config field (field metadata, not
    comments), and lists only the fields the script reads; each option shown has a description."""
    import config
    train = help_text("train_safe.py")
    for name in config.TRAINS:
        assert f"--{name} " in train, name
    assert "--seq_len INT" in train and "sliding window (paper 4.1) [int, default 20]" in train
    assert "--prometheus" not in train and "--drift_window" not in train  # not read by training
    for group in ("common:", "data:", "model:", "training:"):
        assert f"\n{group}" in train
    plot = help_text("plot_loss.py")
    options = re.findall(r"^  (--[a-z_]+|-h)", plot, re.M)
    assert len(options) <= 6 and "--lr" not in plot, options
    for script in ("train_safe.py", "test.py", "ablation.py", "baselines.py", "meta_eval.py", "plot_loss.py",
                   "detect_live.py"):
        lines = help_text(script).splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^  (--[a-z_]+)(?: \[?[A-Z.]+\]?)?(.*)$", line)
            if m:  # a description, not only the type and default (on the next line when the option is long)
                text = m.group(2).strip() or lines[i + 1].strip()
                assert text and not text.startswith("["), (script, m.group(1), text)
    for f in dataclasses.fields(Config):
        assert f.metadata.get("help"), f.name


def test_a_script_refuses_an_option_it_does_not_read():
    for script, option in (("plot_loss.py", "--lr=0.1"), ("test.py", "--epochs=3"), ("train_safe.py", "--drift_window=5")):
        r = subprocess.run([sys.executable, script, option], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "does not read it" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_space_and_equals_forms_and_bool_flags():
    cli = parse_cli(["--epochs", "1", "--lr=3e-3", "--resume", "--no-plots", "--data", "x/y"])
    cfg = cli.cfg
    assert (cfg.epochs, cfg.lr, cfg.resume, cfg.plots, cfg.data) == (1, 3e-3, True, False, "x/y")
    assert cli.given == {"epochs", "lr", "resume", "plots", "data"}
    assert parse_config(["--resume=True", "--plots=False", "--use_local", "False"]).plots is False
    assert parse_config(["--resume=True"]).resume is True
    assert parse_config(["--resume", "--no-resume"]).resume is False  # the last one wins
    assert parse_config(["--entities=1,2"]).entities == "1,2"  # a string field stays text
    with pytest.raises(ConfigError, match="expected bool"):
        parse_config(["--resume=maybe"])
    with pytest.raises(ConfigError, match="unknown option --epoch "):  # no abbreviations
        parse_config(["--epoch=1"])
    assert parse_cli(["--preset=test"]).given >= {"d_model", "epochs"}  # a preset's fields count as set


def test_bad_option_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "train_safe.py", "--epochs", "many"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("train_safe.py: error: --epochs: expected int")


def test_effective_config_prints_only_changed_fields(capsys):
    print_config(parse_config(["--epochs", "3", "--device=cpu"]))
    out = capsys.readouterr().out
    assert out.strip() == "config: epochs=3, device='cpu'"
    print_config(Config())
    assert capsys.readouterr().out.strip() == "config: the defaults"


def tiny_checkpoint(cfg: Config, with_model_args: bool) -> dict:
    from puad import PUAD, model_args
    model = PUAD(cfg, 3)
    ckpt = dict(config=dataclasses.asdict(cfg), n_features=3, features=["a", "b", "c"], entities=["e1"],
                scalers={}, model=model.state_dict())
    if with_model_args:
        ckpt["model_args"] = model_args(cfg)
    return ckpt


def test_old_checkpoint_with_config_only_loads(tmp_path):
    from puad import build_model, checkpoint_args, read_checkpoint, run_config
    trained = parse_config(["--preset=test", "--d_model=8", "--data=somewhere", "--smooth=2"])
    torch.save(tiny_checkpoint(trained, with_model_args=False), tmp_path / "old.ckpt")
    ckpt = read_checkpoint(tmp_path / "old.ckpt")
    assert "model_args" not in ckpt and checkpoint_args(ckpt)["d_model"] == 8
    model, mcfg = build_model(ckpt)
    assert mcfg.d_model == 8 and model.encoder.out_dim > 0
    # a run on it: the model fields and data from the checkpoint, run options from the command line
    run = parse_cli(["--d_model=64", "--drift_window=7"])
    cfg = run_config(run.cfg, ckpt, run.given)
    assert (cfg.d_model, cfg.data, cfg.drift_window) == (8, "somewhere", 7)
    assert cfg.smooth == Config.smooth  # not the training run's
    run = parse_cli(["--data=elsewhere"])
    assert run_config(run.cfg, ckpt, run.given).data == "elsewhere"


def test_new_checkpoint_stores_model_args(tmp_path):
    from puad import MODEL_FIELDS, build_model, read_checkpoint
    trained = parse_config(["--preset=test", "--n_local=3"])
    torch.save(tiny_checkpoint(trained, with_model_args=True), tmp_path / "new.ckpt")
    ckpt = read_checkpoint(tmp_path / "new.ckpt")
    assert set(MODEL_FIELDS) <= set(ckpt["model_args"]) and ckpt["model_args"]["n_local"] == 3
    assert build_model(ckpt)[1].n_local == 3


# ---- the import graph: no library module imports a script

LIBRARY = ["utils.py", "puad.py", "scoring.py", "metrics.py", "config.py", "prometheus.py", "faultlog.py",
           "transformer.py", "prototype_ot.py", "vae_loss.py", "tranad.py", "labshop/faults.py"]
SCRIPT_MODULES = {"train_safe", "test", "plot_loss", "baselines", "bench", "meta_eval", "detect_live",
                  "export_metrics", "lab", "ablation", "inject", "chaos"}


def imports(path) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", LIBRARY)
def test_no_library_module_imports_a_script(module):
    assert not imports(module) & SCRIPT_MODULES


@pytest.mark.parametrize("script", ["lab.py", "chaos/inject.py", "bench.py", "detect_live.py"])
def test_scripts_use_plain_imports(script):
    text = (ROOT / script).read_text()
    assert "sys.path.insert" not in text and "importlib" not in text
    # lab.py runs export_metrics.export(), a script's function; the others need no script at all
    forbidden = {"train_safe"} | (set() if script == "lab.py" else {"export_metrics"})
    assert not imports(script) & forbidden


def test_train_and_test_with_space_separated_options(tmp_path, capsys):
    """`--epochs 1` end to end: the checkpoint stores model_args, test.py takes the model from it
    and its run options from the command line; metrics.json holds the whole config."""
    import json

    import test as evaluate_script
    import train_safe
    from puad import read_checkpoint
    from test_reliability import make_dataset
    data = make_dataset(tmp_path / "data", features=("a", "b", "c"))
    (data / "e2" / "train.csv").write_text(  # another column order: aligned by name
        __import__("pandas").read_csv(data / "e2" / "train.csv")[["timestamp", "c", "a", "b"]].to_csv(index=False))
    train_safe.main(["--data", str(data), "--preset", "test", "--ckpt", str(tmp_path / "puad.ckpt"),
                     "--loss_csv", str(tmp_path / "loss.csv"), "--seq_len", "10", "--epochs", "1",
                     "--stage", "global", "--num_threads", "1"])
    ckpt = read_checkpoint(tmp_path / "puad.ckpt")
    assert ckpt["model_args"]["seq_len"] == 10 and ckpt["model_args"]["data"] == str(data)
    capsys.readouterr()
    res = evaluate_script.main(["--ckpt", str(tmp_path / "puad.ckpt"), "--out_dir", str(tmp_path / "res"),
                                "--no-plots", "--smooth", "1"])
    printed = capsys.readouterr().out
    assert "seq_len=10" in printed and "smooth=1" in printed and "score_floor" not in printed
    doc = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert doc["config"]["seq_len"] == 10 and doc["config"]["smooth"] == 1 and doc["config"]["data"] == str(data)
    assert set(res["entities"]) == {"e1", "e2"}


def test_num_threads_is_honoured_by_every_script_that_runs_the_model(tmp_path):
    """--num_threads=1 leaves torch at one thread after test.py, ablation.py and baselines.py
    (utils.set_threads; before, test.py kept torch's default)."""
    import ablation
    import baselines
    import test as evaluate_script
    import train_safe
    from test_reliability import eval_args, make_dataset, targs
    data = make_dataset(tmp_path / "data")
    before = torch.get_num_threads()
    try:
        train_safe.main(targs(tmp_path, data, "--stage=global"))
        runs = {"test.py": lambda: evaluate_script.main(eval_args(tmp_path, data, "--num_threads=1")),
                "ablation.py": lambda: ablation.main(eval_args(tmp_path, data, "--num_threads=1", f"--out_dir={tmp_path}/abl")),
                "baselines.py": lambda: baselines.main([f"--data={data}", "--seq_len=10", "--methods=random",
                                                        f"--out_dir={tmp_path}/base", "--num_threads=1"])}
        for script, run in runs.items():
            torch.set_num_threads(2)
            run()
            assert torch.get_num_threads() == 1, script
    finally:
        torch.set_num_threads(before)
