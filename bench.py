"""Performance benchmark: matmul peak, training and scoring throughput, FLOPs, memory, scaling.

    python bench.py                                  # presets cpu and paper, writes res_hr/bench.json
    python bench.py --quick --presets=cpu            # a quick look
    python bench.py --threads=1 --out=res_hr/bench-1t.json
    python bench.py --fleet=1000 --threads=1         # live detection of 1,000 services (only that)
    python bench.py --fleet=100,1000,5000 --threads=1
    python bench.py --vs_tranad --threads=1            # PUAD's default scoring against TranAD's (only that)
    python bench.py --naming --threads=1               # test.py with naming by repair against without (only that)

Measured on this machine, on the device utils.get_device picks (--device=cpu|cuda):
  - the matmul peak (GFLOP/s) in fp32, and in bf16 (only fast with hardware bf16: AMX, AVX512-BF16, GPUs);
  - per preset: model FLOPs per window (torch.utils.flop_counter.FlopCounterMode: matmuls and
    attention only), training windows/s (the train_safe.py step: forward, backward, clipping,
    Adam) and so the fraction of the fp32 peak reached; the share of a step in Sinkhorn
    (prototype_ot.sinkhorn_log, forward and its unrolled backward) and in data loading
    (Windows.batches gather); scoring points/s in both modes (puad.score_series,
    --score_mode=point|block; its encoder in bf16 where native, so its fraction is of the bf16
    peak there); peak memory (CPU: VmHWM of /proc/self/status above the RSS before
    the phase, reset through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated);
  - scaling (cpu preset): data loading and train/score time against 1, 4, 12 ASD entities (real
    data from --data, else synthetic series of ASD's shape: V=19, 8640 train and 4320 test rows).
--fleet=N[,N...] (bench_fleet): a real Prometheus on loopback scraping, every second, an
exporter (fleetsim.py, its own process) of N synthetic services with the lab's metric set
(labshop/metrics-lab.yaml, 16 columns; normal load, 1 % of the services with a CPU or latency
fault); once a window is filled (seq_len + smooth - 1 steps + the 5 s rate window),
detect_live.Detector polls it at 1 s steps with a `cpu`-preset model (random weights: the cost is
the same as a trained one's), every service with its own scaler, Scorer and latent memory of
puad.LATENT_MEMORY windows (fleet_state), and prints, per N, `fleet N entities: step X ms (query
Y ms, score Z ms)`: the median over --fleet_polls polls after the first, each one step after the
last (a warm poll reads the newest grid points and scores one new window per entity, two where
the previous poll's last point has changed since; the first poll, which reads and scores whole
windows, is printed too); the CPU time of a poll in the detector (all its threads) and in
Prometheus; the detector's resident memory (VmRSS) after the polls; what one service holds, by
part (service_bytes). A step over 1,000 ms means a 1 s poll interval is too short for that
fleet on this machine: the detector then polls late (--live_step=15 leaves 15 s). Each size
runs in a process of its own (its resident memory is its own).
--vs_tranad (bench_vs_tranad): PUAD against TranAD (tranad.py, written from Tuli et al. 2022)
on one entity (--vs_data, SMD machine-1-6 by default), in one process, --vs_rounds rounds that
alternate the two: training windows/s (the train_safe.py step of the cpu preset, batch 256;
tranad.train_step, batch 128), and points/s of scoring the test split through the project's
scorer (scoring.apply, the drift guard's thresholds): PUAD with global prototypes, PUAD's
default path (local prototypes under --local_score=closer and the latent term: what test.py
scores an entity with), TranAD (its score, mean over features); and per entity as test.py without
naming (PUAD: puad.reconstruct_entity, the calibration rows, the latent memory and the test
split, then calibrate; TranAD: its validation-tail scores, then calibrate and the test split).
Both score in batches of --score_batch windows. Then the peak extra memory of scoring the test
split once (PUAD's default path, TranAD), each model in a fresh process (PeakMemory). PUAD is
--ckpt (with the entity's local file), else a cpu-preset model trained here with both stages;
TranAD is trained here; --vs_epochs epochs of --vs_windows windows each (speed is per window:
a model to time, not a good one). Prints PUAD / TranAD for each; writes res_hr/bench-vs-tranad.json.
--naming (bench_naming): what naming by repair costs test.py on one entity with local
prototypes (--vs_data, SMD machine-1-6 by default; --ckpt with the entity's local file, else
trained as for --vs_tranad): `python test.py --entity=E` with the default naming against
`--repair_weight=0` (scores, thresholds and detection metrics are the same; only the features
named differ), --vs_rounds rounds alternating the two, each run a process of its own with
--num_threads=--threads. Prints each one's wall time (the process, imports included) and
test.py's own seconds (metrics.json: after the imports), their medians, the median of the
rounds' ratios, and both runs' HitRate@150 %; writes res_hr/bench-naming.json.
The machine may be shared: the load average before and after is recorded; timings are the
best of a few repeats.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import prototype_ot
import puad
from config import OneLineParser, cli_error, parse_bool, parse_config
import scoring
import tranad
from transformer import bf16_native
from puad import (LATENT_MEMORY, PUAD, apply_local_state, build_model, calibrate_entity, entity_state, fit_scorer, latent_memory,
                  local_path, read_checkpoint, reconstruct_entity, run_config, score_kwargs, score_series,
                  window_reconstructor)
from utils import (DataError, Scaler, Windows, align_features, create_sequences, get_device, load_dataset, release_freed_memory,
                   set_seed, set_threads,
                   split_train_val, time_step, write_json_atomic)

OPTIONS = dict(presets="cpu,paper", quick=False, out="res_hr/bench.json", data="../shared/datasets/ASD",
               device="auto", threads=0, score_batch=1024, entities="1,4,12", fleet="",
               fleet_polls=6, vs_tranad=False, vs_data="../shared/datasets/SMD/machine-1-6", ckpt="",
               vs_epochs=1, vs_windows=4096, vs_rounds=3, naming=False)
V, SEQ_LEN, N_TRAIN, N_TEST = 19, 20, 8640, 4320  # ASD's shape
NAMED_POINTS = 100  # consecutive flagged points whose features the naming benchmark ranks


OPTION_HELP = dict(presets="comma list of config.py presets to measure", quick="fewer repeats and smaller matmuls (a quick look)", out="JSON file of every number",
                   data="ASD-shaped dataset for the real-data runs (synthetic series when absent)",
                   device="auto | cpu | cuda | cuda:N", threads="torch CPU threads (0 = torch default)",
                   score_batch="windows per scoring batch", entities="entity counts of the scaling runs ('' = skip)",
                   fleet="comma list of fleet sizes: benchmark only live detection of that many services (see above)",
                   fleet_polls="polls timed per fleet size (after the first)",
                   vs_tranad="benchmark only PUAD's default scoring against TranAD's (tranad.py) on --vs_data (see above)",
                   vs_data="one entity folder for --vs_tranad and --naming", ckpt="--vs_tranad, --naming: a PUAD "
                   "checkpoint with a local file for the entity ('' = train one here)",
                   vs_epochs="--vs_tranad: training epochs of both models (--naming: of PUAD)",
                   vs_windows="--vs_tranad, --naming: training windows per epoch",
                   vs_rounds="--vs_tranad, --naming: alternating timed runs",
                   naming="benchmark only test.py with naming by repair against --repair_weight=0 on --vs_data (see above)")


def parse_args(argv: list[str]) -> dict:
    """bench.py's own options (OPTIONS; not Config fields): --help lists them."""
    parser = OneLineParser(prog="bench.py", description=__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in OPTIONS.items():
        if isinstance(default, bool):
            parser.add_argument(f"--{key}", nargs="?", const=True, type=parse_bool, default=default, metavar="BOOL",
                                help=f"{OPTION_HELP[key]} (--{key} / --no-{key}; default: {default})")
            parser.add_argument(f"--no-{key}", dest=key, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{key}", type=type(default), default=default, metavar=type(default).__name__.upper(),
                                help=f"{OPTION_HELP[key]} (default: {default!r})")
    return vars(parser.parse_args(argv))


# ---- timing and memory helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc/PID/stat (10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a phase in bytes: CUDA allocator peak, or on CPU the peak RSS (VmHWM) above
    the RSS at the start (VmHWM is reset through /proc/self/clear_refs where the kernel allows)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.kind = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                self.reset = False
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes, self.kind = torch.cuda.max_memory_allocated(self.device) - self.base, "cuda max_memory_allocated"
        elif self.base is not None:
            hwm = _status("VmHWM")
            self.bytes = None if hwm is None else hwm - self.base
            self.kind = "VmHWM - VmRSS" + ("" if self.reset else " (VmHWM not resettable: an upper bound)")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = best_time(lambda: a @ b, device, repeats)
    return 2 * n ** 3 / t / 1e9


# ---- per preset

def model_flops(model: PUAD, x: torch.Tensor) -> tuple[float, float]:
    """FLOPs per window: training forward, and forward + backward (matmuls and attention)."""
    model.train()
    with FlopCounterMode(display=False) as fc:
        model.loss(x, (0.01, 0.01, 0.01))
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.loss(x, (0.01, 0.01, 0.01))["total"].backward()
    model.zero_grad(set_to_none=True)
    return fwd / len(x), fc.get_total_flops() / len(x)


def synthetic_series(n_entities: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    t = np.arange(N_TRAIN + N_TEST)[:, None]
    out = []
    for i in range(n_entities):
        x = np.sin(2 * np.pi * t / rng.uniform(50, 500, V)) + 0.1 * rng.standard_normal((len(t), V))
        out.append((f"synthetic-{i + 1}", x[:N_TRAIN], x[N_TRAIN:]))
    return out


def entity_series(data: str, n_entities: int) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str, float]:
    """(name, scaled train, scaled test) of the first n entities of --data, or synthetic ones."""
    t = time.perf_counter()
    if Path(data).is_dir():
        names = sorted((p.name for p in Path(data).iterdir() if p.is_dir()),
                       key=lambda s: [int(c) if c.isdigit() else c for c in s.replace("-", " ").split()])
        if len(names) >= n_entities:
            ents = load_dataset(data, names[:n_entities], min_rows=SEQ_LEN)
            out = []
            for e in ents:
                sc = Scaler("minmax").fit(e.train)
                out.append((e.name, sc.transform(e.train), sc.transform(e.test)))
            return out, f"{data} ({n_entities} entities)", time.perf_counter() - t
    out = [(n, Scaler("minmax").fit(a).transform(a), Scaler("minmax").fit(a).transform(b))
           for n, a, b in synthetic_series(n_entities)]
    return out, "synthetic (ASD shape)", time.perf_counter() - t


class Probe:
    """Times prototype_ot.sinkhorn_log (forward) inside the model and keeps its last cost."""

    def __init__(self, device):
        self.device, self.seconds, self.calls, self.cost, self.orig = device, 0.0, 0, None, None

    def __enter__(self):
        self.orig = prototype_ot.sinkhorn_log

        def timed(cost, *a, **k):
            sync(self.device)
            t = time.perf_counter()
            r = self.orig(cost, *a, **k)
            sync(self.device)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            self.cost = cost.detach()
            return r
        prototype_ot.sinkhorn_log = timed
        return self

    def __exit__(self, *exc):
        prototype_ot.sinkhorn_log = self.orig


def train_bench(cfg, model: PUAD, windows: Windows, device, steps: int) -> dict:
    """The train_safe.py step timed: data gather, forward, backward, clipping, Adam."""
    params = [p for n, p in model.named_parameters() if n != "pot.beta_l"]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    batches = windows.batches(cfg.batch_size, gen)
    model.train()
    load_s = step_s = 0.0
    n = 0

    def one_step(timed: bool):
        nonlocal load_s, step_s, n
        nonlocal batches
        t0 = time.perf_counter()
        xb = next(batches, None)
        if xb is None or len(xb) < cfg.batch_size:
            batches = windows.batches(cfg.batch_size, gen)
            xb = next(batches)
        sync(device)
        t1 = time.perf_counter()
        out = model.loss(xb, (cfg.rho1, cfg.rho2, cfg.rho3))
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if timed:
            load_s += t1 - t0
            step_s += t2 - t0
            n += len(xb)

    one_step(False)  # warm-up
    with Probe(device) as probe:
        for _ in range(steps):
            one_step(True)
    # Sinkhorn's backward (its unrolled last iterations) runs inside backward(); time it alone on
    # the last real cost matrix: forward + backward, minus the forward already counted
    cost = probe.cost.clone().requires_grad_(True)
    pot = model.pot

    def sk_fb():
        plan, _, _ = prototype_ot.sinkhorn_log(cost, pot.eps, pot.n_iters)
        plan.sum().backward()
    def sk_f():
        with torch.no_grad():
            prototype_ot.sinkhorn_log(cost.detach(), pot.eps, pot.n_iters)
    sk_bwd = max(best_time(sk_fb, device, 5) - best_time(sk_f, device, 5), 0.0)
    sinkhorn_s = probe.seconds / max(probe.calls, 1) + sk_bwd
    per_step = step_s / steps
    return dict(batch=cfg.batch_size, steps=steps, windows_per_s=n / step_s, step_s=per_step,
                sinkhorn_s_per_step=sinkhorn_s, sinkhorn_share=sinkhorn_s / per_step,
                data_s_per_step=load_s / steps, data_share=load_s / step_s)


def score_bench(model: PUAD, series: np.ndarray, cfg, device, batch: int, mode: str, repeats: int,
                train: np.ndarray | None = None) -> dict:
    """The whole default scorer: reconstruction (score_series) and Scorer.score (normalise, the
    latent term against a memory of up to 1,000 train windows, combine, smooth), with a Scorer
    fitted once on the series' first rows (memory_s: building the memory, once per entity at
    calibration)."""
    t0 = time.perf_counter()
    memory = latent_memory(model, [series if train is None else train], cfg)
    memory_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = scoring.Scorer.from_config(cfg).fit(score_series(model, series[: 10 * cfg.seq_len], cfg.seq_len, mode=mode),
                                                 memory=memory)
    first_s = time.perf_counter() - t0
    t = best_time(lambda: scorer.score(score_series(model, series, cfg.seq_len, batch_size=batch, mode=mode)),
                  device, repeats)
    n_windows = len(series) - cfg.seq_len + 1 if mode == "point" else math.ceil(len(series) / cfg.seq_len)
    res = dict(mode=mode, batch=batch, points=len(series), seconds=t,
               points_per_s=len(series) / t, windows_per_s=n_windows / t, first_call_s=first_s,
               memory_s=memory_s, memory_windows=len(memory))
    if mode == "point":  # naming the features of flagged points (a reconstruction per feature repaired)
        rec = score_series(model, series, cfg.seq_len, batch_size=batch)
        rows = np.arange(len(series) - NAMED_POINTS, len(series))
        res["name_s_per_point"] = best_time(lambda: scorer.explain(
            rec, window_reconstructor(model, False), rows, cfg.seq_len), device, 1) / len(rows)
    return res


def bench_preset(name: str, opts: dict, device: torch.device, series: list, peak_fp32: float) -> dict:
    quick = opts["quick"]
    cfg = parse_config([f"--preset={name}", f"--seq_len={SEQ_LEN}"])
    set_seed(0)
    res: dict = dict(preset=name)
    with PeakMemory(device) as mem_model:
        model = PUAD(cfg, V).to(device)
    res["parameters"] = sum(p.numel() for p in model.parameters())
    if quick and name == "paper":
        cfg.batch_size = 64  # --quick: a smaller paper batch
    trains = [tr for _, tr, _ in series]
    windows = Windows(trains, cfg.seq_len, 1, device)
    xb = windows.data[windows.starts[:cfg.batch_size, None] + windows.steps]
    fwd, fwd_bwd = model_flops(model, xb)
    res.update(flops_fwd_per_window=fwd, flops_fwd_bwd_per_window=fwd_bwd)
    steps = (3 if name == "paper" else 10) if quick else (4 if name == "paper" else 30)
    with PeakMemory(device) as mem_train:
        tr = train_bench(cfg, model, windows, device, steps)
    tr["gflops"] = tr["windows_per_s"] * fwd_bwd / 1e9
    tr["fraction_of_fp32_peak"] = tr["gflops"] / peak_fp32
    tr["peak_memory_bytes"] = mem_train.bytes
    res["train"] = tr
    model.eval()
    test = series[0][2]
    if name == "paper":
        test = test[: (500 if quick else 1500)]
    res["score"] = {}
    for mode in ("point", "block"):
        with PeakMemory(device) as mem_score:
            s = score_bench(model, test, cfg, device, opts["score_batch"], mode, 2 if quick else 3,
                            train=series[0][1])
        s["peak_memory_bytes"] = mem_score.bytes
        s["gflops"] = s["windows_per_s"] * fwd / 1e9
        res["score"][s["mode"]] = s
    if name == "cpu" and not quick:  # the batch size does not change a score; does it change the speed?
        res["score_batch_sweep"] = {b: score_bench(model, test, cfg, device, b, "point", 2, train=series[0][1])["points_per_s"]
                                    for b in (256, 1024, 4096, 16384)}
    res["memory_kind"] = mem_train.kind
    res["model_memory_bytes"] = mem_model.bytes
    return res


def bench_scaling(opts: dict, device: torch.device) -> list[dict]:
    """cpu preset: loading, train throughput and scoring against the number of entities."""
    cfg = parse_config(["--preset=cpu", f"--seq_len={SEQ_LEN}"])
    rows = []
    for k in (int(c) for c in opts["entities"].split(",")):
        series, source, load_s = entity_series(opts["data"], k)
        set_seed(0)
        model = PUAD(cfg, V).to(device)
        t = time.perf_counter()
        windows = Windows([tr for _, tr, _ in series], cfg.seq_len, 1, device)
        build_s = time.perf_counter() - t
        tr = train_bench(cfg, model, windows, device, 3 if opts["quick"] else 8)
        model.eval()
        t = time.perf_counter()
        n_points = 0
        for _, _, test in series:
            score_series(model, test, cfg.seq_len, batch_size=opts["score_batch"], mode="block")
            n_points += len(test)
        score_s = time.perf_counter() - t
        rows.append(dict(entities=k, source=source, train_windows=len(windows), load_s=load_s,
                         windows_build_s=build_s, train_windows_per_s=tr["windows_per_s"],
                         epoch_s_projected=len(windows) / tr["windows_per_s"], data_share=tr["data_share"],
                         test_points=n_points, score_block_s=score_s, score_block_points_per_s=n_points / score_s))
    return rows


def bench_fleet(n: int, opts: dict) -> dict:
    """One fleet size: Prometheus + exporter of n services, a Detector on all of them, timed polls."""
    import detect_live
    import fleetsim
    from config import PRESETS, Config
    from prometheus import load_metric_set, parse_step

    names = fleetsim.service_names(n)
    faults = {name: ("cpu", "latency")[i % 2] for i, name in enumerate(names[::100])}
    cfg = Config(**{k: v for k, v in PRESETS["cpu"].items()}, num_threads=opts["threads"],
                 score_batch=opts["score_batch"])
    metric_set = load_metric_set(Path(__file__).parent / "labshop" / "metrics-lab.yaml", services=names)
    metric_set["rate_window"] = "5s"
    features = [m["column"] for m in metric_set["metrics"]]
    set_seed(0)
    model = PUAD(cfg, len(features)).eval()
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp, \
            fleetsim.Fleet(names, Path(tmp), scrape_s=1, external=True, faults=faults) as fleet:
        rows = cfg.seq_len + cfg.smooth - 1
        fill = rows + 2 * parse_step(metric_set["rate_window"]) + 5  # the window, its rate-window rows and their rates
        time.sleep(max(0.0, fleet.started + fill - time.time()))
        # the first poll reads whole windows of every service: far longer than a warm one
        live = detect_live.LiveOptions(prometheus=fleet.prometheus, live_step=1, live_log=f"{tmp}/events.jsonl",
                                       query_timeout=60.0)
        session = detect_live.make_session()
        rss_before = _status("VmRSS")
        states, scorers, setup_s = fleet_state(names, faults, model, cfg, session, fleet.prometheus, metric_set, rows)
        det = detect_live.Detector(cfg, live, {"features": features}, model, names, metric_set, metric_set["metrics"],
                                   states, scorers)
        # each poll advances the window by one step, as in a detector that keeps up (detect_live's
        # run loop polls 0.25 x step after a grid point); a poll longer than the step delays the next
        prom = next(p.pid for name, p in fleet.procs.started if name == "prometheus")
        c0, t0 = cpu_seconds(prom), time.time()
        time.sleep(2.0)
        prom_idle = (cpu_seconds(prom) - c0) / (time.time() - t0)  # scraping and ingesting, no query
        timings = []
        end = int(math.floor(time.time() - 0.25))
        for _ in range(opts["fleet_polls"] + 1):
            time.sleep(max(0.0, end + 0.25 - time.time()))
            c0, p0 = time.process_time(), cpu_seconds(prom)
            det.poll(end)
            timings.append(dict(det.timing, cpu_s=time.process_time() - c0, prometheus_cpu_s=cpu_seconds(prom) - p0))
            end += 1
        alarms = sum(det.alerts.on(s) for s in names)
        caught = sum(det.alerts.on(s) for s in faults)
        rss = _status("VmRSS")
        service = service_bytes(det, names[0])
    warm = timings[1:]
    med = lambda key: float(np.median([t[key] for t in warm])) * 1e3  # noqa: E731
    return dict(load_average=os.getloadavg()[0], entities=n, rss_bytes=rss, rss_before_bytes=rss_before,
                service_bytes=service, 
                setup_s=setup_s, memory_windows=len(scorers[names[0]].memory_),
                step_ms=med("step_s"), query_ms=med("query_s"), score_ms=med("score_s"),
                update_ms=med("update_s"), cpu_ms=med("cpu_s"), prometheus_cpu_ms=med("prometheus_cpu_s"),
                prometheus_idle_cpu=prom_idle, first_step_ms=timings[0]["step_s"] * 1e3,
                first_score_ms=timings[0]["score_s"] * 1e3, scored=warm[-1]["scored"],
                model_windows=float(np.median([t["model_windows"] for t in warm])),
                faulty=len(faults), alarms=alarms, alarms_on_faulty=caught, polls=len(warm))


def fleet_run(n: int, opts: dict) -> dict:
    """bench_fleet(n) in a process of its own (fleet_child), so that each size's resident memory
    is its own, not what an earlier size left allocated."""
    with tempfile.TemporaryDirectory(prefix="fleet-run-") as tmp:
        out = Path(tmp) / "fleet.json"
        spec = json.dumps(dict(n=n, opts=opts, out=str(out)))
        r = subprocess.run([sys.executable, "-c", "import bench, sys; bench.fleet_child(sys.argv[1])", spec],
                           cwd=Path(__file__).parent)
        if r.returncode or not out.is_file():
            raise SystemExit(f"bench.py: error: the fleet of {n} services failed (exit code {r.returncode})")
        return json.loads(out.read_text())


def fleet_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    set_threads(spec["opts"]["threads"])
    write_json_atomic(spec["out"], bench_fleet(spec["n"], spec["opts"]))


def fleet_state(names: list[str], faults: dict, model: PUAD, cfg, session, prometheus: str, metric_set: dict,
                rows: int) -> tuple[dict, dict, float]:
    """Every service's own state, as a real fleet holds it: a scaler, and a Scorer fitted on its
    own with a latent memory of its own of puad.LATENT_MEMORY windows x d_theta (float32). The
    values come from 20 normal services' first window (the scaler fitted on their rows, the
    calibration their reconstruction, the memories their windows' theta0s resampled with a
    little noise per service): the synthetic fleet has no train series, and the cost of a poll
    depends on the sizes, not on the values. -> (states, scorers, seconds it took)."""
    import detect_live
    t0 = time.perf_counter()
    end = int(time.time()) - 1
    sample = [s for s in names if s not in faults][:20]
    got = detect_live.fetch_fleet(session, prometheus, metric_set, metric_set["metrics"], sample, end, rows, 1, 30.0)
    x = np.concatenate([np.nan_to_num(v) for v, _ in got.values()])
    scaler = Scaler("minmax").fit(x)
    calib = score_series(model, scaler.transform(x), cfg.seq_len)
    base = latent_memory(model, [scaler.transform(v) for v in (np.nan_to_num(v) for v, _ in got.values())], cfg)
    const, spread = scoring.constant_features(x), 0.01 * base.std(0)
    rng = np.random.default_rng(0)
    states, scorers = {}, {}
    for i, name in enumerate(names):
        if i % 100 == 99:  # the fits' freed temporaries back to the system, else the allocator keeps ~1 MB per service
            release_freed_memory()
        memory = base[rng.integers(0, len(base), LATENT_MEMORY)] + spread * rng.standard_normal(
            (LATENT_MEMORY, base.shape[1]), dtype=np.float32)
        states[name] = detect_live.EntityState(Scaler(scaler.kind, scaler.shift.copy(), scaler.scale.copy()))
        scorers[name] = scoring.Scorer.from_config(cfg).fit(calib, const, memory)
    return states, scorers, time.perf_counter() - t0


def service_bytes(det, name: str) -> dict[str, int]:
    """What the detector holds for one service after some polls, in bytes, by part: its latent
    memory (its rows of the stack: states, squared norms, centre), its Scorer's other arrays,
    its scaler, the drift guard's past scores (a deque of numbers), the window cache (the last
    `smooth` windows' bytes, mean and theta0) and the last poll's rows (input, mean, named)."""
    live = det.scoring
    sc, st = live.scorers[name], live.states[name]
    m = sc.memory_
    rec, named = live.last_input[name]
    return dict(
        latent_memory=sum(t.numel() * t.element_size() for t in (m.states, m.norms, m.center)) if m else 0,
        scorer=sum(a.nbytes for a in (sc.center_, sc.scale_, sc.pinned_, sc.usual_, sc.recent_) if a is not None),
        scaler=st.scaler.shift.nbytes + st.scaler.scale.nbytes,
        drift_history=live.history[name].buffer.nbytes,
        window_cache=sum(sys.getsizeof(k) + mu.nbytes + z.nbytes for k, (mu, z) in live.window_cache[name].items()),
        last_rows=rec.x.nbytes + rec.mu.nbytes + named.nbytes)


# ---- PUAD against TranAD (--vs_tranad): one process, the same entity, alternating runs

def vs_checkpoint(opts: dict, folder: Path, tmp: Path) -> Path:
    """--ckpt, else a cpu-preset PUAD trained on the entity with both stages (train_safe.py, its
    own process; --vs_epochs epochs of --vs_windows windows each: enough for a model to time)."""
    if opts["ckpt"]:
        return Path(opts["ckpt"])
    ckpt = tmp / "puad.ckpt"
    cmd = [sys.executable, "train_safe.py", "--preset=cpu", f"--data={folder}", f"--ckpt={ckpt}",
           f"--loss_csv={tmp}/loss.csv", "--stage=both", f"--epochs={opts['vs_epochs']}",
           f"--local_epochs={opts['vs_epochs']}", f"--max_train_windows={opts['vs_windows']}",
           f"--num_threads={opts['threads']}"]
    r = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench.py: error: training PUAD on {folder} failed: {r.stderr.strip().splitlines()[-1:]}")
    return ckpt


def entity_folder(opts: dict) -> Path:
    """--vs_data, checked: one entity folder with its labels."""
    folder = Path(opts["vs_data"])
    if not (folder / "test_label.csv").is_file() and not (folder / "test_label.csv.gz").is_file():
        cli_error(f"--vs_data={folder}: not an entity folder with train, test and test_label files")
    return folder


def vs_setup(opts: dict, tmp: Path) -> dict:
    """The entity (--vs_data, one entity folder), PUAD (its checkpoint, local file and the
    calibrations test.py fits) and a TranAD trained on the same scaled train rows."""
    folder = entity_folder(opts)
    ckpt_path = vs_checkpoint(opts, folder, tmp)
    ckpt = read_checkpoint(ckpt_path)
    cfg = run_config(parse_config([f"--data={folder}", f"--ckpt={ckpt_path}", f"--score_batch={opts['score_batch']}"]),
                     ckpt, {"data"})
    model, _ = build_model(ckpt)
    try:
        ent = align_features(load_dataset(folder, min_rows=cfg.seq_len)[0], list(ckpt["features"]), str(folder))
    except DataError as e:
        cli_error(f"--vs_data={folder}: {e}")
    local, scaler = entity_state(ckpt, ckpt_path, ent.name)
    if local is None:
        raise SystemExit(f"bench.py: error: {local_path(ckpt_path, ent.name)}: no local file; --vs_tranad times "
                         f"the default path, with local prototypes")
    apply_local_state(model, local)
    train, test = scaler.transform(ent.train), scaler.transform(ent.test)
    step_s = time_step([ent])
    cals = {use: calibrate_entity(model, ckpt, cfg, train, local, use, ent.name, step_s) for use in (True, False)}
    fit_parts, held = split_train_val(train, cfg.val_frac, cfg.seq_len, cfg.val_blocks)
    win = np.concatenate([create_sequences(p, tranad.WINDOW) for p in fit_parts])
    pick = np.random.default_rng(0).permutation(len(win))[:opts["vs_windows"]]  # as --max_train_windows
    ctx = dict(folder=folder, ckpt_path=ckpt_path, ckpt=ckpt, cfg=cfg, model=model, ent=ent, train=train, test=test,
               fit_parts=fit_parts, held=held, step_s=step_s, cals=cals, tranad_windows=win,
               tranad=tranad.fit(win[np.sort(pick)], epochs=opts["vs_epochs"]))
    ctx["tcal"] = tranad_calibration(ctx)
    return ctx


def puad_scores(ctx: dict, use_local: bool, bf16: bool = True) -> np.ndarray:
    """The test split through test.py's scorer: score_series, Scorer.score (the latent term
    included), the drift guard's thresholds; bf16=False: the encoder in fp32 even where the
    device runs bf16 natively (puad.SCORE_BF16)."""
    scorer, cfg = ctx["cals"][use_local], ctx["cfg"]
    default, puad.SCORE_BF16 = puad.SCORE_BF16, bf16 and puad.SCORE_BF16
    try:
        return scorer.thresholds(scorer.score(score_series(ctx["model"], ctx["test"], cfg.seq_len, use_local,
                                                           **score_kwargs(cfg))))
    finally:
        puad.SCORE_BF16 = default


def puad_entity(ctx: dict) -> np.ndarray:
    """test.py's score_entity without naming: calibration rows, the latent memory, the test
    split, calibration, scores, thresholds."""
    r = reconstruct_entity(ctx["model"], ctx["ckpt"], ctx["cfg"], ctx["ent"])
    scorer = fit_scorer(ctx["cfg"], r.calib, ctx["step_s"])
    return scorer.thresholds(scorer.score(r.test))


def tranad_calibration(ctx: dict) -> scoring.Scorer:
    """TranAD's Scorer fitted on the held-out train rows, as baselines.py fits one."""
    scores = [tranad.score_series(ctx["tranad"], p, ctx["cfg"].score_batch).mean(1) for p in ctx["held"]]
    rows = np.concatenate(ctx["held"])
    return scoring.Scorer.from_config(ctx["cfg"]).fit(scoring.Reconstruction(rows, scores=np.concatenate(scores)),
                                                      step_s=ctx["step_s"])


def tranad_scores(ctx: dict, rows: np.ndarray, scorer: scoring.Scorer | None = None) -> np.ndarray:
    """TranAD's scores of rows (mean over features) through the same smoothing and threshold;
    without a scorer, calibrated first (tranad_calibration, as puad_entity)."""
    scorer = scorer or tranad_calibration(ctx)
    s = scorer.score(scoring.Reconstruction(rows, scores=tranad.score_series(ctx["tranad"], rows, ctx["cfg"].score_batch).mean(1)))
    return scorer.thresholds(s)


def tranad_train_bench(model, windows: np.ndarray, steps: int) -> float:
    """Windows/s of tranad.train_step (batch tranad.BATCH, random batches, epoch 1)."""
    opt, _ = tranad.make_optimizer(model)
    gen = np.random.default_rng(0)
    batches = [torch.as_tensor(np.ascontiguousarray(windows[gen.integers(0, len(windows), tranad.BATCH)], np.float32))
               for _ in range(steps + 1)]
    model.train()
    tranad.train_step(model, opt, batches[0], 1)  # warm-up
    t = time.perf_counter()
    for xb in batches[1:]:
        tranad.train_step(model, opt, xb, 1)
    return steps * tranad.BATCH / (time.perf_counter() - t)


def vs_memory(ctx: dict, which: str, opts: dict, tmp: Path) -> dict:
    """Peak extra memory of scoring the test split once (puad_scores with local prototypes, or
    tranad_scores), in a fresh process of its own (vs_memory_child): PeakMemory, VmHWM above
    the RSS before, VmHWM reset through /proc/self/clear_refs, after the setup's freed memory
    went back to the system (glibc malloc_trim)."""
    spec = dict(which=which, opts=opts, ckpt=str(ctx["ckpt_path"]), tranad=str(tmp / "tranad.pt"))
    torch.save(ctx["tranad"].state_dict(), spec["tranad"])
    r = subprocess.run([sys.executable, "-c", "import bench, sys; bench.vs_memory_child(sys.argv[1])", json.dumps(spec)],
                       cwd=Path(__file__).parent, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench.py: error: memory of {which}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def vs_memory_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    opts = dict(spec["opts"], ckpt=spec["ckpt"])
    set_threads(opts["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        ctx = vs_setup(dict(opts, vs_epochs=0), Path(tmp))  # no TranAD training: its weights are loaded
    ctx["tranad"].load_state_dict(torch.load(spec["tranad"], weights_only=True))
    fn = (lambda: puad_scores(ctx, True)) if spec["which"] == "puad" else (lambda: tranad_scores(ctx, ctx["test"], ctx["tcal"]))
    release_freed_memory()  # what the setup freed goes back to the system, so that scoring cannot reuse it unseen
    with PeakMemory(torch.device("cpu")) as mem:
        fn()
    print(json.dumps(dict(bytes=mem.bytes, kind=mem.kind)))


def bench_vs_tranad(opts: dict) -> dict:
    """Training windows/s, scoring points/s (the best of --vs_rounds alternating runs) and the
    scoring memory of PUAD's default path against TranAD's on one entity."""
    rounds = opts["vs_rounds"]
    with tempfile.TemporaryDirectory(prefix="vs-tranad-") as tmp:
        t0 = time.perf_counter()
        ctx = vs_setup(opts, Path(tmp))
        setup_s = time.perf_counter() - t0
        cfg = ctx["cfg"]
        puad_model = copy.deepcopy(ctx["model"])
        windows = Windows(ctx["fit_parts"], cfg.seq_len, 1, torch.device("cpu"))
        tran = copy.deepcopy(ctx["tranad"])
        n_test = len(ctx["test"])
        runs: dict[str, list[float]] = {k: [] for k in ("train_puad", "train_tranad", "global_puad", "default_puad",
                                                        "default_fp32", "default_tranad", "entity_puad", "entity_tranad")}
        for _ in range(rounds):  # alternating, so that a busy spell of the machine hits both
            runs["train_puad"].append(train_bench(cfg, puad_model, windows, torch.device("cpu"), 10)["windows_per_s"])
            runs["train_tranad"].append(tranad_train_bench(tran, ctx["tranad_windows"], 20))
            for key, fn in (("global_puad", lambda: puad_scores(ctx, False)), ("default_puad", lambda: puad_scores(ctx, True)),
                            ("default_fp32", lambda: puad_scores(ctx, True, bf16=False)),
                            ("default_tranad", lambda: tranad_scores(ctx, ctx["test"], ctx["tcal"])),
                            ("entity_puad", lambda: puad_entity(ctx)), ("entity_tranad", lambda: tranad_scores(ctx, ctx["test"]))):
                t = time.perf_counter()
                fn()
                runs[key].append(n_test / (time.perf_counter() - t))
        memory = {which: vs_memory(ctx, which, opts, Path(tmp)) for which in ("puad", "tranad")}
    best = {k: max(v) for k, v in runs.items()}
    pairs = dict(train=("train_puad", "train_tranad"), global_path=("global_puad", "default_tranad"),
                 default_path=("default_puad", "default_tranad"), default_fp32=("default_fp32", "default_tranad"),
                 entity=("entity_puad", "entity_tranad"))
    paired = {k: float(np.median(np.divide(runs[p], runs[q]))) for k, (p, q) in pairs.items()}  # round by round
    return dict(data=str(ctx["folder"]), entity=ctx["ent"].name, features=ctx["ent"].test.shape[1],
                train_rows=len(ctx["train"]), test_points=n_test, puad_seq_len=cfg.seq_len, tranad_window=tranad.WINDOW,
                checkpoint=opts["ckpt"] or "trained here", bf16_native=bf16_native(torch.device("cpu")), setup_s=setup_s, score_batch=cfg.score_batch, runs=runs, best=best, memory=memory, paired=paired,
                puad_parameters=sum(p.numel() for p in ctx["model"].parameters()),
                tranad_parameters=sum(p.numel() for p in ctx["tranad"].parameters()))


def print_vs_tranad(r: dict, threads: int) -> None:
    b, m = r["best"], r["memory"]
    print(f"PUAD against TranAD on {r['entity']} ({r['features']} features, {r['train_rows']} train rows, "
          f"{r['test_points']} test points), {threads} thread(s), best of {len(r['runs']['train_puad'])} alternating runs")
    print(f"  PUAD cpu preset, {r['puad_parameters'] / 1e3:.0f} k parameters, window {r['puad_seq_len']}; "
          f"TranAD {r['tranad_parameters'] / 1e3:.0f} k parameters, window {r['tranad_window']}")
    print(f"  {'path':<58}{'PUAD':>12}{'TranAD':>12}{'PUAD / TranAD':>15}{'paired':>9}")
    rows = [("training (windows/s)", b["train_puad"], b["train_tranad"], "train"),
            ("scoring the test split, global prototypes (points/s)", b["global_puad"], b["default_tranad"], "global_path"),
            ("scoring the test split, default path (points/s)", b["default_puad"], b["default_tranad"], "default_path"),
            ("  the same, the encoder in fp32 everywhere (points/s)", b["default_fp32"], b["default_tranad"], "default_fp32"),
            ("per entity, test.py without naming (test points/s)", b["entity_puad"], b["entity_tranad"], "entity")]
    for name, p, t, key in rows:
        print(f"  {name:<58}{p:>12,.0f}{t:>12,.0f}{p / t:>14.2f}x{r['paired'][key]:>8.2f}x")
    mp, mt = m["puad"]["bytes"], m["tranad"]["bytes"]
    ratio = f"{mp / mt:>14.2f}x" if mp and mt else ""
    print(f"  {'peak extra memory scoring the test split, default path':<58}{fmt_bytes(mp):>12}{fmt_bytes(mt):>12}{ratio}")
    print(f"  default path: local prototypes (each point the closer reconstruction) + latent term, the encoder in bf16 "
          f"{'(native here)' if r['bf16_native'] else '(not native here: fp32)'}; TranAD (fp32) through the same smoothing "
          f"and threshold; both in batches of {r['score_batch']} windows. Memory: {m['puad']['kind']}, each model in a "
          f"fresh process. paired: the median over rounds of the round's ratio. Setup (training both models, "
          f"calibrations) {r['setup_s']:.0f} s")


# ---- naming by repair (--naming): test.py with and without it, alternating processes

def naming_run(ckpt: Path, folder: Path, out: Path, threads: int, repair: bool) -> dict:
    """One `python test.py` on the entity, in a process of its own -> its wall seconds (imports
    included), test.py's own seconds (metrics.json) and the entity's metrics."""
    cmd = [sys.executable, "test.py", f"--ckpt={ckpt}", f"--data={folder}", f"--entity={folder.name}",
           f"--out_dir={out}", *([f"--num_threads={threads}"] if threads else []), *([] if repair else ["--repair_weight=0"])]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"bench.py: error: {' '.join(cmd[1:])} failed: {r.stderr.strip().splitlines()[-1:]}")
    doc = json.loads((out / "metrics.json").read_text())
    return dict(wall_s=wall, test_s=doc["seconds"], metrics=doc["entities"][folder.name])


def bench_naming(opts: dict) -> dict:
    """test.py with the default naming against --repair_weight=0 on --vs_data, --vs_rounds rounds
    alternating the two (which goes first alternates too)."""
    folder = entity_folder(opts)
    with tempfile.TemporaryDirectory(prefix="naming-") as tmp:
        ckpt = vs_checkpoint(opts, folder, Path(tmp))
        if not local_path(ckpt, folder.name).is_file():
            raise SystemExit(f"bench.py: error: {local_path(ckpt, folder.name)}: no local file; --naming times "
                             f"test.py with local prototypes")
        runs: dict[str, list[dict]] = {"repair": [], "no_repair": []}
        for i in range(opts["vs_rounds"]):
            for repair in ((True, False) if i % 2 == 0 else (False, True)):
                key = "repair" if repair else "no_repair"
                runs[key].append(naming_run(ckpt, folder, Path(tmp) / f"{key}-{i}", opts["threads"], repair))
    med = {k: {t: float(np.median([r[t] for r in v])) for t in ("wall_s", "test_s")} for k, v in runs.items()}
    ratio = {t: float(np.median([a[t] / b[t] for a, b in zip(runs["repair"], runs["no_repair"])])) for t in ("wall_s", "test_s")}
    m = {k: v[0]["metrics"] for k, v in runs.items()}
    return dict(data=str(folder), entity=folder.name, checkpoint=opts["ckpt"] or "trained here", runs=runs, median=med,
                ratio=ratio, hitrate_150={k: v.get("hitrate_150") for k, v in m.items()},
                auc_pr={k: v.get("auc_pr") for k, v in m.items()}, local_prototypes=m["repair"]["local_prototypes"])


def print_naming(r: dict, threads: int) -> None:
    med, ratio, n = r["median"], r["ratio"], len(r["runs"]["repair"])
    print(f"test.py on {r['entity']} (local prototypes: {r['local_prototypes']}), --num_threads={threads}, "
          f"median of {n} alternating runs each")
    print(f"  {'':<32}{'wall (process)':>16}{'test.py own':>14}")
    for key, name in (("repair", "default naming (by repair)"), ("no_repair", "--repair_weight=0")):
        print(f"  {name:<32}{med[key]['wall_s']:>14.1f} s{med[key]['test_s']:>12.1f} s")
    print(f"  {'default / --repair_weight=0':<32}{ratio['wall_s']:>15.2f}x{ratio['test_s']:>13.2f}x   (median of the rounds' ratios)")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"  HitRate@150%: {fmt(r['hitrate_150']['repair'])} with repair, {fmt(r['hitrate_150']['no_repair'])} without; "
          f"AUC-PR {fmt(r['auc_pr']['repair'])} and {fmt(r['auc_pr']['no_repair'])}")


def fmt_bytes(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def run_and_write(opts: dict, key: str, bench: Callable[[dict], dict], show: Callable[[dict, int], None],
                  default_out: str, **header) -> dict:
    """One side-by-side benchmark: bench(opts) under results[key], bracketed by the load average,
    printed by show(result, threads) and written to --out (default_out when --out is not given)."""
    results = dict(header, load_average_start=os.getloadavg(), options=opts)
    results[key] = r = bench(opts)
    results["load_average_end"] = os.getloadavg()
    show(r, results["threads"])
    print(f"load average {results['load_average_start'][0]:.2f} at the start, "
          f"{results['load_average_end'][0]:.2f} at the end")
    write_json_atomic(opts["out"] if opts["out"] != OPTIONS["out"] else default_out, results)
    return results


def run_vs_tranad(opts: dict) -> dict:
    """--vs_tranad: bench_vs_tranad, printed and written to --out (res_hr/bench-vs-tranad.json)."""
    return run_and_write(opts, "vs_tranad", bench_vs_tranad, print_vs_tranad, "res_hr/bench-vs-tranad.json",
                         threads=torch.get_num_threads(), torch=torch.__version__,
                         cpu=platform.processor() or platform.machine())


def run_naming(opts: dict) -> dict:
    """--naming: bench_naming, printed and written to --out (res_hr/bench-naming.json)."""
    return run_and_write(opts, "naming", bench_naming, print_naming, "res_hr/bench-naming.json", threads=opts["threads"])


def run_fleet(opts: dict) -> dict:
    """--fleet=N,...: fleet_run per size (each in a process of its own), printed; --out if given."""
    results = {"threads": torch.get_num_threads(), "load_average_start": os.getloadavg(), "fleet": []}
    for n in [int(v) for v in str(opts["fleet"]).split(",") if v.strip()]:
        r = fleet_run(n, opts)
        results["fleet"].append(r)
        print(f"fleet {n} entities: step {r['step_ms']:.0f} ms (query {r['query_ms']:.0f} ms, "
              f"score {r['score_ms']:.0f} ms)", flush=True)
        print(f"  first poll {r['first_step_ms']:.0f} ms (score {r['first_score_ms']:.0f} ms, every window "
              f"new); metrics update {r['update_ms']:.0f} ms; {r['scored']} entities scored per poll, "
              f"{r['model_windows']:.0f} windows through the model; load average {r['load_average']:.1f}; "
              f"median of {r['polls']} polls", flush=True)
        print(f"  CPU per poll: detector {r['cpu_ms']:.0f} ms (all its threads), Prometheus {r['prometheus_cpu_ms']:.0f} ms "
              f"(it uses {1e3 * r['prometheus_idle_cpu']:.0f} ms/s between polls, scraping and ingesting)", flush=True)
        print(f"  detector resident memory {fmt_bytes(r['rss_bytes'])} after the polls, {fmt_bytes(r['rss_before_bytes'])} before "
              f"the services' state: a scaler, a Scorer and a latent memory of {r['memory_windows']} windows "
              f"each, built in {r['setup_s']:.0f} s)", flush=True)
        print("  one service holds " + ", ".join(f"{k.replace('_', ' ')} {v / 1024:.1f} kB"
                                                 for k, v in r["service_bytes"].items()), flush=True)
    results["load_average_end"] = os.getloadavg()
    if opts["out"] != OPTIONS["out"]:
        write_json_atomic(opts["out"], results)
    return results


def run_scaling(opts: dict, device: torch.device) -> list[dict]:
    """--entities: bench_scaling's rows, printed."""
    rows = bench_scaling(opts, device)
    print(f"\n[scaling, cpu preset] {rows[0]['source'] if rows else ''}")
    print(f"  {'entities':>8}{'train windows':>15}{'load s':>8}{'train win/s':>13}{'epoch s':>9}"
          f"{'test points':>13}{'score block s':>15}")
    for r in rows:
        print(f"  {r['entities']:>8}{r['train_windows']:>15}{r['load_s']:>8.2f}{r['train_windows_per_s']:>13.0f}"
              f"{r['epoch_s_projected']:>9.1f}{r['test_points']:>13}{r['score_block_s']:>15.2f}")
    return rows


def run_presets(opts: dict) -> dict:
    """The default run: matmul peak, each preset's training and scoring (bench_preset), the
    scaling over entities (--entities), printed and written to --out."""
    device = get_device(opts["device"])
    load0 = os.getloadavg()
    t_start = time.time()
    quick = opts["quick"]
    n = 1024 if quick else 2048
    peak = {"fp32": max(matmul_peak(device, torch.float32, n, 3 if quick else 5) for _ in range(2))}
    bf16 = matmul_peak(device, torch.bfloat16, 512 if device.type == "cpu" else n, 2)
    peak["bf16"] = bf16
    peak["bf16_fast"] = bf16 > peak["fp32"]
    print(f"device {device}, {torch.get_num_threads()} threads, load average {load0[0]:.2f}: "
          f"matmul peak fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s"
          + ("" if peak["bf16_fast"] else " (slow here: no hardware bf16; training and scoring stay fp32)"), flush=True)
    if load0[0] > 0.5 and torch.get_num_threads() > 1:
        print(f"warning: load average {load0[0]:.1f} before the run: other jobs share these cores, and "
              f"{torch.get_num_threads()} OpenMP threads per process slow down badly when a core is taken "
              f"(try --threads=1)", flush=True)
    series, source, _ = entity_series(opts["data"], 1)
    results = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                   cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                   load_average_start=load0, options=opts, data=source, matmul_peak_gflops=peak, presets={})
    for name in [p for p in opts["presets"].split(",") if p]:
        r = bench_preset(name, opts, device, series, peak["fp32"])
        results["presets"][name] = r
        tr = r["train"]
        print(f"\n[{name}] {r['parameters'] / 1e6:.2f} M parameters; {r['flops_fwd_per_window'] / 1e6:.1f} MFLOP/window "
              f"forward, {r['flops_fwd_bwd_per_window'] / 1e6:.1f} MFLOP forward+backward")
        score_peak = "bf16" if bf16_native(device) and puad.SCORE_BF16 else "fp32"  # the encoder's precision when scoring
        print(f"  {'phase':<22}{'throughput':>22}{'GFLOP/s':>10}{'% of peak':>13}{'peak memory':>13}"
              f"  (training: of the fp32 peak; scoring: of the {score_peak} peak, the encoder's precision there)")
        print(f"  {'train (batch ' + str(tr['batch']) + ')':<22}{tr['windows_per_s']:>14.0f} win/s"
              f"{tr['gflops']:>10.1f}{100 * tr['fraction_of_fp32_peak']:>12.1f}%{fmt_bytes(tr['peak_memory_bytes']):>13}")
        for s in r["score"].values():
            print(f"  {'score ' + s['mode']:<22}{s['points_per_s']:>11.0f} points/s{s['gflops']:>10.1f}"
                  f"{100 * s['gflops'] / peak[score_peak]:>12.1f}%{fmt_bytes(s['peak_memory_bytes']):>13}")
        print(f"  train step {tr['step_s'] * 1e3:.1f} ms: Sinkhorn {tr['sinkhorn_s_per_step'] * 1e3:.2f} ms "
              f"({100 * tr['sinkhorn_share']:.1f} %), data gather {tr['data_s_per_step'] * 1e3:.2f} ms "
              f"({100 * tr['data_share']:.2f} %)")
        point = r["score"].get("point")
        if point and "name_s_per_point" in point:
            print(f"  naming (scoring.explain): {point['name_s_per_point'] * 1e3:.1f} ms per flagged point "
                  f"(up to {V + 1} windows each, global prototypes; a live alarm: its last point, once when raised or "
                  f"re-sent; test.py: bench.py --naming)")
        if point:
            print(f"  latent memory: {point['memory_windows']} windows in {point['memory_s'] * 1e3:.0f} ms "
                  f"(once per entity, at calibration)")
        if "score_batch_sweep" in r:
            print("  point scoring vs --score_batch: " + ", ".join(f"{b}: {v:.0f}/s" for b, v in r["score_batch_sweep"].items()))
    if opts["entities"]:
        results["scaling"] = run_scaling(opts, device)
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = round(time.time() - t_start, 1)
    write_json_atomic(opts["out"], results)
    print(f"\nload average {results['load_average_end'][0]:.2f} at the end; "
          f"wrote {opts['out']} in {results['seconds']:.0f}s")
    return results


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(opts["threads"])
    if opts["vs_tranad"]:
        return run_vs_tranad(opts)
    if opts["naming"]:
        return run_naming(opts)
    if opts["fleet"]:
        return run_fleet(opts)
    return run_presets(opts)

if __name__ == "__main__":
    main()
