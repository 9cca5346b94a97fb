"""Scale-out and fast scoring: torchrun/DDP training against one process, block scoring mode,
the bf16 encoder of scoring."""
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import test as evaluate_script
import train_safe
from config import parse_config
from conftest import ROOT, args
from puad import PUAD, read_checkpoint, score_series
from utils import Scaler, load_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_splits_of_a_batch_are_the_one_process_batch():
    w = train_safe.Windows([np.random.rand(300, 3), np.random.rand(200, 3)], 20, 1, "cpu")
    one = list(w.batches(64, torch.Generator().manual_seed(5)))
    ranks = [list(w.batches(64, torch.Generator().manual_seed(5), split=(r, 2))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)  # every rank takes every step
    for full, a, b in zip(one, *ranks):
        assert torch.equal(torch.cat([a, b]).sort(0).values, full.sort(0).values)
    shards = [torch.cat(list(w.batches(50, shard=(r, 3)))) for r in range(3)]
    assert sum(len(s) for s in shards) == len(w)  # validation: every window once


def test_torchrun_two_processes_match_one_process(asd, tmp_path):
    """2 ranks (gloo) with half of each batch each, gradients averaged, = one process with the
    whole batch, up to what depends on the split: Sinkhorn couples the windows of a batch (each
    rank transports its half), and each rank draws its own noise and dropout, so the runs drift
    apart a little over the epoch. The epoch's mean training loss must agree within 5 %
    (measured, seeds 0, 1, 2: 0.1 %, 1.2 %, 2.3 %), not bit for bit."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--entities=omi-1", "--stage=global", "--epochs=1", "--max_train_windows=1536")
    train_safe.main(args(one, asd, *common))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train_safe.py", *args(two, asd, *common)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 processes (DistributedDataParallel)" in r.stdout
    assert r.stdout.count("global all epoch 1/1") == 1 and r.stdout.count("saved ") == 1  # rank 0 only
    assert r.stdout.count("config:") == 1
    # exactly the files one process writes: one checkpoint, its resume copy, the loss csv
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    a, b = pd.read_csv(one / "loss.csv"), pd.read_csv(two / "loss.csv")
    assert len(a) == len(b) == 1
    assert b.total[0] == pytest.approx(a.total[0], rel=0.05)
    assert b.recon[0] == pytest.approx(a.recon[0], rel=0.05)
    ca, cb = read_checkpoint(one / "puad.ckpt"), read_checkpoint(two / "puad.ckpt")
    assert ca["model"].keys() == cb["model"].keys() and cb["entities"] == ["omi-1"]
    g = cb["model"]["pot.g_global"]
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # the running potentials were kept


def untrained_on_omi1(asd, n: int):
    """A test-preset model with seed-0 weights and random running potentials, and omi-1's first n
    test rows scaled with its train rows -> (cfg, model, x)."""
    torch.manual_seed(0)
    cfg = parse_config(["--preset=test"])
    model = PUAD(cfg, 19).eval()
    with torch.no_grad():
        model.pot.g_global.normal_()
    ent = load_dataset(asd, "omi-1")[0]
    return cfg, model, Scaler().fit(ent.train).transform(ent.test[:n])


def test_block_scoring_matches_point_scoring_where_the_same_window_scores(asd):
    cfg, model, x = untrained_on_omi1(asd, 1013)  # 50 blocks and a tail of 13 points
    calls = []
    real = model.reconstruct
    model.reconstruct = lambda xb, *a, **k: calls.append(len(xb)) or real(xb, *a, **k)
    po = score_series(model, x, cfg.seq_len, batch_size=256)
    n_point = sum(calls)
    calls.clear()
    bo = score_series(model, x, cfg.seq_len, batch_size=16, mode="block")
    # the per-feature squared error stands in for a score here: the same window, the same numbers
    (p, p_plan), (b, b_plan) = [(((o.x - o.mu) ** 2).sum(1), o.plan) for o in (po, bo)]
    assert sum(calls) == 51 and n_point == 1013 - 19 + 1  # seq_len times fewer windows (point: the first again, whole)
    assert b.shape == p.shape == (1013,) and b_plan.shape == p_plan.shape
    assert np.isfinite(b).all() and np.isfinite(b_plan).all()
    same = np.r_[0:20, 19:1013:20, 1012]  # first window, last point of each block, the series end
    np.testing.assert_allclose(b[same], p[same], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b_plan[same], p_plan[same], rtol=1e-5, atol=1e-6)
    assert not np.allclose(b, p)  # elsewhere another window scores the point
    with pytest.raises(ValueError, match="point or block"):
        score_series(model, x, cfg.seq_len, mode="blocks")


def test_bf16_scoring_agrees_with_fp32_and_training_stays_fp32(asd, monkeypatch):
    """Scoring's encoder in bf16 (forced here, as on a CPU with AVX-512 BF16, so the test also
    runs on one without) ranks points as fp32 does and moves scores by little; training and
    validation (model.loss) run the encoder in fp32."""
    import puad
    import transformer
    cfg, model, x = untrained_on_omi1(asd, 600)
    seen: list[torch.dtype] = []
    model.encoder.layers.layers[0].linear1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    monkeypatch.setattr(transformer, "bf16_native", lambda device: True)
    scores = {}
    for bf16 in (False, True):
        monkeypatch.setattr(puad, "SCORE_BF16", bf16)
        o = score_series(model, x, cfg.seq_len, batch_size=256)
        scores[bf16] = ((o.x - o.mu) ** 2).sum(1)
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16  # the switch reaches the layers
    a, b = scores[False], scores[True]
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * np.median(a))
    assert np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1] > 0.99  # Spearman
    seen.clear()
    model.loss(torch.as_tensor(x[None, :cfg.seq_len], dtype=torch.float32), (0.01, 0.01, 0.01))
    with torch.no_grad():
        model(torch.as_tensor(x[None, :cfg.seq_len], dtype=torch.float32), sample=False, batch_plan=False)
    assert seen == [torch.float32, torch.float32]


def test_test_py_block_mode(trained, tmp_path):
    ckpt_dir, data = trained
    out = tmp_path / "res"
    m = evaluate_script.main([f"--ckpt={ckpt_dir}/puad.ckpt", f"--data={data}", "--entity=omi-1",
                              f"--out_dir={out}", "--plots=False", "--score_mode=block"])
    assert m["score_mode"] == "block"
    scores = pd.read_csv(out / "scores_omi-1.csv")
    assert len(scores) == 4320 and np.isfinite(scores.score).all()
    assert 0.3 < m["entities"]["omi-1"]["auc_roc"] <= 1


def test_bench_naming_times_test_py_both_ways(tmp_path, capsys):
    """`bench.py --naming --ckpt=...` on a tiny entity with local prototypes: test.py run in its own
    processes with the default naming and with --repair_weight=0, both times and the ratio printed;
    the two runs detect the same (naming changes only which features are named)."""
    import json

    import bench
    from test_reliability import make_dataset, targs
    data = make_dataset(tmp_path / "data", entities=("e1",))
    out = tmp_path / "naming.json"
    train_safe.main(targs(tmp_path, data, "--stage=both"))
    bench.main(["--naming", f"--vs_data={data / 'e1'}", f"--ckpt={tmp_path}/puad.ckpt", "--threads=1", "--vs_rounds=1",
                f"--out={out}"])
    printed = capsys.readouterr().out
    assert "default / --repair_weight=0" in printed and "--num_threads=1" in printed
    r = json.loads(out.read_text())["naming"]
    assert r["entity"] == "e1" and r["local_prototypes"] is True
    assert len(r["runs"]["repair"]) == len(r["runs"]["no_repair"]) == 1
    for run in r["runs"]["repair"] + r["runs"]["no_repair"]:
        assert run["wall_s"] > run["test_s"] > 0  # the process waits for the imports too
    assert r["auc_pr"]["repair"] == r["auc_pr"]["no_repair"]
    assert r["ratio"]["wall_s"] > 0 and r["ratio"]["test_s"] > 0
    with pytest.raises(SystemExit, match="no local file"):
        (tmp_path / "puad.local-e1.pt").unlink()
        bench.main(["--naming", f"--vs_data={data / 'e1'}", f"--ckpt={tmp_path}/puad.ckpt", "--threads=1"])


def test_bench_trains_its_own_checkpoint_with_local_prototypes(tmp_path):
    """Without --ckpt, --vs_tranad and --naming train a cpu-preset PUAD with both stages on the
    entity (bench.vs_checkpoint): the shared checkpoint and the entity's local file."""
    import bench
    from puad import local_path, read_checkpoint
    from test_reliability import make_dataset
    data = make_dataset(tmp_path / "data", entities=("e1",))
    ckpt = bench.vs_checkpoint(dict(bench.OPTIONS, threads=1, vs_windows=64), data / "e1", tmp_path)
    assert read_checkpoint(ckpt)["entities"] == ["e1"]
    assert read_checkpoint(local_path(ckpt, "e1"), kind="local")["entity"] == "e1"
