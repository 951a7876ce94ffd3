"""Tests for the paper's other baselines (section 5.1): CDS, the domain classifier, Learning to
Reweight (LTR) and Meta-Weight-Net (MWN), in bilevel.py and train.py.

Each one is checked against an independent computation: CDS's Δ against per-example
cross-entropies computed by hand, the classifier against a held-out AUC computed by hand, LTR's
weights against brute-force per-example gradients, MWN's outer gradient against reverse-over-
reverse autograd through the look-ahead. Then every method runs end to end and resumes exactly
from its checkpoint. Tiny models; the whole file runs in well under a minute on a CPU.
"""

import copy
import functools
import json
import os
import sys

import pytest
import torch
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bilevel  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import ByteLM, ModelConfig, second_order  # noqa: E402
from weighter import LossWeighter, Weighter  # noqa: E402
from conftest import nats_per_byte_by_hand, run_theta  # noqa: E402

BUILTIN = data.builtin_corpora          # the real one (the classifier test uses it as is)
TINY = ["--seq_len=32", "--n_layer=1", "--n_head=2", "--n_embd=16", "--n_hidden=32", "--batch_size=8",
        "--big_batch_size=64", "--specific_batch_size=8", "--weighter_dim=8", "--eval_examples=64",
        "--eval_interval=5", "--warmup=5", "--cds_finetune_steps=3"]


@pytest.fixture(scope="module", autouse=True)
def small_builtin_corpus():
    """train.py's runs here use a 2000-example built-in generic pool, built once per seq_len."""
    small = functools.lru_cache(maxsize=None)(lambda seed, seq_len: BUILTIN(seed, seq_len, n_generic=2000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "builtin_corpora", small)
        yield


def tiny_cfg(method, out_dir, *extra):
    defaults = {k: getattr(train, k) for k in train.config_keys}
    return train.parse_args([f"--method={method}", f"--out_dir={out_dir}", *TINY, *extra], defaults)


def advance(ctx, start, stop):
    """Steps start..stop-1 of the method, as train.run's loop takes them (lr schedule included)."""
    for step in range(start, stop):
        train.train_step(ctx, step)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_hidden=32, seq_len=16, dropout=0.0))


def text_batch(alphabet, n, T=16, seed=0):
    """(n, T) uint8 rows of random bytes from `alphabet`, each right-padded after a random length."""
    g = torch.Generator().manual_seed(seed)
    chars = torch.tensor(list(alphabet.encode()), dtype=torch.uint8)
    x = chars[torch.randint(len(chars), (n, T), generator=g)]
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
    x[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return x


def hand_losses(model, x):
    """ℓ(x; θ) by hand: −log softmax(logits)[next byte], averaged over the non-pad bytes. (N,)"""
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(x).double(), -1)                 # (N, T, 256)
        nll = -logp.gather(-1, x.long()[..., None]).squeeze(-1)                # (N, T)
        mask = (x != 0).double()                                               # (N, T)
        return ((nll * mask).sum(1) / mask.sum(1)).float()                     # (N,)


# -----------------------------------------------------------------------------------------------
# CDS

def test_cds_delta_is_the_loss_change_from_fine_tuning(tmp_path):
    cfg = tiny_cfg("cds", tmp_path, "--max_steps=8", "--cds_pretrain_steps=3", "--cds_finetune_steps=10")
    ctx = train.setup(cfg)
    advance(ctx, 0, 3)                                   # phase (i): uniform pretraining
    train.save_checkpoint(ctx, 3)
    advance(ctx, 3, 4)                                   # phases (ii)-(iii), then one step of (iv)
    delta = ctx.cds["delta"]
    assert delta.shape == (len(ctx.generic.train),)
    assert not delta.requires_grad        # scoring the pool keeps no autograd graph of its N rows
    # replay phase (ii) from the checkpoint (same θ, same specific batches) and compute Δ by hand
    assert train.load_checkpoint(ctx) == 3 and not ctx.cds
    theta, moments = copy.deepcopy(ctx.model.state_dict()), copy.deepcopy(ctx.opt.state_dict()["state"])
    tuned = train.cds_finetuned_copy(ctx, 3)
    # θ and its AdamW moments are untouched: phase (iv) resumes the pretrained model
    assert all(torch.equal(theta[k], v) for k, v in ctx.model.state_dict().items())
    assert all(torch.equal(moments[i][k], v) for i, st in ctx.opt.state_dict()["state"].items() for k, v in st.items())
    x = ctx.generic.train.x
    expected = hand_losses(tuned, x) - hand_losses(ctx.model, x)               # ℓ(x; θ_ft) − ℓ(x; θ)
    assert torch.allclose(delta, expected, atol=1e-4)
    # fine-tuning was on the specific data: the target domain improves more than the unrelated ones
    src = ctx.generic.train.source_id
    target, unrelated = ctx.generic.sources.index("target"), ctx.generic.sources.index("unrelated_a")
    assert delta[src == target].mean() < delta[src == unrelated].mean()


