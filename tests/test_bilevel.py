"""Tests for bilevel.py: every outer update against an independent computation.

DDS     reverse-over-reverse autograd through the look-ahead, finite differences, and its ρ → 0 limit
SOBA    finite-difference Hessian-vector products, brute-force per-example gradients, and a weighted
        ridge regression / weighted mean problem whose hypergradient has a closed form
Anograd finite differences of the cosine, and the scale invariance of a
filter   frequencies of the three filters over many draws, and their use of the CPU generator
Brute force = a loop of autograd.grad, one per example; everything in float64. The forward-mode
references of per_example_dot (`per_example_dot_jvp`) and of soba_terms
(`soba_terms_forward_over_reverse`) live here.
"""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp

import bilevel
from conftest import TINY, random_bytes, tiny_model, tiny_weighter
from model import ByteLM, second_order
from weighter import filter_batch


# ----------------------------------------------------------------------------------------------
# helpers

def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def params_of(module):
    return [p for p in module.parameters() if p.requires_grad]


def per_example_grads(model, x):
    """(b, P): row i = ∇_θ ℓ(x_i; θ), one autograd.grad call per example."""
    params = params_of(model)
    losses = model(x)
    return torch.stack([flat(torch.autograd.grad(losses[i], params, retain_graph=True))
                        for i in range(len(x))])


def mean_grad(model, x):
    """(P,) ∇_θ of the uniform mean loss on x."""
    return flat(torch.autograd.grad(model(x).mean(), params_of(model)))


def alpha_grad(weighter):
    """(A,) the weighter's .grad as set by an outer update, zeros where there is none."""
    return flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in weighter.parameters()])


def grad_of_weighted(weighter, x, c, weights="weights"):
    """(A,) ∇_α Σ_x c(x) w(x; α) for constants c: (b,)."""
    w = getattr(weighter, weights)(x)
    gs = torch.autograd.grad((c.detach() * w).sum(), list(weighter.parameters()), allow_unused=True)
    return flat([g if g is not None else torch.zeros_like(p) for g, p in zip(gs, weighter.parameters())])


def shifted(module, direction, eps):
    """Context-free in-place shift of a module's parameters by eps·direction (direction: (A,))."""
    with torch.no_grad():
        i = 0
        for p in module.parameters():
            n = p.numel()
            p.add_(eps * direction[i:i + n].view_as(p))
            i += n


def directional_fd(f, module, direction, eps=1e-5):
    """(f(α + εd) − f(α − εd)) / 2ε, restoring α. Keep ‖εd‖ small: the networks have ReLU kinks."""
    shifted(module, direction, eps)
    fp = f()
    shifted(module, direction, -2 * eps)
    fm = f()
    shifted(module, direction, eps)
    return (fp - fm) / (2 * eps)


def per_example_dot_jvp(model, theta, x, u):
    """The same (ℓ, c) as `bilevel.per_example_dot`, by one Jacobian–vector product (forward-mode
    autodiff): the jvp of θ ↦ ℓ(x; θ) in the direction u is d/dt ℓ(x; θ + t u) at t = 0 = ⟨∇ℓ(x; θ), u⟩.
    The textbook route, for any model; it needs attention's math path and costs more."""
    primal = {k: t.detach() for k, t in theta.items()}
    tangent = {k: u[k].detach().to(t.dtype) for k, t in primal.items()}
    with second_order(model):     # the fused attention kernel has no forward-mode derivative
        losses, c = jvp(lambda th: bilevel.loss_at(model, th, x), (primal,), (tangent,))
    return losses.detach(), c.detach()


