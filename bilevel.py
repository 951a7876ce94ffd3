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
    MWN      u = −ρ ∇L_specific(θ')      (DDS, with w = softmax(mlp(ℓ(x; θ); α)), Meta-Weight-Net)

The inner products c(x) = ⟨∇ℓ(x; θ), u⟩ = d/dt ℓ(x; θ + t u) for a whole batch come from ONE
ordinary backward pass: with a step size t_x of its own for every example, c = ∇_t Σ_x ℓ(x; θ + t_x u)
at t = 0 (`per_example_dot`; the forward-mode JVP of tests/test_bilevel.py, its reference, gives
the same numbers at a higher cost). No per-example gradient is ever materialised. SOBA gets them
for free from its Hessian–vector product (it differentiates through per-example weights ε, see
`soba_step`). The tests check every update against finite differences, brute-force per-example
gradients and closed forms.

Variables are named as in the paper: θ (`theta`, a dict name → tensor), α (the weighter's
parameters), ρ (`rho`), η (`eta`), v, B_generic (`x_generic`), B_specific (`x_specific`).

No host synchronisation in the updates: they return tensors (0-dim for scalars, detached) on the
model's device; the caller converts them to numbers when it logs.

Departures from the paper and the reference code (and why each stays). Each is what the reported
runs computed: changing it would change their numbers.
  (a) Anograd's loss is −⟨g, s⟩/(‖g‖‖s‖ + 1e-12) (g: the weighted generic, s: the specific
      gradient), the cosine; the reference code's is −⟨g, s⟩/(‖g‖ + 1e-6). ‖s‖ does not depend on
      α: a per-step rescaling of α's gradient, which Adam on α mostly normalises away.
  (b) w(x; α) is a softmax over the batch's sequences (one masked-mean score each); the
      reference's is a softmax over tokens. They differ when rows are padded. Stays: the filter
      draws sequences, one weight each.
  (c) DDS and Anograd take their outer step on R, the first b rows of the i.i.d. uniform big batch
      B (train.py), before the filter (the reference code's order): R is a uniform b-subset of B,
      and w is the softmax over R, not over B.
  (d) SOBA's Hessian is taken on the filtered batch S (drawn ∝ w) with uniform weights 1/b, as the
      reference code does, not as Σ_B w ∇²ℓ; its d_α uses the softmax over S. Stays: the same
      pass gives the main model's gradient on S.
  (e) `outer_every` = k takes the outer step on every k-th step only (the paper: every step). k = 1
      is the default; the `cpu` preset's k = 3 bounds a CPU step's cost (README, "Step cost").
  (f) CDS computes Δ once, then keeps the top-b of −Δ within each big batch B, online, as the
      reference code does; the paper restricts the generic set once, before training.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from model import second_order, uncompiled


# ----------------------------------------------------------------------------------------------
# data parallelism: what the updates need from torchrun's N ranks, and nothing in one process.
# Under torchrun each rank holds 1/N of every batch: rows r, r + N, r + 2N, … of it (rank r). The
# updates stay exact if (i) every softmax w(x; α) is normalised over the whole batch (the weighters'
# `weights(x, ranks)`, weighter.batch_softmax), (ii) every θ-space direction that is not a uniform mean
# (a weighted sum Σ w ∇ℓ, a specific gradient that enters a look-ahead or a cosine) is summed or averaged
# over the ranks before it is used, and (iii) a rank's α-gradient is its part of Σ_x c(x) ∇_α w(x; α),
# summed over the ranks by the caller.
# OneProcess is the identity; Ranks implements the same four methods with collectives (train.py joins
# the process group and uses the same object for its own all-reduces of θ's and α's gradients).

class OneProcess:
    """The data-parallel reductions of one process: every method returns its input unchanged."""
    rank, world = 0, 1

    def sum_(self, tensors):
        """Σ over the ranks, in place, of a list of tensors; returns the list."""
        return tensors

    def mean_(self, tensors):
        """The mean over the ranks, in place, of a list of tensors; returns the list."""
        return tensors

    def reduce_(self, tensors, mean):
        """mean_ (the gradients of a mean loss) or sum_ (of this rank's part of a sum)."""
        return self.mean_(tensors) if mean else self.sum_(tensors)

    def rows(self, t):
        """This rank's rows (n/N,) of a batch → the whole batch's (n,), in batch order, with a graph."""
        return t

    def mine(self, t):
        """The whole batch's (n,) → this rank's rows (n/N,): rows rank, rank + N, …"""
        return t


ONE = OneProcess()


class Ranks(OneProcess):
    """OneProcess's reductions over torchrun's N ranks (the process group train.py joined): rank r holds
    rows r, r + N, … of every batch."""
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def sum_(self, tensors):
        return self.all_reduce_(tensors, 1)

    def mean_(self, tensors):
        return self.all_reduce_(tensors, self.world)

    def all_reduce_(self, tensors, divisor):
        """Σ over the ranks / divisor, in place, in one collective (gloo has no mean)."""
        if tensors:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat /= divisor
            for t, f in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(f.view_as(t))
        return tensors

    def rows(self, t):
        return GatherRows.apply(t)

    def mine(self, t):
        return t[self.rank::self.world]


class GatherRows(torch.autograd.Function):
    """(n/N,) this rank's rows → (n,) the whole batch, row i from rank i % N; differentiable."""
    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())                  # N × (n/N,): rank r's rows
        return torch.stack(parts, dim=1).reshape(-1)            # (n/N, N) → (n,)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss is its part of the batch's: the gradient of a row is the sum over the ranks
        grad = grad.contiguous().clone()                        # (n,)
        dist.all_reduce(grad)
        return grad.view(-1, dist.get_world_size())[:, dist.get_rank()]      # (n/N,) this rank's rows


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
    """⟨a, b⟩ for two parameter-shaped dicts, in float32 at least (float64 stays float64)."""
    a_up = [t.to(torch.promote_types(t.dtype, torch.float32)) for t in a.values()]
    # a_k ⊙ b_k for every tensor k in one call (torch._foreach_*: one kernel launch on CUDA, the same
    # elementwise products), then Σ_k sum(a_k ⊙ b_k) in the order of a
    return sum(p.sum() for p in torch._foreach_mul(a_up, [b[k] for k in a]))


