"""PUAD: Transformer encoder -> prototype OT -> hierarchical VAE (Li et al., ICML 2023).

The model, its reconstruction of a series (score_series: the decoder's mean and standard
deviation of every point, from the window ending at it) and checkpoint I/O. scoring.py turns
reconstructions into anomaly scores (higher = more anomalous) and thresholds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass
import sys
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch
from torch import nn

import scoring
from scoring import Reconstruction
from config import Config, ConfigError, config_from_dict
from faultlog import ExportError, path_name
from prototype_ot import PrototypeOT
from transformer import TransformerEncoder
from utils import (Entity, Scaler, atomic_write, create_sequences, log, split_bounds, split_train_val, time_step,
                   trailing_mean, window_values_to_points)
from vae_loss import HierarchicalVAE, gaussian_kl, gaussian_nll, total_loss


INPUT_CLIP = 10.0  # scaled inputs are clipped to +-this before the model (score_series)
HISTORY_CALIB_ROWS = 4000  # the most calibration rows a stage-1 checkpoint stores (history_calibration)
LATENT_MEMORY = 1000  # the most normal windows an entity's latent memory keeps (500 to all: within 0.005 AUC-PR,
                      # docs/decisions.md)
SCORE_BF16 = True  # scoring runs the encoder in bf16 where the device does natively (transformer.bf16_native)


class PUAD(nn.Module):
    def __init__(self, cfg: Config, n_features: int):
        super().__init__()
        self.encoder = TransformerEncoder(n_features, cfg.seq_len, cfg.d_model, cfg.n_heads,
                                          cfg.n_layers, cfg.d_ff, cfg.dropout)
        self.to_h1 = nn.Sequential(nn.Linear(self.encoder.out_dim, cfg.d_h1), nn.GELU())  # eq. 8
        self.pot = PrototypeOT(cfg.n_global, cfg.n_local, cfg.d_theta, cfg.sinkhorn_eps,
                               cfg.sinkhorn_iters, cfg.ot_momentum)
        self.vae = HierarchicalVAE(self.encoder.out_dim, cfg.d_h1, cfg.d_theta, cfg.seq_len,
                                   n_features, cfg.min_std)
        # the level gauges (utils.level_gauges; the checkpoint's "level"): centred on each window's
        # mean before the encoder, in training and scoring, and reconstructed around it
        self.register_buffer("level", torch.zeros(n_features, dtype=torch.bool), persistent=False)
        self.has_level = False

    def set_level(self, mask) -> "PUAD":
        """Mark the level gauges ((V,) bool; None or all False: none, the model as before them)."""
        mask = torch.as_tensor(False if mask is None else mask, dtype=torch.bool).expand(len(self.level))
        self.level.copy_(mask.to(self.level.device))
        self.has_level = bool(mask.any())
        return self

    def center(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, V) -> (x less each window's mean on the level gauges, that mean (B, 1, V); 0 elsewhere)."""
        if not self.has_level:
            return x, torch.zeros_like(x[:, :1])
        c = x.mean(1, keepdim=True) * self.level.to(x.dtype)
        return x - c, c

    def encode(self, x: torch.Tensor, sample: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, V) -> h1, q(theta0 | x)'s mean and std, theta0 (sampled, or the mean)."""
        h0 = self.encoder(self.center(x)[0])
        mu0, std0 = self.vae.phi(h0)
        theta0 = mu0 + std0 * torch.randn_like(std0) if sample else mu0
        return self.to_h1(h0), mu0, std0, theta0

    def encode_mean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring's encoding of windows x (B, T, V): h1 and theta0, q(theta0 | x)'s mean, the
        encoder in bf16 where the device runs it natively (SCORE_BF16)."""
        h0 = self.encoder(self.center(x)[0], bf16=SCORE_BF16)
        return self.to_h1(h0), self.vae.phi.mean(h0)

    def generate(self, theta0: torch.Tensor, h1: torch.Tensor, use_local: bool, sample: bool = True,
                 batch_plan: bool = True, need_loss: bool = True) -> dict[str, torch.Tensor]:
        """theta0 -> transport to the prototypes (eq. 2-4), theta1 (eq. 9), the decoder's x_mu
        and x_std (B, T, V); the OT loss and q(theta1)'s mean and std for the loss."""
        theta0_prime, ot, plan = self.pot(theta0, use_local, batch_plan, need_loss=need_loss)
        mu1, std1 = self.vae.psi(torch.cat([theta0_prime, h1], dim=-1))
        theta1 = mu1 + std1 * torch.randn_like(std1) if sample else mu1
        x_mu, x_std = self.vae.decode(theta1)
        return {"theta0_prime": theta0_prime, "ot": ot, "plan": plan, "mu1": mu1, "std1": std1,
                "x_mu": x_mu, "x_std": x_std}

    def forward(self, x: torch.Tensor, use_local: bool = False, sample: bool = True,
                batch_plan: bool = True) -> dict[str, torch.Tensor]:
        """x (B, T, V) -> the loss parts (batch means), the per-point NLL (B, T, V) and the plan
        (B, K). Training samples and transports a batch together (batch_plan); validation uses
        posterior means, each window transported alone (sample=batch_plan=False)."""
        x = self.center(x)[0]  # the level gauges' shape is reconstructed, their level is the window's
        h1, mu0, std0, theta0 = self.encode(x, sample)
        g = self.generate(theta0, h1, use_local, sample, batch_plan)
        mu_p, std_p = self.vae.f1(g["theta0_prime"])
        nll = gaussian_nll(x, g["x_mu"], g["x_std"])
        return {"recon": nll.sum((1, 2)).mean(), "kl0": gaussian_kl(mu0, std0).sum(-1).mean(),
                "kl1": gaussian_kl(g["mu1"], g["std1"], mu_p, std_p).sum(-1).mean(), "ot": g["ot"],
                "nll": nll, "x_mu": g["x_mu"], "x_std": g["x_std"], "plan": g["plan"], "theta0": theta0}

    def loss(self, x: torch.Tensor, rho: tuple[float, float, float], use_local: bool = False,
             batch_plan: bool = True) -> dict[str, torch.Tensor]:
        out = self(x, use_local, batch_plan=batch_plan)
        out["total"] = total_loss(out["recon"], out["kl0"], out["kl1"], out["ot"], *rho)
        return out

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, use_local: bool = False, last: bool = False) -> dict[str, torch.Tensor]:
        """The decoder's mean of every point of every window (B, T, V), or of each window's last
        point only (last=True: (B, 1, V)), from posterior means (on the level gauges: around the
        window's mean, "center" (B, 1, V), PUAD.center); the row-normalised transport plan
        (B, K) and theta0 (B, d_theta), what the encoder makes of each window (the same with or
        without the local prototypes).

        Each window is transported on its own (running OT potentials), so nothing depends on the
        batch. With use_local each point takes the reconstruction, with or without the local
        prototypes, that is closer to it (squared error summed over its features): the local
        prototypes then explain what the global ones do not, and never make a point worse
        explained (fitted on a few windows, they otherwise pull every window towards those:
        docs/meta.md). "local_used" (B, T or 1) says which; "plan_global" (B, K_g) is the plan
        without them (the windows' transport before adaptation). The encoder runs once for both.
        """
        was_training = self.training
        self.eval()
        x, center = self.center(x)
        h1, theta0 = self.encode_mean(x)
        xs = x[:, -1:] if last else x

        def decode(local: bool) -> tuple[torch.Tensor, torch.Tensor]:
            theta0_prime, _, plan = self.pot(theta0, local, batch_plan=False, need_loss=False)
            theta1 = self.vae.psi.mean(torch.cat([theta0_prime, h1], dim=-1))
            return self.vae.decode_mean(theta1, last), plan / plan.sum(-1, keepdim=True)

        x_mu, plan = decode(False)
        res = {"x_mu": x_mu, "plan": plan, "theta0": theta0, "center": center.expand(xs.shape),
               "local_used": torch.zeros(xs.shape[:2], dtype=torch.bool, device=x.device)}
        if use_local:
            local_mu, local_plan = decode(True)
            used = ((xs - local_mu) ** 2).sum(-1) <= ((xs - x_mu) ** 2).sum(-1)  # (B, T or 1)
            res.update(x_mu=torch.where(used[..., None], local_mu, x_mu), plan=local_plan, local_used=used,
                       plan_global=plan)
        if self.has_level:
            res["x_mu"] = res["x_mu"] + center
        self.train(was_training)
        return res


