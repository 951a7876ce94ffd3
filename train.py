"""
Train a byte-level language model on a large *generic* corpus for a small *specific* domain, with
the online bilevel data selection of "Adaptive Training Distributions with Scalable Online Bilevel
Optimization" (Grangier, Ablin, Hannun), Algorithm 1, or one of the paper's baselines.

    python train.py                                   # Sparse SOBA on the built-in corpus, ~3 min on a CPU
    python train.py --preset=cpu --method=baseline --generic=DIR --specific=FILE --out_dir=out/base

Every setting is a global below; `--key=value` overrides it (the value must parse as the default's
type), `--preset=NAME` first applies one of the named blocks in PRESETS. The resolved configuration
is printed and saved with the run.
"""

import copy
import json
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import bilevel
import data
from model import ByteLM, ModelConfig
from weighter import LossWeighter, Weighter, effective_sample_size, filter_batch, score

# -----------------------------------------------------------------------------------------------
# default config values: the built-in experiment, small enough for a 2-core CPU in a few minutes
# I/O
out_dir = "out"
generic = ""            # corpus path(s): file, directory, glob or comma list; "" = built-in synthetic corpus
specific = ""           # idem; several specific sets separated by ";" = multi-task outer loss (Appendix B)
doc_mode = "first"      # "first": a document's first seq_len bytes (paper, the default); "chunk": all its windows
resume = False          # continue from out_dir/ckpt.pt
seed = 0
device = "auto"         # "auto" = cuda if available, else cpu
preset = ""             # "cpu" | "small" | "paper": see PRESETS
# method: baseline | mixing | specific | dds | soba | anograd | scalebio | cds | classifier | ltr | mwn
method = "soba"
# main model θ (paper Table 1 is the "paper" preset)
n_layer = 2
n_head = 4
n_embd = 64
n_hidden = 256
seq_len = 128
dropout = 0.0
# weighting network α (reference: embedding and one causal conv of width 128, kernel 7)
weighter_dim = 32
weighter_kernel = 7
# optimisation of θ: AdamW(0.9, 0.98, eps 1e-9), linear warm-up then lr·√(warmup/step) (reference)
max_steps = 600         # pretraining steps
finetune_steps = 0      # then this many steps on the specific training set ("+ fine-tune" rows)
batch_size = 32         # b: examples the main model trains on per step
big_batch_size = 512    # |B_generic^big|: examples the weighter scores per step (paper: 128·b)
specific_batch_size = 32  # |B_specific| for the outer losses
lr = 2e-3
warmup = 100
weight_decay = 0.0
grad_clip = 0.0         # 0 = off (reference: off)
# optimisation of α and the bilevel updates
meta_lr = 1e-3          # Adam on α (reference: 1e-3, constant)
rho = 0.1               # DDS look-ahead step ρ (reference: 0.1)
soba_v_optim = "adam"   # "adam": v follows Adam at the main lr (reference code); "sgd": v ← v − η d_v (paper text)
soba_v_lr = 0.0         # η for v; 0 = the main model's lr schedule
soba_chunks = 1         # SOBA's second-order pass in this many micro-batches: same numbers, less memory
filter = "without_replacement"  # importance | without_replacement | top (paper Table 7)
outer_every = 1         # run the outer update every k steps (1 = every step, the paper)
# baselines
generic_weight = 0.9    # mixing: g = 0.9 g_generic + 0.1 g_specific (reference)
cds_pretrain_steps = 0  # CDS phase (i): uniform steps before scoring, counted in max_steps; 0 = max_steps // 4
cds_finetune_steps = 100  # CDS phase (ii): steps fine-tuning a copy of θ on the specific set before re-scoring
# ScaleBiO (--method=scalebio, see bilevel.py): min_{p,w} max_u L1(w) + α·[L2(w, λ) − L2(u, λ)], λ = softmax(p)
scalebio_alpha = 10.0   # α: the constant penalty weight (NOT the weighting network's α); authors: 10 to 100
scalebio_lr_p = 1e-2    # AdamW lr of the source logits p, scaled by the main lr schedule like u and w
scalebio_weight_decay = 5e-4  # AdamW weight decay of u and w (the authors' value)
lisa = False            # randomized block coordinate descent for u and w (ScaleBiO; LISA-style)
lisa_interval = 20      # resample the active blocks every this many steps
lisa_layers = 2         # number of active transformer blocks (embeddings, final norm, head always train)
# denoising setting: re-label generic examples into K sources, source k corrupted with prob min(1, 2k/K)
noise_sources = 0       # K; 0 = off. K = 10: sources 0..4 corrupted 0, .2, .4, .6, .8; 5..9 pure noise
# section 6 experiments (see "fixed weighting networks" below): Algorithm 1's filter with α trained elsewhere
weighter_ckpt = ""      # frozen: a run dir / ckpt.pt / weighters/step_N.pt whose weighting network α is kept fixed
weighter_trajectory = ""  # shuffled: a run dir (or its weighters/ dir) whose saved α_t are replayed in a random order σ
save_weighter_every = 0  # runs that learn α save it to out_dir/weighters/step_N.pt: every k steps; 0 = every eval; <0 = never
# evaluation
eval_interval = 100
eval_examples = 2000    # evaluate on (a fixed subset of) this many examples per set; 0 = all
eval_batch_size = 256
# -----------------------------------------------------------------------------------------------
PRESETS = {
    # a meaningful real-corpus experiment in minutes on a 2-core CPU (see README for timings).
    # outer_every=3 departs from the paper (one outer step per inner step): on a CPU one outer step
    # costs ~5 main steps (SOBA's Hessian-vector product needs the math attention path and a double
    # backward), so it runs on every 3rd step, 200 of 600, for < 3x the baseline's step cost. The
    # README compares both schedules (SOBA on Reuters: outer_every=1 ends slightly lower, at ~5x).
    "cpu": dict(n_layer=2, n_head=4, n_embd=64, n_hidden=256, seq_len=128, dropout=0.0,
                weighter_dim=32, batch_size=32, big_batch_size=512, specific_batch_size=32,
                max_steps=600, warmup=200, eval_interval=150, eval_examples=2000, outer_every=3,
                soba_chunks=4),   # SOBA's second-order pass in 4 micro-batches: 0.3x the memory, same speed
    # the paper's small model (Table 9), for the transfer study of section 6.4
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_hidden=512, seq_len=256, dropout=0.1,
                  weighter_dim=128, batch_size=128, big_batch_size=16384, specific_batch_size=128,
                  max_steps=300_000, warmup=1000, eval_interval=5000, eval_examples=0),
    # the paper's language model (Table 1, section 5.2): needs a GPU. SOBA's second-order pass in 2
    # micro-batches: the same numbers at half the memory (one pass: 2.0x the baseline step's; README)
    "paper": dict(n_layer=12, n_head=8, n_embd=256, n_hidden=1024, seq_len=256, dropout=0.1,
                  weighter_dim=128, batch_size=128, big_batch_size=16384, specific_batch_size=128,
                  max_steps=300_000, warmup=1000, eval_interval=5000, eval_examples=0, soba_chunks=2),
}
METHODS = ("baseline", "mixing", "specific", "dds", "soba", "anograd", "scalebio")
SPARSE = ("dds", "soba", "anograd")   # Algorithm 1 with a learned weighting network
BASELINES = ("cds", "classifier", "ltr", "mwn")   # the paper's other baselines (section 5.1)
METHODS += BASELINES
SELECTING = SPARSE + ("cds", "classifier", "mwn")   # methods that keep b of a big batch B
FIXED = ("frozen", "shuffled")   # section 6: Algorithm 1's filter with a fixed α trained by another run
METHODS += FIXED
SELECTING += FIXED
# settings a resumed run may change without changing what it computes
RESUMABLE = {"resume", "device", "out_dir", "soba_chunks"}
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


