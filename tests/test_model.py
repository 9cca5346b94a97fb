"""Sinkhorn / prototype OT and the VAE's closed forms."""
import math

import numpy as np
import pytest
import torch

from config import parse_config
from prototype_ot import PrototypeOT, sinkhorn_log
from puad import PUAD
from vae_loss import gaussian_kl, gaussian_nll, total_loss


def reference_sinkhorn(C: np.ndarray, eps: float, iters: int = 5000):
    """Textbook Sinkhorn-Knopp in float64 (scaling form), independent of the module's log domain."""
    n, k = C.shape
    a, b = np.full(n, 1 / n), np.full(k, 1 / k)
    K = np.exp(-C / eps)
    u, v = np.ones(n), np.ones(k)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    M = u[:, None] * K * v[None, :]
    return M, (M * C).sum() + eps * (M * np.log(M / np.outer(a, b))).sum()


def test_sinkhorn_marginals_converge():
    torch.manual_seed(0)
    cost = torch.rand(2, 64, 10, dtype=torch.float64) * 3  # batched
    plan, f, g = sinkhorn_log(cost, eps=0.05, n_iters=2000, tol=1e-9)
    assert plan.shape == (2, 64, 10)
    assert torch.allclose(plan.sum(-1), torch.full((2, 64), 1 / 64, dtype=torch.float64), atol=1e-4 / 64)
    assert torch.allclose(plan.sum(-2), torch.full((2, 10), 1 / 10, dtype=torch.float64), atol=1e-4 / 10)


def test_sinkhorn_log_domain_is_stable_for_small_eps():
    cost = torch.rand(32, 12, dtype=torch.float64) * 50
    plan, _, _ = sinkhorn_log(cost, eps=0.01, n_iters=300)
    assert torch.isfinite(plan).all()  # exp(-5000) underflows in the scaling form; not here


def test_ot_loss_matches_brute_force():
    torch.manual_seed(1)
    pot = PrototypeOT(4, 2, dim=3, eps=0.5, n_iters=3000).double()
    theta0 = torch.randn(6, 3, dtype=torch.float64)
    _, ot, plan = pot(theta0, use_local=False)
    C = pot.cost(theta0, pot.beta_g).detach().numpy()
    C_direct = np.sqrt(((theta0.numpy()[:, None] - pot.beta_g.detach().numpy()[None]) ** 2).sum(-1)) / math.sqrt(3)
    np.testing.assert_allclose(C, C_direct, rtol=1e-6)
    M_ref, loss_ref = reference_sinkhorn(C_direct, 0.5)
    np.testing.assert_allclose(plan.detach().numpy(), M_ref, atol=1e-7)
    assert abs(ot.item() - loss_ref) < 1e-6


def test_theta0_prime_is_row_normalised_plan_times_prototypes():
    torch.manual_seed(2)
    pot = PrototypeOT(5, 2, dim=4).double()
    theta0 = torch.randn(8, 4, dtype=torch.float64)
    prime, _, plan = pot(theta0, use_local=True)
    beta = torch.cat([pot.beta_g, pot.beta_l])
    expected = (plan / plan.sum(1, keepdim=True)) @ beta
    assert plan.shape == (8, 7)
    assert torch.allclose(prime, expected)


def test_gradients_flow_and_freeze():
    torch.manual_seed(3)
    pot = PrototypeOT(5, 2, dim=4)
    theta0 = torch.randn(8, 4, requires_grad=True)
    prime, ot, _ = pot(theta0)
    (ot + prime.pow(2).sum()).backward()
    assert theta0.grad is not None and theta0.grad.abs().sum() > 0
    assert pot.beta_g.grad is not None and pot.beta_g.grad.abs().sum() > 0
    assert pot.beta_l.grad is None  # global-only transport does not touch beta_l

    pot.zero_grad()
    pot.freeze_global()
    theta0 = torch.randn(8, 4, requires_grad=True)
    prime, ot, _ = pot(theta0, use_local=True)
    (ot + prime.pow(2).sum()).backward()
    assert pot.beta_g.grad is None
    assert pot.beta_l.grad is not None and pot.beta_l.grad.abs().sum() > 0


