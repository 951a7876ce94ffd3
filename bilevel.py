"""
The outer updates of the weighting network α (paper section 4.3), one short function each.

The bilevel problem (section 4.1):

    θ*(α) ∈ argmin_θ  L_generic(θ, α) = Σ_{x∈D_generic} w(x; α) ℓ(x; θ)               (1)
    min_α  L_specific(θ*(α)) = Σ_{x'∈D_specific} ℓ(x'; θ*(α))                          (2)

Every update below ends the same way. The weights enter the generic objective linearly, so the
α-gradient of any of the outer losses is a vector–Jacobian product through the weighting network,

    ∇_α L = Σ_x  c(x) ∇_α w(x; α),        c(x) = ∂L/∂w(x) = ⟨∇_θ ℓ(x; θ), u⟩,

with a direction u in θ-space that depends on the method:
    DDS      u = −ρ ∇L_specific(θ')      (the chain rule through the look-ahead θ', Eq. 3)
    SOBA     u = v                       (the linear-system estimate −H⁻¹∇L_specific)
    Anograd  u = ∂(−cos)/∂g              (the derivative of the cosine w.r.t. the generic gradient)
    LTR      u = −lr ∇L_specific(θ)      (Eq. 3 at ε = 0, one batch, no weighting network)

The inner products c(x) = ⟨∇ℓ(x; θ), u⟩ for a whole batch are ONE Jacobian–vector product of
the per-example losses, ∂/∂t ℓ(x; θ + t u) at t = 0 (forward-mode autodiff, `per_example_dot`):
no per-example gradient is ever materialised. SOBA gets them for free from its Hessian–vector
product (it differentiates through per-example weights ε, see `soba_step`). The tests check every
update against finite differences, brute-force per-example gradients and closed forms.

Variables are named as in the paper: θ (`theta`, a dict name → tensor), α (the weighter's
parameters), ρ (`rho`), η (`eta`), v, B_generic (`x_generic`), B_specific (`x_specific`).
"""

import torch
from torch.func import functional_call, jvp

from model import second_order


# ----------------------------------------------------------------------------------------------
# helpers: θ as a dict of tensors, ℓ(x; θ), gradients and inner products in θ-space

def theta_of(model):
    """θ: the model's trainable parameters as {name: tensor} (the live tensors, not copies)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def loss_at(model, theta, x):
    """ℓ(x; θ) for a dict θ that may differ from the model's own parameters. (B,)"""
    return functional_call(model, theta, (x,))


def grad_at(model, theta, x, weights=None):
    """∇_θ Σ_x weights(x) ℓ(x; θ) (uniform mean when weights is None) → ({name: grad}, loss)."""
    theta = {k: t.detach().requires_grad_() for k, t in theta.items()}
    losses = loss_at(model, theta, x)                                   # (B,)
    loss = losses.mean() if weights is None else (weights.detach() * losses).sum()
    grads = torch.autograd.grad(loss, list(theta.values()))
    return dict(zip(theta, grads)), loss.detach()


def dot(a, b):
    """⟨a, b⟩ for two parameter-shaped dicts."""
    return sum((a[k].float() * b[k].float()).sum() for k in a)


def per_example_dot(model, theta, x, u):
    """c(x) = ⟨∇_θ ℓ(x; θ), u⟩ for every x in the batch, by one Jacobian–vector product.

    jvp of θ ↦ ℓ(x; θ) in the direction u is d/dt ℓ(x; θ + t u) at t = 0 = ⟨∇ℓ(x; θ), u⟩.
    Returns (ℓ(x; θ), c), both (B,)."""
    primal = {k: t.detach() for k, t in theta.items()}
    tangent = {k: u[k].detach().to(t.dtype) for k, t in primal.items()}
    with second_order():     # the fused attention kernel has no forward-mode derivative
        losses, c = jvp(lambda th: loss_at(model, th, x), (primal,), (tangent,))
    return losses.detach(), c.detach()


def backward_to_alpha(c, w):
    """∇_α Σ_x c(x) w(x; α): one vector–Jacobian product through the weighting network.
    Accumulates into the weighter's .grad; c: (B,) constants, w: (B,) with a graph to α."""
    (c.detach() * w).sum().backward()


# ----------------------------------------------------------------------------------------------
# DDS: differentiable data selection, one unrolled step (section 4.3.1, Eq. 3)

def dds_step(model, weighter, x_generic, x_specific, rho):
    """Sets α.grad to ∇_α L(α) of Eq. (3) and returns L(α).

        L(α) = mean_{x'∈B_specific} ℓ(x'; u(θ, α)),   u(θ, α) = θ − ρ Σ_{x∈B_generic} w(x; α) ∇_θ ℓ(x; θ)

    (the paper sums over B_specific; we average, a constant factor that Adam on α ignores).
    Back-propagating L to α through the look-ahead is done by the chain rule, which is exact here
    because u(θ, α) is linear in the weights: ∂u/∂w(x) = −ρ ∇_θ ℓ(x; θ), so
        ∂L/∂w(x) = −ρ ⟨∇_θ L(θ'), ∇_θ ℓ(x; θ)⟩ and ∇_α L = Σ_x ∂L/∂w(x) ∇_α w(x; α).
    (tests/test_bilevel.py checks it against reverse-over-reverse autograd and finite differences.)
    """
    theta = theta_of(model)
    w = weighter.weights(x_generic)                                      # (b,) w(x; α), graph to α
    # g_generic = Σ_x w(x; α) ∇_θ ℓ(x; θ)
    g_generic, _ = grad_at(model, theta, x_generic, weights=w)
    # θ' = u(θ, α) = θ − ρ g_generic
    theta_prime = {k: theta[k].detach() - rho * g_generic[k] for k in theta}
    # L(α) = L_specific(θ') and its gradient in θ' (first order)
    g_specific, L = grad_at(model, theta_prime, x_specific)
    # ∂L/∂w(x) = ⟨∇ℓ(x; θ), −ρ ∇L_specific(θ')⟩ for all x ∈ B_generic at once (a JVP)
    _, c = per_example_dot(model, theta, x_generic, {k: -rho * g for k, g in g_specific.items()})
    # ∇_α L = Σ_x ∂L/∂w(x) ∇_α w(x; α)
    backward_to_alpha(c, w)
    return L


