"""Train PUAD in two stages (paper Algorithm 1).

Stage 1 (global): the network and the global prototypes beta_g on the train series of one or
many entities (one shared model; windows never cross entity borders).
Stage 2 (local): everything frozen but the local prototypes beta_l, fitted on one entity's
train series (or its first --adapt_windows windows); written to a small file of its own beside
the shared checkpoint, which stays untouched.

    python train_safe.py                                   # both stages on the default data
    python train_safe.py --data=../shared/datasets/ASD --entities=omi-1,omi-2 --stage=global
    python train_safe.py --stage=local --entity=omi-3 --adapt_windows=20

One run per --ckpt: a second one stops with a one-line error naming <ckpt>.lock. A run that
learned nothing (no finite validation loss) exits non-zero and never prints `saved`; Ctrl-C
exits 130 naming the last complete epoch that --resume continues from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from config import TRAINS, Config, cli
from puad import (PUAD, build_model, checkpoint_args, fail, history_calibration, local_mismatch, local_path, model_args,
                  model_id, read_checkpoint, run_config, save_checkpoint)
from utils import (DataError, Entity, LockError, Scaler, Windows, align_features, get_device, level_gauges, load_dataset,
                   log, output_lock, set_seed, set_threads, shared_features, split_train_val, time_step,
                   write_csv_atomic)
from vae_loss import total_loss

MAX_BAD_STEPS = 20  # non-finite losses in a row that stop a run (a divergence, not a bad batch)
LOSS_COLUMNS = ["stage", "entity", "epoch", "total", "recon", "kl0", "kl1", "ot", "val_total",
                "rho1", "rho2", "rho3", "lr", "seconds", "skipped"]


# ---- distributed training: `torchrun --nproc_per_node=N train_safe.py ...` trains one model with
# DistributedDataParallel; every rank takes its share of every batch; only rank 0 writes and prints.

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group (plain `python train_safe.py`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA, gloo on CPU. Ranks other than 0 print
    nothing (stdout to /dev/null, log errors only)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        log.setLevel(logging.ERROR)
    return device


class LossStep(torch.nn.Module):
    """model.loss as a forward(), for DistributedDataParallel to hook."""

    def __init__(self, model: PUAD):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, rho: tuple[float, float, float], use_local: bool) -> dict:
        return self.model.loss(x, rho, use_local)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over the ranks (the values themselves with one process)."""
    if dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rho_at(cfg: Config, epoch_progress: float, warm: bool = True) -> tuple[float, float, float]:
    """rho1..3 rise linearly from 0 to their targets over the first warmup_epochs (paper 3.3);
    the local stage starts from a trained model and uses the targets (warm=False)."""
    f = 1.0 if cfg.warmup_epochs <= 0 or not warm else min(1.0, epoch_progress / cfg.warmup_epochs)
    return cfg.rho1 * f, cfg.rho2 * f, cfg.rho3 * f


@torch.no_grad()
def validate(model: PUAD, windows: Windows, cfg: Config, use_local: bool) -> float:
    """Validation loss with the target rhos, posterior means, each window on its own."""
    model.eval()
    total, n = 0.0, 0
    for xb in windows.batches(cfg.score_batch, shard=dist_info()):  # each rank its share
        out = model(xb, use_local, sample=False, batch_plan=False)
        loss = total_loss(out["recon"], out["kl0"], out["kl1"], out["ot"], cfg.rho1, cfg.rho2, cfg.rho3)
        total += loss.item() * len(xb)
        n += len(xb)
    model.train()
    total, n = all_sum([total, n], windows.data.device)
    return total / max(n, 1)


def make_step(model: PUAD, cfg: Config, dev: torch.device, use_local: bool, start_epoch: int):
    """The training step, step_fn(xb, rho, use_local) -> loss parts, and the running OT potentials
    the ranks average after every step (None with one process)."""
    # stage 2 transports each window alone with the potentials stage 1 learned: a balanced plan
    # over a batch of N few-shot windows forces those N windows to use every prototype equally
    # (for N = 1, theta0' is the mean prototype; docs/meta.md)
    batch_plan = not use_local
    rank, world = dist_info()
    if world == 1:
        return (lambda xb, rho, ul: model.loss(xb, rho, ul, batch_plan)), None
    # --batch_size is the global batch: each rank takes batch_size/world of it, gradients are
    # averaged. Parameters and buffers are broadcast from rank 0 here. The per-forward buffer
    # broadcast is off: it would overwrite the running OT potentials with rank 0's at every
    # forward (an average over rank 0's batches only); they are averaged over the ranks after
    # every step instead (the update is linear in g: the running mean of the ranks' mean g).
    ddp = torch.nn.parallel.DistributedDataParallel
    no_fwd_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(ddp).parameters else {"broadcast_buffers": False}  # older torch
    step_fn = ddp(LossStep(model), device_ids=[dev.index] if dev.type == "cuda" else None, **no_fwd_sync)
    torch.manual_seed(cfg.seed + 1000 * start_epoch + rank + 1)  # each rank its own sampling noise
    return step_fn, (model.pot.g_local if use_local else model.pot.g_global)