# ---- checkpoints: plain dicts of tensors, strings and numbers, loadable with weights_only=True

def local_path(ckpt: str | Path, entity: str) -> Path:
    """Where the per-entity state (beta_l, its OT potentials and scaler) sits beside the shared
    model; an entity name that is not one path component is refused (faultlog.path_name)."""
    ckpt = Path(ckpt)
    try:
        return ckpt.with_name(f"{ckpt.stem}.local-{path_name(entity, 'entity')}.pt")
    except ExportError as e:
        fail(str(e))


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write a checkpoint atomically and fsynced; a failed write (a full disk) is a one-line error
    and leaves the file there as it was. Serialised in memory first: torch.save reports a failed
    write as an opaque RuntimeError, a plain write says why."""
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    try:
        atomic_write(path, write)
    except OSError as e:
        fail(f"{path}: cannot save the checkpoint ({e.strerror or e}); the file there is unchanged")


def fail(message: str) -> NoReturn:
    """Stop the running script with a one-line `script.py: error: ...` (exit code 1)."""
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu", kind: str | None = None) -> dict:
    """A checkpoint as a dict; kind='shared' (train_safe.py's model file), 'local' (an entity's
    file) or None (either, told apart by beta_l): a missing, truncated, empty or foreign file is
    a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: no checkpoint; train one first with train_safe.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # an empty file's error has no text
        fail(f"{path}: not a readable PUAD checkpoint ({reason})")
    if kind is None:
        kind = "local" if isinstance(ckpt, dict) and "beta_l" in ckpt else "shared"
    need = ("n_features", "features", "scalers") if kind == "shared" else ("entity", "features", "beta_l", "g_local", "scaler")
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if kind == "shared" and not (isinstance(ckpt, dict) and ("model_args" in ckpt or "config" in ckpt)):
        missing.insert(0, "config or model_args")  # model_args since they were split from config
    if missing:
        fail(f"{path}: not a PUAD {kind} checkpoint (no {', '.join(missing)})")
    return ckpt


