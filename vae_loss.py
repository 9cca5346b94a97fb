"""Prototype-guided hierarchical generative model and its losses (paper eq. 6-11).

Generative:  theta0 ~ N(0, I);  theta1 ~ N(F1_mu(theta0'), F1_sigma(theta0'));
             x ~ N(F2_mu(theta1), F2_sigma(theta1)) over the whole window (T x V).
Inference:   q(theta0 | x) = N(Phi(h0));  q(theta1 | theta0', x) = N(Psi(theta0', h1)).
Loss (eq. 11, minimised): -log p(x | theta1) + rho1 KL(q(theta1) || p(theta1 | theta0'))
             + rho2 KL(q(theta0) || N(0, I)) + rho3 L_OT.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """-log N(x | mu, std^2), elementwise."""
    return 0.5 * (((x - mu) / std) ** 2 + LOG_2PI) + torch.log(std)


def gaussian_kl(mu_q: torch.Tensor, std_q: torch.Tensor, mu_p: torch.Tensor | float = 0.0,
                std_p: torch.Tensor | float = 1.0) -> torch.Tensor:
    """KL(N(mu_q, std_q^2) || N(mu_p, std_p^2)), elementwise (closed form)."""
    std_p = torch.as_tensor(std_p, dtype=std_q.dtype, device=std_q.device)
    return (torch.log(std_p / std_q) + (std_q ** 2 + (mu_q - mu_p) ** 2) / (2 * std_p ** 2) - 0.5)


class GaussianHead(nn.Module):
    """A nonlinearity f(W x + b) followed by a mean and a positive standard deviation."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, min_std: float):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU())
        self.mu = nn.Linear(d_hidden, d_out)
        self.std = nn.Linear(d_hidden, d_out)
        self.min_std = min_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
        return self.mu(h), F.softplus(self.std(h)) + self.min_std

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean alone (scoring uses posterior means: the std head is not needed)."""
        return self.mu(self.hidden(x))


class HierarchicalVAE(nn.Module):
    def __init__(self, d_h0: int, d_h1: int, d_theta: int, seq_len: int, n_features: int,
                 min_std: float = 0.01):
        super().__init__()
        self.seq_len, self.n_features = seq_len, n_features
        self.phi = GaussianHead(d_h0, d_h1, d_theta, min_std)             # q(theta0 | x)
        self.psi = GaussianHead(d_theta + d_h1, d_h1, d_theta, min_std)   # q(theta1 | theta0', h1)
        self.f1 = GaussianHead(d_theta, d_h1, d_theta, min_std)           # p(theta1 | theta0')
        self.f2 = GaussianHead(d_theta, d_h1, seq_len * n_features, min_std)  # p(x | theta1)

    def decode(self, theta1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, std = self.f2(theta1)
        shape = (-1, self.seq_len, self.n_features)
        return mu.view(shape), std.view(shape)

    def decode_mean(self, theta1: torch.Tensor, last: bool = False) -> torch.Tensor:
        """The decoder's mean (B, T, V), or of the window's last point only (B, 1, V)."""
        h = self.f2.hidden(theta1)
        if not last:
            return self.f2.mu(h).view(-1, self.seq_len, self.n_features)
        rows = slice((self.seq_len - 1) * self.n_features, None)  # the last point's V outputs
        return F.linear(h, self.f2.mu.weight[rows], self.f2.mu.bias[rows]).view(-1, 1, self.n_features)


def total_loss(recon: torch.Tensor, kl0: torch.Tensor, kl1: torch.Tensor, ot: torch.Tensor,
               rho1: float, rho2: float, rho3: float) -> torch.Tensor:
    """Eq. 11 as a loss to minimise (recon = -E log p(x | theta1))."""
    return recon + rho1 * kl1 + rho2 * kl0 + rho3 * ot