def agree_finite(finite: bool, running: torch.Tensor, world: int) -> bool:
    """Whether every rank's loss is finite (one collective under torchrun, which also averages
    the Sinkhorn potentials `running`): a step is skipped on every rank or on none."""
    if world == 1:
        return finite
    with torch.no_grad():
        packed = torch.cat([running, running.new_tensor([float(finite)])])
        dist.all_reduce(packed)
        running.copy_(packed[:-1] / world)
    return bool(packed[-1] == world)


def epoch_line(row: dict, epochs: int, n: int) -> str:
    """The log line of one epoch (a loss.csv row; n windows trained on)."""
    return (f"{row['stage']} {row['entity']} epoch {row['epoch']}/{epochs}: total {row['total']:.4g} "
            f"recon {row['recon']:.4g} kl0 {row['kl0']:.3g} kl1 {row['kl1']:.3g} ot {row['ot']:.3g} | "
            f"val {row['val_total']:.4g} | {row['seconds']:.1f}s {n / max(row['seconds'], 1e-9):.0f} windows/s"
            + (f" | skipped {row['skipped']}" if row['skipped'] else ""))


def run_epochs(model: PUAD, params: list[torch.Tensor], train_w: Windows, val_w: Windows, cfg: Config,
               stage: str, entity: str, epochs: int, lr: float, save, history: list[dict],
               start_epoch: int = 0, opt_state: dict | None = None, best_val: float = math.inf) -> float:
    """The training loop shared by both stages; save(epoch, best, optimizer, improved) persists
    state. One loop on purpose (a train script that reads top to bottom, as nanoGPT's): each
    epoch's steps, skips and torchrun collectives, then its validation, log row and save."""
    use_local = stage == "local"
    opt = torch.optim.Adam(params, lr=lr)
    if opt_state:
        opt.load_state_dict(opt_state)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * start_epoch + (stage == "local"))
    steps_per_epoch = math.ceil((cfg.max_train_windows or len(train_w)) / cfg.batch_size)
    bad_run = 0
    model.train()
    rank, world = dist_info()
    step_fn, running = make_step(model, cfg, train_w.data.device, use_local, start_epoch)
    for epoch in range(start_epoch + 1, epochs + 1):
        t0, sums, n, skipped = time.time(), dict(total=0.0, recon=0.0, kl0=0.0, kl1=0.0, ot=0.0), 0, 0
        bar = tqdm(train_w.batches(cfg.batch_size, gen, cfg.max_train_windows, split=(rank, world)),
                   total=steps_per_epoch, desc=f"{stage} {entity} epoch {epoch}/{epochs}",
                   disable=None if rank == 0 else True, leave=False)  # None: a bar on a terminal only
        for step, xb in enumerate(bar):
            rho = rho_at(cfg, epoch - 1 + step / steps_per_epoch, not use_local)
            out = step_fn(xb, rho, use_local)
            if not agree_finite(bool(torch.isfinite(out["total"])), running, world):
                skipped, bad_run = skipped + 1, bad_run + 1
                log.warning("%s epoch %d step %d: non-finite loss, step skipped", stage, epoch, step)
                if bad_run >= MAX_BAD_STEPS:
                    raise SystemExit(f"train_safe.py: error: {bad_run} non-finite losses in a row "
                                     f"({stage} stage, epoch {epoch}); stopped without saving. "
                                     f"Lower --lr or check the data.")
                continue
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(grad_norm):
                skipped, bad_run = skipped + 1, bad_run + 1
                continue
            opt.step()
            bad_run = 0
            for k in sums:
                sums[k] += out[k].item() * len(xb)
            n += len(xb)
            bar.set_postfix({k: f"{out[k].item():.3g}" for k in ("total", "recon", "kl0", "kl1", "ot")})
        if world > 1:  # the epoch's loss over every rank's windows
            *vals, n = all_sum([*sums.values(), n], train_w.data.device)
            sums, n = dict(zip(sums, vals)), int(n)
        if n == 0:  # fewer steps than MAX_BAD_STEPS, all of them non-finite: nothing learned
            raise SystemExit(f"train_safe.py: error: every step of {stage} epoch {epoch} was non-finite "
                             f"(skipped {skipped}); stopped, this epoch not saved. Lower --lr or check "
                             f"the data and --sinkhorn_eps.")
        val = validate(model, val_w, cfg, use_local)
        rho = rho_at(cfg, epoch, not use_local)
        row = dict(stage=stage, entity=entity, epoch=epoch, **{k: v / max(n, 1) for k, v in sums.items()},
                   val_total=val, rho1=rho[0], rho2=rho[1], rho3=rho[2], lr=opt.param_groups[0]["lr"],
                   seconds=round(time.time() - t0, 3), skipped=skipped)
        history.append(row)
        print(epoch_line(row, epochs, n), flush=True)
        improved = math.isfinite(val) and val < best_val
        best_val = val if improved else best_val
        if rank == 0:  # the only writer under torchrun
            write_csv_atomic(cfg.loss_csv, pd.DataFrame(history, columns=LOSS_COLUMNS))
            save(epoch, best_val, opt.state_dict(), improved)
    if world > 1:
        dist.barrier()  # rank 0's files are written before any rank goes on
    return best_val