def test_scoring_does_not_depend_on_the_batch():
    torch.manual_seed(4)
    cfg = parse_config(["--preset=test"])
    model = PUAD(cfg, 5)
    x = torch.rand(16, cfg.seq_len, 5)
    model.train()
    for _ in range(3):  # fill the running potentials
        model.loss(x, (0.01, 0.01, 0.01))
    alone = torch.cat([model.reconstruct(x[i:i + 1])["x_mu"] for i in range(4)])
    together = model.reconstruct(x)["x_mu"][:4]
    assert torch.allclose(alone, together, atol=1e-5)


def test_fast_scoring_path_equals_the_full_forward(monkeypatch):
    """reconstruct() (no KL, prior head or OT loss) gives the numbers of the full forward pass
    with posterior means and each window transported alone (in fp32, as the forward runs:
    puad.SCORE_BF16 off; tests/test_perf.py compares the bf16 encoder)."""
    import puad
    monkeypatch.setattr(puad, "SCORE_BF16", False)
    torch.manual_seed(5)
    cfg = parse_config(["--preset=test"])
    model = PUAD(cfg, 5)
    x = torch.rand(16, cfg.seq_len, 5)
    model.train()
    for _ in range(3):
        model.loss(x, (0.01, 0.01, 0.01))
    model.eval()
    with torch.no_grad():
        full = model(x, sample=False, batch_plan=False)
    fast = model.reconstruct(x)
    assert torch.allclose(fast["x_mu"], full["x_mu"], atol=1e-6)
    plan = full["plan"] / full["plan"].sum(-1, keepdim=True)
    assert torch.allclose(fast["plan"], plan, atol=1e-6)
    assert torch.allclose(fast["theta0"], full["theta0"], atol=1e-6)  # what the latent term compares
    assert "kl0" not in fast and "recon" in full


def test_gaussian_kl_closed_form():
    # KL(N(1, 2^2) || N(0, 1)) = ln(1/2) + (4 + 1)/2 - 1/2
    kl = gaussian_kl(torch.tensor([1.0]), torch.tensor([2.0]))
    assert kl.item() == pytest.approx(math.log(0.5) + 2.5 - 0.5, abs=1e-6)
    # KL(N(0, 1) || N(1, 0.5^2)) = ln(0.5) + (1 + 1)/(2 * 0.25) - 1/2
    kl = gaussian_kl(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.5]))
    assert kl.item() == pytest.approx(math.log(0.5) + 4.0 - 0.5, abs=1e-6)
    mu_q, s_q, mu_p, s_p = torch.randn(4, 7), torch.rand(7) + 0.1, torch.randn(7), torch.rand(7) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, s_q), torch.distributions.Normal(mu_p, s_p))
    assert torch.allclose(gaussian_kl(mu_q, s_q, mu_p, s_p), ref, atol=1e-5)


def test_gaussian_nll_closed_form():
    # -log N(3 | 1, 2^2) = 0.5 * ((3-1)/2)^2 + 0.5 ln(2 pi) + ln 2
    nll = gaussian_nll(torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0))
    assert nll.item() == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi) + math.log(2), abs=1e-6)
    x, mu, s = torch.randn(10), torch.randn(10), torch.rand(10) + 0.05
    assert torch.allclose(gaussian_nll(x, mu, s), -torch.distributions.Normal(mu, s).log_prob(x), atol=1e-5)


def test_total_loss_is_eq_11():
    r, k0, k1, ot = (torch.tensor(v) for v in (10.0, 2.0, 3.0, 4.0))
    assert total_loss(r, k0, k1, ot, 0.1, 0.2, 0.3).item() == pytest.approx(10 + 0.1 * 3 + 0.2 * 2 + 0.3 * 4)