def per_example_dot(model, theta, x, u, mean_grad=False):
    """c(x) = ⟨∇_θ ℓ(x; θ), u⟩ for every x in the batch by ONE ordinary backward pass.
    Returns (ℓ(x; θ), c), both (B,); with mean_grad, (ℓ, g, c) where g = ∇_θ mean_x ℓ(x; θ) comes from
    the same backward (SOBA's finite-difference path, `soba_terms_fd`).

    c(x) is the directional derivative d/dt ℓ(x; θ + t u) at t = 0. Give every example its own
    step size t_x (a (B,) vector, all 0). The examples do not interact, so

        c = ∇_t Σ_x ℓ(x; θ + t_x u)  at t = 0,

    the gradient of ONE scalar: one reverse pass gives all B directional derivatives. A model whose
    parameters differ per example is not formed: every parameter enters the model through a layer
    whose output is affine in that layer's parameters (Linear, LayerNorm, Embedding, the tied head),
        layer(h; θ_l + t_x u_l) = layer(h; θ_l) + t_x · layer_0(h; u_l)
    (layer_0: the same layer, linear part only, e.g. h U_Wᵀ + U_b for y = h Wᵀ + b), so a forward
    hook adds t_x · layer_0(h; u_l) to every layer's output and the forward pass computes
    ℓ(x; θ + t_x u) exactly. The hooks detach h in that term: the derivative through it is
    multiplied by t = 0. No per-example gradient is formed, no second-order graph is built, and
    attention keeps its fused kernel. On our CPU, at the `cpu` preset, the pass costs 1.0–1.5
    forward+backward passes and the forward-mode JVP (tests/test_bilevel.py, the same numbers)
    1.4–2.5; at the paper's size both cost 1.1 (`diagnose.py bench`, README "Step cost").
    A model compiled by model.compile_model runs uncompiled here (the hooks change per call)."""
    # a parameter's name in θ / u, also when one tensor is used twice (the tied embedding and head)
    first = {}
    name_in_theta = {n: first.setdefault(id(p), n)
                     for n, p in model.named_parameters(remove_duplicate=False)}
    t = torch.zeros(len(x), device=x.device, dtype=next(iter(theta.values())).dtype,
                    requires_grad=True)                                 # (B,) one step size t_x per example

    def add_tangent(module_name):
        def hook(layer, inputs, out):
            # u_l: u on this layer's parameters (0 for a parameter outside θ, e.g. a frozen block)
            names = {n: name_in_theta[f"{module_name}.{n}" if module_name else n]
                     for n, _ in layer.named_parameters(recurse=False)}
            u_l = {n: u[k].detach() if k in u else torch.zeros_like(getattr(layer, n))
                   for n, k in names.items()}
            # layer(h; θ_l + t_x u_l) = layer(h; θ_l) + t_x · layer_0(h; u_l)
            t_x = t.view(-1, *[1] * (out.dim() - 1))                    # (B, 1, 1)
            return out + t_x * layer_0(layer, inputs[0].detach(), u_l)
        return hook
    hooks = [m.register_forward_hook(add_tangent(n)) for n, m in model.named_modules()
             if next(m.parameters(recurse=False), None) is not None]
    # θ detached: only t gets a gradient (and θ too with mean_grad)
    theta = {k: p.detach().requires_grad_(mean_grad) for k, p in theta.items()}
    try:
        # ℓ(x; θ + t_x u)
        with uncompiled(model):
            losses = loss_at(model, theta, x)                           # (B,)
    finally:
        for h in hooks:
            h.remove()
    if mean_grad:
        # ∇ of (1/B) Σ_x ℓ(x; θ + t_x u) at t = 0: g in θ (the hooks add 0 to every output, and their
        # term does not depend on θ), c_x / B in t_x (ℓ(x) alone depends on t_x)
        *g, c_over_B = torch.autograd.grad(losses.mean(), list(theta.values()) + [t])
        return losses.detach(), dict(zip(theta, g)), len(x) * c_over_B
    # c = ∇_t Σ_x ℓ(x; θ + t_x u) at t = 0
    (c,) = torch.autograd.grad(losses.sum(), t)                         # (B,)
    return losses.detach(), c


