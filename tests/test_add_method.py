"""Adding a method through the documented extension points only (README, "Add a method").

A toy Algorithm 1 method is registered the way a forker adds one: an outer update (here α moves along
a random direction drawn from the method's own generator: no learning, but state that a resume must
restore), a setup function that builds that state and declares it in ctx.state, and a row in
train.METHODS. Nothing else in train.py is touched. The test checks that it trains θ, that α moves
exactly as the outer update says, that θ trains on the filter's selection, and that a run stopped
and resumed ends bit for bit where the uninterrupted run ends.
"""

import signal
from functools import partial

import pytest
import torch

import train
from weighter import filter_batch, score

TINY = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--n_hidden=32", "--seq_len=32", "--batch_size=4",
        "--big_batch_size=16", "--specific_batch_size=4", "--eval_examples=32", "--eval_interval=2",
        "--weighter_dim=8", "--finetune_steps=0"]
STEP_SIZE = 0.05


def outer_toy(ctx, x_R, x_specific):
    """The toy outer update on R: α ← α + STEP_SIZE · d, d ~ N(0, I) from the method's own generator."""
    with torch.no_grad():
        for p in ctx.weighter.parameters():
            d = torch.randn(p.shape, generator=ctx.toy_gen)         # drawn on the CPU, then moved
            p.add_(d.to(p.device), alpha=STEP_SIZE)
    return torch.zeros(())                                          # its "outer loss", logged


def setup_toy(ctx):
    """α and its optimiser as every Algorithm 1 method has them, then the toy's generator, declared
    in ctx.state so that a checkpoint holds it."""
    train.setup_alpha(ctx)
    ctx.toy_gen = torch.Generator().manual_seed(ctx.cfg["seed"] + 7)
    ctx.state["toy_gen"] = train.Stateful(ctx.toy_gen.get_state, ctx.toy_gen.set_state)


@pytest.fixture
def with_toy(monkeypatch):
    toy = train.Method(partial(train.step_sparse, outer_on_R=outer_toy), setup_toy, selects=True)
    monkeypatch.setitem(train.METHODS, "toy", toy)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def make_ctx(tmp_path):
    defaults = {k: getattr(train, k) for k in train.config_keys}
    return train.setup(train.parse_args(["--method=toy", f"--out_dir={tmp_path}", *TINY], defaults))


def test_toy_method_moves_alpha_filters_and_trains(with_toy, tmp_path):
    ctx = make_ctx(tmp_path)
    for step in range(3):
        alpha, theta = params(ctx.weighter), params(ctx.model)
        # the expected α_{t+1} and S, computed independently from copies of the random streams
        toy_gen = torch.Generator().set_state(ctx.toy_gen.get_state())
        sampler = torch.Generator().set_state(ctx.generic_sampler.generator.get_state())
        filter_gen = torch.Generator().set_state(ctx.gen.get_state())
        want_alpha = [a + STEP_SIZE * torch.randn(a.shape, generator=toy_gen) for a in alpha]
        idx_B = torch.randint(len(ctx.x_train), (ctx.cfg["big_batch_size"],), generator=sampler)
        out = train.train_step(ctx, step)
        assert all(torch.allclose(p, w, atol=1e-7) for p, w in zip(params(ctx.weighter), want_alpha))
        S = filter_batch(score(ctx.weighter, ctx.x_train[idx_B]), ctx.b, ctx.cfg["filter"], filter_gen)
        assert torch.equal(out.idx, idx_B[S])                       # θ trained on filter(B, α_{t+1}, b)
        assert torch.isfinite(out.loss)
        assert any(not torch.equal(a, b) for a, b in zip(params(ctx.model), theta))   # θ moved


def test_toy_method_checkpoints_and_resumes_exactly(with_toy, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main([f"--out_dir={whole}", "--method=toy", *TINY, "--max_steps=6"]) == 0
    calls = []

    def sigterm_after_step_3(value, device):        # as if SIGTERM arrived during step 3
        calls.append(value)
        return signal.SIGTERM if len(calls) == 3 else value
    with monkeypatch.context() as m:
        m.setattr(train, "any_rank", sigterm_after_step_3)
        assert train.main([f"--out_dir={parts}", "--method=toy", *TINY, "--max_steps=6"]) == 128 + signal.SIGTERM
    assert train.main([f"--out_dir={parts}", "--resume"]) == 0
    a = torch.load(whole / "ckpt.pt", weights_only=True)
    b = torch.load(parts / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, t in a["model"].items():
        assert torch.equal(t, b["model"][k]), k
    for k, t in a["weighter"].items():
        assert torch.equal(t, b["weighter"][k]), k
    assert torch.equal(a["toy_gen"], b["toy_gen"])     # the state setup_toy declared is in the checkpoint