def soba_terms_forward_over_reverse(model, x, v):
    """The same (ℓ, g, H v, c) as `bilevel.soba_terms`, by forward over reverse, as the reference
    code computes H v: one Jacobian–vector product, in the direction v, of θ ↦ (∇_θ mean ℓ(x; θ), ℓ(x; θ)):
        tangent of ∇_θ mean ℓ = H v,     tangent of ℓ(x; θ) = ⟨∇_θ ℓ(x; θ), v⟩ = c."""
    primal = {k: t.detach() for k, t in bilevel.theta_of(model).items()}
    tangent = {k: v[k].detach().to(t.dtype) for k, t in primal.items()}

    def mean_loss(theta):
        losses = bilevel.loss_at(model, theta, x)                               # (b,)
        return losses.mean(), losses
    with second_order(model):
        (g, losses), (Hv, c) = jvp(grad(mean_loss, has_aux=True), (primal,), (tangent,))
    return losses.detach(), {k: t.detach() for k, t in g.items()}, Hv, c


def unflatten_like(vec, model):
    out, i = {}, 0
    for k, p in model.named_parameters():
        out[k] = vec[i:i + p.numel()].view_as(p).clone()
        i += p.numel()
    return out


@pytest.fixture
def setup():
    model, weighter = tiny_model(), tiny_weighter()
    x_generic = random_bytes(6, seed=10, pad_from={2: 8})
    x_specific = random_bytes(4, seed=11, pad_from={0: 5})
    w = weighter.weights(x_generic)
    assert w.max() / w.min() > 3          # really non-uniform weights
    return model, weighter, x_generic, x_specific


# ----------------------------------------------------------------------------------------------
# DDS (section 4.3.1, Eq. 3)

def dds_objective(model, weighter, x_generic, x_specific, rho):
    """L(α) = mean ℓ(x_spec; θ − ρ Σ_x w(x; α) ∇ℓ(x; θ)), straight from the definition."""
    params = dict(model.named_parameters())
    w = weighter.weights(x_generic)
    g = torch.autograd.grad((w * model(x_generic)).sum(), list(params.values()))
    theta_prime = {k: p - rho * gi for (k, p), gi in zip(params.items(), g)}
    return functional_call(model, theta_prime, (x_specific,)).mean()


def test_dds_matches_reverse_over_reverse(setup):
    model, weighter, xg, xs = setup
    rho = 0.5
    L = bilevel.dds_step(model, weighter, xg, xs, rho)
    got = alpha_grad(weighter)
    # the look-ahead built as a graph and differentiated twice
    params = dict(model.named_parameters())
    with second_order():
        w = weighter.weights(xg)
        g = torch.autograd.grad((w * model(xg)).sum(), list(params.values()), create_graph=True)
        theta_prime = {k: p - rho * gi for (k, p), gi in zip(params.items(), g)}
        L_ref = functional_call(model, theta_prime, (xs,)).mean()
        ref = torch.autograd.grad(L_ref, list(weighter.parameters()), allow_unused=True)
    ref = flat([r if r is not None else torch.zeros_like(p) for r, p in zip(ref, weighter.parameters())])
    assert ref.norm() > 1e-6
    torch.testing.assert_close(L, L_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10 * ref.abs().max().item())


def test_dds_matches_finite_differences(setup):
    model, weighter, xg, xs = setup
    rho = 0.5
    bilevel.dds_step(model, weighter, xg, xs, rho)
    got = alpha_grad(weighter)
    d = torch.randn(got.shape, generator=torch.Generator().manual_seed(0), dtype=got.dtype)
    d /= d.norm()
    fd = directional_fd(lambda: dds_objective(model, weighter, xg, xs, rho).item(), weighter, d)
    assert abs(fd) > 1e-6
    assert got @ d == pytest.approx(fd, rel=1e-6)


def test_dds_small_rho_limit_is_minus_rho_gradient_alignment(setup):
    """ρ → 0: ∇_α L ≈ −ρ Σ_x ⟨∇L_specific(θ), ∇ℓ(x; θ)⟩ ∇_α w(x; α)."""
    model, weighter, xg, xs = setup
    rho = 1e-6
    bilevel.dds_step(model, weighter, xg, xs, rho)
    got = alpha_grad(weighter)
    c = -rho * per_example_grads(model, xg) @ mean_grad(model, xs)          # (b,)
    ref = grad_of_weighted(weighter, xg, c)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ----------------------------------------------------------------------------------------------