def layer_0(layer, h, u_l):
    """The linear part of a layer that is affine in its parameters, evaluated at parameters u_l:
    layer(h; θ_l + t u_l) − layer(h; θ_l) = t · layer_0(h; u_l)."""
    if isinstance(layer, torch.nn.Linear):          # y = h Wᵀ + b
        return F.linear(h, u_l["weight"], u_l.get("bias"))
    if isinstance(layer, torch.nn.LayerNorm):       # y = ĥ ⊙ γ + β,  ĥ = (h − mean) / std
        return F.layer_norm(h, layer.normalized_shape, u_l.get("weight"), u_l.get("bias"), layer.eps)
    if isinstance(layer, torch.nn.Embedding):       # y = E[h]
        return F.embedding(h, u_l["weight"])
    raise TypeError(f"per_example_dot: {type(layer).__name__} has parameters but no layer_0 here; "
                    "add its linear part (or take a forward-mode JVP)")


def backward_to_alpha(c, w):
    """∇_α Σ_x c(x) w(x; α): one vector–Jacobian product through the weighting network.
    Accumulates into the weighter's .grad; c: (B,) constants, w: (B,) with a graph to α."""
    (c.detach() * w).sum().backward()


# ----------------------------------------------------------------------------------------------
# DDS: differentiable data selection, one unrolled step (section 4.3.1, Eq. 3)

def dds_step(model, weighter, x_generic, x_specific, rho, w=None, ranks=ONE):
    """Sets α.grad to ∇_α L(α) of Eq. (3) and returns L(α).

        L(α) = mean_{x'∈B_specific} ℓ(x'; u(θ, α)),   u(θ, α) = θ − ρ Σ_{x∈B_generic} w(x; α) ∇_θ ℓ(x; θ)

    (the paper sums over B_specific; we average, a constant factor that Adam on α ignores).
    Back-propagating L to α through the look-ahead is done by the chain rule, which is exact here
    because u(θ, α) is linear in the weights: ∂u/∂w(x) = −ρ ∇_θ ℓ(x; θ), so
        ∂L/∂w(x) = −ρ ⟨∇_θ L(θ'), ∇_θ ℓ(x; θ)⟩ and ∇_α L = Σ_x ∂L/∂w(x) ∇_α w(x; α).
    (tests/test_bilevel.py checks it against reverse-over-reverse autograd and finite differences.)

    w: the (b,) weights w(x; α) with their graph to α; by default the byte CNN's softmax,
    weighter.weights(x_generic). Meta-Weight-Net passes its own, softmax(mlp(ℓ(x; θ); α)).
    ranks: under torchrun, x_generic and x_specific are this rank's rows (see OneProcess).
    """
    theta = theta_of(model)
    if w is None:
        w = weighter.weights(x_generic, ranks)                           # (b,) w(x; α), graph to α
    # g_generic = Σ_x w(x; α) ∇_θ ℓ(x; θ)   (torchrun: the ranks' partial sums, summed)
    g_generic, _ = grad_at(model, theta, x_generic, weights=w)
    ranks.sum_(list(g_generic.values()))
    # θ' = u(θ, α) = θ − ρ g_generic
    theta_prime = {k: theta[k].detach() - rho * g_generic[k] for k in theta}
    # L(α) = L_specific(θ') and its gradient in θ' (first order; torchrun: averaged over the ranks)
    g_specific, L = grad_at(model, theta_prime, x_specific)
    ranks.mean_(list(g_specific.values()) + [L])
    # ∂L/∂w(x) = ⟨∇ℓ(x; θ), −ρ ∇L_specific(θ')⟩ for all x ∈ B_generic at once (one backward pass)
    _, c = per_example_dot(model, theta, x_generic, {k: -rho * g for k, g in g_specific.items()})
    # ∇_α L = Σ_x ∂L/∂w(x) ∇_α w(x; α)
    backward_to_alpha(c, w)
    return L