def model_id(state: dict[str, torch.Tensor]) -> str:
    """Identity of a shared model: a hash of its tensors (local files record the one they fit)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# the network and its input: fixed by a checkpoint (stored as its "model_args", like nanoGPT's)
MODEL_FIELDS = ("seq_len", "d_model", "n_heads", "n_layers", "d_ff", "d_h1", "d_theta", "n_global", "n_local",
                "sinkhorn_eps", "sinkhorn_iters", "ot_momentum", "dropout", "min_std")
# what it was trained on: the defaults of a run on the checkpoint (--data, --entities, --val_frac
# may change them) and adapt_windows (which rows calibrate it)
TRAINED_ON = ("data", "entities", "val_frac", "val_blocks", "adapt_windows")
# defaults from the checkpoint that a run may change: the data and how it was split
OVERRIDABLE = ("data", "entities", "val_frac", "val_blocks")
# what a checkpoint that predates a field was trained with, where Config's default has changed since
LEGACY = {"val_blocks": 1}


def model_args(cfg: Config) -> dict:
    """What a checkpoint stores as its model_args: MODEL_FIELDS and TRAINED_ON of cfg."""
    return {k: getattr(cfg, k) for k in MODEL_FIELDS + TRAINED_ON}


def checkpoint_args(ckpt: dict) -> dict:
    """A checkpoint's model_args; an old checkpoint (only "config") has them derived from its
    config, fields it predates at Config's defaults."""
    stored = ckpt.get("model_args") or {k: v for k, v in ckpt.get("config", {}).items()
                                        if k in MODEL_FIELDS + TRAINED_ON}
    return {k: stored.get(k, LEGACY.get(k, getattr(Config, k))) for k in MODEL_FIELDS + TRAINED_ON}


def run_config(cfg: Config, ckpt: dict, given: set[str] = frozenset()) -> Config:
    """The Config of a run on a trained checkpoint (test.py, detect_live.py, ablation.py, the local
    stage): the model fields are the checkpoint's (one set differently on the command line is
    ignored, with a warning); --data, --entities, --val_frac and --val_blocks (OVERRIDABLE) default to
    the checkpoint's unless given; every run option (scoring, thresholds, outputs, device...) is the command line's."""
    args = checkpoint_args(ckpt)
    ignored = [f"--{k}={getattr(cfg, k)!r} (checkpoint: {args[k]!r})" for k in MODEL_FIELDS
               if k in given and k not in OVERRIDABLE and getattr(cfg, k) != args[k]]
    if ignored:
        log.warning("the checkpoint fixes the model; ignored: %s", ", ".join(ignored))
    values = {k: args[k] for k in dict.fromkeys(MODEL_FIELDS + OVERRIDABLE) if k not in OVERRIDABLE or k not in given}
    try:
        return dataclasses.replace(cfg, **values).validate()
    except ConfigError as e:
        fail(f"checkpoint model_args: {e}")