# per_example_dot: c(x) = ⟨∇ℓ(x; θ), u⟩ by per-example step sizes (and by one JVP)

@pytest.mark.parametrize("fn", [bilevel.per_example_dot, per_example_dot_jvp])
def test_per_example_dot_matches_brute_force(setup, fn):
    model, _, xg, _ = setup
    u_flat = torch.randn(sum(p.numel() for p in model.parameters()),
                         generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    losses, c = fn(model, bilevel.theta_of(model), xg, unflatten_like(u_flat, model))
    torch.testing.assert_close(losses, model(xg).detach(), rtol=1e-12, atol=1e-12)
    ref = per_example_grads(model, xg) @ u_flat
    torch.testing.assert_close(c, ref, rtol=1e-9, atol=1e-10 * ref.abs().max().item())


def test_per_example_dot_with_frozen_blocks_and_dropout():
    """θ without a frozen block (ScaleBiO's LISA freezes some): u is 0 there. In train mode with
    dropout, both routes see the same dropout masks when the RNG is reset."""
    torch.manual_seed(0)
    model = ByteLM.from_config({**TINY, "n_layer": 2, "dropout": 0.3}).double().train()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    theta = bilevel.theta_of(model)
    assert not any(k.startswith("blocks.0.") for k in theta)
    u = {k: torch.randn_like(p) for k, p in theta.items()}
    x = random_bytes(5, 12, seed=3)
    torch.manual_seed(1)
    losses, c = bilevel.per_example_dot(model, theta, x, u)
    torch.manual_seed(1)
    losses_ref, c_ref = per_example_dot_jvp(model, theta, x, u)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-9, atol=1e-10 * c_ref.abs().max().item())


class EmbeddingPReLU(nn.Module):
    """ℓ(x) = Σ PReLU(E[x]): PReLU's output is not affine in its parameter (the slope)."""

    def __init__(self):
        super().__init__()
        self.emb, self.act = nn.Embedding(256, 4), nn.PReLU()

    def forward(self, x):
        return self.act(self.emb(x.long())).sum((1, 2))


def test_per_example_dot_refuses_a_layer_it_cannot_linearise():
    model = EmbeddingPReLU()
    theta = bilevel.theta_of(model)
    with pytest.raises(TypeError, match="PReLU"):
        bilevel.per_example_dot(model, theta, random_bytes(2, 3, seed=0), theta)
    per_example_dot_jvp(model, theta, random_bytes(2, 3, seed=0), theta)   # the JVP takes any layer


# ----------------------------------------------------------------------------------------------
# SOBA (section 4.3.2)

def random_v(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}


def test_soba_hessian_vector_product_matches_finite_differences(setup):
    """d_v − ∇L_specific(θ) = (1/b) Σ_x ∇²ℓ(x; θ) v: the Hessian of the UNIFORM mean generic loss."""
    model, weighter, xg, xs = setup
    v = random_v(model)
    d_v, _, _ = bilevel.soba_step(model, weighter, xg, xs, v)
    hv = flat(d_v.values()) - mean_grad(model, xs)
    v_flat = flat(v.values())
    params = params_of(model)

    def grad_at(eps):
        shifted(model, v_flat, eps)
        out = mean_grad(model, xg)
        shifted(model, v_flat, -eps)
        return out

    # a small step (‖εv‖ = 1e-6) so that no ReLU changes side between the two evaluations
    eps = 1e-6 / v_flat.norm().item()
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert fd.norm() > 1e-3 and len(params) > 0
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-7 * fd.abs().max().item())