class ConfigError(Exception):
    pass


def parse_args(argv, defaults):
    """nanoGPT-style `--key=value` overrides, checked against the type of each default."""
    cfg = dict(defaults)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --key=value")
        key, eq, val = arg[2:].partition("=")
        if key not in cfg:
            raise ConfigError(f"--{key}: unknown setting")
        if not eq and isinstance(cfg[key], bool):
            val = "True"
        overrides[key] = cast(key, val, cfg[key])
    if overrides.get("preset", cfg["preset"]):
        name = overrides.get("preset", cfg["preset"])
        if name not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        cfg.update(PRESETS[name])
    cfg.update(overrides)
    check(cfg)
    return cfg


def cast(key, val, default):
    try:
        if isinstance(default, bool):
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        return type(default)(val)
    except ValueError:
        raise ConfigError(f"--{key}: expected a {type(default).__name__}, got {val!r}") from None


def check(cfg):
    if cfg["method"] not in METHODS:
        raise ConfigError(f"--method: unknown method {cfg['method']!r} (choose from {', '.join(METHODS)})")
    for k in ("batch_size", "big_batch_size", "specific_batch_size", "seq_len", "n_layer", "n_head",
              "n_embd", "n_hidden", "eval_interval", "eval_batch_size", "weighter_dim", "outer_every",
              "soba_chunks"):
        if cfg[k] <= 0:
            raise ConfigError(f"--{k}: must be positive, got {cfg[k]}")
    for k in ("max_steps", "finetune_steps", "eval_examples"):
        if cfg[k] < 0:
            raise ConfigError(f"--{k}: must be non-negative, got {cfg[k]}")
    if cfg["method"] in SELECTING and cfg["batch_size"] > cfg["big_batch_size"]:
        raise ConfigError(f"--batch_size: {cfg['batch_size']} is larger than --big_batch_size={cfg['big_batch_size']}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"--n_embd: {cfg['n_embd']} is not a multiple of --n_head={cfg['n_head']}")
    if cfg["filter"] not in ("importance", "without_replacement", "top"):
        raise ConfigError(f"--filter: unknown filter {cfg['filter']!r}")
    if cfg["soba_v_optim"] not in ("adam", "sgd"):
        raise ConfigError(f"--soba_v_optim: expected adam or sgd, got {cfg['soba_v_optim']!r}")
    if cfg["doc_mode"] not in ("chunk", "first"):
        raise ConfigError(f"--doc_mode: expected chunk or first, got {cfg['doc_mode']!r}")
    check_scalebio(cfg)
    check_baselines(cfg)
    check_fixed(cfg)


def check_scalebio(cfg):
    """ScaleBiO / LISA / denoising settings."""
    if cfg["scalebio_alpha"] <= 0:
        raise ConfigError(f"--scalebio_alpha: must be positive, got {cfg['scalebio_alpha']}")
    if cfg["lisa_interval"] <= 0:
        raise ConfigError(f"--lisa_interval: must be positive, got {cfg['lisa_interval']}")
    if cfg["lisa"] and not 0 < cfg["lisa_layers"] <= cfg["n_layer"]:
        raise ConfigError(f"--lisa_layers: must be in 1..n_layer={cfg['n_layer']}, got {cfg['lisa_layers']}")
    if cfg["lisa"] and cfg["method"] != "scalebio":
        raise ConfigError("--lisa: only --method=scalebio uses randomized block coordinate descent")
    if cfg["noise_sources"] < 0 or cfg["noise_sources"] == 1:
        raise ConfigError(f"--noise_sources: must be 0 (off) or at least 2, got {cfg['noise_sources']}")


# -----------------------------------------------------------------------------------------------
# data

def load_data(cfg):
    """(generic Corpus, [specific Corpus, ...], info) from the flags, or the built-in corpus."""
    if not cfg["generic"] and not cfg["specific"]:
        g, s, info = data.builtin_corpora(cfg["seed"], cfg["seq_len"])
        specifics = [s]
    elif not cfg["generic"] or not cfg["specific"]:
        raise ConfigError("--generic and --specific: give both (or neither, for the built-in corpus)")
    else:
        g = data.load_corpus(cfg["generic"], cfg["seq_len"], cfg["doc_mode"], flag="--generic")
        specifics = [data.load_corpus(spec, cfg["seq_len"], cfg["doc_mode"], flag="--specific")
                     for spec in cfg["specific"].split(";")]
        info = {}
    if cfg["noise_sources"]:
        g, info = noisy_corpus(g, cfg["noise_sources"], cfg["seed"]), {}   # the denoising setting
    for s in specifics:
        if len(s.train) < cfg["specific_batch_size"] or len(s.valid) == 0 or len(s.test) == 0:
            raise ConfigError(f"--specific: {s.name} has {len(s.train)} training examples (fewer than "
                              f"--specific_batch_size={cfg['specific_batch_size']}) or an empty valid/test split")
    if len(g.train) < cfg["big_batch_size"] and cfg["method"] in SELECTING:
        raise ConfigError(f"--generic: {len(g.train)} training examples, fewer than --big_batch_size")
    return g, specifics, info


def eval_subset(examples, n, seed):
    """A fixed random subset of n examples (all when n = 0), the same at every evaluation."""
    if n == 0 or len(examples) <= n:
        return examples
    return examples.subset(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n])


@torch.no_grad()
def evaluate(model, examples, ctx):
    """Mean nats per byte over a set: Σ nats / Σ non-pad bytes (bytes, not examples, weigh equally)."""
    model.eval()
    nats, nbytes = 0.0, 0.0
    for i in tqdm(range(0, len(examples), ctx.cfg["eval_batch_size"]), desc="eval", leave=False, disable=None):
        x = examples.x[i:i + ctx.cfg["eval_batch_size"]].to(ctx.device)
        with ctx.autocast():
            losses = model(x).float()                                  # (B,) nats per byte
        n = (x != 0).sum(1).float()                                    # (B,) bytes
        nats += (losses * n).sum().item()
        nbytes += n.sum().item()
    model.train()
    return nats / nbytes


def eval_all(ctx):
    out = {"generic_valid_loss": evaluate(ctx.model, ctx.eval_sets["generic_valid"], ctx)}
    for split in ("valid", "test"):
        per_set = [evaluate(ctx.model, ctx.eval_sets[f"{name}_{split}"], ctx) for name in ctx.specific_names]
        out[f"specific_{split}_loss"] = sum(per_set) / len(per_set)   # Appendix B: the average
        if len(per_set) > 1:
            for name, v in zip(ctx.specific_names, per_set):
                out[f"specific_{split}_loss/{name}"] = v
    return out


# -----------------------------------------------------------------------------------------------
# one training step per method; each returns the indices (into generic train) it trained on

def lr_at(step, cfg):
    # reference schedule: linear warm-up to lr, then lr·√(warmup/step)
    s = step + 1
    return cfg["lr"] * min(s / cfg["warmup"], math.sqrt(cfg["warmup"] / s))