def used_rows(e: Entity, cfg: Config) -> np.ndarray:
    """The part of an entity's train series training sees: all of it, or its first adapt_windows windows."""
    return e.train[: cfg.adapt_windows + cfg.seq_len - 1] if cfg.adapt_windows else e.train


def prepare(entities: list[Entity], cfg: Config, scalers: dict[str, Scaler] | None = None
            ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]], dict[str, Scaler]]:
    """Scale each entity with its own train-fitted scaler and hold out val_frac of it
    (utils.split_train_val: --val_blocks) -> per entity, its train parts and held-out parts.

    With --adapt_windows=N only the first N windows of each train series are used (scaler
    fitted on them too); there is then too little to hold out, so they also validate.
    """
    scalers = dict(scalers or {})
    trains, vals = [], []
    for e in entities:
        series = used_rows(e, cfg)
        if e.name not in scalers:
            scalers[e.name] = Scaler().fit(series)
        x = scalers[e.name].transform(series)
        tr, va = ([x], [x]) if cfg.adapt_windows else split_train_val(x, cfg.val_frac, cfg.seq_len, cfg.val_blocks)
        trains.append(tr)
        vals.append(va)
    return trains, vals, scalers


def level_mask(entities: list[Entity], cfg: Config) -> np.ndarray:
    """The model's level gauges: a feature that is one (utils.level_gauges) over the rows training
    sees of any entity; none with --level_window=0. Named in the log."""
    mask = np.zeros(len(entities[0].features), bool)
    if cfg.level_window > 0:
        for e in entities:
            mask |= level_gauges(used_rows(e, cfg))
    if mask.any():
        print(f"level gauges ({int(mask.sum())}, centred on each window's mean): "
              + ", ".join(f for f, m in zip(entities[0].features, mask) if m))
    return mask