# ----------------------------------------------------------------------------------------------
# SOBA: stochastic bilevel algorithm (section 4.3.2; Dagréou et al. 2022)

def soba_step(model, weighter, x_generic, x_specific, v, chunks=1, ranks=ONE, hvp="exact"):
    """Sets α.grad to d_α, returns (d_v, g, ℓ) with g the uniform generic gradient on x_generic and
    ℓ its (b,) per-example losses. `chunks` > 1 computes the same numbers in micro-batches, with
    less memory (see soba_terms). hvp: "exact" (the double backward below) or "finite_difference"
    (H v from two first-order passes, `soba_terms_fd`).

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
    losses, g, Hv, c = soba_terms(model, x_generic, v, chunks, hvp)
    # ∇_θ L_specific(θ) on B_specific
    g_specific, _ = grad_at(model, theta, x_specific)
    # d_v = H v + ∇L_specific, for all of θ's tensors in one call
    d_v = dict(zip(theta, torch._foreach_add([Hv[k] for k in theta], [g_specific[k] for k in theta])))
    # d_α = Σ_x ⟨∇ℓ(x; θ), v⟩ ∇_α w(x; α)   (torchrun: g, H v, d_v are uniform means, which the
    # caller averages over the ranks; w is the softmax over the whole S)
    backward_to_alpha(c, weighter.weights(x_generic, ranks))
    return d_v, g, losses


def soba_terms(model, x, v, chunks=1, hvp="exact"):
    """(ℓ, g, H v, c) on a batch x of b examples, by reverse over reverse (see soba_step):
    ℓ (b,) the losses, g = ∇_θ mean ℓ, H v = ∇²_θ (mean ℓ) v, c (b,) = ⟨∇_θ ℓ(x; θ), v⟩.
    hvp="finite_difference": the same terms on first-order passes (`soba_terms_fd`), H v approximated.

    The create_graph backward keeps the graph of the backward pass alive until the double backward
    (with the (b, heads, T, T) attention matrices of the math path): the step's peak memory. With
    `chunks` > 1 the batch is split into micro-batches x_1, …, x_m, each done on its own, and
        g = Σ_j (|x_j| / b) g_j,   H v = Σ_j (|x_j| / b) H_j v,   ℓ and c concatenated,
    the same numbers with one micro-batch's graph alive at a time."""
    if chunks > 1:
        parts = [(len(xj) / len(x), soba_terms(model, xj, v, hvp=hvp)) for xj in x.chunk(chunks)]
        losses = torch.cat([p[0] for _, p in parts])                                # (b,)
        g = {k: sum(share * p[1][k] for share, p in parts) for k in v}
        Hv = {k: sum(share * p[2][k] for share, p in parts) for k in v}
        c = torch.cat([p[3] for _, p in parts])                                     # (b,)
        return losses, g, Hv, c
    if hvp == "finite_difference":
        return soba_terms_fd(model, x, v)
    theta = theta_of(model)
    names, params = list(theta), list(theta.values())
    b = x.shape[0]
    # (b,) ε = 1/b
    eps = torch.full((b,), 1.0 / b, device=x.device, requires_grad=True, dtype=params[0].dtype)
    with second_order(model):
        losses = model(x)                                                       # (b,) ℓ(x; θ)
        g = torch.autograd.grad((eps * losses).sum(), params, create_graph=True)   # g = ∇_θ Σ ε ℓ
        g_dot_v = sum((gi * v[k]).sum() for gi, k in zip(g, names))            # ⟨g, v⟩
        *Hv, c = torch.autograd.grad(g_dot_v, params + [eps])                   # H v, (b,) c = ⟨∇ℓ(x), v⟩
    return losses.detach(), {k: gi.detach() for k, gi in zip(names, g)}, dict(zip(names, Hv)), c


# the finite difference's step: ‖εv‖ = FD_STEP ‖θ‖. Its error: truncation and ReLU kinks crossed, which
# grow with ε, plus the FP32 rounding of the two gradients, ~1/ε. On the `cpu` preset's model (60 steps
# in, b = 32, FP32 against FP64 exact) at 3e-3: 0.6% along SOBA's v, 1.3% along ∇L_specific, 1.9% along a
# random direction (at 1e-2: 0.5%, 14%, 1.8%; at 1e-3: 0.5%, 0.2%, 2.9%)
FD_STEP = 3e-3


