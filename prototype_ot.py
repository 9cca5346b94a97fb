"""Prototype-oriented optimal transport (paper section 3.2.1, eq. 2-5).

theta0 (N samples of a batch) and the prototypes beta = [beta_g; beta_l] are two uniform
empirical distributions; the entropic OT plan M between them (Sinkhorn, Cuturi 2013) gives
theta0' = M x beta with M's rows renormalised, and the OT loss of eq. 5,
<M, C> + eps * KL(M || a b^T): the entropy term measured against the product of the uniform
marginals, which differs from eq. 5's sum M ln M by the constant ln(N K) and makes the loss
independent of the batch size.

Scoring must not depend on which other windows share a batch (a live detector scores one
window at a time), so training also keeps a running mean of the prototypes' dual
potentials g. With them, a row of the normalised plan is softmax_j((g_j - C_ij) / eps), which
is how a single window is transported when `batch_plan=False`.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinkhorn_log(cost: torch.Tensor, eps: float, n_iters: int = 100, tol: float = 1e-6,
                 grad_iters: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropic OT between uniform marginals, in the log domain; batched over leading dims.

    cost: (..., N, K). Returns (plan (..., N, K) summing to 1, potentials f (..., N), g (..., K)).
    The potentials are first iterated without autograd until the marginals are met (to tol,
    or n_iters); the last grad_iters iterations, warm-started there, are unrolled by autograd,
    so gradients reach the cost (and so theta0 and the prototypes) at a fraction of the cost
    of unrolling every iteration.
    """
    n, k = cost.shape[-2], cost.shape[-1]
    log_a = torch.full(cost.shape[:-1], -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full(cost.shape[:-2] + (k,), -math.log(k), dtype=cost.dtype, device=cost.device)

    def step(f, g, c):
        f = eps * (log_a - torch.logsumexp((g.unsqueeze(-2) - c) / eps, dim=-1))
        g = eps * (log_b - torch.logsumexp((f.unsqueeze(-1) - c) / eps, dim=-2))
        return f, g

    f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
    with torch.no_grad():
        c = cost.detach()
        for it in range(max(n_iters - grad_iters, 0)):
            f, g = step(f, g, c)
            if tol and it % 10 == 9:  # g was just fitted: the row marginals carry the error
                rows = torch.logsumexp((f.unsqueeze(-1) + g.unsqueeze(-2) - c) / eps, -1).exp()
                if (rows - log_a.exp()).abs().max() < tol / n:
                    break
    for _ in range(grad_iters if torch.is_grad_enabled() and cost.requires_grad else 0):
        f, g = step(f, g, cost)
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)
    return plan, f, g


class PrototypeOT(nn.Module):
    def __init__(self, n_global: int, n_local: int, dim: int, eps: float = 0.1,
                 n_iters: int = 100, momentum: float = 0.1):
        super().__init__()
        self.beta_g = nn.Parameter(torch.randn(n_global, dim))
        self.beta_l = nn.Parameter(torch.randn(n_local, dim))
        self.eps, self.n_iters, self.momentum = eps, n_iters, momentum
        self.cost_scale = math.sqrt(dim)  # keeps eps meaningful whatever the dimension
        # running prototype potentials: for beta_g alone (stage 1) and for [beta_g; beta_l] (stage 2)
        self.register_buffer("g_global", torch.zeros(n_global))
        self.register_buffer("g_local", torch.zeros(n_global + n_local))

    def freeze_global(self, frozen: bool = True) -> None:
        self.beta_g.requires_grad_(not frozen)

    def prototypes(self, use_local: bool) -> torch.Tensor:
        return torch.cat([self.beta_g, self.beta_l]) if use_local else self.beta_g

    def cost(self, theta0: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """C_ij = ||theta0_i - beta_j||_2 / sqrt(dim) (the small constant keeps the gradient finite at 0)."""
        d2 = (theta0.unsqueeze(-2) - beta).pow(2).sum(-1)
        return torch.sqrt(d2 + 1e-8) / self.cost_scale

    def forward(self, theta0: torch.Tensor, use_local: bool = False, batch_plan: bool = True,
                need_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """theta0 (N, d) -> (theta0' (N, d), OT loss (scalar), plan (N, K)).

        batch_plan=True: Sinkhorn over the batch (training, eq. 3-5); updates the running
        potentials in training mode. False: each row transported alone with the running
        potentials (scoring); the OT loss is then that of the row-normalised plan.
        need_loss=False skips the OT loss (returned as None): scoring does not need it.
        """
        beta = self.prototypes(use_local)
        cost = self.cost(theta0, beta)
        running = self.g_local if use_local else self.g_global
        if batch_plan:
            plan, _, g = sinkhorn_log(cost, self.eps, self.n_iters)
            if self.training and torch.is_grad_enabled():
                with torch.no_grad():
                    running.lerp_(g - g.mean(), self.momentum)
        else:
            plan = torch.softmax((running - cost) / self.eps, dim=-1) / cost.shape[0]
        rows = plan / plan.sum(-1, keepdim=True)
        theta0_prime = rows @ beta
        if not need_loss:
            return theta0_prime, None, plan
        n, k = plan.shape[-2], plan.shape[-1]
        ot_loss = (plan * cost).sum() + self.eps * (plan * (torch.log(plan + 1e-30) + math.log(n * k))).sum()
        return theta0_prime, ot_loss, plan