def build_model(ckpt: dict, device: torch.device | str = "cpu") -> tuple[PUAD, Config]:
    """The checkpoint's model (eval mode) and a Config of its model_args (other fields default)."""
    try:
        cfg = config_from_dict(checkpoint_args(ckpt))
    except ConfigError as e:
        fail(f"checkpoint model_args: {e}")
    n = ckpt["n_features"]
    if isinstance(n, bool) or not isinstance(n, int) or n != len(ckpt["features"]):
        fail(f"checkpoint n_features={n!r} does not match its {len(ckpt['features'])} features")
    if not isinstance(ckpt.get("model"), dict):
        fail("checkpoint has no model weights")
    with torch.device("meta"):  # shapes only, nothing allocated: absurd model_args are refused here
        expected = {k: tuple(v.shape) for k, v in PUAD(cfg, n).state_dict().items()}
    stored = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else "not a tensor" for k, v in ckpt["model"].items()}
    wrong = [k for k in expected if stored.get(k, "missing") != expected[k]]
    if wrong:
        got = stored.get(wrong[0], "missing")
        fail(f"checkpoint model does not match its own model_args ({wrong[0]}: {got}, model_args give "
             f"{expected[wrong[0]]}; seq_len={cfg.seq_len}, d_model={cfg.d_model})")
    model = PUAD(cfg, n).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        fail(f"checkpoint model does not match its own model_args ({str(e).splitlines()[0]})")
    level = ckpt.get("level")  # absent in checkpoints from before the level gauges: none
    if level is not None and len(level) != n:
        fail(f"checkpoint level has {len(level)} entries for {n} features")
    model.set_level(level)
    host = ckpt.get("host")  # absent in checkpoints from before the host-level columns: none
    if host is not None and len(host) != n:
        fail(f"checkpoint host has {len(host)} entries for {n} features")
    model.eval()
    return model, cfg


def apply_local_state(model: PUAD, local: dict) -> None:
    with torch.no_grad():
        model.pot.beta_l.copy_(local["beta_l"])
        model.pot.g_local.copy_(local["g_local"])


def local_mismatch(local: dict, ckpt: dict, entity: str) -> str | None:
    """Why a local file does not belong to this shared checkpoint and entity; None when it does."""
    if local.get("entity") != entity:
        return f"written for entity {local.get('entity')!r}, not {entity!r}"
    if list(local.get("features", [])) != list(ckpt["features"]):
        return "fitted on other features than the shared checkpoint's"
    if tuple(local["beta_l"].shape) != tuple(ckpt["model"]["pot.beta_l"].shape):
        return f"local prototypes of shape {tuple(local['beta_l'].shape)}, the model has " \
               f"{tuple(ckpt['model']['pot.beta_l'].shape)}"
    shared = ckpt.get("model_id") or model_id(ckpt["model"])
    if local.get("shared_id") != shared:
        return "fitted against another shared model (the checkpoint was retrained since, or the " \
               "file comes from elsewhere)"
    return None


def entity_state(ckpt: dict, ckpt_path: str | Path, entity: str) -> tuple[dict | None, Scaler | None]:
    """An entity's local file (None unless adapted) and its scaler: the local file's, else the
    one the shared checkpoint was trained with, else None. A local file that does not belong to
    this checkpoint and entity (local_mismatch) is refused: a one-line error naming it."""
    lp = local_path(ckpt_path, entity)
    local = read_checkpoint(lp, kind="local") if lp.is_file() else None
    if local is not None:
        problem = local_mismatch(local, ckpt, entity)
        if problem:
            fail(f"{lp}: {problem}; refit it with train_safe.py --stage=local --entity={entity} "
                 f"or delete it")
        return local, Scaler.from_state(local["scaler"])
    if entity in ckpt["scalers"]:
        return None, Scaler.from_state(ckpt["scalers"][entity])
    return None, None


def adapted_windows(ckpt: dict, local: dict | None) -> int:
    """N when the model saw only the first N windows of the entity (--adapt_windows=N), else 0."""
    return local.get("adapt_windows", 0) if local is not None else checkpoint_args(ckpt)["adapt_windows"]