def soba_terms_fd(model, x, v):
    """soba_terms' (ℓ, g, H v, c) on first-order passes only (--hvp=finite_difference): the central
    difference of two gradients of L = mean_x ℓ(x; ·) along v,

        H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε,       ε = FD_STEP ‖θ‖ / ‖v‖,

    exact up to O(ε²) where L is smooth (a quadratic L gives H v exactly); a ReLU that changes side
    between θ − εv and θ + εv adds an error, small when many units average it (see FD_STEP). Nothing
    is differentiated twice, so attention keeps its fused kernels (no `second_order`). The two passes
    run in FP32 with autocast off: in bf16 their difference would be rounding noise. ℓ, g and
    c = ⟨∇ℓ(x; θ), v⟩ come from one more pass, `per_example_dot` with its mean gradient, under the
    caller's precision (as the main update's). All three passes draw the same dropout masks.
    Cost: three first-order forward+backward passes on x (the first with per_example_dot's hooks)."""
    theta = {k: t.detach() for k, t in theta_of(model).items()}
    v = {k: t.detach() for k, t in v.items()}
    # ε = FD_STEP ‖θ‖ / ‖v‖, a 0-dim tensor (no host synchronisation); v = 0 gives H v = 0
    eps = FD_STEP * dot(theta, theta).sqrt() / dot(v, v).sqrt().clamp(min=1e-12)
    # the random state restored after each pass but the last: every pass draws the same dropout masks
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        losses, g, c = per_example_dot(model, theta, x, v, mean_grad=True)    # (b,), ∇_θ mean ℓ, (b,)
    with torch.autocast(x.device.type, enabled=False):
        with torch.random.fork_rng(devices=cuda):
            # ∇L(θ + εv), FP32
            g_plus, _ = grad_at(model, {k: t + eps * v[k] for k, t in theta.items()}, x)
        # ∇L(θ − εv), FP32
        g_minus, _ = grad_at(model, {k: t - eps * v[k] for k, t in theta.items()}, x)
    # H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε
    Hv = {k: (g_plus[k] - g_minus[k]) / (2 * eps) for k in theta}
    return losses, g, Hv, c


def soba_alpha_grad(model, weighter, x, v, ranks=ONE):
    """Sets α.grad to d_α = Σ_{x∈S} ⟨∇_θ ℓ(x; θ), v⟩ ∇_α w(x; α) for a given v (replacing any gradient
    α held): the reference code's order passes v_{t+1}, v after its update (soba_step's own d_α uses v_t,
    from its one pass). Costs one more forward and backward pass on x (`per_example_dot`)."""
    weighter.zero_grad(set_to_none=True)
    # c(x) = ⟨∇_θ ℓ(x; θ), v⟩ for every x ∈ S, (b,)
    _, c = per_example_dot(model, theta_of(model), x, v)
    # d_α = Σ_x c(x) ∇_α w(x; α)   (torchrun: w is the softmax over the whole S)
    backward_to_alpha(c, weighter.weights(x, ranks))


# ----------------------------------------------------------------------------------------------
# Anograd: aligned normalised gradient (section 4.3.3)

def anograd_step(model, weighter, x_generic, x_specific, ranks=ONE):
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
    w = weighter.anograd_weights(x_generic, ranks)                           # (b,) graph to α
    g, _ = grad_at(model, theta, x_generic, weights=w)                       # g_generic(α)
    s, _ = grad_at(model, theta, x_specific)                                 # g_specific
    # torchrun: g is a sum over the whole batch, s a mean: both before the cosine
    ranks.sum_(list(g.values()))
    ranks.mean_(list(s.values()))
    g_norm, s_norm = dot(g, g).sqrt(), dot(s, s).sqrt()
    cos = dot(g, s) / (g_norm * s_norm + 1e-12)
    # q = −∂cos/∂g = −( s/(‖g‖‖s‖) − cos · g/‖g‖² ), each operation for all of θ's tensors in one call
    s_term = torch._foreach_div([s[k] for k in g], g_norm * s_norm + 1e-12)               # s/(‖g‖‖s‖)
    g_term = torch._foreach_div(torch._foreach_mul(list(g.values()), cos), g_norm ** 2 + 1e-12)   # cos g/‖g‖²
    q = dict(zip(g, torch._foreach_neg(torch._foreach_sub(s_term, g_term))))
    _, c = per_example_dot(model, theta, x_generic, q)                       # (b,) ∂(−cos)/∂w(x)
    backward_to_alpha(c, w)
    return -cos.detach()


