"""Tests for model.py: the per-example loss ℓ(x; θ), second-order autodiff, parameter counts,
building from a config, torch.compile and second_order."""

import pytest
import torch
from torch.func import functional_call

from conftest import TINY, random_bytes, tiny_model
from model import ByteLM, ModelConfig, compile_model, second_order


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_per_example_loss_is_masked_mean_cross_entropy():
    model = tiny_model()
    # row 1 is padded from byte 5 on, row 2 holds a single byte; row 0 is full
    x = random_bytes(3, pad_from={1: 5, 2: 1})
    logits = model.logits(x)                                              # (B, T, 256)
    logp = logits - logits.exp().sum(-1, keepdim=True).log()              # explicit log-softmax
    nll = -logp.gather(-1, x.long()[..., None]).squeeze(-1)              # (B, T) −log p(x_t | x_<t)
    expected = []
    for i in range(3):
        n = int((x[i] != 0).sum())                                        # right-padded: first n bytes
        expected.append(nll[i, :n].sum() / n)
    expected = torch.stack(expected)                                      # (B,)
    got = model.per_example_loss(x)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), got, rtol=0, atol=0)
    # the loss of a row is its own: the same row alone in a batch gives the same value
    torch.testing.assert_close(model(x[1:2]), got[1:2], rtol=1e-12, atol=1e-12)


def test_logits_are_causal_and_predict_every_byte():
    """Position t predicts x[t] from x[<t] (input shifted right, byte 0 in front): changing x[t]
    leaves logits[:, :t+1] unchanged and changes logits[:, t+1:]."""
    model = tiny_model()
    x = random_bytes(2)
    t = 4
    x2 = x.clone()
    x2[:, t] = x2[:, t] % 255 + 1                                         # another non-zero byte
    a, b = model.logits(x), model.logits(x2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-6
    # the first byte is predicted too, from the beginning-of-text byte 0: logits[:, 0] is the same
    # for every example
    torch.testing.assert_close(a[0, 0], a[1, 0], rtol=0, atol=0)


def test_hessian_vector_product_in_second_order_matches_finite_differences():
    model = tiny_model()
    x = random_bytes(4, pad_from={2: 7})
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    with second_order():   # the fused attention kernel has no double backward
        grads = torch.autograd.grad(model(x).mean(), params, create_graph=True)
        hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(grads, v)), params)

    def grad_at(shift):
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(shift * vi)
        out = flat(torch.autograd.grad(model(x).mean(), params))
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(shift * vi)
        return out

    # H v ≈ (∇(θ+εv) − ∇(θ−εv)) / 2ε, with ‖εv‖ = 1e-6 so that no ReLU changes side in between
    eps = 1e-6 / flat(v).norm().item()
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert fd.norm() > 1e-3
    torch.testing.assert_close(flat(hv), fd, rtol=1e-6, atol=1e-7 * fd.abs().max().item())


def test_functional_call_matches_loaded_parameters():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    x = random_bytes(3, pad_from={0: 9})
    g = torch.Generator().manual_seed(5)
    theta = {k: p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
             for k, p in model.named_parameters()}
    via_functional = functional_call(model, theta, (x,))
    other.load_state_dict(theta)
    torch.testing.assert_close(via_functional, other(x), rtol=1e-12, atol=1e-12)
    assert (via_functional - model(x)).abs().max() > 1e-4                 # θ really was different


def test_preset_parameter_counts():
    # paper Table 9: large 9.53M (9,530,880), small 0.82M; the presets live in train.py
    import train
    n_paper = ByteLM.from_config(train.PRESETS["paper"]).num_params()
    assert abs(n_paper - 9_530_880) / 9_530_880 < 0.01, n_paper
    n_small = ByteLM.from_config(train.PRESETS["small"]).num_params()
    assert abs(n_small - 820_000) / 820_000 < 0.02, n_small


def test_from_config_reads_the_model_keys_of_a_train_config():
    cfg = {**TINY, "n_layer": 2, "lr": 1e-3, "method": "soba"}             # other keys are ignored
    torch.manual_seed(0)
    model = ByteLM.from_config(cfg)
    assert model.cfg == ModelConfig(**{k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "n_hidden",
                                                            "seq_len", "dropout")})
    torch.manual_seed(0)
    same = ByteLM(model.cfg)                                              # the same init, same RNG draws
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_compile_model_keeps_state_dict_and_second_order_runs_it_uncompiled(monkeypatch):
    """compile_model compiles the forward in place: its first call captures the forward's graph
    (TorchDynamo) and gives the eager forward's losses; second_order(model) clears the compiled call
    for its duration, so the model runs eagerly there, and restores it. The captured graph runs as it
    is (a backend that records it): inductor's C++ build of it takes ~25 s of CPU, too slow for CI
    (tests/test_cuda.py runs inductor's on a GPU)."""
    graphs, compile_ = [], torch.nn.Module.compile

    def backend(gm, example_inputs):       # the graph TorchDynamo captured, run as it is
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_(self, backend=backend))
    model = tiny_model()
    keys = list(model.state_dict().keys())
    x = random_bytes(2)
    eager = model(x).detach()
    assert compile_model(model) is model
    compiled_call = model._compiled_call_impl
    assert compiled_call is not None
    assert list(model.state_dict().keys()) == keys
    try:
        compiled = model(x).detach()
    except Exception as e:                 # a platform TorchDynamo does not support
        pytest.skip(f"torch.compile cannot run here: {type(e).__name__}: {e}")
    assert len(graphs) == 1                # the compiled forward ran, as one captured graph
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    with second_order(model):
        assert model._compiled_call_impl is None
        torch.testing.assert_close(model(x).detach(), eager, rtol=0, atol=0)   # the eager forward
    assert model._compiled_call_impl is compiled_call
    # restored also when the block raises; a model never compiled is left alone
    other = tiny_model(seed=1)
    try:
        with second_order(model, other):
            raise RuntimeError
    except RuntimeError:
        pass
    assert model._compiled_call_impl is compiled_call and other._compiled_call_impl is None
