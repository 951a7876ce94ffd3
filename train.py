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
from weighter import Weighter, effective_sample_size, filter_batch, score

# -----------------------------------------------------------------------------------------------
# default config values: the built-in experiment, small enough for a 2-core CPU in a few minutes
# I/O
out_dir = "out"
generic = ""            # corpus path(s): file, directory, glob or comma list; "" = built-in synthetic corpus
specific = ""           # idem; several specific sets separated by ";" = multi-task outer loss (Appendix B)
doc_mode = "chunk"      # "chunk": every seq_len window of a document; "first": its first seq_len bytes (paper)
resume = False          # continue from out_dir/ckpt.pt
seed = 0
device = "auto"         # "auto" = cuda if available, else cpu
preset = ""             # "cpu" | "small" | "paper": see PRESETS
# method: baseline | mixing | specific | dds | soba | anograd
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
max_steps = 800         # pretraining steps
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
filter = "without_replacement"  # importance | without_replacement | top (paper Table 7)
outer_every = 1         # run the outer update every k steps (1 = every step, the paper)
# baselines
generic_weight = 0.9    # mixing: g = 0.9 g_generic + 0.1 g_specific (reference)
# evaluation
eval_interval = 100
eval_examples = 2000    # evaluate on (a fixed subset of) this many examples per set; 0 = all
eval_batch_size = 256
# -----------------------------------------------------------------------------------------------
PRESETS = {
    # a meaningful real-corpus experiment in minutes on a 2-core CPU (see README for timings)
    "cpu": dict(n_layer=2, n_head=4, n_embd=128, n_hidden=512, seq_len=128, dropout=0.0,
                weighter_dim=32, batch_size=32, big_batch_size=512, specific_batch_size=32,
                max_steps=1500, warmup=200, eval_interval=250, eval_examples=2000),
    # the paper's small model (Table 9), for the transfer study of section 6.4
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_hidden=512, seq_len=256, dropout=0.1,
                  weighter_dim=128, batch_size=128, big_batch_size=16384, specific_batch_size=128,
                  max_steps=300_000, warmup=1000, eval_interval=5000, eval_examples=0),
    # the paper's language model (Table 1, section 5.2): needs a GPU
    "paper": dict(n_layer=12, n_head=8, n_embd=256, n_hidden=1024, seq_len=256, dropout=0.1,
                  weighter_dim=128, batch_size=128, big_batch_size=16384, specific_batch_size=128,
                  max_steps=300_000, warmup=1000, eval_interval=5000, eval_examples=0),
}
METHODS = ("baseline", "mixing", "specific", "dds", "soba", "anograd")
SPARSE = ("dds", "soba", "anograd")   # Algorithm 1 with a learned weighting network
# settings a resumed run may change without changing what it computes
RESUMABLE = {"resume", "device", "out_dir"}
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
              "n_embd", "n_hidden", "eval_interval", "eval_batch_size", "weighter_dim", "outer_every"):
        if cfg[k] <= 0:
            raise ConfigError(f"--{k}: must be positive, got {cfg[k]}")
    for k in ("max_steps", "finetune_steps", "eval_examples"):
        if cfg[k] < 0:
            raise ConfigError(f"--{k}: must be non-negative, got {cfg[k]}")
    if cfg["method"] in SPARSE and cfg["batch_size"] > cfg["big_batch_size"]:
        raise ConfigError(f"--batch_size: {cfg['batch_size']} is larger than --big_batch_size={cfg['big_batch_size']}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"--n_embd: {cfg['n_embd']} is not a multiple of --n_head={cfg['n_head']}")
    if cfg["filter"] not in ("importance", "without_replacement", "top"):
        raise ConfigError(f"--filter: unknown filter {cfg['filter']!r}")
    if cfg["soba_v_optim"] not in ("adam", "sgd"):
        raise ConfigError(f"--soba_v_optim: expected adam or sgd, got {cfg['soba_v_optim']!r}")
    if cfg["doc_mode"] not in ("chunk", "first"):
        raise ConfigError(f"--doc_mode: expected chunk or first, got {cfg['doc_mode']!r}")


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
    for s in specifics:
        if len(s.train) < cfg["specific_batch_size"] or len(s.valid) == 0 or len(s.test) == 0:
            raise ConfigError(f"--specific: {s.name} has {len(s.train)} training examples (fewer than "
                              f"--specific_batch_size={cfg['specific_batch_size']}) or an empty valid/test split")
    if len(g.train) < cfg["big_batch_size"] and cfg["method"] in SPARSE:
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
    for i in range(0, len(examples), ctx.cfg["eval_batch_size"]):
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


def main_update(ctx, x=None, grads=None, specific_x=None):
    """One AdamW step on θ: on the uniform mean loss of x, or along precomputed grads; mixing adds
    a specific batch with weight 1 − generic_weight. Returns the (generic) training loss."""
    ctx.opt.zero_grad(set_to_none=True)
    if grads is not None:
        for k, p in ctx.model.named_parameters():
            p.grad = grads[k].to(p.dtype)
        loss = torch.tensor(ctx.last_loss)
    else:
        with ctx.autocast():
            loss = ctx.model(x).float().mean()
            total = loss if specific_x is None else (ctx.cfg["generic_weight"] * loss + (1 - ctx.cfg["generic_weight"])
                                                     * ctx.model(specific_x).float().mean())
        total.backward()
    if ctx.cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.cfg["grad_clip"])
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
        step_fn = bilevel.dds_step if cfg["method"] == "dds" else bilevel.anograd_step
        out = step_fn(model, weighter, x_R, x_spec, cfg["rho"]) if cfg["method"] == "dds" else step_fn(model, weighter, x_R, x_spec)
        ctx.meta_opt.step()
        ctx.stats["outer_loss"] = out.item()
    s_B = score(weighter, x_B)                                             # (|B|,) s(x; α)
    S = filter_batch(s_B, cfg["batch_size"], cfg["filter"], ctx.gen)        # (b,) filter(B, α, b)
    x_S = x_B[S]
    if cfg["method"] == "soba" and outer:
        # SOBA's outer step shares its forward/backward on S with the main update (see bilevel.py)
        d_v, grads, losses = bilevel.soba_step(model, weighter, x_S, specific_batch(ctx), ctx.v)
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
    return st