# ==============================================================================================
# The paper's other baselines (section 5.1, Tables 2-5): CDS, the domain classifier, Learning to
# Reweight (LTR) and Meta-Weight-Net (MWN). train.py runs them (`step_cds`, `step_classifier`,
# `step_ltr`, `step_mwn`); tests/test_baselines.py checks each against an independent computation.

@torch.no_grad()
def losses_of(model, x, batch_size=256, device="cpu", desc=None):
    """ℓ(x; θ) for every row of x, in batches, in eval mode: (N, T) uint8 (on any device) → (N,)
    float32 on `device` (the model's). No host synchronisation: the batches' losses stay on the
    device until the caller reads them. The caller picks the precision (autocast); desc labels a
    tqdm bar (None: no bar)."""
    was_training = model.training
    model.eval()
    starts = tqdm(range(0, len(x), batch_size), desc=desc, disable=True if desc is None else None,
                  leave=False, dynamic_ncols=True)
    # filled in place: a list of N/batch small outputs, each allocated between two batches' big
    # temporaries, fragmented the CPU heap (CDS scoring 388k examples peaked at 12 GB)
    out = torch.empty(len(x), dtype=torch.float32, device=device)               # (N,) ℓ(x; θ)
    for i in starts:
        out[i:i + batch_size] = model(x[i:i + batch_size].to(device)).float()   # (batch,)
    model.train(was_training)
    return out


def cds_delta(model, tuned, x, batch_size=256, device="cpu"):
    """Contrastive Data Selection (section 2; Moore & Lewis 2010): the loss change of every generic
    example between the pretrained model θ (phase i) and its copy θ_ft fine-tuned on the specific
    data (phase ii),

        Δ(x) = ℓ(x; θ_ft) − ℓ(x; θ)          (N,); negative: fine-tuning made x more likely

    Phase (iii) keeps "the generic data whose loss improvement ... is the greatest": the most
    negative Δ (train.py: the top-b of −Δ within each big batch B, as the reference code does).
    On `device`, like losses_of."""
    before = losses_of(model, x, batch_size, device, desc="CDS: score generic with θ")        # (N,)
    after = losses_of(tuned, x, batch_size, device, desc="CDS: score generic with θ_ft")      # (N,)
    return after - before


def classifier_step(weighter, x_generic, x_specific):
    """Domain classifier (section 5.1): sets α.grad to the gradient of the binary cross-entropy of
    the logit s(x; α) (the weighting network's architecture, `Weighter`), generic = 0, specific = 1,
    and returns the loss. With a balanced batch (as many generic as specific rows):

        L(α) = −½ mean_{x'∈B_specific} log σ(s(x'; α)) − ½ mean_{x∈B_generic} log(1 − σ(s(x; α)))

    σ(s(x; α)) estimates P(specific | x); the selection keeps the highest logits."""
    s = weighter(torch.cat([x_generic, x_specific])).float()                    # (n_g + n_s,) logits
    # labels made on s's device (no host-to-device copy)
    y = torch.cat([torch.zeros(len(x_generic), device=s.device),
                   torch.ones(len(x_specific), device=s.device)])                  # (n_g + n_s,)
    loss = F.binary_cross_entropy_with_logits(s, y)
    loss.backward()
    return loss.detach()


def ltr_weights(model, x_generic, x_specific, lr, ranks=ONE):
    """Learning to Reweight (Ren et al. 2018): weights for ONE batch, no weighting network.

    Give each generic example a free weight ε_i, look one SGD step ahead, and differentiate the
    specific loss w.r.t. ε at ε = 0 (where θ' = θ):

        θ'(ε) = θ − lr Σ_i ε_i ∇_θ ℓ(x_i; θ)
        w̃_i   = max(−∂L_specific(θ'(ε))/∂ε_i |_{ε=0}, 0) = max(lr ⟨∇L_specific(θ), ∇ℓ(x_i; θ)⟩, 0)
        w_i   = w̃_i / Σ_j w̃_j                 (uniform when every w̃_i = 0)

    (The paper's text speaks of one step "from uniform"; we follow Ren et al. and the reference
    code: ε = 0, clipped at 0, normalised. lr only scales w̃, so it cancels in w.)
    All ⟨∇L_specific, ∇ℓ(x_i)⟩ come from ONE backward pass (`per_example_dot`): no per-example
    gradients, but the main model's forward and backward at EVERY example of the batch.
    Returns (w, ℓ(x; θ)), both (b,). torchrun: this rank's rows, w normalised over the whole batch."""
    theta = theta_of(model)
    # ∇L_specific(θ) on B_specific
    g_specific, _ = grad_at(model, theta, x_specific)
    ranks.mean_(list(g_specific.values()))
    # c_i = ⟨∇ℓ(x_i; θ), ∇L_specific(θ)⟩ for every x_i ∈ B_generic
    losses, c = per_example_dot(model, theta, x_generic, g_specific)            # (b,), (b,)
    # w̃_i = max(lr c_i, 0)
    w_tilde = (lr * c.float()).clamp(min=0.0)                                   # (b,)
    (total,) = ranks.sum_([w_tilde.sum()])                                     # Σ over the whole batch
    # w = w̃ / Σ w̃, or uniform if Σ w̃ = 0 (chosen on the device: no host synchronisation)
    w = torch.where(total > 0, w_tilde / total, torch.full_like(w_tilde, 1.0 / (len(w_tilde) * ranks.world)))
    return w, losses