def flat(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [p for entity in parts for p in entity]


def resume_global(cfg: Config, model: PUAD, entities: list[Entity], last_path: Path,
                  device: torch.device) -> tuple[list[dict], int, dict | None, float]:
    """--resume of the global stage from last_path (loaded into model) -> (history, epoch it
    stopped after, optimizer state, best validation loss); a fresh start without --resume or
    without the file. A file of other features or model sizes is refused (one line)."""
    if not cfg.resume or not last_path.is_file():
        if cfg.resume:
            log.warning("--resume: %s not found; starting from scratch", last_path)
        return [], 0, None, math.inf
    last = read_checkpoint(last_path, device)
    try:
        for e in entities:
            align_features(e, list(last["features"]), f"{cfg.data}/{e.name}", str(last_path), extra="refuse")
    except DataError as e:
        fail(f"{last_path}: --resume: trained on other features than {cfg.data} has ({e}); "
             f"drop --resume or use another --ckpt")
    try:
        model.load_state_dict(last["model"])
    except RuntimeError:
        changed = {k: (v, getattr(cfg, k)) for k, v in checkpoint_args(last).items()
                   if k in ("seq_len", "d_model", "n_heads", "n_layers", "d_ff", "d_h1", "d_theta",
                            "n_global", "n_local") and v != getattr(cfg, k)}
        fail(f"{last_path}: --resume: model of other sizes (saved vs now: {changed or 'see the config'}); "
             f"drop --resume or use the same sizes")
    print(f"resuming the global stage after epoch {last['epoch']} from {last_path}")
    return ([r for r in last["history"] if r["stage"] == "global"], last["epoch"], last["optimizer"],
            last["best_val"])


def warn_stale_locals(ckpt_path: Path) -> None:
    """After a new shared model: the local files beside it that belong to the previous one (now
    refused by test.py and detect_live.py) are named in a warning."""
    locals_ = sorted(ckpt_path.parent.glob(f"{ckpt_path.stem}.local-*.pt"))
    shared = read_checkpoint(ckpt_path) if locals_ else None
    stale = [p for p in locals_ if local_mismatch(read_checkpoint(p, kind="local"), shared, p.stem.split(".local-", 1)[1])]
    if stale:
        log.warning("%d local file(s) beside %s belong to the previous shared model and are now refused "
                    "by test.py and detect_live.py: %s; refit them with --stage=local",
                    len(stale), ckpt_path, ", ".join(p.name for p in stale))


def train_global(cfg: Config, device: torch.device) -> Path:
    entities = load_dataset(cfg.data, cfg.entities, min_rows=cfg.seq_len)
    trains, vals, scalers = prepare(entities, cfg)
    train_w = Windows(flat(trains), cfg.seq_len, 1, device)
    val_w = Windows(flat(vals), cfg.seq_len, 1, device)
    print(f"global stage: {len(entities)} entities, {len(entities[0].features)} features, "
          f"{len(train_w)} train windows, {len(val_w)} validation windows")
    ckpt_path, last_path = Path(cfg.ckpt), Path(cfg.ckpt).with_suffix(".last.ckpt")
    level = level_mask(entities, cfg)
    host = shared_features(entities)
    if host.any():
        print(f"host-level columns ({int(host.sum())}, the same values in entities that share a node; named, not "
              "scored: docs/decisions.md): "
              + ", ".join(f for f, m in zip(entities[0].features, host) if m))
    model = PUAD(cfg, len(entities[0].features)).to(device).set_level(level)
    model.pot.freeze_global(False)
    model.pot.beta_l.requires_grad_(False)  # not trained in stage 1 (DDP needs every trainable tensor used)
    params = [p for n, p in model.named_parameters() if n != "pot.beta_l"]
    history, start_epoch, opt_state, best_val = resume_global(cfg, model, entities, last_path, device)
    meta = dict(config=dataclasses.asdict(cfg), model_args=model_args(cfg), n_features=len(entities[0].features),
                features=entities[0].features, entities=[e.name for e in entities],
                scalers={k: s.state_dict() for k, s in scalers.items()}, stage="global", version=1,
                step_s=time_step(entities),  # seconds between rows; detect_live.py polls at this step (None: row numbers)
                level=[bool(v) for v in level],  # the level gauges (PUAD.set_level)
                host=[bool(v) for v in host],  # the host-level columns (utils.shared_features): named, not scored
                # pooled over every history entity: the scaler a new entity adapted from a few windows borrows
                history_scaler=Scaler().fit(np.concatenate([used_rows(e, cfg) for e in entities])).state_dict())

    saved = []  # epochs whose model this run wrote to ckpt_path

    def save(epoch: int, best: float, opt_sd: dict, improved: bool) -> None:
        if improved:
            sd = model.state_dict()
            save_checkpoint(ckpt_path, dict(meta, model=sd, model_id=model_id(sd), epoch=epoch, val_loss=best))
            saved.append(epoch)
        if epoch == cfg.epochs or epoch % max(1, cfg.epochs // 20) == 0:  # long few-shot runs: ~20 resume points
            save_checkpoint(last_path, dict(meta, model=model.state_dict(), epoch=epoch, best_val=best,
                                            optimizer=opt_sd, history=history))

    if start_epoch < cfg.epochs:
        run_epochs(model, params, train_w, val_w, cfg, "global", "all", cfg.epochs, cfg.lr, save,
                   history, start_epoch, opt_state, best_val)
    if dist_info()[0] == 0:  # only rank 0 writes (and may see) the checkpoint
        # a file already at ckpt_path is an earlier run's, unless this run resumed it with a finite best
        if not saved and not (start_epoch and math.isfinite(best_val) and ckpt_path.is_file()):
            fail(f"no finite validation loss in epochs {start_epoch + 1}..{cfg.epochs}; nothing saved"
                 + (f" ({ckpt_path} is an earlier run's)" if ckpt_path.is_file() else ""))
        if saved:  # the best epoch's model, with the history's calibration rows (puad.history_calibration)
            best = read_checkpoint(ckpt_path, device)
            model.load_state_dict(best["model"])
            save_checkpoint(ckpt_path, dict(best, history_calib=history_calibration(model, vals, trains, cfg,
                                                                                step_s=time_step(entities))))
        print(f"saved {ckpt_path} ({ckpt_path.stat().st_size / 1e6:.2f} MB): epoch {saved[-1]} of {cfg.epochs}, the "
              f"lowest validation loss; {last_path.name} holds epoch {cfg.epochs} for --resume" if saved else
              f"kept {ckpt_path}: no better epoch after resuming")
        if cfg.stage == "global":
            warn_stale_locals(ckpt_path)
    return ckpt_path


def train_local(cfg: Config, device: torch.device, entity_name: str, given: set[str] = frozenset()) -> Path:
    """Fit beta_l of one entity with every other tensor frozen; write only the local file. The
    model fields are the shared checkpoint's (puad.run_config)."""
    shared = read_checkpoint(cfg.ckpt, device)
    model, _ = build_model(shared, device)
    cfg = run_config(cfg, shared, given)
    ent = align_features(load_dataset(cfg.data, [entity_name], min_rows=cfg.seq_len)[0], list(shared["features"]),
                         f"{cfg.data}/{entity_name}", f"the checkpoint {cfg.ckpt}")
    if entity_name in shared["scalers"] and not cfg.adapt_windows:
        known = {entity_name: Scaler.from_state(shared["scalers"][entity_name])}  # trained on it
    else:  # the history's pooled scaler: a few windows' own range is no range (docs/meta.md)
        known = {entity_name: Scaler.from_state(shared["history_scaler"])}
    trains, vals, scalers = prepare([ent], cfg, known)
    scaler = scalers[entity_name]
    train_w, val_w = Windows(flat(trains), cfg.seq_len, 1, device), Windows(flat(vals), cfg.seq_len, 1, device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.pot.beta_l.requires_grad_(True)
    init_local_prototypes(model, train_w, cfg)
    print(f"local stage: entity {entity_name}, {len(train_w)} windows, only beta_l trained")
    out_path = local_path(cfg.ckpt, entity_name)
    history = _previous_rows(cfg.loss_csv)  # the global stage's rows; local rows are appended
    # what the file belongs to: puad.local_mismatch checks these against the shared checkpoint
    meta = dict(entity=entity_name, adapt_windows=cfg.adapt_windows, scaler=scaler.state_dict(),
                features=ent.features, shared_ckpt=str(cfg.ckpt),
                shared_id=shared.get("model_id") or model_id(shared["model"]), version=1)
    saved = []

    def save(epoch: int, best: float, opt_sd: dict, improved: bool) -> None:
        if improved:
            save_checkpoint(out_path, dict(meta, beta_l=model.pot.beta_l.detach().clone(),
                                           g_local=model.pot.g_local.clone(), epoch=epoch, val_loss=best))
            saved.append(epoch)

    model.train()
    run_epochs(model, [model.pot.beta_l], train_w, val_w, cfg, "local", entity_name, cfg.local_epochs,
               cfg.local_lr, save, history)
    if not saved:
        fail(f"{entity_name}: no finite validation loss in {cfg.local_epochs} local epochs; nothing saved"
             + (f" ({out_path} is an earlier run's)" if out_path.is_file() else ""))
    print(f"saved {out_path} ({out_path.stat().st_size / 1e3:.1f} kB)")
    return out_path


@torch.no_grad()
def init_local_prototypes(model: PUAD, train_w: Windows, cfg: Config) -> None:
    """Where beta_l and its OT potentials start (the only tensors stage 2 fits): copies of the
    global prototypes that the adaptation windows use most, each copy and its original sharing
    the original's mass (both potentials g_j - eps ln 2), so that adaptation starts exactly at the
    history model's reconstruction and moves only what the new entity needs (the paper's theta0
    of a few windows measured worse on new servers: docs/meta.md)."""
    model.eval()
    pot = model.pot
    g = pot.g_global.clone()
    idx = torch.arange(len(train_w), device=train_w.data.device)
    use = torch.zeros(len(g), device=idx.device)
    for i in range(0, len(idx), 1024):
        x = train_w.data[train_w.starts[idx[i:i + 1024], None] + train_w.steps]
        theta0 = model.vae.phi(model.encoder(x))[0]
        use += torch.softmax((g - pot.cost(theta0, pot.beta_g)) / pot.eps, -1).sum(0)
    top = torch.argsort(use, descending=True)[: cfg.n_local] % len(g)
    pot.beta_l.copy_(pot.beta_g[top])
    g_copy = g[top] - pot.eps * math.log(2.0)  # softmax(g - C) over [beta_g; beta_l] = over beta_g
    g[top] = g_copy
    pot.g_local.copy_(torch.cat([g, g_copy]))


def _previous_rows(loss_csv: str) -> list[dict]:
    """Rows already in loss_metrics.csv (the global stage) so local rows are appended to them."""
    path = Path(loss_csv)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"--loss_csv {path}: cannot parse CSV ({str(e).splitlines()[0]}); move it away") from None
    return df.to_dict("records") if list(df.columns) == LOSS_COLUMNS else []


def main(argv: list[str] | None = None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")  # under torchrun only rank 0 prints, the config too
    parsed = cli(argv, description=__doc__, reads=TRAINS)
    train(parsed.cfg, parsed.given)


def train(cfg: Config, given: set[str] = frozenset()) -> None:
    """Both stages as cfg.stage says (what `python train_safe.py` runs; meta_eval.py calls it with
    Config objects). given: the fields set on the command line (the local stage takes --data and
    --entities from the checkpoint unless given)."""
    set_seed(cfg.seed)
    set_threads(cfg.num_threads)
    device = init_distributed(get_device(cfg.device))  # a no-op without torchrun
    rank, world = dist_info()
    print(f"device: {device}" + (f", {world} processes (DistributedDataParallel)" if world > 1 else ""))
    t0 = time.time()
    ckpt_path = Path(cfg.ckpt)
    for option, path in (("ckpt", ckpt_path), ("loss_csv", Path(cfg.loss_csv))):
        if path.is_dir():  # refused before training, not at the first save
            raise SystemExit(f"train_safe.py: error: --{option}={path}: a folder, not a file")
    try:
        # one run per --ckpt: it writes the checkpoint, its .last.ckpt and the local files beside it;
        # the lock sits beside the real file, so a symlinked --ckpt takes the same lock
        real = Path(os.path.realpath(ckpt_path))
        lock = output_lock(real.with_name(real.name + ".lock")) if rank == 0 else None
        with lock or contextlib.nullcontext():
            _train(cfg, device, rank, world, given)
    except LockError as e:
        raise SystemExit(f"train_safe.py: error: {e}") from None
    except DataError as e:
        raise SystemExit(f"train_safe.py: error: {e}") from None
    except OSError as e:  # a full disk while writing the loss CSV (checkpoints: puad.save_checkpoint)
        raise SystemExit(f"train_safe.py: error: cannot write {e.filename or 'an output'} ({e.strerror or e}); "
                         "the files there are unchanged") from None
    except KeyboardInterrupt:
        last = ckpt_path.with_suffix(".last.ckpt")
        if cfg.stage != "local" and last.is_file() and last.stat().st_mtime >= t0:  # this run's
            where = f"last complete epoch ({read_checkpoint(last)['epoch']}) saved to {last}; continue with --resume"
        else:
            where = "no complete epoch of this run to resume from; run it again"
        print(f"train_safe.py: interrupted; {where}", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"done in {time.time() - t0:.1f}s")


def _train(cfg: Config, device: torch.device, rank: int, world: int, given: set[str] = frozenset()) -> None:
    if cfg.stage in ("global", "both"):
        train_global(cfg, device)
    if world > 1:  # stage 2 is tiny: rank 0 fits it alone, the others are done
        dist.destroy_process_group()
        if rank != 0:
            return
    if cfg.stage in ("local", "both"):
        targets = [cfg.entity] if cfg.entity else read_checkpoint(cfg.ckpt)["entities"]
        for name in targets:
            train_local(cfg, device, name, given)


if __name__ == "__main__":
    main(sys.argv[1:])