def test_local_init_global_starts_at_the_history_models_reconstruction():
    """Stage 2 copies the most-used global prototypes and splits each one's mass with its copy:
    before any local step, scoring with the local prototypes equals scoring without."""
    import numpy as np

    from train_safe import init_local_prototypes
    from utils import Windows
    torch.manual_seed(6)
    cfg = parse_config(["--preset=test"])
    model = PUAD(cfg, 5)
    x = torch.rand(64, cfg.seq_len, 5)
    model.train()
    for _ in range(3):
        model.loss(x, (0.01, 0.01, 0.01))
    windows = Windows([np.random.default_rng(0).random((80, 5))], cfg.seq_len, 1, "cpu")
    init_local_prototypes(model, windows, cfg)
    with torch.no_grad():
        assert any(torch.allclose(model.pot.beta_l[0], b) for b in model.pot.beta_g)
    a, b = model.reconstruct(x, use_local=False), model.reconstruct(x, use_local=True)
    assert torch.allclose(a["x_mu"], b["x_mu"], atol=1e-5)


def test_local_prototypes_reconstruct_a_point_only_where_closer(monkeypatch):
    """With local prototypes each point's mean comes from the pass, with or without them, whose
    mean is closer to it (the encoder runs once for both); score_series keeps it per point. In
    fp32, as the forward it is compared with (puad.SCORE_BF16 off)."""
    import numpy as np

    import puad
    from puad import score_series
    monkeypatch.setattr(puad, "SCORE_BF16", False)
    from utils import create_sequences
    torch.manual_seed(7)
    cfg = parse_config(["--preset=test"])
    model = PUAD(cfg, 5)
    x = torch.rand(64, cfg.seq_len, 5)
    model.train()
    for _ in range(3):
        model.loss(x, (0.01, 0.01, 0.01))
    model.eval()
    with torch.no_grad():  # local prototypes at theta0 of two windows, their potentials at 0
        model.pot.beta_l.copy_(model.encode(x[:2], sample=False)[3])
        model.pot.g_local.copy_(torch.cat([model.pot.g_global, torch.zeros(cfg.n_local)]))
        local = model(x, use_local=True, sample=False, batch_plan=False)
    g, c = model.reconstruct(x, use_local=False), model.reconstruct(x, use_local=True)
    assert not bool(g["local_used"].any())
    se = {k: ((x - o["x_mu"]) ** 2).sum(-1) for k, o in (("g", g), ("l", local), ("c", c))}
    used = c["local_used"]
    assert 0 < used.float().mean() < 1  # both passes win somewhere with these weights
    assert torch.equal(used, se["l"] <= se["g"])
    assert torch.allclose(se["c"], torch.minimum(se["l"], se["g"]), atol=1e-6)
    assert torch.allclose(c["x_mu"], torch.where(used[..., None], local["x_mu"], g["x_mu"]), atol=1e-6)
    assert torch.allclose(c["plan"], local["plan"] / local["plan"].sum(-1, keepdim=True), atol=1e-6)  # the local plan
    assert torch.allclose(c["plan_global"], g["plan"])  # and the one before adaptation beside it
    assert c["plan_global"].shape[-1] == cfg.n_global and "plan_global" not in g
    # score_series keeps each window's last point (the first window's every point), in both modes
    series = np.random.default_rng(2).random((60, 5)).astype(np.float32)
    windows = torch.as_tensor(np.ascontiguousarray(create_sequences(series, cfg.seq_len)))
    per_window = model.reconstruct(windows, use_local=True)
    out = score_series(model, series, cfg.seq_len, True)
    np.testing.assert_allclose(out.mu[cfg.seq_len - 1:], per_window["x_mu"][:, -1].numpy(), atol=1e-6)
    np.testing.assert_allclose(out.mu[:cfg.seq_len - 1], per_window["x_mu"][0, :-1].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out.local_used[cfg.seq_len - 1:], per_window["local_used"][:, -1].numpy())
    for mode in ("point", "block"):
        out = score_series(model, series, cfg.seq_len, True, mode=mode)
        glob = score_series(model, series, cfg.seq_len, False, mode=mode)
        assert out.local_used.shape == (60,) and out.local_used.any() and not glob.local_used.any()
        np.testing.assert_allclose(out.plan_global, glob.plan, atol=1e-6)
        assert out.plan.shape == (60, cfg.n_global + cfg.n_local) and glob.plan_global is None