def test_cds_keeps_the_top_b_of_minus_delta_within_B(tmp_path):
    cfg = tiny_cfg("cds", tmp_path, "--max_steps=8", "--cds_pretrain_steps=2")
    ctx = train.setup(cfg)
    advance(ctx, 0, 3)                                   # Δ is computed at step 2
    rng = ctx.generic_sampler.state_dict()["rng"]
    idx_B = ctx.generic_sampler.sample(cfg["big_batch_size"])    # the B that step 3 will draw
    ctx.generic_sampler.load_state_dict({"rng": rng})
    idx_S = train.train_step(ctx, 3).idx
    delta = ctx.cds["delta"]
    assert torch.equal(delta[idx_S].sort().values, delta[idx_B].sort().values[: cfg["batch_size"]])


# -----------------------------------------------------------------------------------------------
# domain classifier

def test_classifier_loss_and_gradient_are_the_binary_cross_entropy():
    torch.manual_seed(0)
    clf = Weighter(dim=8, kernel=3)
    x_g, x_s = text_batch("0123456789", 6, seed=1), text_batch("abcde", 6, seed=2)
    loss = bilevel.classifier_step(clf, x_g, x_s)
    got = [p.grad.clone() for p in clf.parameters() if p.grad is not None]
    # by hand: −mean over the batch of y log σ(s) + (1 − y) log(1 − σ(s)), generic y = 0, specific y = 1
    clf.zero_grad()
    p_g, p_s = torch.sigmoid(clf(x_g)), torch.sigmoid(clf(x_s))
    hand = -(torch.log(1 - p_g).sum() + torch.log(p_s).sum()) / 12
    hand.backward()
    want = [p.grad for p in clf.parameters() if p.grad is not None]
    assert torch.allclose(loss, hand.detach(), atol=1e-6)
    assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_classifier_separates_the_target_domain_on_held_out_examples():
    g, s, info = BUILTIN(0, 64)
    torch.manual_seed(0)
    clf = Weighter(dim=16, kernel=7)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    gs, ss = data.Sampler(len(g.train), 1), data.Sampler(len(s.train), 2)
    for _ in range(300):                                 # balanced batches: 32 generic, 32 specific
        opt.zero_grad(set_to_none=True)
        bilevel.classifier_step(clf, g.train.x[gs.sample(32)], s.train.x[ss.sample(32)])
        opt.step()
    with torch.no_grad():
        logit = clf(g.valid.x)                           # (N,) held-out generic examples
    is_target = g.valid.source_id == g.sources.index(info["target_source"])
    pos, neg = logit[is_target], logit[~is_target]
    # AUC = P(a random target example outscores a random other one), ties count half
    auc = ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean()
    assert auc > 0.9, f"AUC {auc:.3f}"


def test_classifier_keeps_the_top_b_logits_within_B(tmp_path):
    cfg = tiny_cfg("classifier", tmp_path, "--max_steps=8")
    ctx = train.setup(cfg)
    advance(ctx, 0, 3)
    rng = ctx.generic_sampler.state_dict()["rng"]
    ctx.generic_sampler.sample(cfg["specific_batch_size"])      # the classifier's generic half
    idx_B = ctx.generic_sampler.sample(cfg["big_batch_size"])    # then the B of step 3
    ctx.generic_sampler.load_state_dict({"rng": rng})
    idx_S = train.train_step(ctx, 3).idx
    with torch.no_grad():
        logit = ctx.weighter(ctx.generic.train.x)                               # (N,) after the step
    top_b = logit[idx_B].sort(descending=True).values[: cfg["batch_size"]]
    assert torch.allclose(logit[idx_S].sort(descending=True).values, top_b)