# ----------------------------------------------------------------------------------------------
# SOBA: stochastic bilevel algorithm (section 4.3.2; Dagréou et al. 2022)

def soba_step(model, weighter, x_generic, x_specific, v):
    """Sets α.grad to d_α, returns (d_v, g) with g the uniform generic gradient on x_generic.

    With θ*(α) replaced by the current θ (as SOBA does) and v ≈ −[∇²_θθ L_generic]⁻¹ ∇L_specific:
        d_v = Σ_{x∈B_generic} w(x; α) ∇²_θ ℓ(x; θ) v + ∇_θ L_specific(θ)     (Hessian-vector product)
        d_α = Σ_{x∈B_generic} ⟨∇_θ ℓ(x; θ), v⟩ ∇_α w(x; α)                  (≈ ∇²_αθ L_generic v)
    The caller then takes v ← v − η d_v and a descent step on α along d_α.

    B_generic here is the filtered batch S of Algorithm 1: it was drawn ∝ w, so the Hessian term
    uses its uniform mean (1/b) Σ_{x∈S} ∇²ℓ(x; θ), as the reference code does, and d_α uses the
    softmax weights over S. One forward pass and one create_graph backward on S serve three
    purposes: with per-example weights ε (all 1/b),
        g = ∇_θ Σ_x ε_x ℓ(x; θ)          is the main model's gradient for this step,
        ∇_θ ⟨g, v⟩ = H v                  is the Hessian-vector product (reverse over reverse),
        ∂⟨g, v⟩/∂ε_x = ⟨∇_θ ℓ(x; θ), v⟩   are the per-example inner products, without per-example
                                           gradients.
    """
    theta = theta_of(model)
    names, params = list(theta), list(theta.values())
    b = x_generic.shape[0]
    eps = torch.full((b,), 1.0 / b, device=x_generic.device, requires_grad=True)  # (b,) ε = 1/b
    with second_order():
        losses = model(x_generic)                                               # (b,) ℓ(x; θ)
        g = torch.autograd.grad((eps * losses).sum(), params, create_graph=True)
        g_dot_v = sum((gi * v[k]).sum() for gi, k in zip(g, names))            # ⟨g, v⟩
        *Hv, c = torch.autograd.grad(g_dot_v, params + [eps])                   # H v, (b,) c = ⟨∇ℓ(x), v⟩
    # ∇_θ L_specific(θ) on B_specific
    g_specific, _ = grad_at(model, theta, x_specific)
    # d_v = H v + ∇L_specific
    d_v = {k: Hv[i] + g_specific[k] for i, k in enumerate(names)}
    # d_α = Σ_x ⟨∇ℓ(x; θ), v⟩ ∇_α w(x; α)
    backward_to_alpha(c, weighter.weights(x_generic))
    return d_v, {k: gi.detach() for k, gi in zip(names, g)}, losses.detach()


# ----------------------------------------------------------------------------------------------
# Anograd: aligned normalised gradient (section 4.3.3)

def anograd_step(model, weighter, x_generic, x_specific):
    """Sets α.grad to ∇_α L_anograd and returns L_anograd = −cos(g_generic(α), g_specific).

        g_generic(α) = ∇_θ Σ_{x∈B_generic} w(x; α) ℓ(x; θ),   g_specific = ∇_θ L_specific(θ)

    Steepest descent on L_specific restricted to conic combinations of generic gradients (Eq. 4)
    asks for the generic update best aligned with the specific one. The paper writes "min cosine";
    the update direction is −g_generic, so aligning it with −g_specific means *maximising* the
    cosine of the two gradients, which is what the reference code does (loss = −cos). w is
    softplus(a)·softmax(s) (reference); the cosine is scale-invariant, so a gets no gradient.
    By the chain rule through g_generic, which is linear in w:
        ∂(−cos)/∂w(x) = ⟨∇_θ ℓ(x; θ), q⟩,   q = −∂cos/∂g = −( s/(‖g‖‖s‖) − cos · g/‖g‖² ).
    """
    theta = theta_of(model)
    w = weighter.anograd_weights(x_generic)                                  # (b,) graph to α
    g, _ = grad_at(model, theta, x_generic, weights=w)                       # g_generic(α)
    s, _ = grad_at(model, theta, x_specific)                                 # g_specific
    g_norm, s_norm = dot(g, g).sqrt(), dot(s, s).sqrt()
    cos = dot(g, s) / (g_norm * s_norm + 1e-12)
    # q = −∂cos/∂g
    q = {k: -(s[k] / (g_norm * s_norm + 1e-12) - cos * g[k] / (g_norm ** 2 + 1e-12)) for k in g}
    _, c = per_example_dot(model, theta, x_generic, q)                       # (b,) ∂(−cos)/∂w(x)
    backward_to_alpha(c, w)
    return -cos.detach()
