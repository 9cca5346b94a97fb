"""TranAD (Tuli, Casale and Jennings, VLDB 2022), written from the paper: the yardstick of
`bench.py --vs_tranad` and the `tranad` method of baselines.py.

A window W (K x V) of the scaled series and a focus score F (K x V) are concatenated (K x 2V),
given sinusoidal positions, and encoded by a Transformer encoder; two decoders, each a
Transformer decoder over the same K x 2V sequence (masked: position k attends to positions
<= k) and the encoder's output, end in a linear map to V and a sigmoid: O_d (K x V).

    phase 1:                    F = 0             ->  O1 = D1(E(W, F)),  O2 = D2(E(W, F))
    phase 2 (self-conditioning): F = (O1 - W)^2    ->  Ô2 = D2(E(W, F))
    training at epoch n = 1, 2, ... (the evolving adversarial objective):
        L1 = eps^-n ||O1 - W||^2 + (1 - eps^-n) ||Ô2 - W||^2   trains the encoder and decoder 1
        L2 = eps^-n ||O2 - W||^2 - (1 - eps^-n) ||Ô2 - W||^2   trains decoder 2
    score, per feature, at the window's last point:    1/2 (O1 - W)^2 + 1/2 (Ô2 - W)^2

Decoder 1 reconstructs; decoder 2 learns to reconstruct badly what decoder 1's errors point at,
and decoder 1, which reaches Ô2 only through F, learns to leave it nothing to point at.
Defaults read from the authors' code (github.com/imperial-qore/TranAD, not copied): K = 10,
d_model = 2V, V heads, feed-forward 16, dropout 0.1, one layer each, AdamW (lr 1e-4, weight
decay 1e-5) with the lr times 0.9 every 5 epochs, batch 128, 5 epochs. eps = 1.5 is ours (the
code weighs by 1/n instead: 0.2 at n = 5, against 1.5^-5 = 0.13). As the paper draws it, the
decoders reconstruct the whole window, so F is a K x V matrix; the code decodes only the last
point (one decoder query instead of K: less work per window, and a focus score broadcast from
that point). Left out: the MAML meta-learning step and the POT threshold (baselines.py and
bench.py use the project's scorer and threshold for every model).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from transformer import PositionalEncoding
from utils import create_sequences, window_values_to_points

WINDOW, D_FF, DROPOUT, LR, WEIGHT_DECAY, BATCH, EPOCHS, EPS = 10, 16, 0.1, 1e-4, 1e-5, 128, 5, 1.5


class Decoder(nn.Module):
    """One Transformer decoder layer (masked self-attention, attention to the encoder's output,
    feed-forward) -> Linear(2V, V) -> sigmoid."""

    def __init__(self, n_features: int, d_ff: int, dropout: float):
        super().__init__()
        d = 2 * n_features
        self.layer = nn.TransformerDecoderLayer(d, n_features, d_ff, dropout, batch_first=True)
        self.out = nn.Sequential(nn.Linear(d, n_features), nn.Sigmoid())

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(x, memory, tgt_mask=mask, tgt_is_causal=True))


class TranAD(nn.Module):
    def __init__(self, n_features: int, window: int = WINDOW, d_ff: int = D_FF, dropout: float = DROPOUT):
        super().__init__()
        d = 2 * n_features
        self.window = window
        self.pos = PositionalEncoding(d, window)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoderLayer(d, n_features, d_ff, dropout, batch_first=True)
        self.decoder1 = Decoder(n_features, d_ff, dropout)
        self.decoder2 = Decoder(n_features, d_ff, dropout)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(window), persistent=False)

    def encode(self, w: torch.Tensor, focus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[W, F] with positions (B, K, 2V), and the encoder's output of it."""
        x = self.drop(self.pos(torch.cat([w, focus], dim=-1)))
        return x, self.encoder(x)

    def forward(self, w: torch.Tensor, with_o2: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Windows (B, K, V) -> O1, O2 (None unless with_o2: only training needs it), Ô2."""
        x, memory = self.encode(w, torch.zeros_like(w))  # phase 1
        o1 = self.decoder1(x, memory, self.mask)
        o2 = self.decoder2(x, memory, self.mask) if with_o2 else None
        x, memory = self.encode(w, (o1 - w) ** 2)  # phase 2: focus on decoder 1's errors
        return o1, o2, self.decoder2(x, memory, self.mask)


def make_optimizer(model: TranAD, lr: float = LR) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and the step decay (lr x 0.9 every 5 epochs); the authors' lr is 1e-4 on SMD, up to
    9e-3 on other data sets."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    return opt, torch.optim.lr_scheduler.StepLR(opt, 5, 0.9)


def train_step(model: TranAD, opt: torch.optim.Optimizer, w: torch.Tensor, epoch: int, eps: float = EPS
               ) -> tuple[float, float]:
    """One step of the objective at epoch n = epoch (from 1): L1's gradient for the encoder and
    decoder 1, L2's for decoder 2 -> (L1, L2)."""
    o1, o2, o2_hat = model(w)
    a = eps ** -epoch
    l1 = a * ((o1 - w) ** 2).mean() + (1 - a) * ((o2_hat - w) ** 2).mean()
    l2 = a * ((o2 - w) ** 2).mean() - (1 - a) * ((o2_hat - w) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    d2 = list(model.decoder2.parameters())
    g2 = torch.autograd.grad(l2, d2, retain_graph=True)
    l1.backward()
    for p, g in zip(d2, g2):  # decoder 2 follows L2 only
        p.grad = g
    opt.step()
    return l1.item(), l2.item()


def fit(windows: np.ndarray, epochs: int = EPOCHS, batch: int = BATCH, seed: int = 0, lr: float = LR) -> TranAD:
    """A TranAD trained on scaled windows (n, K, V) of normal data (K = the model's window)."""
    torch.manual_seed(seed)
    model = TranAD(windows.shape[2], windows.shape[1])
    opt, sched = make_optimizer(model, lr)
    x = torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            train_step(model, opt, x[idx], epoch)
        sched.step()
    return model.eval()


@torch.inference_mode()
def window_scores(model: TranAD, windows: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The score of the last point of each window (n, K, V), per feature -> (n, V)."""
    model.eval()
    parts = []
    for i in range(0, len(windows), batch):
        w = torch.as_tensor(np.ascontiguousarray(windows[i:i + batch], dtype=np.float32))
        o1, _, o2_hat = model(w, with_o2=False)
        last = w[:, -1]
        parts.append((0.5 * (o1[:, -1] - last) ** 2 + 0.5 * (o2_hat[:, -1] - last) ** 2).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, windows.shape[-1]), np.float32)


def score_series(model: TranAD, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Per-feature scores of every point of a scaled series (n, V): point t from the window
    ending at it, the first K - 1 points from the first window (as puad.score_series)."""
    return window_values_to_points(window_scores(model, create_sequences(x, model.window), batch), model.window)