# -----------------------------------------------------------------------------------------------
# LTR

def test_ltr_weights_match_brute_force_per_example_gradients():
    model = tiny_model()
    # generic: half in the specific alphabet (aligned gradients), half digits (opposed)
    x_g = torch.cat([text_batch("abcde", 5, seed=1), text_batch("0123456789", 5, seed=2)])
    x_s = text_batch("abcde", 4, seed=3)
    lr = 0.3
    w, losses = bilevel.ltr_weights(model, x_g, x_s, lr)
    # brute force: one autograd.grad per example
    params = list(model.parameters())
    g_spec = torch.autograd.grad(model(x_s).mean(), params)                    # ∇L_specific(θ)
    w_tilde = torch.zeros(len(x_g))
    for i in range(len(x_g)):
        g_i = torch.autograd.grad(model(x_g[i:i + 1]).sum(), params)          # ∇ℓ(x_i; θ)
        w_tilde[i] = max(lr * sum((a * b).sum() for a, b in zip(g_spec, g_i)).item(), 0.0)
    assert (w_tilde == 0).any() and (w_tilde > 0).any()                        # the clipping matters
    assert torch.allclose(w, w_tilde / w_tilde.sum(), atol=1e-5)
    assert torch.allclose(losses, hand_losses(model, x_g), atol=1e-5)
    # all w̃ = 0 (here: lr = 0) → uniform weights
    w0, _ = bilevel.ltr_weights(model, x_g, x_s, 0.0)
    assert torch.allclose(w0, torch.full((len(x_g),), 1 / len(x_g)))


def test_ltr_step_trains_on_the_weighted_loss(tmp_path):
    ctx = train.setup(tiny_cfg("ltr", tmp_path, "--max_steps=4"))
    ref = copy.deepcopy(ctx.model)
    ref_opt = torch.optim.AdamW(ref.parameters(), betas=(0.9, 0.98), eps=1e-9)
    ref_opt.load_state_dict(copy.deepcopy(ctx.opt.state_dict()))
    streams = [ctx.generic_sampler.state_dict()] + [s.state_dict() for s in ctx.specific_samplers]
    x = ctx.generic.train.x[ctx.generic_sampler.sample(ctx.cfg["batch_size"])]
    x_s = ctx.specifics[0].train.x[ctx.specific_samplers[0].sample(ctx.cfg["specific_batch_size"])]
    for s, st in zip([ctx.generic_sampler] + ctx.specific_samplers, streams):
        s.load_state_dict(st)                            # the step will draw the same batches
    advance(ctx, 0, 1)
    # by hand: one AdamW step on Σ_i w_i ℓ(x_i; θ)
    w, _ = bilevel.ltr_weights(ref, x, x_s, train.lr_at(0, ctx.cfg))
    for g in ref_opt.param_groups:
        g["lr"] = train.lr_at(0, ctx.cfg)
    (w * ref(x)).sum().backward()
    ref_opt.step()
    for (k, p), q in zip(ctx.model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), k
    assert abs(sum(ctx.counts) - ctx.cfg["batch_size"]) < 1e-4   # weighted source counts, Σ b·w = b


# -----------------------------------------------------------------------------------------------
# Meta-Weight-Net

