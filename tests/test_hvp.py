"""SOBA's Hessian-vector product by finite differences (--hvp=finite_difference, bilevel.soba_terms_fd)
against the exact one (reverse over reverse, bilevel.soba_terms) in float64.

Tolerances (measured, then a margin):
  * FP32 finite differences vs the FP64 exact product, on the tiny model with its ReLU replaced by a GELU:
    1e-3 relative (measured 1.0e-4 on four seeds). With the ReLU, the tiny model's few units make the
    central difference cross kinks for any useful step (15–65% off from 1e-4 to 1e-1 of ‖θ‖); on the
    `cpu` preset's model, whose thousands of units average the kinks out, it is 0.6–1.9% (bilevel.FD_STEP).
  * ℓ, g and d_α from the finite-difference path vs the exact path: 1e-12 (float64 rounding: the same
    numbers from other passes; d_α through c from per_example_dot).
  * with dropout, both paths seeded alike, and a small step (1e-6 of ‖θ‖, no kink crossed): 1e-7; with
    different masks for the two gradients the difference would be O(1).
"""

import copy

import pytest
import torch
import torch.nn as nn

import bilevel
from conftest import TINY, random_bytes, tiny_model, tiny_weighter
from model import ByteLM


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def rel(a, b):
    return ((flat(a).double() - flat(b)).norm() / flat(b).norm()).item()


def random_v(model, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=dtype) for k, p in model.named_parameters()}


def smooth(model):
    """The model with GELU for ReLU in its MLPs: no kinks for the central difference to cross."""
    for block in model.blocks:
        block.mlp[1] = nn.GELU()
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_finite_difference_within_1e_3_of_fp64_exact(seed):
    model = smooth(tiny_model(seed))
    x = random_bytes(6, seed=10 + seed, pad_from={2: 8})
    v = random_v(model, 3 + seed)
    _, _, hv_exact, _ = bilevel.soba_terms(model, x, v)                      # float64, double backward
    m32 = copy.deepcopy(model).float()
    _, _, hv_fd, _ = bilevel.soba_terms_fd(m32, x, {k: t.float() for k, t in v.items()})
    assert all(t.dtype == torch.float32 for t in hv_fd.values())
    assert flat(hv_exact).norm() > 1e-3
    assert rel(hv_fd, hv_exact) < 1e-3, rel(hv_fd, hv_exact)


def test_soba_step_other_outputs_match_the_exact_path():
    """d_α, g and ℓ of soba_step with hvp="finite_difference" are the exact path's; d_v differs by H v's
    approximation only; the micro-batched path gives the same."""
    model, weighter = smooth(tiny_model()), tiny_weighter()
    xg, xs = random_bytes(6, seed=10, pad_from={2: 8}), random_bytes(4, seed=11, pad_from={0: 5})
    v = random_v(model)
    out = {}
    for hvp, chunks in (("exact", 1), ("finite_difference", 1), ("finite_difference", 3)):
        weighter.zero_grad(set_to_none=True)
        d_v, g, losses = bilevel.soba_step(model, weighter, xg, xs, v, chunks=chunks, hvp=hvp)
        d_alpha = [p.grad.reshape(-1) for p in weighter.parameters() if p.grad is not None]   # (a: none)
        out[hvp, chunks] = d_v, g, losses, torch.cat(d_alpha)
    d_v, g, losses, d_alpha = out["exact", 1]
    for key in (("finite_difference", 1), ("finite_difference", 3)):
        d_v_fd, g_fd, losses_fd, d_alpha_fd = out[key]
        torch.testing.assert_close(flat(g_fd), flat(g), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(losses_fd, losses, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d_alpha_fd, d_alpha, rtol=1e-12, atol=1e-12 * d_alpha.abs().max().item())
        # d_v = H v + ∇L_specific: the same ∇L_specific, H v within float64 finite-difference error
        assert rel(d_v_fd, d_v) < 1e-5, rel(d_v_fd, d_v)


def test_dropout_masks_are_shared_by_the_passes(monkeypatch):
    """With dropout, H v is the Hessian of the loss under ONE mask: the finite-difference passes draw the
    exact path's masks (the same seed), so with a small step they agree with it."""
    torch.manual_seed(0)
    model = ByteLM.from_config(dict(TINY, dropout=0.2)).double().train()
    x, v = random_bytes(6, seed=10, pad_from={2: 8}), random_v(model)
    monkeypatch.setattr(bilevel, "FD_STEP", 1e-6)
    torch.manual_seed(5)
    losses, g, hv, c = bilevel.soba_terms(model, x, v)
    torch.manual_seed(5)
    losses_fd, g_fd, hv_fd, c_fd = bilevel.soba_terms_fd(model, x, v)
    after_fd = torch.rand(1)
    torch.manual_seed(5)
    bilevel.soba_terms(model, x, v)
    assert torch.equal(torch.rand(1), after_fd)          # the random stream advanced as by one pass
    assert rel(hv_fd, hv) < 1e-7, rel(hv_fd, hv)
    torch.testing.assert_close(losses_fd, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_fd, c, rtol=1e-10, atol=1e-12 * c.abs().max().item())


def test_v_zero_gives_a_zero_product():
    """SOBA's v starts at zeros: ε = FD_STEP ‖θ‖ / max(‖v‖, 1e-12) is finite and H v = 0."""
    model = tiny_model()
    v = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    _, _, hv, c = bilevel.soba_terms_fd(model, random_bytes(4, seed=1), v)
    assert torch.equal(flat(hv), torch.zeros_like(flat(hv))) and torch.equal(c, torch.zeros_like(c))


def test_the_setting_takes_two_values():
    import train
    defaults = {k: getattr(train, k) for k in train.config_keys}
    assert defaults["hvp"] == "exact"           # the README's numbers: the double backward
    cfg = train.parse_args(["--hvp=finite_difference", "--device=cpu"], defaults)
    assert cfg["hvp"] == "finite_difference"
    with pytest.raises(train.ConfigError, match="--hvp: expected one of exact, finite_difference"):
        train.parse_args(["--hvp=forward", "--device=cpu"], defaults)