def test_level_gauges_are_reconstructed_around_their_recent_level(monkeypatch):
    """A level gauge (PUAD.set_level) enters the model less its window's mean, in training and
    scoring, so a constant shift of it changes nothing but its reconstruction's level; score_series
    then reconstructs it around the lower of the window's mean and its mean over level_rows rows
    before (history first): a rise above the recent level stays in the residual until the level
    catches up, a fall does not. Without level gauges nothing changes."""
    import numpy as np

    import puad
    from puad import score_series
    monkeypatch.setattr(puad, "SCORE_BF16", False)
    torch.manual_seed(3)
    cfg = parse_config(["--preset=test"])
    model = PUAD(cfg, 3).eval()
    x = torch.rand(8, cfg.seq_len, 3)
    shift = torch.tensor([0.0, 5.0, 0.0])
    plain = model.reconstruct(x)["x_mu"]
    assert not model.has_level and torch.equal(model.reconstruct(x)["center"], torch.zeros(8, cfg.seq_len, 3))
    with torch.no_grad():
        loss = model(x, sample=False, batch_plan=False)["recon"]
    model.set_level([False, True, False])
    a, b = model.reconstruct(x), model.reconstruct(x + shift)
    assert torch.allclose(b["x_mu"] - a["x_mu"], shift.expand_as(a["x_mu"]), atol=1e-5)  # only the level moves
    assert torch.allclose(a["theta0"], b["theta0"], atol=1e-5)
    assert not torch.allclose(a["x_mu"], plain, atol=1e-3)  # the gauge enters centred: another reconstruction
    with torch.no_grad():
        assert torch.allclose(model(x + shift, sample=False, batch_plan=False)["recon"],
                              model(x, sample=False, batch_plan=False)["recon"], atol=1e-3)
        assert not torch.allclose(model(x, sample=False, batch_plan=False)["recon"], loss, atol=1e-3)
    # the recent level: a step up of the gauge at row 60 shows until the 30-row level has caught up;
    # a step down at row 130 does not
    n, seq = 200, cfg.seq_len
    rng = np.random.default_rng(0)
    series = (0.5 + 0.01 * rng.standard_normal((n, 3))).astype(np.float32)
    series[60:130, 1] += 2.0
    windowed = score_series(model, series, seq)  # level_rows=0: around the window's own mean
    recent = score_series(model, series, seq, level_rows=30, history=series[:40])
    assert np.abs(series - recent.mu)[62, 1] > 1.5  # shown at the step,
    # gone once 30 rows sit above it
    np.testing.assert_allclose(recent.mu[90:130, 1], windowed.mu[90:130, 1], atol=0.05)
    np.testing.assert_allclose(recent.mu[130:, 1], windowed.mu[130:, 1], atol=0.05)  # the fall back is no level anomaly
    assert recent.fall[140, 1] > 0.3 and (recent.fall >= 0).all() and not recent.fall[:, [0, 2]].any()  # but names it
    assert windowed.fall is None
    np.testing.assert_allclose(recent.mu[:, [0, 2]], windowed.mu[:, [0, 2]], atol=1e-6)  # other features untouched
    # a window wholly above the step: its own mean hides the step, the recent level (20 of 30 rows up) does not
    assert np.abs(series - recent.mu)[80, 1] > np.abs(series - windowed.mu)[80, 1] + 0.5
    # without level gauges level_rows and history change nothing
    model.set_level(None)
    np.testing.assert_array_equal(score_series(model, series, seq, level_rows=30, history=series).mu,
                                  score_series(model, series, seq).mu)
