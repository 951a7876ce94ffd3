"""θ-shaped arithmetic done for all of θ's tensors in one call (torch._foreach_*: one kernel launch on
CUDA) gives the per-tensor loop's numbers bit for bit on the CPU: the same elementwise operations in the
same order (the README's CPU numbers must not move). Each test computes the loop it replaced and compares
with torch.equal."""

import pytest
import torch

import bilevel
import train
from conftest import random_bytes, tiny_model, tiny_weighter


def theta_like(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (7, 5), "b": (5,), "c": (3, 4, 2), "d": ()}
    return {k: torch.randn(s, generator=g, dtype=dtype) * (1 + i) for i, (k, s) in enumerate(shapes.items())}


def same(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_is_the_loop_of_products(dtype):
    a, b = theta_like(0, dtype), theta_like(1, dtype)
    loop = sum((a[k].to(torch.promote_types(a[k].dtype, torch.float32)) * b[k]).sum() for k in a)
    assert torch.equal(bilevel.dot(a, b), loop)


def test_anograd_direction_is_the_loop(monkeypatch):
    """q = −( s/(‖g‖‖s‖) − cos · g/‖g‖² ), read from the per_example_dot call of anograd_step."""
    model, weighter = tiny_model(dtype=torch.float32), tiny_weighter(dtype=torch.float32)
    xg, xs = random_bytes(6, seed=10), random_bytes(4, seed=11)
    seen = {}
    real = bilevel.per_example_dot

    def spy(model, theta, x, u, **kw):
        seen["q"] = u
        return real(model, theta, x, u, **kw)
    monkeypatch.setattr(bilevel, "per_example_dot", spy)
    bilevel.anograd_step(model, weighter, xg, xs)
    w = weighter.anograd_weights(xg)
    g, _ = bilevel.grad_at(model, bilevel.theta_of(model), xg, weights=w)
    s, _ = bilevel.grad_at(model, bilevel.theta_of(model), xs)
    g_norm, s_norm = bilevel.dot(g, g).sqrt(), bilevel.dot(s, s).sqrt()
    cos = bilevel.dot(g, s) / (g_norm * s_norm + 1e-12)
    q = {k: -(s[k] / (g_norm * s_norm + 1e-12) - cos * g[k] / (g_norm ** 2 + 1e-12)) for k in g}
    assert same(seen["q"], q)


def test_soba_d_v_and_sgd_update_of_v_are_the_loops():
    model, weighter = tiny_model(dtype=torch.float32), tiny_weighter(dtype=torch.float32)
    xg, xs = random_bytes(6, seed=10), random_bytes(4, seed=11)
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}
    d_v, _, _ = bilevel.soba_step(model, weighter, xg, xs, v)
    _, _, Hv, _ = bilevel.soba_terms(model, xg, v)
    g_specific, _ = bilevel.grad_at(model, bilevel.theta_of(model), xs)
    assert same(d_v, {k: Hv[k] + g_specific[k] for k in Hv})
    # v ← v − η d_v
    ctx = type("Ctx", (), {})()
    ctx.cfg = dict(soba_v_lr=0.37, soba_v_optim="sgd")
    ctx.ranks, ctx.v = bilevel.ONE, {k: t.clone().requires_grad_() for k, t in v.items()}
    train.soba_v_update(ctx, d_v, 0)
    assert same({k: t.detach() for k, t in ctx.v.items()}, {k: v[k] - 0.37 * d_v[k] for k in v})