def calibration_rows(x_train: np.ndarray, ckpt: dict, local: dict | None, cfg: Config) -> list[np.ndarray]:
    """The scaled train rows a threshold is fitted on, in parts: the first N windows when the
    model saw only those (--adapt_windows=N), else the held-out rows (utils.split_train_val, as
    for the baselines)."""
    n_adapt = adapted_windows(ckpt, local)
    if n_adapt:
        return [x_train[: n_adapt + cfg.seq_len - 1]]
    return split_train_val(x_train, cfg.val_frac, cfg.seq_len, cfg.val_blocks)[1]


def calibration_history(x_train: np.ndarray, ckpt: dict, local: dict | None, cfg: Config) -> list[np.ndarray | None]:
    """For each part of calibration_rows, the train rows before it (the level gauges' recent
    level, score_series' history); None for a part that starts the series."""
    bounds = None if adapted_windows(ckpt, local) else split_bounds(len(x_train), cfg.val_frac, cfg.seq_len,
                                                                     cfg.val_blocks)
    return [x_train[:cut] if cut else None for _, cut, _ in bounds] if bounds else [None]


def score_parts(model: "PUAD", parts: list[np.ndarray], seq_len: int, use_local: bool = False,
                histories: list[np.ndarray | None] | None = None, **kwargs) -> Reconstruction:
    """score_series of several stretches of one series (held-out parts), concatenated in order:
    each part is reconstructed on its own, no window crosses from one into the next; `histories`,
    the rows before each part (score_series' history)."""
    histories = histories or [None] * len(parts)
    return Reconstruction.concat([score_series(model, p, seq_len, use_local, history=h, **kwargs)
                                  for p, h in zip(parts, histories)])


@dataclass
class CalibrationData:
    """What an entity's Scorer is fitted on (calibration_input)."""
    rows: Reconstruction                 # the calibration rows' reconstruction
    constant: np.ndarray                 # (V,) the features constant over the rows training saw
    memory: np.ndarray | None = None     # (M, d_theta) the latent term's normal windows; None: no term
    host: np.ndarray | None = None       # (V,) the host-level features (checkpoint_host): named, not scored


@dataclass
class EntityReconstruction:
    """An entity's calibration data and test split, reconstructed (reconstruct_entity)."""
    calib: CalibrationData
    test: Reconstruction
    use_local: bool


LEVEL_STEP_S = 60.0  # the step level_window assumes where the timestamps give none


def level_rows(cfg: Config, step_s: float | None) -> int:
    """--level_window in rows of this step (at least 1; 0 = off)."""
    return max(1, int(round(cfg.level_window / (step_s or LEVEL_STEP_S)))) if cfg.level_window > 0 else 0


def score_kwargs(cfg: Config, step_s: float | None = None) -> dict:
    """score_series' options from a Config (the same for calibration and test rows)."""
    return dict(batch_size=cfg.score_batch, mode=cfg.score_mode, level_rows=level_rows(cfg, step_s))


def calibration_input(model: PUAD, ckpt: dict, cfg: Config, x_train: np.ndarray, local: dict | None,
                      use_local: bool, name: str = "", step_s: float | None = None) -> CalibrationData:
    """What an entity's calibration is fitted on: the reconstruction of its calibration rows
    (x_train already scaled), which features were constant over the rows training saw, and the
    latent term's memory, never of the calibration rows themselves: theta0 of the train rows
    before the tail (latent_memory), or for an adapted entity the history's (history_memory).
    An entity adapted from so few windows that its rows are under cfg.min_calib_rows borrows
    the history's calibration rows instead (history_calibration), when the checkpoint has them:
    on new ASD servers, N = 5 to 20 windows' own threshold flagged 22-32 % of the test points,
    and up to N = 50 the history's calibration gave the better F1 (docs/meta.md)."""
    parts = calibration_rows(x_train, ckpt, local, cfg)
    rows = np.concatenate(parts)
    adapted = adapted_windows(ckpt, local)
    if adapted and len(rows) < cfg.min_calib_rows:
        if "history_calib" in ckpt:
            log.info("%s: %d calibration rows (< --min_calib_rows=%d): the history's %d calibration rows",
                     name or "entity", len(rows), cfg.min_calib_rows, len(ckpt["history_calib"]["x"]))
            h = {k: v.numpy() for k, v in ckpt["history_calib"].items()}
            return CalibrationData(Reconstruction(h["x"], h["mu"], h.get("theta0")), h["constant"],
                                   history_memory(ckpt, name), checkpoint_host(ckpt))
        log.warning("%s: %d calibration rows (< --min_calib_rows=%d) and no history calibration in the "
                    "checkpoint (trained before it was stored): calibrating on them anyway",
                    name or "entity", len(rows), cfg.min_calib_rows)
    out = score_parts(model, parts, cfg.seq_len, use_local, calibration_history(x_train, ckpt, local, cfg),
                      **score_kwargs(cfg, step_s))
    seen = rows if adapted else x_train
    if adapted:  # its own windows are its calibration rows
        memory = history_memory(ckpt, name)
    else:
        before, held = split_train_val(x_train, cfg.val_frac, cfg.seq_len, cfg.val_blocks)
        # (a series too short to hold out rows validates on itself: no rows left for a memory)
        memory = latent_memory(model, before, cfg) if before[0] is not held[0] else None
    return CalibrationData(out, scoring.constant_features(seen), memory, checkpoint_host(ckpt))