def mwn_step(model, loss_weighter, x_generic, losses, x_specific, rho, ranks=ONE):
    """Meta-Weight-Net (Shu et al. 2019), "a particular, simple case of DDS in which the weight
    model takes as input a single scalar for each example: the example loss" (section 5.1):

        w(x; α) = softmax_{x∈B_generic}(mlp(ℓ(x; θ); α))        (`LossWeighter`, 100 hidden units)

    then the DDS outer update of Eq. (3) unchanged. ℓ(x; θ) enters the MLP as data (detached):
    α's gradient flows through the look-ahead only, as for DDS. losses: (b,) ℓ(x; θ) of x_generic.
    Sets α.grad, returns L(α)."""
    w = loss_weighter.weights(losses, ranks)                                 # (b,) graph to α
    return dds_step(model, loss_weighter, x_generic, x_specific, rho, w=w, ranks=ranks)


# ==============================================================================================
# ScaleBiO: first-order bilevel reweighting of data SOURCES (Pan et al. 2024, "ScaleBiO")
#
# A second, simpler way to learn a training distribution: no weighting network, one weight per
# data source, λ = softmax(p) (p: one logit per source, zeros at start). The bilevel problem
#     min_λ  L1(w*(λ))    s.t.  w*(λ) ∈ argmin_w L2(w, λ),
#     L1(w)    = mean loss on a specific (validation) batch,
#     L2(w, λ) = Σ_s λ_s · (mean loss of the batch's examples from source s),
# is turned into a minimax problem that needs first-order gradients only:
#     min_{p, w} max_u  L1(w) + α·[L2(w, λ) − L2(u, λ)],      λ = softmax(p).
# max_u −α L2(u, λ) = −α min_u L2(u, λ): u tracks w*(λ); the bracket L2(w, λ) − min L2 ≥ 0 is a
# penalty on w for not minimising L2, and as α → ∞ the solutions approach the bilevel ones.
# NAME CLASH: ScaleBiO's α is this constant penalty weight (config `scalebio_alpha`), NOT the
# weighting network's parameters α of the sections above.
#
# Why ∇_p is a hypergradient: with u ≈ w*(λ) and w ≈ w*(λ) − (1/α) H⁻¹∇L1 (w is pulled toward the
# validation loss), α·[L2_s(w) − L2_s(u)] ≈ −⟨∇L2_s, H⁻¹∇L1⟩: a source whose gradient helps the
# validation loss has L2_s(w) < L2_s(u), and descent on p raises its weight.
#
# One step (as the authors run it), all three gradients at the PRE-update u, w:
#   1. u:  descent on α·L2(u, λ)                       (u tracks argmin_u L2(u, λ))
#   2. w:  descent on L1(w) + α·L2(w, λ)
#   3. p:  descent on α·∇_p[L2(w, λ) − L2(u, λ)]      (the losses are constants for p)
# AdamW on u and w (weight decay 5e-4), AdamW on p (lr 1e-2); α constant. The generic batch is
# UNIFORM; λ only reweights its per-source mean losses (it does not change what is sampled).

def per_source_mean(losses, source_id, n_sources, ranks=ONE):
    """L2_s for every source s: the mean of the batch's losses from s; 0 for a source that has no
    example in the batch (it then contributes 0 to L2 and gets no gradient). losses: (B,),
    source_id: (B,) long → (K,). torchrun: this rank's part, Σ_{its rows from s} ℓ_i / n_s with n_s
    counted over the whole batch: summed over the ranks, the parts give the batch's means."""
    # Σ_{i: s_i = s} ℓ_i
    total = torch.zeros(n_sources, dtype=losses.dtype, device=losses.device)             # (K,)
    total = total.index_add(0, source_id, losses)                                          # (K,)
    # n_s = |{i: s_i = s}|, counted by index_add (bincount on CUDA synchronises with the host)
    count = torch.zeros_like(total).index_add(0, source_id, torch.ones_like(losses))       # (K,)
    ranks.sum_([count])
    return total / count.clamp(min=1)                                                      # (K,)