def main_update(ctx, x=None, grads=None, specific_x=None, weights=None):
    """One AdamW step on θ: on the uniform mean loss of x (or Σ_i weights_i ℓ(x_i; θ), LTR), or along
    precomputed grads; mixing adds a specific batch with weight 1 − generic_weight. Returns the
    (generic) training loss."""
    ctx.opt.zero_grad(set_to_none=True)
    if grads is not None:
        for k, p in ctx.model.named_parameters():
            p.grad = grads[k].to(p.dtype)
        loss = torch.tensor(ctx.last_loss)
    else:
        with ctx.autocast():
            losses = ctx.model(x).float()                                   # (b,) ℓ(x; θ)
            loss = losses.mean() if weights is None else (weights.detach() * losses).sum()
            total = loss if specific_x is None else (ctx.cfg["generic_weight"] * loss + (1 - ctx.cfg["generic_weight"])
                                                     * ctx.model(specific_x).float().mean())
        total.backward()
    # ‖∇_θ‖ (clipped to grad_clip when set); checked before the step so θ never takes a NaN update
    norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.cfg["grad_clip"] or float("inf"))
    ctx.stats["grad_norm"] = norm.item()
    if not math.isfinite(ctx.stats["grad_norm"]):
        raise TrainingError(f"step {ctx.step}: the gradient of θ is {ctx.stats['grad_norm']} "
                            "(the last good checkpoint is kept)")
    ctx.opt.step()
    return loss.item()


def specific_batch(ctx):
    """B_specific: a uniform batch from one specific set (chosen at random when there are several)."""
    k = 0 if len(ctx.specifics) == 1 else int(torch.randint(len(ctx.specifics), (1,), generator=ctx.gen))
    idx = ctx.specific_samplers[k].sample(ctx.cfg["specific_batch_size"])
    return ctx.specifics[k].train.x[idx].to(ctx.device)


def step_baseline(ctx, step):
    idx = ctx.generic_sampler.sample(ctx.cfg["batch_size"])
    ctx.last_loss = main_update(ctx, ctx.generic.train.x[idx].to(ctx.device))
    return idx


def step_mixing(ctx, step):
    idx = ctx.generic_sampler.sample(ctx.cfg["batch_size"])
    ctx.last_loss = main_update(ctx, ctx.generic.train.x[idx].to(ctx.device), specific_x=specific_batch(ctx))
    return idx


def step_specific(ctx, step):
    ctx.last_loss = main_update(ctx, specific_batch(ctx))
    return None


def step_sparse(ctx, step):
    """Algorithm 1: draw B_generic^big, outer step on α, filter B to b examples, inner step on θ."""
    cfg, model, weighter = ctx.cfg, ctx.model, ctx.weighter
    idx_B = ctx.generic_sampler.sample(cfg["big_batch_size"])              # (|B|,) uniform draws
    x_B = ctx.generic.train.x[idx_B].to(ctx.device)                       # (|B|, T)
    outer = step % cfg["outer_every"] == 0
    ctx.meta_opt.zero_grad(set_to_none=True)
    grads = None
    if cfg["method"] in ("dds", "anograd") and outer:
        # outer step on R, a uniform b-subset of B (B is i.i.d. uniform, so its first b rows are),
        # with the current θ, before the filter (reference code's order)
        x_R, x_spec = x_B[: cfg["batch_size"]], specific_batch(ctx)
        if cfg["method"] == "dds":
            out = bilevel.dds_step(model, weighter, x_R, x_spec, cfg["rho"])       # Eq. (3)
        else:
            out = bilevel.anograd_step(model, weighter, x_R, x_spec)               # section 4.3.3
        ctx.meta_opt.step()
        ctx.stats["outer_loss"] = out.item()
    s_B = score(weighter, x_B)                                             # (|B|,) s(x; α)
    S = filter_batch(s_B, cfg["batch_size"], cfg["filter"], ctx.gen)        # (b,) filter(B, α, b)
    x_S = x_B[S]
    if cfg["method"] == "soba" and outer:
        # SOBA's outer step shares its forward/backward on S with the main update (see bilevel.py)
        d_v, grads, losses = bilevel.soba_step(model, weighter, x_S, specific_batch(ctx), ctx.v, cfg["soba_chunks"])
        ctx.last_loss = losses.mean().item()
        ctx.meta_opt.step()
        soba_v_update(ctx, d_v, step)
    loss = main_update(ctx, x_S, grads=grads)
    w_B = torch.softmax(s_B, 0)
    ctx.stats["ess"] = effective_sample_size(w_B)
    ctx.stats["max_weight"] = w_B.max().item()
    ctx.last_loss = loss
    return idx_B[S.cpu()]


def soba_v_update(ctx, d_v, step):
    """v ← v − η d_v (paper, section 4.3.2) or an Adam step along d_v (reference code)."""
    eta = ctx.cfg["soba_v_lr"] or lr_at(step, ctx.cfg)
    if ctx.cfg["soba_v_optim"] == "sgd":
        with torch.no_grad():
            for k in ctx.v:
                ctx.v[k] -= eta * d_v[k]
    else:
        for g in ctx.v_opt.param_groups:
            g["lr"] = eta
        for k, t in ctx.v.items():
            t.grad = d_v[k]
        ctx.v_opt.step()


STEPS = {"baseline": step_baseline, "mixing": step_mixing, "specific": step_specific,
         "dds": step_sparse, "soba": step_sparse, "anograd": step_sparse}


# -----------------------------------------------------------------------------------------------
# ScaleBiO (bilevel.py): source weights λ = softmax(p), the auxiliary model u, LISA, denoising.
# The main model w is ctx.model (the one evaluated and kept); its optimizer is ctx.opt.

def setup_scalebio(ctx):
    """u (a copy of w at step 0), p = 0 (λ uniform), AdamW for u, w (weight decay
    scalebio_weight_decay) and p; one LISA generator for u and one for w."""
    cfg = ctx.cfg
    ctx.u = ctx.p = ctx.u_opt = ctx.p_opt = None
    ctx.lisa_gen, ctx.lisa_active = {}, {}
    if cfg["method"] != "scalebio":
        return
    ctx.u = copy.deepcopy(ctx.model)                                       # u: same weights as w
    ctx.p = torch.zeros(len(ctx.generic.sources), device=ctx.device, requires_grad=True)   # (K,) p

    def adamw(params, lr, wd):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=wd)
    ctx.opt = adamw(ctx.model.parameters(), cfg["lr"], cfg["scalebio_weight_decay"])    # w
    ctx.u_opt = adamw(ctx.u.parameters(), cfg["lr"], cfg["scalebio_weight_decay"])      # u
    # no weight decay on p: it would pull λ back toward uniform
    ctx.p_opt = adamw([ctx.p], cfg["scalebio_lr_p"], 0.0)
    for i, k in enumerate(("u", "w")):                   # u and w draw their blocks independently
        ctx.lisa_gen[k] = torch.Generator().manual_seed(cfg["seed"] + 200 + i)
        ctx.lisa_active[k] = list(range(cfg["n_layer"]))  # every block trains until the first draw


def lisa_models(ctx):
    return (("u", ctx.u, ctx.u_opt), ("w", ctx.model, ctx.opt))


def lisa_resample(ctx):
    """Randomized block coordinate descent: draw new active blocks for u and for w, freeze the rest."""
    for k, model, opt in lisa_models(ctx):
        ctx.lisa_active[k] = bilevel.lisa_sample(ctx.cfg["n_layer"], ctx.cfg["lisa_layers"], ctx.lisa_gen[k])
        bilevel.lisa_freeze(model, ctx.lisa_active[k], opt)