def checkpoint_host(ckpt: dict) -> np.ndarray | None:
    """The checkpoint's host-level features ((V,) bool; utils.shared_features of the entities it
    was trained on), None in checkpoints from before them."""
    host = ckpt.get("host")
    return None if host is None else np.asarray(host, bool)


def history_memory(ckpt: dict, name: str = "") -> np.ndarray | None:
    """The history's latent memory stored in a stage-1 checkpoint (history_calibration), or None:
    a model trained on --adapt_windows=N windows has none; an older checkpoint has none either
    (logged: the entity is then scored without the latent term)."""
    if "memory" in ckpt.get("history_calib", {}):
        return ckpt["history_calib"]["memory"].numpy()
    if not checkpoint_args(ckpt)["adapt_windows"]:
        log.warning("%s: the checkpoint stores no latent memory (trained before it was added): scored "
                    "without the latent term; retrain stage 1 to add it", name or "entity")
    return None


@torch.inference_mode()
def latent_memory(model: PUAD, parts: list[np.ndarray], cfg: Config, size: int = LATENT_MEMORY) -> np.ndarray:
    """An entity's memory for the latent term: theta0 (the encoder's posterior mean) of at most
    `size` windows spread evenly over its scaled train rows (the parts training saw, never the
    calibration rows) -> (M, d_theta) float32."""
    windows = np.concatenate([create_sequences(clip_inputs(p), cfg.seq_len) for p in parts])
    if len(windows) > size:
        windows = windows[np.linspace(0, len(windows) - 1, size).round().astype(int)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model.encode_mean(torch.as_tensor(np.ascontiguousarray(windows[i:i + cfg.score_batch]),
                                             device=device))[1].cpu().numpy()
           for i in range(0, len(windows), cfg.score_batch)]  # theta0 as PUAD.reconstruct makes it
    model.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, cfg.d_theta), np.float32)