def L2(losses, source_id, lam):
    """L2(·, λ) = Σ_s λ_s · mean_{i: s_i = s} ℓ_i. losses: (B,), lam: (K,) → scalar"""
    return (lam * per_source_mean(losses, source_id, len(lam))).sum()


def scalebio_step(w, u, p, x_generic, source_id, x_specific, alpha, ranks=ONE):
    """Sets .grad of w's, u's parameters and of p for one ScaleBiO step; returns a dict of 0-dim
    detached float32 tensors (no host synchronisation: the caller converts them when it logs):
    L1, L2_w = L2(w, λ), L2_u = L2(u, λ), gap = L2(w, λ) − L2(u, λ), train_loss = mean ℓ(x; w).

    w: the main model (kept), u: the auxiliary copy, p: (K,) logits, λ = softmax(p);
    x_generic: (B, T) a uniform generic batch, source_id: (B,) its sources; x_specific: (B', T).
    The caller zeroes the gradients before and steps the three optimizers after. Parameters with
    requires_grad=False (blocks frozen by LISA below) get no gradient.
    torchrun: the batches are this rank's rows; the ranks' gradients of u and w are parts of the
    batch's gradients (the caller SUMS them), p's gradient is the batch's on every rank."""
    lam = torch.softmax(p, 0)                                            # (K,) λ, graph to p
    K = lam.shape[0]
    # 1. ∇_u α·L2(u, λ)   (λ is a constant for u)
    losses_u = u(x_generic).float()                                      # (B,) ℓ(x; u)
    m_u = per_source_mean(losses_u, source_id, K, ranks)                 # (K,) L2_s(u)
    (alpha * (lam.detach() * m_u).sum()).backward()
    # 2. ∇_w [L1(w) + α·L2(w, λ)]   (torchrun: L1 is a mean, its rank's part is L1 / N)
    losses_w = w(x_generic).float()                                      # (B,) ℓ(x; w)
    m_w = per_source_mean(losses_w, source_id, K, ranks)                 # (K,) L2_s(w)
    L1 = w(x_specific).float().mean()                                    # L1(w)
    (L1 / ranks.world + alpha * (lam.detach() * m_w).sum()).backward()
    # 3. ∇_p α·[L2(w, λ) − L2(u, λ)] = α·J_softmax(p)ᵀ (m_w − m_u), J = diag(λ) − λλᵀ
    m_w, m_u = ranks.sum_([m_w.detach(), m_u.detach()])                  # the batch's L2_s
    gap = m_w - m_u                                                      # (K,) L2_s(w) − L2_s(u)
    (alpha * (lam * gap).sum()).backward()
    L1, train_loss = ranks.mean_([L1.detach(), losses_w.mean().detach()])
    return {"L1": L1, "L2_w": (lam * m_w).sum().detach(), "L2_u": (lam * m_u).sum().detach(),
            "gap": (lam * gap).sum().detach(), "train_loss": train_loss}


# ----------------------------------------------------------------------------------------------
# Randomized block coordinate descent (LISA-style), ScaleBiO's way to scale to big models
#
# Every `lisa_interval` steps, `lisa_layers` transformer blocks drawn at random (without
# replacement) train and all other blocks are frozen; embeddings, the final norm and the (tied)
# output head always train. u and w draw their blocks independently.
# Memory saved: weights and activations stay (backward still runs through every block, since the
# embeddings below them train), but gradients and AdamW's two moment buffers exist only for the
# active blocks: 3·(k·P_block + P_rest) floats instead of 3·(L·P_block + P_rest), for u and for w.
# A frozen parameter has requires_grad=False, so it gets no .grad, and AdamW skips a parameter
# whose .grad is None: no weight decay, no momentum for frozen blocks. Their AdamW state is
# DROPPED when they freeze (that is the memory saving); a block that becomes active again starts
# with fresh moments.

def lisa_sample(n_layer, n_active, generator):
    """The active blocks: n_active distinct indices of range(n_layer), sorted (a list of ints)."""
    return sorted(torch.randperm(n_layer, generator=generator)[:n_active].tolist())


def lisa_freeze(model, active, opt=None):
    """Train exactly the blocks in `active` (and everything outside model.blocks); drop the
    optimizer state of the frozen blocks' parameters."""
    for i, block in enumerate(model.blocks):
        for prm in block.parameters():
            prm.requires_grad_(i in active)
            if i not in active:
                prm.grad = None
                if opt is not None:
                    opt.state.pop(prm, None)