def step_scalebio(ctx, step):
    """One ScaleBiO step (bilevel.scalebio_step) on a UNIFORM generic batch and a specific batch.
    Returns None: the batch is uniform; the learned distribution is λ, logged at every evaluation."""
    cfg = ctx.cfg
    if cfg["lisa"] and step % cfg["lisa_interval"] == 0:
        lisa_resample(ctx)
    idx = ctx.generic_sampler.sample(cfg["batch_size"])                    # (b,) uniform draws
    x = ctx.generic.train.x[idx].to(ctx.device)                            # (b, T)
    source_id = ctx.generic.train.source_id[idx].to(ctx.device)            # (b,) s_i
    # w follows lr_at (set by the loop); u and p follow the same schedule, as the authors do
    for g in ctx.u_opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    for g in ctx.p_opt.param_groups:
        g["lr"] = cfg["scalebio_lr_p"] * lr_at(step, cfg) / cfg["lr"]
    for opt in (ctx.opt, ctx.u_opt, ctx.p_opt):
        opt.zero_grad(set_to_none=True)
    with ctx.autocast():
        out = bilevel.scalebio_step(ctx.model, ctx.u, ctx.p, x, source_id, specific_batch(ctx),
                                    cfg["scalebio_alpha"])
    if cfg["grad_clip"] > 0:
        for model in (ctx.model, ctx.u):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    # the three gradients were all taken at the pre-update (u, w, p); now the three steps
    for opt in (ctx.opt, ctx.u_opt, ctx.p_opt):
        opt.step()
    if cfg["lisa"] and step + 1 == cfg["max_steps"]:
        # pretraining ends: w trains all its blocks again (fine-tuning, if any, is not LISA)
        ctx.lisa_active["w"] = list(range(cfg["n_layer"]))
        bilevel.lisa_freeze(ctx.model, ctx.lisa_active["w"])
    ctx.last_loss = out.pop("train_loss")                                  # uniform mean ℓ(x; w)
    ctx.stats.update({f"scalebio_{k}": v for k, v in out.items()})
    return None


def scalebio_log(ctx, phase):
    """λ per source, as "lambda" and as source_share entries ({"share": λ_s, "base": base rate})."""
    if ctx.p is None or phase != "pretrain":
        return {}
    lam = torch.softmax(ctx.p.detach().float(), 0).tolist()
    return {"lambda": dict(zip(ctx.generic.sources, lam)),
            "source_share": {n: {"share": l, "base": b} for n, l, b in zip(ctx.generic.sources, lam, base_rates(ctx))}}


def scalebio_state(ctx):
    if ctx.u is None:
        return {}
    return {"scalebio": {"u": ctx.u.state_dict(), "u_opt": ctx.u_opt.state_dict(), "p": ctx.p.detach(),
                         "p_opt": ctx.p_opt.state_dict(),
                         "lisa_gen": {k: g.get_state() for k, g in ctx.lisa_gen.items()},
                         "lisa_active": {k: list(a) for k, a in ctx.lisa_active.items()}}}


def load_scalebio(ctx, st):
    if ctx.u is None:
        return
    sb = st["scalebio"]
    ctx.u.load_state_dict(sb["u"])
    with torch.no_grad():
        ctx.p.copy_(sb["p"])
    for k, model, _ in lisa_models(ctx):
        ctx.lisa_gen[k].set_state(sb["lisa_gen"][k])
        ctx.lisa_active[k] = list(sb["lisa_active"][k])
        bilevel.lisa_freeze(model, ctx.lisa_active[k])
    ctx.u_opt.load_state_dict(sb["u_opt"])
    ctx.p_opt.load_state_dict(sb["p_opt"])


def noisy_corpus(g, K, seed):
    """The denoising setting: the generic corpus's train/valid/test re-labelled into K sources,
    source k corrupted with probability min(1, 2k/K) (data.noisy_sources)."""
    splits = [data.noisy_sources(e, K, seed + 300 + i) for i, e in enumerate((g.train, g.valid, g.test))]
    return data.Corpus(*splits, splits[0].sources, f"{g.name}+noise{K}")


