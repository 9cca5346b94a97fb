"""PUAD: Transformer encoder -> prototype OT -> hierarchical VAE (Li et al., ICML 2023).

Anomaly score of a time point: the negative log-likelihood -log p(x_t | theta1) of that
point's V values under the decoder, summed over V. Higher = more anomalous (the paper's
S_t = log p(x | ...) with the sign flipped, so every score in the project points one way).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import nn

from config import Config, ConfigError, config_from_dict
from prototype_ot import PrototypeOT
from transformer import TransformerEncoder
from utils import Scaler, atomic_write, create_sequences, split_train_val, window_to_point_scores
from vae_loss import HierarchicalVAE, gaussian_kl, gaussian_nll, total_loss


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

    def forward(self, x: torch.Tensor, use_local: bool = False, sample: bool = True,
                batch_plan: bool = True) -> dict[str, torch.Tensor]:
        """x (B, T, V) -> loss parts (batch means) and the per-point NLL (B, T, V)."""
        h0 = self.encoder(x)
        h1 = self.to_h1(h0)
        mu0, std0 = self.vae.phi(h0)
        theta0 = mu0 + std0 * torch.randn_like(std0) if sample else mu0
        theta0_prime, ot, plan = self.pot(theta0, use_local, batch_plan)
        mu_p, std_p = self.vae.f1(theta0_prime)
        mu1, std1 = self.vae.psi(torch.cat([theta0_prime, h1], dim=-1))
        theta1 = mu1 + std1 * torch.randn_like(std1) if sample else mu1
        x_mu, x_std = self.vae.decode(theta1)
        nll = gaussian_nll(x, x_mu, x_std)
        out = {
            "recon": nll.sum((1, 2)).mean(),
            "kl0": gaussian_kl(mu0, std0).sum(-1).mean(),
            "kl1": gaussian_kl(mu1, std1, mu_p, std_p).sum(-1).mean(),
            "ot": ot,
            "nll": nll,
            "plan": plan,
        }
        return out

    def loss(self, x: torch.Tensor, rho: tuple[float, float, float], use_local: bool = False,
             batch_plan: bool = True) -> dict[str, torch.Tensor]:
        out = self(x, use_local, batch_plan=batch_plan)
        out["total"] = total_loss(out["recon"], out["kl0"], out["kl1"], out["ot"], *rho)
        return out

    @torch.inference_mode()
    def score(self, x: torch.Tensor, use_local: bool = False, n_samples: int = 0, amp: bool = False,
              compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-point anomaly scores (B, T) and the row-normalised transport plan (B, K).

        Each window is scored on its own (running OT potentials), so a score does not depend
        on the batch. n_samples=0 uses posterior means; L > 0 averages the NLL over L samples.
        amp: the encoder under bf16 autocast, on CUDA only (off by default; unmeasured).
        compile: the posterior-mean scorer through torch.compile (dynamic batch size, compiled
        once per model: ~1 min on 2 CPU cores, and no faster there than eager; CUDA unmeasured).
        """
        was_training = self.training
        self.eval()
        if n_samples <= 0:
            if compile and "_compiled_scorer" not in self.__dict__:
                self.__dict__["_compiled_scorer"] = torch.compile(self._score_means, dynamic=True)
            nll, plan = (self.__dict__["_compiled_scorer"] if compile else self._score_means)(x, use_local, amp)
        else:
            outs = [self(x, use_local, sample=True, batch_plan=False) for _ in range(n_samples)]
            nll = torch.stack([o["nll"].sum(-1) for o in outs]).mean(0)
            plan = torch.stack([o["plan"] for o in outs]).mean(0)
        self.train(was_training)
        return nll, plan / plan.sum(-1, keepdim=True)

    def _score_means(self, x: torch.Tensor, use_local: bool, amp: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(sample=False, batch_plan=False) reduced to what a score needs: no KL terms, no
        prior head f1, no OT loss, no sigma of q(theta1). Same numbers as the full forward."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp and x.device.type == "cuda"):
            h0 = self.encoder(x)
        h0 = h0.float()
        h1 = self.to_h1(h0)
        theta0 = self.vae.phi.mu(self.vae.phi.hidden(h0))
        beta = self.pot.prototypes(use_local)
        running = self.pot.g_local if use_local else self.pot.g_global
        plan = torch.softmax((running - self.pot.cost(theta0, beta)) / self.pot.eps, dim=-1)
        theta1 = self.vae.psi.mu(self.vae.psi.hidden(torch.cat([plan @ beta, h1], dim=-1)))
        x_mu, x_std = self.vae.decode(theta1)
        return gaussian_nll(x, x_mu, x_std).sum(-1), plan


# ---- checkpoints: plain dicts of tensors, strings and numbers, loadable with weights_only=True

def local_path(ckpt: str | Path, entity: str) -> Path:
    """Where the per-entity state (beta_l, its OT potentials and scaler) sits beside the shared model."""
    ckpt = Path(ckpt)
    return ckpt.with_name(f"{ckpt.stem}.local-{entity}.pt")


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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
    need = ("config", "n_features", "features") if kind == "shared" else \
        ("entity", "features", "beta_l", "g_local", "scaler")
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
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


def build_model(ckpt: dict, device: torch.device | str = "cpu") -> tuple[PUAD, Config]:
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as e:
        fail(f"checkpoint config: {e}")
    model = PUAD(cfg, ckpt["n_features"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except KeyError:
        fail("checkpoint has no model weights")
    except RuntimeError as e:
        fail(f"checkpoint model does not match its own config ({str(e).splitlines()[0]})")
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


def calibration_rows(x_train: np.ndarray, ckpt: dict, local: dict | None, cfg: Config) -> np.ndarray:
    """The scaled train rows a threshold is fitted on: the first N windows when the model saw only
    those (--adapt_windows=N), else the held-out validation tail (as for the baselines)."""
    n_adapt = (local if local is not None else ckpt["config"]).get("adapt_windows", 0)
    if n_adapt:
        return x_train[: n_adapt + cfg.seq_len - 1]
    return split_train_val(x_train, cfg.val_frac, cfg.seq_len)[1]


def score_series(model: PUAD, x: np.ndarray, seq_len: int, use_local: bool = False,
                 batch_size: int = 1024, n_samples: int = 0, mode: str = "point", amp: bool = False,
                 compile: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Score every point of a scaled series (n, V): the one scorer of the project.

    Returns (point scores (n,), transport plan of the window scoring each point (n, K)).
    mode="point": point t is scored by the window that ends at it; the first seq_len-1 points by
    the first window (see utils.window_to_point_scores): one window per point.
    mode="block": non-overlapping windows (stride seq_len), every point of a window scored by
    it at once, about seq_len times fewer windows; the tail that no full window covers is
    scored by the last window, the one ending at the last point. The first seq_len points,
    the last point of every block and the last point of the series get the same score in both
    modes (the same window scores them). Windows go through in batches, no Python loop per
    window; amp: bf16 autocast for the encoder on CUDA, compile: torch.compile (see PUAD.score).
    """
    if mode not in ("point", "block"):
        raise ValueError(f"score mode must be point or block, not {mode!r}")
    device = next(model.parameters()).device
    n = len(x)
    windows = create_sequences(x, seq_len, seq_len if mode == "block" else 1)
    tail = n - len(windows) * seq_len if mode == "block" else 0  # points after the last full block
    scores, plans = [], []
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        if tail and i + batch_size >= len(windows):
            batch = np.concatenate([batch, x[None, n - seq_len:]])  # the window ending at the last point
        xb = torch.as_tensor(np.require(batch, requirements=["C", "W"]), device=device)  # copies a view
        s, p = model.score(xb, use_local, n_samples, amp=amp, compile=compile)
        scores.append(s.float().cpu().numpy())
        plans.append(p.float().cpu().numpy())
    window_scores, plan = np.concatenate(scores), np.concatenate(plans)
    if mode == "block":
        n_full = len(windows)
        point = window_scores[:n_full].reshape(-1)
        point_plan = np.repeat(plan[:n_full], seq_len, axis=0)
        if tail:
            point = np.concatenate([point, window_scores[-1, seq_len - tail:]])
            point_plan = np.concatenate([point_plan, np.repeat(plan[-1:], tail, axis=0)])
        return point, point_plan
    plan = np.concatenate([np.repeat(plan[:1], seq_len - 1, axis=0), plan])
    return window_to_point_scores(window_scores, seq_len), plan