def test_mwn_weighter_gets_the_look_ahead_gradient_and_changes():
    model, rho = tiny_model(), 0.5
    torch.manual_seed(1)
    lw = LossWeighter()
    x_g = torch.cat([text_batch("abcde", 4, seed=1), text_batch("0123456789", 4, seed=2)])
    x_s = text_batch("abcde", 4, seed=3)
    losses = model(x_g).detach()                                               # (b,) ℓ(x; θ)
    L = bilevel.mwn_step(model, lw, x_g, losses, x_s, rho)
    got = [p.grad.clone() for p in lw.parameters()]
    assert sum(g.norm() for g in got) > 0
    # reverse over reverse through θ' = θ − ρ Σ w(x; α) ∇ℓ(x; θ), w = softmax(mlp(ℓ; α))
    lw.zero_grad()
    names, params = zip(*model.named_parameters())
    with second_order():
        w = lw.weights(losses)
        g = torch.autograd.grad((w * model(x_g)).sum(), params, create_graph=True)
        theta_prime = {k: p - rho * gi for k, p, gi in zip(names, params, g)}
        L_hand = functional_call(model, theta_prime, (x_s,)).mean()
        want = torch.autograd.grad(L_hand, list(lw.parameters()))
    assert torch.allclose(L, L_hand.detach(), atol=1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # one Adam step changes the weights
    for p, gr in zip(lw.parameters(), got):
        p.grad = gr
    before = lw.weights(losses).detach()
    torch.optim.Adam(lw.parameters(), lr=1e-2).step()
    assert not torch.allclose(before, lw.weights(losses).detach())


def test_mwn_step_filters_B_by_the_mlp_of_the_main_models_losses(tmp_path):
    cfg = tiny_cfg("mwn", tmp_path, "--max_steps=8", "--filter=top")
    ctx = train.setup(cfg)
    advance(ctx, 0, 3)
    theta = copy.deepcopy(ctx.model)                                           # θ before step 3
    rng = ctx.generic_sampler.state_dict()["rng"]
    idx_B = ctx.generic_sampler.sample(cfg["big_batch_size"])
    ctx.generic_sampler.load_state_dict({"rng": rng})
    idx_S = train.train_step(ctx, 3).idx
    with torch.no_grad():
        s_B = ctx.weighter(hand_losses(theta, ctx.generic.train.x[idx_B]))    # mlp(ℓ(x; θ); α) on B
        s_S = ctx.weighter(hand_losses(theta, ctx.generic.train.x[idx_S]))
    top_b = s_B.sort(descending=True).values[: cfg["batch_size"]]
    assert torch.allclose(s_S.sort(descending=True).values, top_b, atol=1e-5)


# -----------------------------------------------------------------------------------------------
# end to end: settings, train.main, checkpoints

@pytest.mark.parametrize("args", [["--cds_finetune_steps=0"], ["--cds_pretrain_steps=-1"],
                                  ["--method=cds", "--max_steps=10", "--cds_pretrain_steps=10"],
                                  ["--method=classifier", "--batch_size=64", "--big_batch_size=32"]])
def test_bad_settings_name_the_flag(args):
    flag = args[-1].split("=")[0].replace("big_batch_size", "batch_size")
    with pytest.raises(train.ConfigError, match=flag):
        train.parse_args(args, {k: getattr(train, k) for k in train.config_keys})


@pytest.mark.parametrize("method", ("cds", "classifier", "ltr", "mwn"))
def test_each_baseline_runs_from_main(method, tmp_path, capsys):
    out = tmp_path / method
    argv = [f"--method={method}", f"--out_dir={out}", "--max_steps=10", "--cds_pretrain_steps=4", *TINY]
    assert train.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    # the reported loss is the final θ's (ckpt.pt) on the specific test examples, recomputed by hand: the
    # built-in specific set, the fixed subset of eval_examples (64) that every evaluation uses
    test = data.eval_subset(data.builtin_corpora(0, 32)[1].test, 64, 2).x               # (64, 32)
    assert summary["specific_test_loss"] == pytest.approx(nats_per_byte_by_hand(run_theta(out), test), rel=1e-5)
    assert abs(sum(v["share"] for v in summary["source_share"].values()) - 1) < 1e-6
    if method == "cds":
        assert summary["cds_score_s"] > 0 and summary["cds_examples_per_s"] > 0


@pytest.mark.parametrize("method", ("cds", "classifier", "ltr", "mwn"))
def test_resume_continues_exactly(method, tmp_path):
    """Every piece of state is in the checkpoint: 3 steps after a reload = 3 steps straight on."""
    cfg = tiny_cfg(method, tmp_path, "--max_steps=8", "--cds_pretrain_steps=2")
    a = train.setup(cfg)
    advance(a, 0, 4)
    train.save_checkpoint(a, 4)
    advance(a, 4, 7)
    b = train.setup(cfg)
    assert train.load_checkpoint(b) == 4
    advance(b, 4, 7)
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    if a.weighter is not None:
        for p, q in zip(a.weighter.parameters(), b.weighter.parameters()):
            assert torch.equal(p, q)
