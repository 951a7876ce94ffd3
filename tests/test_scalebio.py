"""Tests for ScaleBiO (bilevel.py, train.py --method=scalebio), LISA and the denoising setting.

Each test compares against an independent computation: the p-gradient against the softmax
Jacobian applied by hand to per-source means computed by a loop; the iterates against the closed
form of a quadratic minimax problem; LISA against which parameters actually moved."""

import copy
import functools
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bilevel  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import ByteLM, ModelConfig  # noqa: E402


def tiny_lm(seed=0, n_layer=1):
    torch.manual_seed(seed)
    return ByteLM(ModelConfig(n_layer=n_layer, n_head=2, n_embd=16, n_hidden=32, seq_len=16, dropout=0.0))


def random_bytes(n, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n, T), generator=g, dtype=torch.uint8)


# -----------------------------------------------------------------------------------------------
# 1. the gradients of one step, against a by-hand computation

def test_gradients_match_independent_computation():
    alpha, K = 7.0, 4
    w = tiny_lm(0)
    u = tiny_lm(1)                                          # u ≠ w, so L2(w) − L2(u) ≠ 0
    p = torch.tensor([0.3, -0.2, 0.5, 0.1], requires_grad=True)
    x, x_spec = random_bytes(10, seed=1), random_bytes(6, seed=2)
    source_id = torch.tensor([0, 0, 1, 3, 3, 3, 0, 1, 1, 3])   # source 2 is absent from the batch
    bilevel.scalebio_step(w, u, p, x, source_id, x_spec, alpha)

    # per-source means by a loop over sources; an absent source contributes 0
    def means(model):
        with torch.no_grad():
            losses = model(x)
        return torch.stack([losses[source_id == s].mean() if (source_id == s).any() else torch.tensor(0.0)
                            for s in range(K)])
    lam = torch.softmax(p.detach(), 0)
    gap = means(w) - means(u)                                                   # (K,)
    # ∇_p α[L2(w, λ) − L2(u, λ)] = α (diag(λ) − λλᵀ) gap
    J = torch.diag(lam) - torch.outer(lam, lam)
    assert torch.allclose(p.grad, alpha * J @ gap, atol=1e-5)
    # the absent source's own gap is 0: only the softmax coupling −α λ_2 ⟨λ, gap⟩ reaches p_2
    assert gap[2] == 0 and torch.allclose(p.grad[2], -alpha * lam[2] * (lam @ gap), atol=1e-6)

    # ∇_u α L2(u, λ) and ∇_w [L1(w) + α L2(w, λ)] by a plain autograd of the loop expression
    def L2_loop(model):
        losses = model(x)
        return sum(lam[s] * losses[source_id == s].mean() for s in range(K) if (source_id == s).any())
    u2, w2 = copy.deepcopy(u), copy.deepcopy(w)
    for prm in list(u2.parameters()) + list(w2.parameters()):
        prm.grad = None
    (alpha * L2_loop(u2)).backward()
    (w2(x_spec).mean() + alpha * L2_loop(w2)).backward()
    for a, b in zip(u.parameters(), u2.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    for a, b in zip(w.parameters(), w2.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_per_source_mean_absent_source_is_zero():
    losses = torch.tensor([1.0, 2.0, 4.0])
    m = bilevel.per_source_mean(losses, torch.tensor([0, 0, 2]), 3)
    assert torch.equal(m, torch.tensor([1.5, 0.0, 4.0]))


# -----------------------------------------------------------------------------------------------
# 2. a strongly convex problem with a closed-form solution
#
# Two sources of noiseless linear regression data with whitened features (XᵀX/n = I), targets
# a and b; validation targets c = 0.7a + 0.3b. Then L_s(w) = ‖w − a_s‖², and
#     L2(w, λ) = ‖w − (λ0 a + λ1 b)‖² + λ0 λ1 ‖a − b‖²,   L2(w, λ) − min_u L2(u, λ) = ‖w − w*(λ)‖²,
# so min_{λ,w} max_u ‖w − c‖² + α‖w − w*(λ)‖² is solved by w = u = c, λ = (0.7, 0.3), for every α.

class Quadratic(nn.Module):
    """Per-example squared error of a linear model; a batch row is (features (d,), target)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def forward(self, batch):
        X, y = batch[:, :-1], batch[:, -1]                 # (B, d), (B,)
        return (X @ self.w - y) ** 2                       # (B,)


def whitened(n, d, seed):
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))
    return q * n ** 0.5                                    # (n, d), XᵀX/n = I


def test_iterates_approach_closed_form():
    d, n, alpha = 3, 32, 10.0
    a, b = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([-1.0, 2.0, 0.5])
    c = 0.7 * a + 0.3 * b
    X0, X1, Xv = whitened(n, d, 0), whitened(n, d, 1), whitened(n, d, 2)
    x_generic = torch.cat([torch.cat([X0, (X0 @ a)[:, None]], 1), torch.cat([X1, (X1 @ b)[:, None]], 1)])
    source_id = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    x_spec = torch.cat([Xv, (Xv @ c)[:, None]], 1)
    w, u = Quadratic(d), Quadratic(d)
    p = torch.zeros(2, requires_grad=True)
    opts = [torch.optim.SGD(w.parameters(), lr=0.02), torch.optim.SGD(u.parameters(), lr=0.02),
            torch.optim.SGD([p], lr=0.05)]     # p slower than u, w (with lr 0.5: a limit cycle)
    for _ in range(400):
        for o in opts:
            o.zero_grad()
        bilevel.scalebio_step(w, u, p, x_generic, source_id, x_spec, alpha)
        for o in opts:
            o.step()
    lam = torch.softmax(p.detach(), 0)
    assert torch.allclose(lam, torch.tensor([0.7, 0.3]), atol=1e-3), lam
    assert torch.allclose(w.w.detach(), c, atol=1e-3), w.w
    assert torch.allclose(u.w.detach(), c, atol=1e-3), u.w


# -----------------------------------------------------------------------------------------------
# 3. train.py: LISA, exact resume, logging (on a small built-in corpus)

@pytest.fixture
def small_builtin(monkeypatch):
    monkeypatch.setattr(data, "builtin_corpora", functools.partial(data.builtin_corpora, n_generic=1000,
                                                                   n_specific_train=64, n_specific_eval=32))


def cfg_for(tmp_path, **kw):
    defaults = {k: getattr(train, k) for k in train.config_keys}
    args = dict(method="scalebio", n_layer=4, n_head=2, n_embd=16, n_hidden=32, seq_len=32, batch_size=8,
                specific_batch_size=8, eval_examples=32, eval_interval=1000, max_steps=7, out_dir=str(tmp_path))
    args.update(kw)
    return train.parse_args([f"--{k}={v}" for k, v in args.items()], defaults)


def run_steps(ctx, steps):
    for step in steps:
        train.train_step(ctx, step)


def block_of(name):
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


def test_lisa_freezes_exactly_the_active_blocks(tmp_path, small_builtin):
    ctx = train.setup(cfg_for(tmp_path, lisa=True, lisa_layers=2, lisa_interval=3, max_steps=100))
    history = {"u": [], "w": []}
    for step in range(7):
        lisa = (("u", ctx.u, ctx.u_opt), ("w", ctx.model, ctx.opt))
        before = {k: {n: t.detach().clone() for n, t in m.named_parameters()} for k, m, _ in lisa}
        run_steps(ctx, [step])
        for k, model, opt in lisa:
            active = ctx.lisa_active[k]
            history[k].append(tuple(active))
            assert len(active) == 2 and len(set(active)) == 2
            for n, t in model.named_parameters():
                moved = not torch.equal(t.detach(), before[k][n])
                blk = block_of(n)
                # frozen blocks do not move at all (weight decay 5e-4 would move them if applied);
                # embeddings, final norm, active blocks always do
                assert moved == (blk is None or blk in active), (k, step, n)
                # AdamW state only for what trains (the memory LISA saves)
                assert (t in opt.state) == (blk is None or blk in active), (k, step, n)
    for k in ("u", "w"):   # resampled at steps 0, 3, 6 only
        h = history[k]
        assert h[0] == h[1] == h[2] and h[3] == h[4] == h[5]
    assert history["u"] != history["w"]        # independent draws (seeds 200, 201)
    assert len(set(history["w"])) > 1


def test_exact_resume(tmp_path, small_builtin):
    cfg = cfg_for(tmp_path, lisa=True, lisa_layers=2, lisa_interval=2)
    ctx = train.setup(cfg)
    run_steps(ctx, range(3))
    train.save_checkpoint(ctx, 3)
    ctx2 = train.setup(cfg)
    assert train.load_checkpoint(ctx2) == 3
    run_steps(ctx2, range(3, 6))
    run_steps(ctx, range(3, 6))        # the torch RNG was reset to the checkpoint's by the load
    for m1, m2 in ((ctx.model, ctx2.model), (ctx.u, ctx2.u)):
        for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
            assert torch.equal(a, b), n
    assert torch.equal(ctx.p, ctx2.p) and ctx.lisa_active == ctx2.lisa_active


def test_run_logs_lambda(tmp_path, small_builtin):
    cfg = cfg_for(tmp_path, n_layer=1, max_steps=4, eval_interval=2)
    assert train.run(cfg, {k: getattr(train, k) for k in train.config_keys}) == 0
    import json
    recs = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    summary = json.load(open(tmp_path / "summary.json"))
    lam = torch.softmax(torch.load(tmp_path / "ckpt.pt", weights_only=True)["p"], 0).tolist()
    ids = train.setup(cfg).generic.train.source_id.tolist()
    base = [ids.count(k) / len(ids) for k in range(len(lam))]     # each source's share of the pool, counted
    for rec in (recs[-1], summary):
        assert list(rec["lambda"].values()) == pytest.approx(lam)
        assert [v["share"] for v in rec["source_share"].values()] == pytest.approx(lam)
        assert [v["base"] for v in rec["source_share"].values()] == pytest.approx(base)


# -----------------------------------------------------------------------------------------------
# 4. the denoising setting

def test_noisy_sources():
    g, _, _ = data.builtin_corpora(0, 32, n_generic=2000)
    e = data.noisy_sources(g.train, 10, seed=0)
    assert e.sources[0] == "s0_noise0.0" and e.sources[9] == "s9_noise1.0"
    assert torch.bincount(e.source_id).tolist() == [200] * 10
    changed = (e.x != g.train.x).any(1).float()                                 # (N,) corrupted rows
    rates = torch.stack([changed[e.source_id == k].mean() for k in range(10)])
    assert torch.allclose(rates, torch.tensor(data.noise_rates(10)), atol=0.1)
    assert rates[0] == 0 and (rates[5:] == 1).all()
    # padding (byte 0) is kept: right-pad every row to a random length, corrupt again
    lengths = torch.randint(1, 33, (len(g.train),), generator=torch.Generator().manual_seed(0))   # (N,)
    padded = g.train.subset(torch.arange(len(g.train)))
    padded.x = torch.where(torch.arange(32)[None, :] < lengths[:, None], padded.x, torch.zeros_like(padded.x))
    e2 = data.noisy_sources(padded, 10, seed=0)
    assert torch.equal(e2.x == 0, padded.x == 0)
    assert torch.equal(data.noisy_sources(g.train, 10, seed=0).x, e.x)         # deterministic


def test_denoising_lambda_leaves_pure_noise_sources(tmp_path, small_builtin):
    """A short run on the built-in corpus split into 10 sources (sources 5..9 pure noise): λ of
    every pure-noise source ends below 1/K, and the clean half holds more than the corrupted half."""
    K, steps = 10, 40
    ctx = train.setup(cfg_for(tmp_path, noise_sources=K, n_layer=1, batch_size=32, warmup=10, max_steps=steps))
    run_steps(ctx, range(steps))
    lam = torch.softmax(ctx.p.detach(), 0)                                      # (K,)
    assert (lam[K // 2:] < 1.0 / K).all(), lam
    assert lam[:K // 2].sum() > lam[K // 2:].sum(), lam