def noise_halves(summary, ctx):
    """Denoising verdict: total share (λ for ScaleBiO, trained-on share for the others) of the
    clean half (sources k < K/2, corruption < 1) and of the corrupted half (pure noise)."""
    K = ctx.cfg["noise_sources"]
    if not K or "source_share" not in summary:
        return {}
    share = [summary["source_share"][n]["share"] for n in ctx.generic.sources]
    return {"share_clean_half": sum(share[:K // 2]), "share_corrupted_half": sum(share[K // 2:])}


STEPS["scalebio"] = step_scalebio


# -----------------------------------------------------------------------------------------------
# The paper's other baselines (section 5.1, Tables 2-5): CDS, the domain classifier, Learning to
# Reweight (LTR), Meta-Weight-Net (MWN); their maths is in bilevel.py. CDS, the classifier and MWN
# keep b examples of a uniform big batch B, like Algorithm 1, and train on them uniformly; LTR
# trains on a uniform batch of b with per-example weights. Their state: ctx.weighter / ctx.meta_opt
# (classifier: the `Weighter` CNN with a logit head; MWN: the `LossWeighter` MLP) and ctx.cds.

def cds_pretrain(cfg):
    """The length of CDS phase (i), in steps (0 in the config = a quarter of max_steps)."""
    return cfg["cds_pretrain_steps"] or max(1, cfg["max_steps"] // 4)


def check_baselines(cfg):
    if cfg["cds_pretrain_steps"] < 0:
        raise ConfigError(f"--cds_pretrain_steps: must be non-negative, got {cfg['cds_pretrain_steps']}")
    if cfg["cds_finetune_steps"] <= 0:
        raise ConfigError(f"--cds_finetune_steps: must be positive, got {cfg['cds_finetune_steps']}")
    if cfg["method"] == "cds" and cds_pretrain(cfg) >= cfg["max_steps"]:
        raise ConfigError(f"--cds_pretrain_steps: {cds_pretrain(cfg)} leaves no selection step within "
                          f"--max_steps={cfg['max_steps']}")


def setup_baselines(ctx):
    cfg = ctx.cfg
    ctx.cds = None     # CDS: {"delta": (N,) Δ per generic train example, timings} once computed
    if cfg["method"] == "classifier":
        # "the same architecture as the weighting model" (section 5.1); its score is a logit
        ctx.weighter = Weighter(cfg["weighter_dim"], cfg["weighter_kernel"]).to(ctx.device)
    elif cfg["method"] == "mwn":
        ctx.weighter = LossWeighter().to(ctx.device)     # mlp(ℓ(x; θ); α), 100 hidden units
    if cfg["method"] in ("classifier", "mwn"):
        ctx.meta_opt = torch.optim.Adam(ctx.weighter.parameters(), lr=cfg["meta_lr"])


def big_batch(ctx):
    """B_generic^big: |B| uniform draws from generic train → (indices (|B|,), x (|B|, T))."""
    idx_B = ctx.generic_sampler.sample(ctx.cfg["big_batch_size"])
    return idx_B, ctx.generic.train.x[idx_B].to(ctx.device)


# --- CDS: contrastive data selection (section 2) ---

def step_cds(ctx, step):
    """CDS's four phases (section 2) inside one run of max_steps:
    (i)   steps < cds_pretrain_steps: uniform generic training, as the baseline;
    (ii)  then, once: fine-tune a copy θ_ft of the pretrained θ on the specific data;
    (iii) Δ(x) = ℓ(x; θ_ft) − ℓ(x; θ) for every generic training example (`cds_phase`);
    (iv)  resume training θ on the examples with the greatest improvement (most negative Δ).
    The paper restricts the generic set once; we keep the top-b of −Δ within each uniform big
    batch B, as the reference code does: the same selected fraction b/|B|, drawn online."""
    if step < cds_pretrain(ctx.cfg):
        return step_baseline(ctx, step)
    if ctx.cds is None:
        ctx.cds = cds_phase(ctx, step)
        ctx.stats.update(cds_stats(ctx.cds))
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    S = torch.topk(-ctx.cds["delta"][idx_B], ctx.cfg["batch_size"]).indices    # (b,) top-b of −Δ
    ctx.last_loss = main_update(ctx, x_B[S.to(ctx.device)])
    return idx_B[S]


def cds_finetuned_copy(ctx, step):
    """CDS phase (ii): a copy θ_ft of θ trained cds_finetune_steps steps on specific batches, with a
    copy of θ's AdamW state and the lr schedule continuing from `step` (as train.py's own
    fine-tuning). θ and its optimizer are left untouched: phase (iv) resumes the pretrained θ."""
    cfg = ctx.cfg
    tuned = copy.deepcopy(ctx.model)
    opt = torch.optim.AdamW(tuned.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-9,
                            weight_decay=cfg["weight_decay"])
    opt.load_state_dict(copy.deepcopy(ctx.opt.state_dict()))   # deep: AdamW updates moments in place
    for k in range(cfg["cds_finetune_steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step + k, cfg)
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = tuned(specific_batch(ctx)).float().mean()
        loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(tuned.parameters(), cfg["grad_clip"])
        opt.step()
    return tuned


def cds_phase(ctx, step):
    """CDS phases (ii)-(iii): θ_ft, then Δ for all N generic training examples (bilevel.cds_delta).
    Scoring is 2N forward passes of the main model: timed and reported (cds_score_s)."""
    t0 = time.perf_counter()
    tuned = cds_finetuned_copy(ctx, step)
    t1 = time.perf_counter()
    with ctx.autocast():
        delta = bilevel.cds_delta(ctx.model, tuned, ctx.generic.train.x, ctx.cfg["eval_batch_size"], ctx.device)
    t2 = time.perf_counter()
    out = {"delta": delta, "finetune_s": t1 - t0, "score_s": t2 - t1, "examples_per_s": 2 * len(delta) / (t2 - t1)}
    tqdm.write(f"CDS at step {step}: fine-tuned a copy for {ctx.cfg['cds_finetune_steps']} steps in "
               f"{out['finetune_s']:.1f} s; scored {len(delta)} generic examples twice in {out['score_s']:.1f} s "
               f"({out['examples_per_s']:.0f} examples/s)")
    return out


def cds_stats(cds):
    return {"cds_score_s": cds["score_s"], "cds_examples_per_s": cds["examples_per_s"],
            "cds_finetune_s": cds["finetune_s"]}


# --- the domain classifier (section 5.1) ---

def step_classifier(ctx, step):
    """One Adam step of the classifier on a balanced batch (bilevel.classifier_step: specific = 1,
    generic = 0, specific_batch_size of each), then the deterministic top-b of B by logit,
    trained on uniformly. The paper pretrains the classifier and then restricts the generic set;
    we train it online, one step per training step, as the reference code does."""
    cfg = ctx.cfg
    if step % cfg["outer_every"] == 0:
        x_g = ctx.generic.train.x[ctx.generic_sampler.sample(cfg["specific_batch_size"])].to(ctx.device)
        ctx.meta_opt.zero_grad(set_to_none=True)
        ctx.stats["classifier_bce"] = bilevel.classifier_step(ctx.weighter, x_g, specific_batch(ctx)).item()
        ctx.meta_opt.step()
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    s_B = score(ctx.weighter, x_B)                                             # (|B|,) logits
    S = filter_batch(s_B, cfg["batch_size"], "top")                            # (b,) top-b logits
    ctx.last_loss = main_update(ctx, x_B[S])
    return idx_B[S.cpu()]


# --- LTR: learning to reweight (Ren et al. 2018) ---

def step_ltr(ctx, step):
    """Weights for a uniform batch of b from one look-ahead derivative (bilevel.ltr_weights), then
    one AdamW step of θ on Σ_i w_i ℓ(x_i; θ) (weighted, not filtered).

    Why LTR costs more than the sparse methods (section 5.1: "a generic example x cannot be
    discarded without evaluating the main model and its gradient at x"): with no weighting
    network, an example's weight needs the main model's forward AND backward at that example. So
    LTR weighs only the b examples it trains on (per step: forward+backward on B_specific, the
    inner products on b, the weighted forward+backward on b); selecting from a big batch B as
    Algorithm 1 does would cost |B| main-model forward+backward passes per step where the sparse
    methods pay |B| forwards of the small CNN.

    Returns None: every example of the batch is trained on, with weight w_i; the source share
    logged for LTR is the weighted one (Σ_i b·w_i per source), counted here."""
    cfg = ctx.cfg
    idx = ctx.generic_sampler.sample(cfg["batch_size"])                        # (b,) uniform draws
    x = ctx.generic.train.x[idx].to(ctx.device)                                # (b, T)
    w, _ = bilevel.ltr_weights(ctx.model, x, specific_batch(ctx), lr_at(step, cfg))   # (b,) Σ w = 1
    ctx.last_loss = main_update(ctx, x, weights=w)
    for s, wi in zip(ctx.generic.train.source_id[idx].tolist(), (len(w) * w).tolist()):
        ctx.counts[s] += wi
    ctx.stats["ess"] = effective_sample_size(w)
    ctx.stats["max_weight"] = w.max().item()
    return None


# --- Meta-Weight-Net (Shu et al. 2019) ---

def step_mwn(ctx, step):
    """Algorithm 1 with Meta-Weight-Net's weighting network w(x; α) = softmax(mlp(ℓ(x; θ); α)):
    1. ℓ(x; θ) for all of B: the main model's forward on |B| examples (no grad). This is MWN's
       expensive part: its only feature is the main model's loss, where the byte CNN of the other
       sparse methods scores B for a fraction of that cost;
    2. the DDS outer step (bilevel.mwn_step) on R = the first b rows of B (a uniform b-subset);
    3. filter B by the MLP's scores (--filter) and train θ on the b kept examples uniformly."""
    cfg, b = ctx.cfg, ctx.cfg["batch_size"]
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    with ctx.autocast():
        # in chunks of b rows: the (chunk, T, 256) logits then take no more memory than the main step's
        losses_B = bilevel.losses_of(ctx.model, x_B, b, ctx.device).to(ctx.device)   # (|B|,)
    if step % cfg["outer_every"] == 0:
        ctx.meta_opt.zero_grad(set_to_none=True)
        L = bilevel.mwn_step(ctx.model, ctx.weighter, x_B[:b], losses_B[:b], specific_batch(ctx), cfg["rho"])
        ctx.meta_opt.step()
        ctx.stats["outer_loss"] = L.item()
    with torch.no_grad():
        s_B = ctx.weighter(losses_B).float()                                   # (|B|,) scores
    S = filter_batch(s_B, b, cfg["filter"], ctx.gen)                           # (b,)
    ctx.last_loss = main_update(ctx, x_B[S])
    w_B = torch.softmax(s_B, 0)
    ctx.stats["ess"] = effective_sample_size(w_B)
    ctx.stats["max_weight"] = w_B.max().item()
    return idx_B[S.cpu()]


def baselines_state(ctx):
    return {} if ctx.cds is None else {"cds": ctx.cds}     # Δ (N,) tensor and timings (floats)


def load_baselines(ctx, st):
    ctx.cds = st.get("cds")
    if ctx.cds is not None:
        ctx.stats.update(cds_stats(ctx.cds))


STEPS.update(cds=step_cds, classifier=step_classifier, ltr=step_ltr, mwn=step_mwn)


# -----------------------------------------------------------------------------------------------
# fixed weighting networks: the section-6 experiments
#
# `frozen` (6.1 "final weighting", 6.4 "weights from small"): Algorithm 1 with α fixed to a weighting
# network trained by another run, possibly with a different main model (only α's own size must
# match, and it is read from that run's config). No outer update: every step draws B_generic^big,
# keeps filter(B, α, b) and takes one step on the uniform mean loss of those b examples: the paper's
#     min_θ Σ_{x∈D_generic} w(x; α) ℓ(x; θ)        with α fixed (6.4),
# sampled as Algorithm 1 samples it (the filter's bias, section 6.2, included).
# `shuffled` (6.1): the α_t a run saved during training (out_dir/weighters/, see save_weighter_every)
# replayed in a random order σ: the max_steps steps are cut into K equal segments, one per saved
# α_{t_1}, ..., α_{t_K}, and segment j uses α_{t_σ(j)}. σ comes from --seed, so a resumed run replays
# the same order.

def load_weighter(path, flag="--weighter_ckpt"):
    """The text-scoring weighting network α saved by a run → (Weighter in eval mode, checkpoint dict).
    path: a run directory, its ckpt.pt, or a weighters/step_N.pt snapshot."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    st = read_checkpoint(path, flag)
    sd, c = st.get("weighter"), st.get("config", {})
    if sd is None:
        raise ConfigError(f"{flag}: {path} has no weighting network (method {c.get('method')!r})")
    if "embed.weight" not in sd:
        raise ConfigError(f"{flag}: {path}: its weighting network scores losses, not text (method {c.get('method')!r})")
    n_conv = sum(1 for k in sd if k.startswith("convs.") and k.endswith(".weight"))
    w = Weighter(c.get("weighter_dim", weighter_dim), c.get("weighter_kernel", weighter_kernel), n_conv)
    try:
        w.load_state_dict(sd)
    except RuntimeError:
        raise ConfigError(f"{flag}: {path}: its weighting network does not match its config's weighter_dim/kernel") from None
    return w.requires_grad_(False).eval(), st


def check_fixed(cfg):
    if cfg["method"] == "frozen" and not cfg["weighter_ckpt"]:
        raise ConfigError("--method=frozen: give --weighter_ckpt=RUN_DIR (a run with a weighting network)")
    if cfg["method"] == "shuffled" and not cfg["weighter_trajectory"]:
        raise ConfigError("--method=shuffled: give --weighter_trajectory=RUN_DIR (a run that saved weighters/)")


def trajectory(path):
    """The α_t snapshots a run saved, sorted by step t: [path of weighters/step_t.pt, ...]."""
    d = os.path.join(path, "weighters") if os.path.isdir(os.path.join(path, "weighters")) else path
    files = [f for f in os.listdir(d) if f.startswith("step_") and f.endswith(".pt")] if os.path.isdir(d) else []
    if not files:
        raise ConfigError(f"--weighter_trajectory: no weighters/step_N.pt snapshots in {path}")
    return [os.path.join(d, f) for f in sorted(files, key=lambda f: int(f[5:-3]))]


def setup_fixed(ctx):
    cfg = ctx.cfg
    if cfg["method"] not in FIXED:
        return
    if cfg["method"] == "frozen":
        ctx.weighter, _ = load_weighter(cfg["weighter_ckpt"])
    else:
        ctx.trajectory = trajectory(cfg["weighter_trajectory"])
        ctx.sigma = torch.randperm(len(ctx.trajectory), generator=torch.Generator().manual_seed(cfg["seed"] + 200))
        ctx.weighter, _ = load_weighter(ctx.trajectory[0], "--weighter_trajectory")
        ctx.segment = None      # the segment whose α is loaded: none yet (also after a resume)
    ctx.weighter.to(ctx.device)
    # never stepped: kept so that the checkpoint code saves and restores α like any run's
    ctx.meta_opt = torch.optim.Adam(ctx.weighter.parameters(), lr=0.0)


def replay_alpha(ctx, step):
    """shuffled: load α_{t_σ(j)} when step enters segment j of K equal segments of max_steps."""
    K = len(ctx.trajectory)
    j = min(K - 1, step * K // ctx.cfg["max_steps"])
    if j != ctx.segment:
        st = torch.load(ctx.trajectory[int(ctx.sigma[j])], map_location="cpu", weights_only=True)
        ctx.weighter.load_state_dict(st["weighter"])
        ctx.segment = j


def step_fixed(ctx, step):
    """Algorithm 1 without its outer step: B_generic^big, filter(B, α, b), one step on the b examples."""
    cfg = ctx.cfg
    if cfg["method"] == "shuffled":
        replay_alpha(ctx, step)
    idx_B, x_B = big_batch(ctx)                                            # (|B|,), (|B|, T)
    s_B = score(ctx.weighter, x_B)                                         # (|B|,) s(x; α)
    S = filter_batch(s_B, cfg["batch_size"], cfg["filter"], ctx.gen)       # (b,) filter(B, α, b)
    ctx.last_loss = main_update(ctx, x_B[S])                               # uniform mean loss on S
    w_B = torch.softmax(s_B, 0)                                            # (|B|,) w(x; α)
    ctx.stats["ess"] = effective_sample_size(w_B)
    ctx.stats["max_weight"] = w_B.max().item()
    return idx_B[S.cpu()]


def save_weighter_snapshot(ctx, done):
    """Runs that learn a weighting network save α_t (a few 100 kB) to out_dir/weighters/step_t.pt
    every save_weighter_every steps (0: at every pretraining evaluation), for `shuffled`."""
    cfg, k = ctx.cfg, ctx.cfg["save_weighter_every"]
    if ctx.weighter is None or cfg["method"] in FIXED or k < 0 or done > cfg["max_steps"]:
        return
    if not (done % k == 0 if k > 0 else (done % cfg["eval_interval"] == 0 or done == cfg["max_steps"])):
        return
    d = os.path.join(cfg["out_dir"], "weighters")
    os.makedirs(d, exist_ok=True)
    snap = {"step": done, "weighter": ctx.weighter.state_dict(), "config": {
        "method": cfg["method"], "weighter_dim": cfg["weighter_dim"], "weighter_kernel": cfg["weighter_kernel"],
        "seq_len": cfg["seq_len"]}}
    atomic_write(os.path.join(d, f"step_{done}.pt"), lambda p: torch.save(snap, p))


STEPS.update(frozen=step_fixed, shuffled=step_fixed)


# -----------------------------------------------------------------------------------------------
# checkpoints: the complete state, written atomically

def atomic_write(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def state_dict(ctx, step):
    st = {"step": step, "config": ctx.cfg, "model": ctx.model.state_dict(), "opt": ctx.opt.state_dict(),
          "generic_sampler": ctx.generic_sampler.state_dict(),
          "specific_samplers": [s.state_dict() for s in ctx.specific_samplers],
          "gen": ctx.gen.get_state(), "torch_rng": torch.get_rng_state(),
          "counts": ctx.counts, "seen": ctx.seen, "train_time": ctx.train_time, "best": ctx.best,
          "last_eval": ctx.last_eval}
    if torch.cuda.is_available():
        st["cuda_rng"] = torch.cuda.get_rng_state()
    if ctx.weighter is not None:
        st["weighter"] = ctx.weighter.state_dict()
        st["meta_opt"] = ctx.meta_opt.state_dict()
    if ctx.v is not None:
        st["v"] = ctx.v
        st["v_opt"] = ctx.v_opt.state_dict()
    st.update(scalebio_state(ctx))
    st.update(baselines_state(ctx))
    return st


def save_checkpoint(ctx, step):
    atomic_write(os.path.join(ctx.cfg["out_dir"], "ckpt.pt"), lambda p: torch.save(state_dict(ctx, step), p))


def read_checkpoint(path, flag):
    """torch.load(weights_only=True) of a checkpoint, or a one-line ConfigError naming the flag."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__})") from None


def load_checkpoint(ctx):
    path = os.path.join(ctx.cfg["out_dir"], "ckpt.pt")
    st = read_checkpoint(path, "--resume")
    diff = sorted(k for k in set(st["config"]) | set(ctx.cfg)
                  if k not in RESUMABLE and st["config"].get(k) != ctx.cfg.get(k))
    if diff:
        raise ConfigError(f"--resume: {path} was written with different settings: " +
                          ", ".join(f"{k}={st['config'].get(k)!r} (now {ctx.cfg.get(k)!r})" for k in diff))
    ctx.model.load_state_dict(st["model"])
    ctx.opt.load_state_dict(st["opt"])
    ctx.generic_sampler.load_state_dict(st["generic_sampler"])
    for s, d in zip(ctx.specific_samplers, st["specific_samplers"]):
        s.load_state_dict(d)
    ctx.gen.set_state(st["gen"])
    torch.set_rng_state(st["torch_rng"])
    if "cuda_rng" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda_rng"])
    if ctx.weighter is not None:
        ctx.weighter.load_state_dict(st["weighter"])
        ctx.meta_opt.load_state_dict(st["meta_opt"])
    if ctx.v is not None:
        for k in ctx.v:
            ctx.v[k].data.copy_(st["v"][k])
        ctx.v_opt.load_state_dict(st["v_opt"])
    load_scalebio(ctx, st)
    load_baselines(ctx, st)
    ctx.counts, ctx.seen, ctx.train_time, ctx.best, ctx.last_eval = (
        st["counts"], st["seen"], st["train_time"], st["best"], st["last_eval"])
    return st["step"]


# -----------------------------------------------------------------------------------------------
# setup, logging, the loop

def set_names(specifics):
    """Names of the specific sets in logs: "specific" for one; for several (Appendix B), each spec's
    file or directory name without its extension ("reuters21578"), or the whole spec if two clash."""
    if len(specifics) == 1:
        return ["specific"]
    names = [os.path.basename(s.name.rstrip("/")).split(".")[0] or s.name for s in specifics]
    return names if len(set(names)) == len(names) else [s.name for s in specifics]


def setup(cfg):
    torch.manual_seed(cfg["seed"])
    torch.set_flush_denormal(True)    # denormal floats make the CPU's double backward ~20% slower
    dev = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    generic_c, specifics, info = load_data(cfg)
    ctx = SimpleNamespace(cfg=cfg, device=dev, generic=generic_c, specifics=specifics, info=info,
                          specific_names=set_names(specifics))
    ctx.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda")
    mcfg = ModelConfig(**{k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "n_hidden", "seq_len", "dropout")})
    ctx.model = ByteLM(mcfg).to(dev)
    ctx.opt = torch.optim.AdamW(ctx.model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-9,
                                weight_decay=cfg["weight_decay"])
    ctx.weighter, ctx.meta_opt, ctx.v, ctx.v_opt = None, None, None, None
    if cfg["method"] in SPARSE:
        ctx.weighter = Weighter(cfg["weighter_dim"], cfg["weighter_kernel"]).to(dev)
        ctx.meta_opt = torch.optim.Adam(ctx.weighter.parameters(), lr=cfg["meta_lr"])
    if cfg["method"] == "soba":
        # v: same shape as θ, zeros at start, never reset (reference code)
        ctx.v = {k: torch.zeros_like(p, requires_grad=True) for k, p in ctx.model.named_parameters()}
        ctx.v_opt = torch.optim.Adam(list(ctx.v.values()), lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-9)
    ctx.generic_sampler = data.Sampler(len(generic_c.train), cfg["seed"] + 1)
    ctx.specific_samplers = [data.Sampler(len(s.train), cfg["seed"] + 2 + i) for i, s in enumerate(specifics)]
    ctx.gen = torch.Generator().manual_seed(cfg["seed"] + 100)     # filter and task draws
    n = cfg["eval_examples"]
    ctx.eval_sets = {"generic_valid": eval_subset(generic_c.valid, n, 0)}
    for name, s in zip(ctx.specific_names, specifics):
        ctx.eval_sets[f"{name}_valid"] = eval_subset(s.valid, n, 1)
        ctx.eval_sets[f"{name}_test"] = eval_subset(s.test, n, 2)
    ctx.counts = [0] * len(generic_c.sources)      # per source, trained-on examples this interval
    ctx.seen, ctx.train_time, ctx.best, ctx.last_eval, ctx.stats, ctx.last_loss = 0, 0.0, None, {}, {}, float("nan")
    ctx.step = 0
    setup_scalebio(ctx)
    setup_baselines(ctx)
    setup_fixed(ctx)
    return ctx


def base_rates(ctx):
    ids = ctx.generic.train.source_id
    return (torch.bincount(ids, minlength=len(ctx.generic.sources)).float() / len(ids)).tolist()


def source_share(ctx):
    total = sum(ctx.counts)
    if total == 0:
        return None
    return {name: {"share": c / total, "base": b}
            for name, c, b in zip(ctx.generic.sources, ctx.counts, base_rates(ctx))}


def log_eval(ctx, step, phase):
    rec = {"step": step, "phase": phase, "elapsed_s": round(ctx.train_time, 2), "examples_seen": ctx.seen,
           **eval_all(ctx), "lr": lr_at(step, ctx.cfg), "train_loss": ctx.last_loss}
    for k, v in rec.items():
        if k.endswith("_loss") and not math.isfinite(v):
            raise TrainingError(f"step {step}: {k} is {v} (the last good checkpoint is kept)")
    rec.update({k: v for k, v in ctx.stats.items()})
    rec.update(scalebio_log(ctx, phase))     # ScaleBiO: λ per source, as "lambda" and "source_share"
    share = source_share(ctx)
    if share is not None and phase == "pretrain":
        rec["source_share"] = share
        ctx.last_share = share
    ctx.counts = [0] * len(ctx.generic.sources)
    with open(os.path.join(ctx.cfg["out_dir"], "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def progress_line(rec, ms, ctx):
    line = (f"step {rec['step']:6d} | {rec['phase']:8s} | train {rec['train_loss']:.3f} | specific valid "
            f"{rec['specific_valid_loss']:.3f} test {rec['specific_test_loss']:.3f} | generic valid "
            f"{rec['generic_valid_loss']:.3f} | {ms:6.1f} ms/step")
    target = ctx.info.get("target_source")
    if target and rec.get("source_share"):
        sh = rec["source_share"][target]
        line += f" | {target} share {sh['share']:.2f} (base {sh['base']:.2f})"
    return line


def truncate_log(path, step):
    """On resume: keep the log records up to the checkpoint's step (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
    atomic_write(path, lambda p: open(p, "w").writelines(keep))


def run(cfg):
    ctx = setup(cfg)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    start = 0
    if cfg["resume"]:
        start = load_checkpoint(ctx)
        truncate_log(log_path, start)
    elif os.path.exists(log_path):
        os.remove(log_path)
    atomic_write(os.path.join(cfg["out_dir"], "config.json"), lambda p: json.dump(cfg, open(p, "w"), indent=1))
    print(f"{cfg['method']} | θ: {ctx.model.num_params() / 1e6:.2f}M params | device {ctx.device} | "
          f"generic {len(ctx.generic.train)} train examples from {len(ctx.generic.sources)} sources | "
          f"specific {', '.join(str(len(s.train)) for s in ctx.specifics)} train examples")
    # SIGINT / SIGTERM: finish the current step, write a checkpoint, exit (handlers restored after)
    stop = {"sig": None}
    previous = {sig: signal.signal(sig, lambda s, f: stop.update(sig=s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train_loop(ctx, cfg, start, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_loop(ctx, cfg, start, stop):
    total = cfg["max_steps"] + cfg["finetune_steps"]
    ms_hist, ms_all = [], []    # pretraining step times (for ms_per_step), all step times (for the progress line)
    bar = tqdm(range(start, total), initial=start, total=total, desc=cfg["method"], dynamic_ncols=True, leave=False, disable=None)
    step = start
    for step in bar:
        phase = "pretrain" if step < cfg["max_steps"] else "finetune"
        for group in ctx.opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        t0 = time.perf_counter()
        ctx.step = step
        idx = (STEPS[cfg["method"]] if phase == "pretrain" else step_specific)(ctx, step)
        dt = time.perf_counter() - t0
        ctx.train_time += dt
        ctx.seen += cfg["batch_size"]
        ms_all.append(dt * 1000)
        if phase == "pretrain":
            ms_hist.append(dt * 1000)
        if idx is not None:
            for i in ctx.generic.train.source_id[idx].tolist():
                ctx.counts[i] += 1
        for name, value in [("training loss", ctx.last_loss), *ctx.stats.items()]:
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingError(f"step {step}: {name} is {value} (the last good checkpoint is kept)")
        bar.set_postfix(loss=f"{ctx.last_loss:.3f}")
        done = step + 1
        save_weighter_snapshot(ctx, done)     # α_t for `shuffled` replays (section 6.1)
        if done % cfg["eval_interval"] == 0 or done == cfg["max_steps"] or done == total:
            finish_eval(ctx, done, "pretrain" if done <= cfg["max_steps"] else "finetune", ms_all)
        if stop["sig"] is not None:
            save_checkpoint(ctx, done)
            bar.close()
            print(f"stopped by signal {stop['sig']} after step {done}; checkpoint written, continue with --resume")
            return ctx, 128 + stop["sig"]
    bar.close()
    write_summary(ctx, total, ms_hist)
    return ctx, 0


def finish_eval(ctx, done, phase, ms_all):
    rec = log_eval(ctx, done, phase)
    recent = ms_all[-ctx.cfg["eval_interval"]:]
    ms = sum(recent) / max(1, len(recent))
    tqdm.write(progress_line(rec, ms, ctx))
    if done == ctx.cfg["max_steps"]:
        ctx.last_eval = {"pretrain": rec}
    elif phase == "finetune" and (ctx.best is None or rec["specific_valid_loss"] < ctx.best["specific_valid_loss"]):
        ctx.best = rec     # fine-tuning result = the evaluation with the best specific valid loss
    save_checkpoint(ctx, done)


class TrainingError(Exception):
    pass


def peak_mem_mb(ctx):
    if ctx.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_summary(ctx, total, ms_hist):
    cfg = ctx.cfg
    pre = ctx.last_eval.get("pretrain", {})
    summary = {"steps": cfg["max_steps"], "method": cfg["method"]}
    for k in ("specific_valid_loss", "specific_test_loss", "generic_valid_loss"):
        summary[k] = pre.get(k)
    summary.update({k: v for k, v in pre.items() if k.startswith("specific_") and "/" in k})
    if cfg["finetune_steps"] > 0 and ctx.best is not None:
        summary["specific_test_loss_finetuned"] = ctx.best["specific_test_loss"]
        summary["specific_valid_loss_finetuned"] = ctx.best["specific_valid_loss"]
        summary["finetune_best_step"] = ctx.best["step"]
    summary["ms_per_step"] = sum(ms_hist) / len(ms_hist) if ms_hist else None
    summary["peak_mem_mb"] = peak_mem_mb(ctx)
    summary["train_time_s"] = ctx.train_time
    for k in ("ess", "max_weight", "cds_score_s", "cds_examples_per_s", "cds_finetune_s"):
        if k in pre:
            summary[k] = pre[k]
    if "source_share" in pre:
        summary["source_share"] = pre["source_share"]
    if "lambda" in pre:
        summary["lambda"] = pre["lambda"]
    summary.update(noise_halves(summary, ctx))
    if ctx.info.get("target_source"):
        summary["target_source"] = ctx.info["target_source"]
    summary["config"] = cfg
    atomic_write(os.path.join(cfg["out_dir"], "summary.json"), lambda p: json.dump(summary, open(p, "w"), indent=1))
    print(result_words(summary, ctx))


def result_words(summary, ctx):
    msg = f"{summary['method']}: specific test loss {summary['specific_test_loss']:.3f} nats/byte after {summary['steps']} steps"
    if "specific_test_loss_finetuned" in summary:
        msg += f", {summary['specific_test_loss_finetuned']:.3f} after fine-tuning"
    target = summary.get("target_source")
    if target and "source_share" in summary:
        sh = summary["source_share"][target]
        ratio = sh["share"] / sh["base"]
        verdict = "up-weighted" if ratio > 1.5 else "NOT up-weighted"
        what = (f"of ScaleBiO's source weights λ (uniform: {100 / len(summary['lambda']):.0f}%)" if "lambda" in summary
                else f"of the examples the model trained on over the last {ctx.cfg['eval_interval']} steps")
        msg += (f". The target domain {target!r} was {verdict}: {100 * sh['share']:.0f}% {what} vs "
                f"{100 * sh['base']:.0f}% of the generic pool ({ratio:.1f}x)")
    if "share_clean_half" in summary:     # the denoising setting (--noise_sources)
        msg += (f". Denoising: {100 * summary['share_clean_half']:.0f}% of the {'weight λ' if 'lambda' in summary else 'trained-on examples'} "
                f"on the clean half of the sources, {100 * summary['share_corrupted_half']:.0f}% on the pure-noise half")
    return msg + f". Results in {ctx.cfg['out_dir']}/summary.json"


def main(argv):
    try:
        cfg = parse_args(argv, {k: globals()[k] for k in config_keys})
        print(json.dumps(cfg))
        _, code = run(cfg)
        return code
    except (ConfigError, data.DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