def save_checkpoint(ctx, step):
    atomic_write(os.path.join(ctx.cfg["out_dir"], "ckpt.pt"), lambda p: torch.save(state_dict(ctx, step), p))


def load_checkpoint(ctx):
    path = os.path.join(ctx.cfg["out_dir"], "ckpt.pt")
    if not os.path.exists(path):
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
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
    ctx.counts, ctx.seen, ctx.train_time, ctx.best, ctx.last_eval = (
        st["counts"], st["seen"], st["train_time"], st["best"], st["last_eval"])
    return st["step"]


# -----------------------------------------------------------------------------------------------
# setup, logging, the loop

def setup(cfg):
    torch.manual_seed(cfg["seed"])
    torch.set_flush_denormal(True)    # denormal floats make the CPU's double backward ~20% slower
    dev = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    generic_c, specifics, info = load_data(cfg)
    ctx = SimpleNamespace(cfg=cfg, device=dev, generic=generic_c, specifics=specifics, info=info,
                          specific_names=[s.name if len(specifics) > 1 else "specific" for s in specifics])
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
    rec.update({k: v for k, v in ctx.stats.items()})
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
    stop = {"sig": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.update(sig=s))
    total = cfg["max_steps"] + cfg["finetune_steps"]
    ms_hist = []
    bar = tqdm(range(start, total), initial=start, total=total, desc=cfg["method"], dynamic_ncols=True, leave=False, disable=None)
    step = start
    for step in bar:
        phase = "pretrain" if step < cfg["max_steps"] else "finetune"
        for group in ctx.opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        t0 = time.perf_counter()
        idx = (STEPS[cfg["method"]] if phase == "pretrain" else step_specific)(ctx, step)
        dt = time.perf_counter() - t0
        ctx.train_time += dt
        ctx.seen += cfg["batch_size"]
        if phase == "pretrain":
            ms_hist.append(dt * 1000)
        if idx is not None:
            for i in ctx.generic.train.source_id[idx].tolist():
                ctx.counts[i] += 1
        if not math.isfinite(ctx.last_loss):
            raise TrainingError(f"step {step}: training loss is {ctx.last_loss} (the last good checkpoint is kept)")
        bar.set_postfix(loss=f"{ctx.last_loss:.3f}")
        done = step + 1
        if done % cfg["eval_interval"] == 0 or done == cfg["max_steps"] or done == total:
            finish_eval(ctx, done, "pretrain" if done <= cfg["max_steps"] else "finetune", ms_hist)
        if stop["sig"] is not None:
            save_checkpoint(ctx, done)
            bar.close()
            print(f"stopped by signal {stop['sig']} after step {done}; checkpoint written, continue with --resume")
            return ctx, 128 + stop["sig"]
    bar.close()
    write_summary(ctx, total, ms_hist)
    return ctx, 0


def finish_eval(ctx, done, phase, ms_hist):
    rec = log_eval(ctx, done, phase)
    ms = sum(ms_hist[-ctx.cfg["eval_interval"]:]) / max(1, len(ms_hist[-ctx.cfg["eval_interval"]:]))
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
    for k in ("ess", "max_weight"):
        if k in pre:
            summary[k] = pre[k]
    if "source_share" in pre:
        summary["source_share"] = pre["source_share"]
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
        msg += (f". The target domain {target!r} was {verdict}: {100 * sh['share']:.0f}% of the examples the model "
                f"trained on over the last {ctx.cfg['eval_interval']} steps vs {100 * sh['base']:.0f}% of the generic "
                f"pool ({ratio:.1f}x)")
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