def history_calibration(model: PUAD, vals: list[list[np.ndarray]], trains: list[list[np.ndarray]], cfg: Config,
                        max_rows: int = HISTORY_CALIB_ROWS, step_s: float | None = None) -> dict[str, torch.Tensor]:
    """The history's calibration rows, stored in a stage-1 checkpoint: every history entity's
    validation tail (scaled) reconstructed by the trained model with the global prototypes,
    the last max_rows / E rows of each, pooled; constant = constant over every train series;
    memory = theta0 of max_rows / E windows of each train series (latent_memory), pooled; none
    for a model trained on --adapt_windows=N windows, whose train rows are its calibration rows.
    An entity adapted from a few windows compares its theta0s with this memory, and one adapted
    from too few is also calibrated on these rows (calibration_input)."""
    per = max(cfg.seq_len, max_rows // max(1, len(vals)))
    outs = [score_parts(model, v, cfg.seq_len, False, None if cfg.adapt_windows else t,  # the rows before each part
                        **score_kwargs(cfg, step_s)).tail(per) for v, t in zip(vals, trains)]
    const = np.logical_and.reduce([scoring.constant_features(np.concatenate(t)) for t in trains])
    pooled = {k: torch.from_numpy(np.concatenate([getattr(o, k) for o in outs]).astype(np.float32))
              for k in ("x", "mu", "theta0")}
    if cfg.adapt_windows:
        return dict(pooled, constant=torch.from_numpy(np.asarray(const, bool)))
    memory = torch.from_numpy(np.concatenate([latent_memory(model, t, cfg, per) for t in trains]))
    return dict(pooled, constant=torch.from_numpy(np.asarray(const, bool)), memory=memory)


def calibrate_entity(model: PUAD, ckpt: dict, cfg: Config, x_train: np.ndarray, local: dict | None,
                     use_local: bool, name: str = "", step_s: float | None = None) -> scoring.Scorer:
    """The one calibration of an entity: its Scorer fitted on its calibration input
    (calibration_input; detect_live.py; test.py and ablation.py fit the same through
    reconstruct_entity and fit_scorer)."""
    return fit_scorer(cfg, calibration_input(model, ckpt, cfg, x_train, local, use_local, name, step_s), step_s)


def fit_scorer(cfg: Config, calib: CalibrationData, step_s: float | None = None) -> scoring.Scorer:
    """A Scorer with cfg's options fitted on an entity's calibration data."""
    return scoring.Scorer.from_config(cfg).fit(calib.rows, calib.constant, calib.memory, step_s, calib.host)


def history_warning(scorer: scoring.Scorer, step_s: float | None, val_frac: float) -> str | None:
    """Why a fitted threshold may miss its alarm budget, or None: SPOT's risk q (scoring.spot_risk,
    the budget spread over a day's points) asks for a score exceeded once in 1/q points, and the
    calibration rows are fewer, so SPOT extrapolates its tail fit that far beyond them. Says how
    far, and how much normal history holds 1/q calibration rows (they are its last val_frac)."""
    q = scoring.spot_risk(scorer.alarm_budget, scorer.spot_q, step_s)
    n = max(scorer.n_rows_, 1)
    if n * q >= 1:
        return None
    rows = 1 / q / max(val_frac, 1e-9)
    span = f"{rows:,.0f} rows" + (f" ({_duration(rows * step_s)} at {step_s:g} s)" if step_s else "")
    return (f"the threshold is fitted on {n} calibration rows, but SPOT's risk q = {q:.2g} asks for a score "
            f"exceeded once in {1 / q:,.0f} points: SPOT extrapolates {1 / (q * n):,.0f}x beyond them, so the "
            f"alarms per day can be far from the budget; record {span} of normal history for 1/q calibration rows "
            f"(--val_frac={val_frac:g} of it)")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def clip_inputs(x: np.ndarray, clip: float = INPUT_CLIP) -> np.ndarray:
    """Scaled inputs as the model sees them: NaN -> 0, everything clipped to [-clip, clip], float32."""
    return np.clip(np.nan_to_num(np.asarray(x, np.float64), nan=0.0, posinf=clip, neginf=-clip),
                   -clip, clip).astype(np.float32)


def reconstruct_entity(model: PUAD, ckpt: dict, cfg: Config, ent: Entity) -> EntityReconstruction:
    """One entity's local state loaded (if adapted), its calibration input (calibration_input)
    and its test split reconstructed (score_series): what test.py calibrates and scores, and
    what ablation.py scores under each variant. An entity neither trained on nor adapted is
    scaled with its own train data (logged)."""
    local, scaler = entity_state(ckpt, cfg.ckpt, ent.name)
    use_local = local is not None and cfg.use_local  # --use_local=False keeps the local scaler
    if local is not None:
        apply_local_state(model, local)
    if scaler is None:
        log.warning("%s: not seen in training and not adapted; scaling with its own train data "
                    "and global prototypes only", ent.name)
        scaler = Scaler().fit(ent.train)
    step_s, x_train = time_step([ent]), scaler.transform(ent.train)
    return EntityReconstruction(
        calibration_input(model, ckpt, cfg, x_train, local, use_local, ent.name, step_s),
        score_series(model, scaler.transform(ent.test), cfg.seq_len, use_local, history=x_train,
                     **score_kwargs(cfg, step_s)), use_local)


def window_reconstructor(model: PUAD, use_local: bool) -> Callable[[np.ndarray], np.ndarray]:
    """The decoder's mean (B, T, V) of scaled, clipped windows (B, T, V), reconstructed as
    score_series does: what scoring.explain repairs features with. The entity's local state
    must be loaded already."""
    device = next(model.parameters()).device

    def recon(windows: np.ndarray) -> np.ndarray:
        return model.reconstruct(torch.as_tensor(np.ascontiguousarray(windows), device=device), use_local
                                 )["x_mu"].cpu().numpy()
    return recon


def to_recent_level(mu: np.ndarray, center: np.ndarray, base: np.ndarray, level: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The level gauges (level, (V,) bool) reconstructed around the lower of their window's mean
    (center, (n, V): what PUAD.reconstruct added back) and their recent level (base, (n, V):
    utils.trailing_mean) -> (mu, fall): a rise above the recent level is scored, a fall below it
    only named (Reconstruction.fall). score_series and detect_live.LiveScorer alike."""
    mu = mu.copy()
    mu[:, level] += (np.minimum(center, base) - center)[:, level].astype(mu.dtype)
    return mu, np.where(level, np.maximum(base - center, 0.0), 0.0).astype(mu.dtype)


def score_series(model: PUAD, x: np.ndarray, seq_len: int, use_local: bool = False,
                 batch_size: int = 1024, mode: str = "point", clip: float = INPUT_CLIP, level_rows: int = 0,
                 history: np.ndarray | None = None) -> Reconstruction:
    """Reconstruct every point of a scaled series (n, V): the one scorer's model half.

    Returns its scoring.Reconstruction: x, the input as the model saw it (n, V); mu, the
    decoder's mean of each point (n, V); plan, the transport plan of the window that reconstructs
    it (n, K); theta0, that window's theta0 (n, d_theta); local_used (n,), whether the point's
    reconstruction went through the local prototypes (PUAD.reconstruct); and with use_local
    plan_global (n, K_g), the plan without them. A scoring.Scorer turns it into scores. Inputs are clipped to [-clip, clip] (scaled units: `clip` train ranges), so any finite
    input gives a finite score; a clipped value is still far outside every training value.
    mode="point": point t is reconstructed by the window that ends at it; the first seq_len-1
    points by the first window (utils.window_to_point_scores): one window per point, of which
    only the last point is kept. mode="block": non-overlapping windows (stride seq_len), every
    point of a window by it, about seq_len times fewer windows; the tail that no full window
    covers comes from the window ending at the last point. Windows go through in batches.

    The level gauges (PUAD.set_level) are reconstructed around their window's mean; with
    level_rows, around the lower of that and their mean over the level_rows rows before the point
    (utils.trailing_mean; `history`, the scaled rows before x, counted first): a gauge's rise above
    its recent level is scored until that level catches up, a fall below it (a restarted pod's
    memory) is not, but names the gauge (Reconstruction.fall; docs/decisions.md, "Level gauges").
    """
    if mode not in ("point", "block"):
        raise ValueError(f"score mode must be point or block, not {mode!r}")
    device = next(model.parameters()).device
    x = clip_inputs(x, clip)
    n = len(x)
    windows = create_sequences(x, seq_len, seq_len if mode == "block" else 1)
    n_full = len(windows)
    tail = n - n_full * seq_len if mode == "block" else 0  # points after the last full block
    per_point: dict[str, list[np.ndarray]] = {"mu": [], "local_used": []}
    if model.has_level and level_rows:
        per_point["center"] = []
    per_window: dict[str, list[np.ndarray]] = {"plan": [], "theta0": [], "plan_global": []}
    for i in range(0, n_full, batch_size):
        batch = windows[i:i + batch_size]
        last = tail and i + batch_size >= n_full
        if last:
            batch = np.concatenate([batch, x[None, n - seq_len:]])  # the window ending at the last point
        point = mode == "point"  # each window's last point (reconstructed alone), the first window's every point
        out = model.reconstruct(torch.as_tensor(np.require(batch, requirements=["C", "W"]), device=device), use_local,
                                last=point)
        first = model.reconstruct(torch.as_tensor(np.require(batch[:1], requirements=["C", "W"]), device=device), use_local) \
            if point and i == 0 else None
        for k in per_point:
            a = out["x_mu" if k == "mu" else k]
            if point:
                kept = torch.cat([first["x_mu" if k == "mu" else k][0, :-1], a[:, -1]]) if i == 0 else a[:, -1]
            else:
                kept = a[:len(a) - 1 if last else len(a)].flatten(0, 1)
                if last:
                    kept = torch.cat([kept, a[-1, seq_len - tail:]])
            per_point[k].append(kept.cpu().numpy())
        for k in per_window:
            if k in out:
                per_window[k].append(out[k].cpu().numpy())
    res = {k: np.concatenate(v) for k, v in per_point.items()}
    if "center" in res:
        base = trailing_mean(x, level_rows, None if history is None else clip_inputs(history, clip))
        res["mu"], res["fall"] = to_recent_level(res["mu"], res.pop("center"), base, model.level.cpu().numpy())
    for k, v in per_window.items():
        if v:
            w = np.concatenate(v)
            res[k] = (window_values_to_points(w, seq_len) if mode == "point" else
                      np.concatenate([np.repeat(w[:n_full], seq_len, axis=0)] + ([np.repeat(w[-1:], tail, axis=0)] if tail else [])))
    return Reconstruction(x, **res)