def test_soba_alpha_direction_and_gradient_match_brute_force(setup):
    """d_α = Σ_x ⟨∇ℓ(x; θ), v⟩ ∇_α w(x; α); g = the plain uniform mean gradient; losses = ℓ(x; θ)."""
    model, weighter, xg, xs = setup
    v = random_v(model)
    _, g, losses = bilevel.soba_step(model, weighter, xg, xs, v)
    got = alpha_grad(weighter)
    c = per_example_grads(model, xg) @ flat(v.values())                      # (b,) ⟨∇ℓ(x), v⟩
    ref = grad_of_weighted(weighter, xg, c)
    assert ref.norm() > 1e-6
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10 * ref.abs().max().item())
    torch.testing.assert_close(flat(g.values()), mean_grad(model, xg), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses, model(xg).detach(), rtol=1e-12, atol=1e-12)


def test_soba_terms_forward_over_reverse_agree_with_brute_force(setup):
    """Both ways of computing (ℓ, g, H v, c) — reverse over reverse (soba_step's) and forward over
    reverse (the reference code's, above) — against brute force."""
    model, _, xg, _ = setup
    v = random_v(model)
    c_ref = per_example_grads(model, xg) @ flat(v.values())                    # (b,) ⟨∇ℓ(x), v⟩
    for terms in (bilevel.soba_terms, soba_terms_forward_over_reverse):
        losses, g, hv, c = terms(model, xg, v)
        torch.testing.assert_close(c, c_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(flat(g.values()), mean_grad(model, xg), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(losses, model(xg).detach(), rtol=1e-12, atol=1e-12)
        if terms is bilevel.soba_terms:
            hv_rr = flat(hv.values())
        else:
            torch.testing.assert_close(flat(hv.values()), hv_rr, rtol=1e-9, atol=1e-12)


def test_soba_step_in_micro_batches_gives_the_same_numbers(setup):
    model, weighter, xg, xs = setup
    v = random_v(model)
    d_v, g, losses = bilevel.soba_step(model, weighter, xg, xs, v)
    d_alpha = alpha_grad(weighter)
    weighter.zero_grad()
    d_v4, g4, losses4 = bilevel.soba_step(model, weighter, xg, xs, v, chunks=4)   # micro-batches of 2, 2, 2
    for a, b in ((d_v, d_v4), (g, g4)):
        torch.testing.assert_close(flat(b.values()), flat(a.values()), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(losses4, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha_grad(weighter), d_alpha, rtol=1e-10, atol=1e-13)


# A bilevel problem with a closed form. Rows of a "batch" are [features (d), target y, ridge λ_row,
# index i]; the model's per-example loss is ℓ_i(θ) = (x_iᵀθ − y_i)² + λ_row ‖θ‖² (λ_row = λ for the
# training points, 0 for the validation points), and the "weighter" has one free logit per
# training point, w(x_i; α) = softmax over the batch of α_i.

class LinearParams(nn.Module):
    """θ ∈ R^d, zeros at start (float64); subclasses define the per-example loss."""

    def __init__(self, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, dtype=torch.float64))


class Ridge(LinearParams):
    def forward(self, batch):
        d = self.theta.shape[0]
        X, y, lam = batch[:, :d], batch[:, d], batch[:, d + 1]
        return (X @ self.theta - y) ** 2 + lam * (self.theta ** 2).sum()      # (b,) per-example


class MeanEstimation(LinearParams):
    """ℓ_i(θ) = ½‖θ − c_i‖²: every example has the Hessian I."""

    def forward(self, batch):
        d = self.theta.shape[0]
        return 0.5 * ((self.theta - batch[:, :d]) ** 2).sum(1)               # (b,)


class FreeLogits(nn.Module):
    def __init__(self, n, alpha=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n, dtype=torch.float64) if alpha is None else alpha.clone())

    def forward(self, batch):
        return self.alpha[batch[:, -1].long()]                              # (b,) scores: a free logit each

    def weights(self, batch, ranks=None):
        return torch.softmax(self(batch), 0)                                # (b,) (one process)


def ridge_problem(n=8, d=3, n_val=5, lam=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(n_val, d, generator=g, dtype=torch.float64)
    yv = Xv @ torch.randn(d, generator=g, dtype=torch.float64)
    train = torch.cat([X, y[:, None], torch.full((n, 1), lam, dtype=torch.float64),
                       torch.arange(n, dtype=torch.float64)[:, None]], 1)
    val = torch.cat([Xv, yv[:, None], torch.zeros(n_val, 2, dtype=torch.float64)], 1)
    return X, y, Xv, yv, lam, train, val


def ridge_closed_form(alpha, X, y, Xv, yv, lam):
    """θ*(α) = argmin Σ_i w_i ℓ_i, v* = −H⁻¹∇L_val(θ*), h(α) = L_val(θ*(α)) and ∇h(α), by linear algebra."""
    alpha = alpha.detach().clone().requires_grad_()
    w = torch.softmax(alpha, 0)
    d = X.shape[1]
    H = 2 * (X.T * w) @ X + 2 * lam * w.sum() * torch.eye(d, dtype=X.dtype)   # ∇²_θθ Σ w_i ℓ_i
    theta = torch.linalg.solve(H, 2 * (X.T * w) @ y)                         # ∇_θ Σ w_i ℓ_i = 0
    h = ((Xv @ theta - yv) ** 2).mean()
    (grad_h,) = torch.autograd.grad(h, alpha)
    theta = theta.detach()
    grad_val = 2 * Xv.T @ (Xv @ theta - yv) / len(yv)
    v = -torch.linalg.solve(H.detach(), grad_val)
    return theta, v, h.item(), grad_h


def test_soba_converges_to_implicit_function_hypergradient_on_ridge():
    """Full batch, uniform weights (α = 0): SOBA's uniform-mean Hessian IS the Hessian of the
    weighted inner problem. Iterating θ ← θ − ρ g, v ← v − η d_v at fixed α, the iterates reach
    θ*(α) and v* = −H⁻¹∇L_val(θ*), and d_α reaches the implicit-function-theorem ∇h(α)."""
    X, y, Xv, yv, lam, train, val = ridge_problem()
    model, weighter = Ridge(X.shape[1]), FreeLogits(len(X))
    theta_star, v_star, _, grad_h = ridge_closed_form(weighter.alpha, X, y, Xv, yv, lam)
    assert grad_h.norm() > 1e-2
    v = {"theta": torch.zeros_like(model.theta)}
    rho = eta = 0.1
    for _ in range(400):
        weighter.zero_grad()
        d_v, g, _ = bilevel.soba_step(model, weighter, train, val, v)
        with torch.no_grad():
            model.theta -= rho * g["theta"]
            v["theta"] -= eta * d_v["theta"]
    torch.testing.assert_close(model.theta.detach(), theta_star, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(v["theta"], v_star, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(weighter.alpha.grad, grad_h, rtol=1e-7, atol=1e-9)


def test_soba_outer_loop_reaches_the_optimum_on_weighted_mean():
    """ℓ_i = ½‖θ − c_i‖² (Hessian I for every example, so the uniform-mean Hessian of soba_step is
    exact for any weights), outer L_val = ½‖θ − t‖² with t inside the convex hull of the c_i:
    θ*(α) = Σ w_i c_i and min_α h(α) = 0. (1) At a fixed NON-uniform α, with the weighted inner
    step θ ← θ − ρ Σ w_i ∇ℓ_i (the weights enter through the θ update, as the filter does in
    Algorithm 1), d_α reaches the closed-form ∇h(α). (2) The full SOBA loop (α ← α − γ d_α too)
    drives h(α) to ~0."""
    n, d = 6, 2
    gen = torch.Generator().manual_seed(0)
    C = torch.randn(n, d, generator=gen, dtype=torch.float64)
    pi = torch.softmax(torch.randn(n, generator=gen, dtype=torch.float64), 0)
    t = pi @ C                                                              # inside the hull
    train = torch.cat([C, torch.arange(n, dtype=torch.float64)[:, None]], 1)
    val = torch.cat([t[None], torch.zeros(1, 1, dtype=torch.float64)], 1)

    def h_and_grad(alpha):
        alpha = alpha.detach().clone().requires_grad_()
        h = 0.5 * ((torch.softmax(alpha, 0) @ C - t) ** 2).sum()
        return h.item(), torch.autograd.grad(h, alpha)[0]

    def run(weighter, steps, gamma):
        model = MeanEstimation(d)
        v = {"theta": torch.zeros(d, dtype=torch.float64)}
        rho = eta = 0.5
        for _ in range(steps):
            weighter.zero_grad()
            d_v, _, _ = bilevel.soba_step(model, weighter, train, val, v)
            with torch.no_grad():
                w = weighter.weights(train)
                model.theta -= rho * (w[:, None] * (model.theta - C)).sum(0)   # Σ w_i ∇ℓ_i
                v["theta"] -= eta * d_v["theta"]
                weighter.alpha -= gamma * weighter.alpha.grad
        return model

    # (1) fixed non-uniform α
    alpha0 = torch.randn(n, generator=gen, dtype=torch.float64)
    weighter = FreeLogits(n, alpha0)
    model = run(weighter, 80, gamma=0.0)
    _, grad_h = h_and_grad(alpha0)
    torch.testing.assert_close(model.theta.detach(), torch.softmax(alpha0, 0) @ C, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(weighter.alpha.grad, grad_h, rtol=1e-7, atol=1e-9)
    # (2) the whole loop
    weighter = FreeLogits(n)
    h_start, _ = h_and_grad(weighter.alpha)
    run(weighter, 200, gamma=1.0)
    h_end, _ = h_and_grad(weighter.alpha)
    assert h_end < 1e-3 * h_start, (h_start, h_end)


# ----------------------------------------------------------------------------------------------
# Anograd (section 4.3.3)

def anograd_objective(model, weighter, x_generic, x_specific):
    """−cos(Σ_x w(x; α) ∇ℓ(x; θ), ∇L_specific(θ)) with w = softplus(a)·softmax(s)."""
    params = params_of(model)
    w = weighter.anograd_weights(x_generic)
    g = flat(torch.autograd.grad((w * model(x_generic)).sum(), params))
    s = mean_grad(model, x_specific)
    return -(g @ s / (g.norm() * s.norm())).item()


def test_anograd_matches_finite_differences_and_ignores_scale(setup):
    model, weighter, xg, xs = setup
    L = bilevel.anograd_step(model, weighter, xg, xs)
    assert L.item() == pytest.approx(anograd_objective(model, weighter, xg, xs), rel=1e-6)
    got = alpha_grad(weighter)
    for seed in range(2):
        d = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
        d /= d.norm()
        fd = directional_fd(lambda: anograd_objective(model, weighter, xg, xs), weighter, d)
        assert abs(fd) > 1e-6
        assert got @ d == pytest.approx(fd, rel=1e-5)
    # the cosine is scale-invariant: the scalar a of softplus(a)·softmax(s) gets no gradient
    assert weighter.a.grad is not None
    assert abs(weighter.a.grad.item()) < 1e-8 * got.abs().max().item()


# ----------------------------------------------------------------------------------------------
# the filter of Algorithm 1

N_DRAWS = 20_000        # importance: one call of N_DRAWS i.i.d. draws; the others: N_DRAWS // 2 calls
S = torch.tensor([0.5, -1.0, 1.2, 0.0, -0.3, 0.8], dtype=torch.float64)     # |B| = 6 scores
W = torch.softmax(S, 0)


def chi_square(counts, p):
    expected = p * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


# χ² with 5 degrees of freedom: P(χ² > 25) ≈ 1.4e-4
CHI2_LIMIT = 25.0


def test_importance_filter_frequencies_follow_w_with_repeats():
    gen = torch.Generator().manual_seed(0)
    idx = filter_batch(S, N_DRAWS, "importance", gen)                     # N_DRAWS i.i.d. draws
    counts = torch.bincount(idx, minlength=len(S)).double()
    assert chi_square(counts, W) < CHI2_LIMIT
    # with replacement: a batch of b = |B| draws repeats an example (almost surely over 20 batches)
    assert any(len(set(filter_batch(S, len(S), "importance", gen).tolist())) < len(S) for _ in range(20))


def test_without_replacement_filter_one_draw_follows_w_and_draws_are_distinct():
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(len(S), dtype=torch.float64)
    for _ in range(N_DRAWS // 2):
        counts[filter_batch(S, 1, "without_replacement", gen)] += 1
    assert chi_square(counts, W) < CHI2_LIMIT
    for _ in range(50):
        idx = filter_batch(S, 4, "without_replacement", gen).tolist()
        assert len(idx) == 4 and len(set(idx)) == 4


def test_without_replacement_filter_two_draws_inclusion_probabilities():
    """Sequential sampling without replacement ∝ w: P(i ∈ S) = w_i + Σ_{j≠i} w_j w_i / (1 − w_j)."""
    gen = torch.Generator().manual_seed(2)
    n_draws = N_DRAWS // 2
    counts = torch.zeros(len(S), dtype=torch.float64)
    for _ in range(n_draws):
        counts[filter_batch(S, 2, "without_replacement", gen)] += 1
    p_in = torch.stack([W[i] + sum(W[j] * W[i] / (1 - W[j]) for j in range(len(S)) if j != i)
                        for i in range(len(S))])
    # each count is Binomial(n_draws, p_in): a 4.5-sigma band
    sigma = (n_draws * p_in * (1 - p_in)).sqrt()
    assert ((counts - n_draws * p_in).abs() < 4.5 * sigma).all(), (counts / n_draws, p_in)


def test_top_filter_is_deterministic_top_k():
    gen = torch.Generator().manual_seed(3)
    for k in (1, 3, 6):
        first = filter_batch(S, k, "top", gen)
        assert sorted(first.tolist()) == sorted(torch.argsort(S, descending=True)[:k].tolist())
        for _ in range(5):
            assert filter_batch(S, k, "top", gen).tolist() == first.tolist()
    with pytest.raises(ValueError):
        filter_batch(S, 2, "nonsense", gen)


def test_filters_return_distinct_in_range_long_indices_and_gumbel_top_1_follows_w():
    gen = torch.Generator().manual_seed(4)
    s = S.float()                                                           # float32 scores
    for how in ("importance", "without_replacement", "top"):
        for b in (1, 3, 6):
            idx = filter_batch(s, b, how, gen)
            assert idx.dtype == torch.long and idx.shape == (b,) and idx.device == s.device
            assert bool(((0 <= idx) & (idx < len(s))).all()), idx
            if how != "importance":
                assert len(set(idx.tolist())) == b                        # distinct examples
    for b in (1, 3, 6):
        assert torch.equal(filter_batch(s, b, "top"), torch.argsort(s, descending=True)[:b])
    # Gumbel top-1 = one draw from w = softmax(s): inclusion frequencies within 4.5 standard errors
    n = 4000
    counts = torch.zeros(len(s), dtype=torch.float64)
    for _ in range(n):
        counts[filter_batch(s, 1, "without_replacement", gen)] += 1
    w = torch.softmax(s.double(), 0)
    se = (w * (1 - w) / n).sqrt()
    assert ((counts / n - w).abs() < 4.5 * se).all(), (counts / n, w)


def test_filter_draws_come_from_the_cpu_generator_whatever_the_device_of_s():
    """Every draw is made on the CPU with the CPU generator, then moved to s.device: the same numbers
    as a by-hand computation on the CPU, and the generator advances the same way for a tensor on
    another device ('meta' here: no data, but the draws must still be taken from the generator; a
    draw made on s.device would either leave it untouched or, on CUDA, be refused)."""
    s = torch.randn(50, generator=torch.Generator().manual_seed(7))                 # float32
    for b in (1, 5):
        g, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        # without_replacement: top_k(s + G), G = −log(−log U), U drawn on the CPU in float32
        u = torch.rand(s.shape, generator=g_ref).clamp_(1e-20, 1.0)
        expected = torch.topk(s - torch.log(-torch.log(u)), b).indices
        assert torch.equal(filter_batch(s, b, "without_replacement", g), expected)
        assert torch.equal(g.get_state(), g_ref.get_state())
        idx = filter_batch(s.to("meta"), b, "without_replacement", g)
        torch.rand(s.shape, generator=g_ref)
        assert idx.device.type == "meta" and idx.shape == (b,) and idx.dtype == torch.long
        assert torch.equal(g.get_state(), g_ref.get_state())
        # importance: b draws from the CPU probabilities
        expected = torch.multinomial(torch.softmax(s, 0), b, replacement=True, generator=g_ref)
        assert torch.equal(filter_batch(s, b, "importance", g), expected)
        assert torch.equal(g.get_state(), g_ref.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_filter_on_cuda_with_a_cpu_generator_selects_what_the_cpu_selects():
    s = torch.randn(4096, generator=torch.Generator().manual_seed(8))              # float32
    for how in ("importance", "without_replacement", "top"):
        g_cpu, g_cuda = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        on_cpu = filter_batch(s, 64, how, g_cpu)
        on_cuda = filter_batch(s.cuda(), 64, how, g_cuda)
        assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.long
        assert torch.equal(on_cuda.cpu(), on_cpu), how
        assert torch.equal(g_cuda.get_state(), g_cpu.get_state())


def test_soba_alpha_grad_from_a_given_v_matches_brute_force(setup):
    """soba_alpha_grad (the reference code's order passes v_{t+1}): d_α = Σ_x ⟨∇ℓ(x; θ), v⟩ ∇_α w(x; α) for
    the v given, replacing what α.grad held (here soba_step's d_α from another v)."""
    model, weighter, xg, xs = setup
    bilevel.soba_step(model, weighter, xg, xs, random_v(model, seed=5))     # α.grad from another v
    v = random_v(model, seed=3)
    bilevel.soba_alpha_grad(model, weighter, xg, v)
    c = per_example_grads(model, xg) @ flat(v.values())                      # (b,) ⟨∇ℓ(x), v⟩
    ref = grad_of_weighted(weighter, xg, c)
    assert ref.norm() > 1e-6
    torch.testing.assert_close(alpha_grad(weighter), ref, rtol=1e-9, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("order", ["t", "t+1"])
def test_soba_step_in_train_takes_d_alpha_from_v_t_or_v_t_plus_1(order):
    """train.py's SOBA step (--soba_dalpha_v): α.grad after step t is Σ_{x∈S} ⟨∇ℓ(x; θ_t), v⟩ ∇_α w(x; α_t)
    with v = v_t (default) or v_{t+1} (v after this step's update), S the batch θ trained on, by brute force."""
    import copy
    import train
    cfg = train.parse_args(["--n_layer=1", "--n_embd=16", "--n_hidden=32", "--seq_len=16", "--batch_size=8",
                            "--big_batch_size=32", "--specific_batch_size=8", "--weighter_dim=8",
                            "--eval_examples=16", f"--soba_dalpha_v={order}", "--device=cpu"],
                           {k: getattr(train, k) for k in train.config_keys})
    ctx = train.setup(cfg)
    train.train_step(ctx, 0)                      # v_1 ≠ 0
    theta_t, alpha_t = copy.deepcopy(ctx.model).double(), copy.deepcopy(ctx.weighter).double()
    v_t = {k: t.detach().clone() for k, t in ctx.v.items()}
    out = train.train_step(ctx, 1)
    v = v_t if order == "t" else ctx.v
    assert not torch.equal(flat(v_t.values()), flat(ctx.v.values()))
    x_S = ctx.x_train[out.idx]
    c = per_example_grads(theta_t, x_S) @ flat(v.values()).double()          # (b,) ⟨∇ℓ(x; θ_t), v⟩
    ref = grad_of_weighted(alpha_t, x_S, c)
    got = alpha_grad(ctx.weighter).double()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
