"""
Train a byte-level language model on a large *generic* corpus for a small *specific* domain with the
online bilevel data selection of "Adaptive Training Distributions with Scalable Online Bilevel
Optimization" (Grangier, Ablin, Hannun), Algorithm 1, or one of the paper's baselines.

    python train.py                                   # Sparse SOBA, built-in corpus, 4-6 min on 2 CPU cores
    python train.py --preset=cpu --method=baseline --generic=DIR --specific=FILE --out_dir=out/base
    python train.py --help                            # every setting, its default and what it does

Every setting is a global in the config block below; `--key=value` overrides it (the value must parse
as the default's type) and `--preset=NAME` first applies one of the blocks in PRESETS.

Map of this file, in reading order:
    config block, PRESETS      every setting, with its default and one line on what it does
    setup                      data, θ and its optimiser; each method's setup adds its state (α, v, …)
    data parallel              torchrun: the same experiment for any number of processes
    the loop                   Algorithm 1's outer loop: one step, evaluation, checkpoint, signals
    Algorithm 1                step_sparse (B_generic^big → outer step → filter → inner step), the
                               outer updates outer_dds / outer_soba / outer_anograd, main_update (θ)
    the other methods          baseline, mixing, specific, ScaleBiO, CDS, the domain classifier,
                               LTR, Meta-Weight-Net, fixed weighters (section 6); METHODS lists all
    evaluation and outputs     log.jsonl, the progress line, summary.json
    checkpoints                what a checkpoint holds (ctx.state) and how it is saved and restored
    devices and processes      --device, peak memory, torchrun's process group and signals
    the run directory          what train.py writes in out_dir, --overwrite, --resume's log
    command line               --help, --key=value parsing, the setting rules, resume rules, main()

Algorithm 1 (section 4.2) as step_sparse runs it, one outer and one inner update per step:
    for t = 0 … max_steps − 1:
        B ← sample(D_generic, |B|)                   |B| = big_batch_size, i.i.d. uniform draws
        DDS, Anograd: α ← α − Adam(∇_α L_outer(α))    on R ⊂ B (|R| = b) and B_specific (Eq. 3)
        S ← filter(B, w(·; α), b)                    b = batch_size distinct rows of B drawn ∝ w
        SOBA: d_v, d_α on S and B_specific           α ← α − Adam(d_α), v ← v − η d_v (4.3.2)
        θ ← θ − AdamW(∇_θ (1/b) Σ_{x∈S} ℓ(x; θ))      uniform weights on the filtered batch
    then finetune_steps steps of θ on D_specific alone (the "+ fine-tune" rows of Table 2).
Every update's maths is in bilevel.py (one function each, with its equation); this file wires them.

Precision policy (the same for every method, so that step-cost ratios compare like with like): FP32
parameters and optimiser states; on CUDA every forward/backward pass of θ, first- and second-order,
runs under bf16 autocast with TF32 matmuls, losses reduced in FP32; on the CPU everything is FP32.
Random draws all come from CPU generators and are moved to the device, so a checkpoint resumes on
either device and, given the same scores, a seed selects the same examples on both.
"""

import copy
import datetime
import json
import math
import os
import re
import signal
import sys
import time
import resource
import shutil
import tempfile
from functools import partial
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import bilevel
import data
from data import atomic_write, read_checkpoint, write_json
from model import ByteLM
from weighter import (LossWeighter, Replay, Weighter, effective_sample_size, filter_batch, load_weighter,
                      save_snapshot, score, to_device)

# what diagnose.py and the tests may use: the rest of this file is free to change
__all__ = ["config_keys", "PRESETS", "METHODS", "ConfigError", "TrainingError", "parse_args", "cast", "setup",
           "train_step", "lr_at", "peak_mem_mb", "RESUMABLE"]

# ---- config: the built-in experiment, small enough for a 2-core CPU in a few minutes -----------------
# --- I/O
out_dir = "out"         # config.json, log.jsonl, summary.json, ckpt.pt and weighters/ go here
generic = ""            # corpus: file, directory, glob or comma list; "" = the built-in synthetic corpus
specific = ""           # idem; several specific sets separated by ";" = a multi-task outer loss (App. B)
specific_train_docs = 0  # keep a fixed random subset (by seed) of N specific training documents; 0 = all
doc_mode = "first"      # "first": a document's first seq_len bytes (the paper); "chunk": all its windows
data_cache = ""         # prepared copies of the corpora, mapped by runs: "" = ~/.cache/…; "off" = in RAM
data_workers = 0        # processes preparing a corpus's files; 0 = one a file, at most one a CPU
resume = False          # continue the run in out_dir (its saved settings; see --help for what may change)
overwrite = False       # replace a run in out_dir (removes only the files train.py writes there)
init_from = ""          # a run dir or its ckpt.pt: a new run whose θ starts there, with its settings (README)
allow_overlap = False   # train even if generic documents copy specific valid/test ones (contamination)
seed = 0                # every random stream (data draws, filter, init, dropout) derives from it
device = "auto"         # "auto" = cuda if available, else cpu; or cpu, cuda, cuda:N
compile = False         # torch.compile θ's first-order passes (CUDA; SOBA's double backward stays eager)
preset = ""             # "cpu" | "small" | "paper" | "scarce": see PRESETS
# --- method (METHODS below lists them all)
method = "soba"         # baseline | mixing | specific | dds | soba | anograd | scalebio | cds | ... (below)
# --- main model θ (paper Table 1 is the "paper" preset)
n_layer = 2             # transformer blocks
n_head = 4              # attention heads
n_embd = 64             # residual dimension d
n_hidden = 256          # feed-forward latent dimension
seq_len = 128           # bytes per example (the model's context)
dropout = 0.0           # dropout of θ (paper: 0.1)
# --- weighting network α (reference: embedding and one causal conv of width 128, kernel 7)
weighter_dim = 32       # latent width of α's embedding and convolution (reference: 128)
weighter_kernel = 7     # width of α's causal convolution
weighter_init = "default"  # "default": PyTorch's; "reference": the authors' (Xavier conv, LeCun head, 0 bias)
# --- optimisation of θ: AdamW(0.9, 0.98, eps 1e-9), linear warm-up then lr·√(warmup/step) (reference)
max_steps = 600         # pretraining steps
finetune_steps = 0      # then this many steps on the specific training set ("+ fine-tune" rows)
finetune_lr = 0.0       # 0: fine-tuning continues θ's lr schedule and AdamW; > 0: a fresh AdamW, this lr
batch_size = 32         # b: examples the main model trains on per step
big_batch_size = 512    # |B_generic^big|: examples the weighter scores per step (paper: 128·b)
specific_batch_size = 32  # |B_specific| for the outer losses
lr = 2e-3               # peak learning rate of θ
warmup = 100            # linear warm-up steps
weight_decay = 0.0      # AdamW weight decay of θ (reference: 0)
grad_clip = 0.0         # 0 = off (reference: off)
# --- optimisation of α and the bilevel updates
meta_lr = 1e-3          # Adam on α (reference: 1e-3, constant)
rho = 0.1               # DDS look-ahead step ρ (reference: 0.1)
soba_v_optim = "adam"   # "adam": Adam on v at the main lr (reference code); "sgd": v ← v − η d_v (paper)
soba_v_lr = 0.0         # η for v; 0 = the main model's lr schedule
soba_chunks = 1         # SOBA's second-order pass in this many micro-batches: same numbers, less memory
soba_dalpha_v = "t"     # d_α from v_t (the pass of d_v) or "t+1", v updated first (reference; one more pass)
hvp = "exact"           # SOBA's H v: "exact" (double backward) or "finite_difference" (2 FP32 gradients)
filter = "without_replacement"  # importance | without_replacement | top (paper Table 7)
outer_every = 1         # run the outer update every k steps (1 = every step, the paper)
# --- baselines
generic_weight = 0.9    # mixing: g = 0.9 g_generic + 0.1 g_specific (reference)
cds_pretrain_steps = 0  # CDS phase (i): uniform steps before scoring, within max_steps; 0 = max_steps // 4
cds_finetune_steps = 100  # CDS phase (ii): steps fine-tuning a copy of θ on the specific set
# --- ScaleBiO: min_{p,w} max_u L1(w) + α·[L2(w, λ) − L2(u, λ)], λ = softmax(p) (bilevel.py)
scalebio_alpha = 10.0   # α: the penalty weight (NOT the weighting network's α); authors: 10 to 100
scalebio_lr_p = 1e-2    # AdamW lr of the source logits p, scaled by the main lr schedule like u and w
scalebio_weight_decay = 5e-4  # AdamW weight decay of u and w (the authors' value)
lisa = False            # randomized block coordinate descent for u and w (LISA-style)
lisa_interval = 20      # resample the active blocks every this many steps
lisa_layers = 2         # active transformer blocks (embeddings, final norm and head always train)
noise_sources = 0       # denoising: K sources, source k corrupted with prob min(1, 2k/K); 0 = off
# --- section 6: Algorithm 1's filter with a weighting network α trained by another run
weighter_ckpt = ""      # frozen: a run dir, its ckpt.pt or a weighters/step_N.pt whose α stays fixed
weighter_trajectory = ""  # shuffled: a run dir whose saved α_t are replayed in a random order σ
save_weighter_every = 0  # save α to out_dir/weighters/step_N.pt every k steps; 0 = every eval; <0 = never
# --- evaluation
eval_interval = 100     # evaluate, log and checkpoint every this many steps
eval_examples = 2000    # evaluate on (a fixed subset of) this many examples per set; 0 = all
eval_batch_size = 256   # rows per forward pass in evaluation (no effect on the numbers)
# ---- end of config --------------------------------------------------------------------------------
# the range of each numeric setting, checked by check() before anything is read or written (--help prints
# it): an interval, a square bracket including its end. lr > 0: p's schedule divides by it; a learning
# rate of 0 elsewhere (meta_lr, scalebio_lr_p, soba_v_lr: the main schedule) is allowed. inf is refused
RULES = {"(0, inf)": "batch_size big_batch_size specific_batch_size seq_len n_layer n_head n_embd n_hidden "
                     "lr rho eval_interval eval_batch_size weighter_dim outer_every soba_chunks "
                     "lisa_interval cds_finetune_steps scalebio_alpha", "[0, 1)": "dropout",
         "[0, inf)": "max_steps finetune_steps eval_examples specific_train_docs cds_pretrain_steps meta_lr "
                     "scalebio_lr_p weight_decay scalebio_weight_decay grad_clip soba_v_lr finetune_lr "
                     "data_workers", "[1, inf)": "warmup weighter_kernel", "[0, 1]": "generic_weight"}
PRESETS = {
    # a meaningful real-corpus experiment in minutes on a 2-core CPU. outer_every=3 departs from the
    # paper (one outer step per inner step): on a CPU one outer step costs ~5 main steps, so it runs on
    # every 3rd step, for < 3x the baseline's step cost. soba_chunks=4: 0.3x the memory, same speed.
    "cpu": dict(n_layer=2, n_head=4, n_embd=64, n_hidden=256, seq_len=128, dropout=0.0,
                weighter_dim=32, batch_size=32, big_batch_size=512, specific_batch_size=32,
                max_steps=600, warmup=200, eval_interval=150, eval_examples=2000, outer_every=3,
                soba_chunks=4),
    # the paper's small model (Table 9), for the transfer study of section 6.4
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_hidden=512, seq_len=256, dropout=0.1,
                  weighter_dim=128, batch_size=128, big_batch_size=16384, specific_batch_size=128,
                  max_steps=300_000, warmup=1000, eval_interval=5000, eval_examples=0),
    # the paper's language model (Table 1, section 5.2): needs a GPU. SOBA's second-order pass in 2
    # micro-batches: the same numbers at half the memory
    "paper": dict(n_layer=12, n_head=8, n_embd=256, n_hidden=1024, seq_len=256, dropout=0.1,
                  weighter_dim=128, batch_size=128, big_batch_size=16384, specific_batch_size=128,
                  max_steps=300_000, warmup=1000, eval_interval=5000, eval_examples=0, soba_chunks=2),
}
# the paper's regime at CPU scale (README, "Table 2 in the paper's regime"): every 128-byte window of the
# generic corpus (388k examples for the 96k drawn: seed 0 draws 85k distinct), 30 specific training documents
# (specific-only training overfits them by step ~900), 3000 steps and 600 of fine-tuning; meta_lr 3e-3: the
# lowest final specific VALID loss of SOBA over 1e-4, 3e-4, 1e-3, 3e-3, on seeds 0 and 1 (README)
PRESETS["scarce"] = dict(PRESETS["cpu"], max_steps=3000, finetune_steps=600, eval_interval=100,
                         eval_examples=1000, doc_mode="chunk", specific_train_docs=30, meta_lr=3e-3)
config_keys = [k for k, v in globals().items() if k[0] != "_" and type(v) in (int, float, bool, str)]


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss or gradient): str(e) is one line naming the step."""


# ---------------------------------------------------------------------------------------------------
# setup: ctx holds the data, θ and its optimiser, the random streams, and what the method adds (its
# own setup function in METHODS); ctx.state lists what a checkpoint holds

def setup(cfg):
    """Everything a run needs, in ctx: the corpora (examples resident on the device), θ and its AdamW,
    the samplers and generators, then the method's own state (α, v, u, p, …: METHODS[method].setup).
    The order of the random draws (θ's init, then α's) is part of what makes a seed reproduce a run."""
    torch.manual_seed(cfg["seed"])
    torch.set_flush_denormal(True)    # denormal floats make the CPU's double backward ~20% slower
    rank, world, dev = init_ranks(cfg)
    method = METHODS[cfg["method"]]
    # B is drawn i.i.d. uniformly with replacement (Algorithm 1): a pool smaller than |B| only warns
    pool = cfg["big_batch_size"] if method.selects else cfg["batch_size"]
    g, specifics, info = data.load_data(cfg, pool)
    ctx = SimpleNamespace(cfg=cfg, device=dev, rank=rank, world=world, generic=g, specifics=specifics,
                          info=info, specific_names=data.set_names(specifics), step=0, stats={},
                          b=cfg["batch_size"] // world,       # b: this rank's share of the batch
                          ranks=bilevel.Ranks(rank, world) if world > 1 else bilevel.ONE)
    ctx.cuda = cuda = torch.device(dev).type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda    # TF32 on CUDA
    # the precision policy of the module docstring: bf16 autocast around every pass of θ on CUDA
    # (first and second order alike), nothing on the CPU; parameters and optimiser states stay FP32
    ctx.autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=cuda)
    # the examples live on the device; batches are indexed there (the indices come from CPU draws). On the
    # CPU, .to is a no-op: a prepared pool stays a memory map, its rows read as drawn (CDS's scoring and
    # --noise_sources read them all)
    ctx.x_train, ctx.source_train = g.train.x.to(dev), g.train.source_id.to(dev)   # (N, T), (N,)
    ctx.specific_x = [s.train.x.to(dev) for s in specifics]                        # [(N_s, T)]
    ctx.eval_sets = data.eval_sets(g, specifics, ctx.specific_names, cfg["eval_examples"], dev)
    ctx.model = ByteLM.from_config(cfg).to(dev)
    # ScaleBiO's w (= θ) takes its authors' weight decay; fused AdamW on CUDA
    wd = cfg["scalebio_weight_decay"] if cfg["method"] == "scalebio" else cfg["weight_decay"]
    ctx.opt = adamw(ctx.model.parameters(), cfg["lr"], wd, dev)
    ctx.state = {"model": ctx.model, "opt": ctx.opt}
    # what a method without state of its own keeps None (source_share reads p, the loop meta_opt)
    ctx.weighter = ctx.meta_opt = ctx.v = ctx.v_opt = ctx.p = None
    if method.setup is not None:
        method.setup(ctx)
    if cfg["compile"]:
        ctx.model.compile()          # in place: the same module, the same state_dict keys
    ctx.generic_sampler = data.Sampler(len(g.train), cfg["seed"] + 1)
    ctx.specific_samplers = [data.Sampler(len(s.train), cfg["seed"] + 2 + i) for i, s in enumerate(specifics)]
    # the filter's and the task draws (CPU): the same stream on every torchrun rank (a shared choice)
    ctx.gen = torch.Generator().manual_seed(cfg["seed"] + 100)
    if rank > 0:        # torchrun: each rank its own dropout stream (rank 0's is a plain run's)
        torch.manual_seed(cfg["seed"] + 1000 * rank)
    # per source, the examples trained on since the last evaluation (a device tensor: no sync per step)
    ctx.counts = torch.zeros(len(g.sources), dtype=torch.float64, device=dev)
    ctx.progress = dict(seen=0, train_time=0.0, best=None, last_eval={})
    ctx.state.update(generic_sampler=ctx.generic_sampler, specific_samplers=Samplers(ctx.specific_samplers),
                     gen=Stateful(ctx.gen.get_state, ctx.gen.set_state),      # the filter's draws
                     torch_rng=Stateful(torch.get_rng_state, torch.set_rng_state),   # dropout
                     counts=InPlace(ctx.counts),              # source counts
                     progress=Stateful(ctx.progress.copy, partial(restore, ctx.progress)))   # examples, …
    if cuda:
        ctx.state["cuda_rng"] = Stateful(torch.cuda.get_rng_state, torch.cuda.set_rng_state)
    return ctx


def adamw(params, lr, wd, dev):
    """AdamW with the reference code's β = (0.9, 0.98), ε = 1e-9; the fused kernel on CUDA."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=wd,
                             fused=torch.device(dev).type == "cuda" or None)


def lr_at(step, cfg):
    """The learning rate of θ at a step (v, u and p follow it too)."""
    # --finetune_lr: the authors' fine-tuning, at a constant rate (no warm-up, no decay)
    if step >= cfg["max_steps"] and cfg["finetune_lr"] > 0:
        return cfg["finetune_lr"]
    # reference schedule: η_t = lr · min(t / warmup, √(warmup / t)) with t = step + 1: a linear
    # warm-up to lr, then an inverse-square-root decay
    return cfg["lr"] * min((step + 1) / cfg["warmup"], math.sqrt(cfg["warmup"] / (step + 1)))


# --- the methods' own state, built by METHODS[method].setup and registered in ctx.state where it is made

def setup_alpha(ctx, network=None):
    """α: the weighting network w(x; α) and its Adam, saved in checkpoints. The domain classifier uses
    "the same architecture as the weighting model" (section 5.1); Meta-Weight-Net passes its network
    class, LossWeighter: mlp(ℓ(x; θ); α), 100 hidden units."""
    cfg = ctx.cfg
    network = network or partial(Weighter, cfg["weighter_dim"], cfg["weighter_kernel"],
                                 init=cfg["weighter_init"])
    ctx.weighter = network().to(ctx.device)
    ctx.meta_opt = torch.optim.Adam(ctx.weighter.parameters(), lr=cfg["meta_lr"], fused=ctx.cuda or None)
    ctx.state.update(weighter=ctx.weighter, meta_opt=ctx.meta_opt)


def setup_soba(ctx):
    """α, then SOBA's v: same shape as θ, zeros at the start, never reset (reference code), and its Adam."""
    setup_alpha(ctx)
    ctx.v = {k: torch.zeros_like(p, requires_grad=True) for k, p in ctx.model.named_parameters()}
    ctx.v_opt = adamw(list(ctx.v.values()), ctx.cfg["lr"], 0.0, ctx.device)    # Adam: no weight decay
    ctx.state.update(v=InPlace(ctx.v), v_opt=ctx.v_opt)


def setup_frozen(ctx):
    """Section 6: α read from another run, never stepped (no optimiser); saved like any run's α."""
    ctx.weighter = load_weighter(ctx.cfg["weighter_ckpt"])[0].to(ctx.device)
    ctx.state["weighter"] = ctx.weighter


def setup_shuffled(ctx):
    """Section 6.1: the α_t another run saved, replayed in a random order σ (by seed)."""
    ctx.replay = Replay(ctx.cfg["weighter_trajectory"], ctx.cfg["seed"] + 200)
    ctx.weighter = load_weighter(ctx.replay.files[0], "--weighter_trajectory")[0].to(ctx.device)
    ctx.state["weighter"] = ctx.weighter


def setup_cds(ctx):
    """CDS's Δ(x) for every generic example (and its timings), empty until phase (iii) computes it."""
    ctx.cds = {}
    ctx.state["cds"] = Stateful(ctx.cds.copy, partial(restore, ctx.cds, device=ctx.device))


# --- data parallel (torchrun --nproc_per_node=N): the same experiment for any N. batch_size,
# big_batch_size and specific_batch_size are global and must be divisible by N. Every rank draws the
# same global batches (shared samplers) and holds rows r, r + N, r + 2N, … of each (`shard`, `mine`;
# with N = 1 nothing changes, and R = the first b rows of B is then the first b/N rows of each rank's).
# Each rank scores its rows of B; the |B| scores are gathered and every rank runs the same filter with
# the same generator (ctx.gen), then trains on its rows of S. The outer updates are exact: the softmax
# w(x; α) is normalised over the whole batch, the weighted gradients and the specific ones that enter
# a look-ahead or a cosine are reduced over the ranks inside bilevel.py (`ranks`: bilevel.Ranks, or
# bilevel.ONE in one process; exactness costs DDS and Anograd two θ-sized all-reduces a step), LTR's
# normaliser and ScaleBiO's per-source counts are summed. One explicit all_reduce per optimiser step
# (DistributedDataParallel averages neither torch.autograd.grad nor a create_graph backward): a mean
# for a mean loss, a sum for a rank's part of a sum (α in Algorithm 1, LTR's θ, ScaleBiO's u and w).
# tests/test_ddp_invariance.py: 2 ranks and 1 process agree to rounding for all 13 methods. Rank 0
# alone evaluates, logs and writes; checkpoints hold every rank's dropout stream and counts
# (RANK_LOCAL), so a run resumes exactly under the same N only.

def shard(ctx, idx):
    """This rank's rows of a batch drawn whole: (n,) → (n / N,) (rows rank, rank + N, …), on the device."""
    return to_device(ctx.ranks.mine(idx), ctx.device)


def step_alpha(ctx, mean=False):
    """α ← α − Adam(∇_α). torchrun: α's gradient SUMMED over the ranks, each rank's being its part of
    Σ_x c(x) ∇_α w(x; α) with w normalised over the whole batch; averaged (mean) for a mean loss."""
    ctx.ranks.reduce_(grads_of(ctx.weighter), mean)
    ctx.meta_opt.step()


# ---------------------------------------------------------------------------------------------------
# the loop: Algorithm 1's "for t = 1 … T", then fine-tuning; evaluation and checkpoints on the way

class Step(NamedTuple):
    """What a step function returns to the loop."""
    loss: torch.Tensor              # 0-dim: the step's training loss (read at the next evaluation)
    idx: torch.Tensor = None        # (b,) indices into generic train of what θ trained on, or None


def train_loop(ctx, start, stop):
    """Steps start … max_steps + finetune_steps − 1. Every eval_interval steps (and at the end of each
    phase): evaluate, log, checkpoint. stop["sig"] is set by SIGINT / SIGTERM: the step in progress
    finishes, a checkpoint is written and the run exits with 128 + the signal (130 for Ctrl-C).
    Returns the exit status."""
    cfg = ctx.cfg
    total = cfg["max_steps"] + cfg["finetune_steps"]
    ms = []     # step times in ms (the progress line averages the last eval_interval)
    bar = tqdm(range(start, total), initial=start, total=total, desc=cfg["method"], dynamic_ncols=True,
               leave=False, disable=None if ctx.rank == 0 else True)
    if cfg["max_steps"] == 0 and not cfg["resume"]:     # no pretraining (--init_from): θ as it starts
        finish_eval(ctx, 0, "pretrain", ms, None)
    for step in bar:
        t0 = time.perf_counter()
        out = train_step(ctx, step)
        ms.append(1000 * (time.perf_counter() - t0))
        p = ctx.progress      # what the run has done so far (saved in the checkpoint)
        p["train_time"], p["seen"] = p["train_time"] + ms[-1] / 1000, p["seen"] + cfg["batch_size"]
        if step < cfg["max_steps"]:
            p["pretrain_ms"] = p.get("pretrain_ms", 0.0) + ms[-1]        # for summary.json's ms_per_step
        # the sources of the examples θ trained on, counted on the device: sums of 1.0, exact in float64
        # (index_add_, not bincount, whose CUDA kernel reads the indices' range back to the host)
        if out.idx is not None:
            ctx.counts.index_add_(0, ctx.source_train[out.idx], torch.ones_like(out.idx, dtype=torch.float64))
        done = step + 1
        # α_t for `shuffled` replays (section 6.1), when this run trains α (it has α's optimiser)
        if ctx.meta_opt is not None and ctx.rank == 0 and snapshot_due(done, cfg):
            save_snapshot(ctx.weighter, done, cfg)
        if done % cfg["eval_interval"] == 0 or done in (cfg["max_steps"], total):
            finish_eval(ctx, done, "pretrain" if done <= cfg["max_steps"] else "finetune", ms, out.loss)
        # torchrun: the largest signal over the ranks. stop["sig"] is only read here, never reset: a handler
        # that runs while the ranks agree (inside any_rank) is seen at the next step, not overwritten.
        sig = any_rank(stop["sig"] or 0, ctx.device)
        if sig:     # Ctrl-C / SIGTERM: the step is done, checkpoint and exit
            save_checkpoint(ctx, done)
            bar.close()
            launch = f"torchrun --standalone --nproc_per_node={ctx.world}" if ctx.world > 1 else "python"
            print(f"stopped after step {done}; continue: {launch} train.py --resume "
                  f"--out_dir={cfg['out_dir']}")
            return 128 + sig
    bar.close()
    if ctx.rank == 0:
        write_summary(ctx)
    return 0


def train_step(ctx, step):
    """One training step at `step`: the method's step while pretraining, then fine-tuning's, at lr_at(step).
    Returns the step function's Step(loss, idx)."""
    if step == ctx.cfg["max_steps"]:    # fine-tuning starts: the method's own statistics (ess, …) stop here
        ctx.stats.clear()
        if ctx.cfg["finetune_lr"] > 0:
            # the authors' fine-tuning starts a fresh AdamW: no moments, its step count at 0
            ctx.opt.state.clear()
    for group in ctx.opt.param_groups:
        group["lr"] = lr_at(step, ctx.cfg)
    ctx.step = step
    if step < ctx.cfg["max_steps"]:
        return METHODS[ctx.cfg["method"]].step(ctx, step)
    return step_specific(ctx, step)


def snapshot_due(step, cfg):
    """Whether α_step is saved: every save_weighter_every steps of pretraining (0: at every evaluation and
    at its end; < 0: never)."""
    every = cfg["save_weighter_every"]
    if every < 0 or step > cfg["max_steps"]:
        return False
    if every > 0:
        return step % every == 0
    return step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]


# ---------------------------------------------------------------------------------------------------
# Algorithm 1 (section 4.2): one step of sparse online bilevel training

def step_sparse(ctx, step, outer_on_R=None, outer_on_S=None):
    """B_generic^big ~ uniform; the outer step on α; S = filter(B, α, b); the inner step on θ on S.

    The order follows the reference code. DDS and Anograd (`outer_on_R`) take their outer step on R (a
    uniform b-subset of B) with the current θ, then filter with the updated α_{t+1}. SOBA (`outer_on_S`)
    filters with α_t first and takes its outer step on S: its Hessian term and d_α are on the very
    batch θ trains on, and one forward/backward on S serves both SOBA's update and the main update.
    `frozen` and `shuffled` (section 6) run the same step with α trained elsewhere and no outer step."""
    cfg, b = ctx.cfg, ctx.b
    # B_generic^big: |B| i.i.d. uniform draws from D_generic (CPU generator, indices moved)
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    x_mine = ctx.ranks.mine(x_B)             # (|B|/N, T) torchrun: this rank's rows of B (all of B: N = 1)
    due = step % cfg["outer_every"] == 0
    if outer_on_R is not None and due:
        # R = the first b rows of B: B is i.i.d. uniform, so they are a uniform b-subset (torchrun:
        # this rank's rows of R are the first b/N of its rows of B)
        ctx.stats["outer_loss"] = outer_on_R(ctx, x_mine[:b], specific_batch(ctx)).detach()  # α_{t+1}
    # s(x; α) for all of B (each rank scores its rows), then filter(B, α, b): b indices into B drawn
    # ∝ w (Table 7's filters) from the stream every rank shares; each rank trains on its rows of S
    s_B = ctx.ranks.rows(score(ctx.weighter, x_mine))                          # (|B|,)
    S = ctx.ranks.mine(filter_batch(s_B, cfg["batch_size"], cfg["filter"], ctx.gen))   # (b/N,)
    x_S = x_B[S]                                                               # (b/N, T)
    if outer_on_S is not None and due:
        # θ_{t+1} along the gradient of the UNIFORM mean loss of S that the outer update computed
        loss, grads = outer_on_S(ctx, x_S, specific_batch(ctx), step)
        ctx.opt.zero_grad(set_to_none=True)
        for k, p in ctx.model.named_parameters():
            p.grad = grads[k].to(p.dtype)
        step_along_grads(ctx, ctx.model, ctx.opt)
    else:
        # θ_{t+1}: one step on the UNIFORM mean loss of S
        loss = main_update(ctx, x_S)
    # w(x; α) = softmax_B s(x; α): how concentrated the sampling distribution over B is
    weight_stats(ctx, torch.softmax(s_B, 0))
    return Step(loss, idx_B[S])


def outer_dds(ctx, x_R, x_specific):
    """DDS (Eq. 3): α ← α − Adam(∇_α L_specific(θ − ρ ∇_θ Σ_R w ℓ)). Returns the outer loss."""
    ctx.meta_opt.zero_grad(set_to_none=True)
    with ctx.autocast():
        out = bilevel.dds_step(ctx.model, ctx.weighter, x_R, x_specific, ctx.cfg["rho"], ranks=ctx.ranks)
    step_alpha(ctx)
    return out


def outer_anograd(ctx, x_R, x_specific):
    """Anograd (4.3.3): α ← α − Adam(∇_α −cos(∇L_specific, ∇ Σ_R w ℓ)). Returns the outer loss."""
    ctx.meta_opt.zero_grad(set_to_none=True)
    with ctx.autocast():
        out = bilevel.anograd_step(ctx.model, ctx.weighter, x_R, x_specific, ctx.ranks)
    step_alpha(ctx)
    return out


def outer_soba(ctx, x_S, x_specific, step):
    """SOBA (section 4.3.2) on S: α_{t+1} = α_t − Adam(d_α), v_{t+1} from d_v. Returns the uniform mean
    loss of S and its gradient ∇_θ, which the same pass computed (θ then steps along it)."""
    ctx.meta_opt.zero_grad(set_to_none=True)
    with ctx.autocast():
        d_v, grads, losses = bilevel.soba_step(ctx.model, ctx.weighter, x_S, x_specific, ctx.v,
                                               ctx.cfg["soba_chunks"], ctx.ranks, ctx.cfg["hvp"])
    # v_{t+1} from d_v (the order of v's and α's steps does not change them: each has its own gradient)
    soba_v_update(ctx, d_v, step)
    if ctx.cfg["soba_dalpha_v"] == "t+1":
        # the reference code's order: d_α from v_{t+1} (replacing soba_step's, from v_t): one more pass on S
        with ctx.autocast():
            bilevel.soba_alpha_grad(ctx.model, ctx.weighter, x_S, ctx.v, ctx.ranks)
    step_alpha(ctx)
    return losses.mean().detach(), grads


def step_shuffled(ctx, step):
    """Section 6.1: α_{t_σ(j)} in segment j of the run, then Algorithm 1's step with no outer update."""
    ctx.replay.load(ctx.weighter, step, ctx.cfg["max_steps"])
    return step_sparse(ctx, step)


def weight_stats(ctx, w):
    """ESS = (Σ w)² / Σ w² (|B| when uniform, 1 when one-hot) and max w of the weights w: (|B|,)."""
    ctx.stats["ess"], ctx.stats["max_weight"] = effective_sample_size(w), w.max().detach()


def main_update(ctx, x):
    """The inner update of Algorithm 1 on the uniform mean loss of x (b, T):
    θ ← θ − AdamW(∇_θ (1/b) Σ_{x∈S} ℓ(x; θ)). Returns the loss (0-dim)."""
    with ctx.autocast():
        loss = ctx.model(x).float().mean()                                     # (b,) ℓ(x; θ) → mean
    update_theta(ctx, loss)
    return loss.detach()


def update_theta(ctx, loss, model=None, opt=None, mean=True):
    """θ ← θ − AdamW(∇_θ loss): one step of θ (or of model, CDS's copy θ_ft, with its optimiser).
    torchrun: loss is a mean over this rank's rows (mean=True) or its part of a sum (False)."""
    model, opt = model or ctx.model, opt or ctx.opt
    opt.zero_grad(set_to_none=True)
    loss.backward()
    step_along_grads(ctx, model, opt, mean)


def step_along_grads(ctx, model, opt, mean=True):
    """One AdamW step of model along the gradients in its .grad (averaged, or summed, over the ranks)."""
    # torchrun: ∇_θ of the whole batch's loss on every rank
    ctx.ranks.reduce_(grads_of(model), mean)
    # ‖∇_θ‖ (clipped to grad_clip when set), checked before the step so θ never takes a NaN update:
    # the step's one host synchronisation
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.cfg["grad_clip"] or float("inf"))
    if not torch.isfinite(norm):
        raise TrainingError(f"step {ctx.step}: the gradient of θ is {norm.item()} (the last good "
                            "checkpoint is kept)")
    ctx.stats["grad_norm"] = norm
    # AdamW: m ← β1 m + (1 − β1) g, s ← β2 s + (1 − β2) g², θ ← θ − η_t (m̂ / (√ŝ + ε) + λ θ)
    opt.step()


def soba_v_update(ctx, d_v, step):
    """SOBA's linear-system variable v (section 4.3.2)."""
    eta = ctx.cfg["soba_v_lr"] or lr_at(step, ctx.cfg)
    ctx.ranks.mean_(list(d_v.values()))          # torchrun: d_v averaged over the ranks
    if ctx.cfg["soba_v_optim"] == "sgd":
        # paper: v ← v − η d_v (η d_v, then the subtraction, each for all of v's tensors in one call)
        with torch.no_grad():
            torch._foreach_sub_(list(ctx.v.values()), torch._foreach_mul([d_v[k] for k in ctx.v], eta))
        return
    # reference code: v ← v − Adam_η(d_v)
    ctx.v_opt.param_groups[0]["lr"] = eta
    for k, t in ctx.v.items():
        t.grad = d_v[k]
    ctx.v_opt.step()


def specific_batch(ctx):
    # (the draws come from each set's own Sampler: the specific stream does not depend on the method's
    # other draws, so B_specific is the same sequence for every method with the same seed)
    """B_specific: uniform draws from one specific set (chosen at random when there are several)."""
    k = int(torch.randint(len(ctx.specifics), (1,), generator=ctx.gen)) if len(ctx.specifics) > 1 else 0
    idx = shard(ctx, ctx.specific_samplers[k].sample(ctx.cfg["specific_batch_size"]))
    return ctx.specific_x[k][idx]                                              # (|B_specific|, T)


def big_batch(ctx):
    """B_generic^big: |B| uniform draws from generic train → (indices (|B|,), x (|B|, T)), the whole
    batch on every torchrun rank (each scores and trains on its own rows of it)."""
    idx_B = to_device(ctx.generic_sampler.sample(ctx.cfg["big_batch_size"]), ctx.device)
    return idx_B, ctx.x_train[idx_B]


# ---------------------------------------------------------------------------------------------------
# the other methods. Each step function returns Step(loss, idx), idx None when the batch is not a
# selection (specific, LTR, ScaleBiO)

def step_baseline(ctx, step):
    """Plain pretraining on uniform generic batches."""
    idx = shard(ctx, ctx.generic_sampler.sample(ctx.cfg["batch_size"]))
    return Step(main_update(ctx, ctx.x_train[idx]), idx)


def step_mixing(ctx, step):
    """Each step a uniform generic batch and a specific batch: g = 0.9 g_generic + 0.1 g_specific."""
    idx = shard(ctx, ctx.generic_sampler.sample(ctx.cfg["batch_size"]))
    x_specific, gw = specific_batch(ctx), ctx.cfg["generic_weight"]
    with ctx.autocast():
        loss = ctx.model(ctx.x_train[idx]).float().mean()                      # generic mean ℓ(x; θ)
        # g = generic_weight · g_generic + (1 − generic_weight) · g_specific
        total = gw * loss + (1 - gw) * ctx.model(x_specific).float().mean()
    update_theta(ctx, total)
    return Step(loss.detach(), idx)


def step_specific(ctx, step):
    """Training on the specific set only (also every method's fine-tuning phase)."""
    return Step(main_update(ctx, specific_batch(ctx)))


# --- ScaleBiO (bilevel.scalebio_step): source weights λ = softmax(p), the auxiliary model u, LISA.
# The main model w is ctx.model (the one evaluated and kept), its optimiser ctx.opt.

def setup_scalebio(ctx):
    """u (a copy of w at step 0), p = 0 (λ uniform), AdamW for u (weight decay scalebio_weight_decay)
    and p (no weight decay: it would pull λ back toward uniform); a LISA generator each for u and w."""
    cfg = ctx.cfg
    ctx.u = copy.deepcopy(ctx.model)
    ctx.p = torch.zeros(len(ctx.generic.sources), device=ctx.device, requires_grad=True)   # (K,) p
    ctx.u_opt = adamw(ctx.u.parameters(), cfg["lr"], cfg["scalebio_weight_decay"], ctx.device)
    ctx.p_opt = adamw([ctx.p], cfg["scalebio_lr_p"], 0.0, ctx.device)
    ctx.lisa_gen = {k: torch.Generator().manual_seed(cfg["seed"] + 200 + i) for i, k in enumerate("uw")}
    ctx.lisa_active = {k: list(range(cfg["n_layer"])) for k in "uw"}  # all blocks train until a draw
    ctx.state.update(u=ctx.u, p=InPlace(ctx.p), u_opt=ctx.u_opt, p_opt=ctx.p_opt,
                     lisa=Stateful(partial(lisa_state, ctx), partial(load_lisa_state, ctx)))


def step_scalebio(ctx, step):
    """One ScaleBiO step on a UNIFORM generic batch and a specific batch; the learned distribution is
    λ, logged at every evaluation."""
    cfg, lisa = ctx.cfg, (("u", ctx.u, ctx.u_opt), ("w", ctx.model, ctx.opt))
    if cfg["lisa"] and step % cfg["lisa_interval"] == 0:
        for k, model, opt in lisa:    # new active blocks for u and for w, the others frozen
            ctx.lisa_active[k] = bilevel.lisa_sample(cfg["n_layer"], cfg["lisa_layers"], ctx.lisa_gen[k])
            bilevel.lisa_freeze(model, ctx.lisa_active[k], opt)
    idx = shard(ctx, ctx.generic_sampler.sample(cfg["batch_size"]))       # (b,) uniform draws
    # w follows lr_at (set by the loop); u and p follow the same schedule, as the authors do
    ctx.u_opt.param_groups[0]["lr"] = lr_at(step, cfg)
    ctx.p_opt.param_groups[0]["lr"] = cfg["scalebio_lr_p"] * lr_at(step, cfg) / cfg["lr"]
    for opt in (ctx.opt, ctx.u_opt, ctx.p_opt):
        opt.zero_grad(set_to_none=True)
    with ctx.autocast():
        # min_{p,w} max_u L1(w) + α·[L2(w, λ) − L2(u, λ)]: the three gradients at the old (u, w, p)
        out = bilevel.scalebio_step(ctx.model, ctx.u, ctx.p, ctx.x_train[idx], ctx.source_train[idx],
                                    specific_batch(ctx), cfg["scalebio_alpha"], ctx.ranks)
    # torchrun: the ranks' gradients of w and u are parts of the batch's (summed); p's is the batch's
    ctx.ranks.sum_(grads_of(ctx.model, ctx.u))
    if cfg["grad_clip"] > 0:
        for model in (ctx.model, ctx.u):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    for opt in (ctx.opt, ctx.u_opt, ctx.p_opt):
        opt.step()
    if cfg["lisa"] and step + 1 == cfg["max_steps"]:
        # pretraining ends: w trains all its blocks again (fine-tuning is not LISA)
        ctx.lisa_active["w"] = list(range(cfg["n_layer"]))
        bilevel.lisa_freeze(ctx.model, ctx.lisa_active["w"])
    ctx.stats.update({f"scalebio_{k}": v for k, v in out.items() if k != "train_loss"})
    return Step(out["train_loss"])                                             # uniform mean ℓ(x; w)


# --- CDS, the domain classifier, LTR, Meta-Weight-Net (section 5.1; their maths is in bilevel.py).
# CDS, the classifier and MWN keep b examples of a uniform big batch B and train on them uniformly;
# LTR trains on a uniform batch of b with per-example weights.

def cds_pretrain(cfg):
    """The length of CDS phase (i), in steps (0 in the config = a quarter of max_steps)."""
    return cfg["cds_pretrain_steps"] or max(1, cfg["max_steps"] // 4)


def step_cds(ctx, step):
    """CDS inside one run: (i) uniform steps as the baseline; (ii) once, fine-tune a copy θ_ft on the
    specific data; (iii) Δ(x) = ℓ(x; θ_ft) − ℓ(x; θ) for every generic example; (iv) train θ on the
    greatest improvements. The paper restricts the generic set once; we keep the top-b of −Δ within
    each uniform B, as the reference code does: the same selected fraction b/|B|, drawn online."""
    if step < cds_pretrain(ctx.cfg):
        return step_baseline(ctx, step)
    if not ctx.cds:     # phases (ii) and (iii), timed: scoring is 2N forward passes of θ
        t0 = time.perf_counter()
        tuned = cds_finetuned_copy(ctx, step)
        t1 = time.perf_counter()
        with ctx.autocast():
            delta = bilevel.cds_delta(ctx.model, tuned, ctx.x_train, ctx.cfg["eval_batch_size"], ctx.device)
        t2 = time.perf_counter()
        ctx.cds.update(delta=delta, cds_finetune_s=t1 - t0, cds_score_s=t2 - t1,   # Δ: (N,)
                       cds_examples_per_s=2 * len(delta) / (t2 - t1))
    ctx.stats.update({k: v for k, v in ctx.cds.items() if k != "delta"})
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    # S = the top-b of −Δ(x) over B: the examples fine-tuning improved most (this rank's rows of S)
    S = ctx.ranks.mine(torch.topk(-ctx.cds["delta"][idx_B], ctx.cfg["batch_size"]).indices)
    return Step(main_update(ctx, x_B[S]), idx_B[S])


def cds_finetuned_copy(ctx, step):
    """CDS phase (ii): a copy θ_ft of θ trained cds_finetune_steps steps on specific batches, with a
    copy of θ's AdamW state and the lr schedule continuing from `step`; θ itself is left untouched."""
    cfg = ctx.cfg
    tuned = copy.deepcopy(ctx.model)
    opt = adamw(tuned.parameters(), cfg["lr"], cfg["weight_decay"], ctx.device)
    opt.load_state_dict(copy.deepcopy(ctx.opt.state_dict()))   # deep: AdamW updates moments in place
    for k in range(cfg["cds_finetune_steps"]):
        opt.param_groups[0]["lr"] = lr_at(step + k, cfg)
        with ctx.autocast():
            loss = tuned(specific_batch(ctx)).float().mean()                   # (b,) ℓ(x; θ_ft) → mean
        update_theta(ctx, loss, tuned, opt)
    return tuned


def step_classifier(ctx, step):
    """The domain classifier: one Adam step on a balanced batch (specific = 1, generic = 0), then the
    deterministic top-b of B by logit, trained on uniformly. The paper pretrains the classifier and
    then restricts the generic set; we train it online, one step per training step, as the reference."""
    cfg = ctx.cfg
    if step % cfg["outer_every"] == 0:
        x_g = ctx.x_train[shard(ctx, ctx.generic_sampler.sample(cfg["specific_batch_size"]))]
        ctx.meta_opt.zero_grad(set_to_none=True)
        # binary cross-entropy −[y log σ(s(x)) + (1 − y) log(1 − σ(s(x)))], y = 1 specific, 0 generic
        ctx.stats["classifier_bce"] = bilevel.classifier_step(ctx.weighter, x_g, specific_batch(ctx)).detach()
        step_alpha(ctx, mean=True)                  # the BCE is a mean: torchrun averages the ranks'
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    # S = the b examples of B the classifier finds most specific-like (deterministic; this rank's rows)
    s_B = ctx.ranks.rows(score(ctx.weighter, ctx.ranks.mine(x_B)))             # (|B|,) logits
    S = ctx.ranks.mine(filter_batch(s_B, cfg["batch_size"], "top"))            # (b/N,) of the top b
    return Step(main_update(ctx, x_B[S]), idx_B[S])


def step_ltr(ctx, step):
    """Learning to reweight (Ren et al. 2018): weights for a uniform batch of b from one look-ahead
    derivative (bilevel.ltr_weights), then one step of θ on Σ_i w_i ℓ(x_i; θ) (weighted, not filtered).
    With no weighting network, a weight needs the main model's forward AND backward at the example
    (section 5.1), so LTR weighs only the b examples it trains on. The source share logged for LTR is
    the weighted one (Σ_i b·w_i per source), counted here."""
    idx = shard(ctx, ctx.generic_sampler.sample(ctx.cfg["batch_size"]))    # (b,) uniform draws
    x = ctx.x_train[idx]                                                       # (b, T)
    # w_i ∝ max(−∂L_specific(θ − η Σ_j ε_j ∇ℓ_j)/∂ε_i, 0) at ε = 0, normalised to Σ w = 1
    with ctx.autocast():
        w, _ = bilevel.ltr_weights(ctx.model, x, specific_batch(ctx), lr_at(step, ctx.cfg), ctx.ranks)  # (b,)
        loss = (w.detach() * ctx.model(x).float()).sum()                      # Σ_i w_i ℓ(x_i; θ)
    update_theta(ctx, loss, mean=False)       # torchrun: each rank's loss is its part of the sum
    ctx.counts.index_add_(0, ctx.source_train[idx], (ctx.cfg["batch_size"] * w).detach().double())
    weight_stats(ctx, ctx.ranks.rows(w))
    return Step(loss.detach())


def step_mwn(ctx, step):
    """Algorithm 1 with Meta-Weight-Net's w(x; α) = softmax(mlp(ℓ(x; θ); α)): ℓ(x; θ) for all of B
    (the main model's forward on |B| rows: MWN's expensive part, where the byte CNN of the sparse methods
    costs a fraction of it), the DDS outer step on R = the first b rows of B, then the filter."""
    cfg, b = ctx.cfg, ctx.b
    idx_B, x_B = big_batch(ctx)                                                # (|B|,), (|B|, T)
    x_mine = ctx.ranks.mine(x_B)                                  # (|B|/N, T) torchrun: this rank's rows
    # in chunks of b rows (8b on CUDA, fewer launches): the logits take no more memory than the main step's
    with ctx.autocast():
        losses_mine = bilevel.losses_of(ctx.model, x_mine, 8 * b if ctx.cuda else b, ctx.device)   # (|B|/N,)
    if step % cfg["outer_every"] == 0:
        ctx.meta_opt.zero_grad(set_to_none=True)
        with ctx.autocast():     # θ's passes in bf16 on CUDA; the MLP of ℓ stays FP32 (LossWeighter)
            L = bilevel.mwn_step(ctx.model, ctx.weighter, x_mine[:b], losses_mine[:b], specific_batch(ctx),
                                 cfg["rho"], ctx.ranks)
        step_alpha(ctx)
        ctx.stats["outer_loss"] = L.detach()
    with torch.no_grad():
        s_B = ctx.ranks.rows(ctx.weighter(losses_mine).float())                # (|B|,) scores
    S = ctx.ranks.mine(filter_batch(s_B, cfg["batch_size"], cfg["filter"], ctx.gen))   # (b/N,)
    loss = main_update(ctx, x_B[S])
    weight_stats(ctx, torch.softmax(s_B, 0))                               # w(x; α) = softmax_B s(x; α)
    return Step(loss, idx_B[S])


# --- fixed weighting networks (section 6). `frozen` (6.1 "final weighting", 6.4 "weights from small"):
# Algorithm 1 with α fixed to the weighting network of another run, whose main model may differ; no
# outer step, i.e. min_θ Σ_x w(x; α) ℓ(x; θ) with α fixed, sampled as Algorithm 1 samples it.
# `shuffled` (6.1): the α_t a run saved (out_dir/weighters/) replayed in a random order σ: max_steps
# is cut into K equal segments, segment j uses α_{t_σ(j)}; σ comes from --seed.


class Method(NamedTuple):
    """One row of METHODS."""
    step: Callable                  # step(ctx, step) → Step(loss, idx): one training step of θ
    setup: Callable = None          # setup(ctx): builds the method's state in ctx, registers it in ctx.state
    selects: bool = False           # keeps b of a big batch B (so its generic pool should hold |B|)


# Every method: its step function and, for Algorithm 1, its outer update (each outer_* calls one
# function of bilevel.py). Fine-tuning always uses step_specific. To add a method, see the README's
# "Add a method": a step function (or, for Algorithm 1, an outer_* function) and a row here; with
# state, a setup function that registers it in ctx.state; with settings, lines in the config block.
METHODS = {
    "baseline": Method(step_baseline),                                  # uniform generic batches
    "mixing": Method(step_mixing),                                      # generic + specific, fixed mixture
    "specific": Method(step_specific),                                  # the specific training set only
    "dds": Method(partial(step_sparse, outer_on_R=outer_dds), setup_alpha, True),         # Eq. (3)
    "soba": Method(partial(step_sparse, outer_on_S=outer_soba), setup_soba, True),        # 4.3.2, default
    "anograd": Method(partial(step_sparse, outer_on_R=outer_anograd), setup_alpha, True),  # 4.3.3
    "frozen": Method(step_sparse, setup_frozen, True),                 # α fixed (6.1, 6.4)
    "shuffled": Method(step_shuffled, setup_shuffled, True),           # another run's α_t, shuffled (6.1)
    "scalebio": Method(step_scalebio, setup_scalebio),                 # ScaleBiO: one weight per source
    "cds": Method(step_cds, setup_cds, True),                          # contrastive data selection (2)
    "classifier": Method(step_classifier, setup_alpha, True),          # domain classifier, top-b of B (5.1)
    "ltr": Method(step_ltr),                                            # learning to reweight (5.1)
    "mwn": Method(step_mwn, partial(setup_alpha, network=LossWeighter), True),   # Meta-Weight-Net (5.1)
}


# ---------------------------------------------------------------------------------------------------
# evaluation and outputs

def eval_all(ctx):
    """Losses on every evaluated set, in nats per byte, on fixed subsets of eval_examples examples
    (data.eval_sets). Several specific sets are averaged (Appendix B) and also logged one by one."""
    def loss(name):    # mean nats per byte (model.nats_per_byte), one labelled bar per set
        return ctx.model.nats_per_byte(ctx.eval_sets[name], ctx.cfg["eval_batch_size"], ctx.autocast,
                                       f"eval {name.replace('_', ' ')}")
    # None: the generic corpus has no valid split (its loss is a diagnostic)
    out = {"generic_valid_loss": loss("generic_valid") if len(ctx.eval_sets["generic_valid"]) else None}
    for split in ("valid", "test"):
        per_set = [loss(f"{n}_{split}") for n in ctx.specific_names]
        out[f"specific_{split}_loss"] = sum(per_set) / len(per_set)
        if len(per_set) > 1:
            out.update({f"specific_{split}_loss/{n}": v for n, v in zip(ctx.specific_names, per_set)})
    return out


def finish_eval(ctx, done, phase, ms, train_loss):
    """Evaluate and log (torchrun: on rank 0), then write a checkpoint."""
    ctx.ranks.sum_([ctx.counts])      # torchrun: the sources θ trained on, summed over ranks
    # torchrun: the logged statistics averaged over the ranks, so that they are the whole batch's (the
    # ranks' own losses are means over equal shares; what every rank holds alike stays as it is)
    # (train_loss is None at an evaluation before any step: --init_from)
    ctx.ranks.mean_([t for t in [*ctx.stats.values(), train_loss] if torch.is_tensor(t)])
    if ctx.rank == 0:
        log_eval(ctx, done, phase, ms, train_loss)
    ctx.counts.zero_()
    save_checkpoint(ctx, done)


def log_eval(ctx, done, phase, ms, train_loss):
    """Evaluate, append a record to log.jsonl, print the progress line, keep the results."""
    rec = {"step": done, "phase": phase, "elapsed_s": round(ctx.progress["train_time"], 2),
           "examples_seen": ctx.progress["seen"], **eval_all(ctx), "lr": lr_at(done, ctx.cfg),
           "train_loss": None if train_loss is None else float(train_loss),   # None: before any step
           **{k: float(v) for k, v in ctx.stats.items()}}
    for k, v in rec.items():    # losses and statistics were kept as tensors: checked here
        if isinstance(v, float) and not math.isfinite(v):
            raise TrainingError(f"step {done}: {k} is {v} (the last good checkpoint is kept)")
    share = source_share(ctx)
    if share is not None and phase == "pretrain":
        rec["source_share"] = share
        if ctx.p is not None:
            rec["lambda"] = {n: s["share"] for n, s in share.items()}
    with open(os.path.join(ctx.cfg["out_dir"], "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    recent = ms[-ctx.cfg["eval_interval"]:]
    tqdm.write(progress_line(rec, sum(recent) / max(1, len(recent)), ctx))
    # the pretraining result, and the fine-tuning result (the best specific valid loss)
    p, best = ctx.progress, ctx.progress["best"]
    if done == ctx.cfg["max_steps"]:
        p["last_eval"] = {"pretrain": rec}
    if phase == "finetune" and (best is None or rec["specific_valid_loss"] < best["specific_valid_loss"]):
        p["best"] = rec


def source_share(ctx):
    """Per source: its share of what θ trained on since the last evaluation (ScaleBiO: λ) and its
    base rate in the generic pool."""
    if ctx.p is None and not ctx.counts.any():
        return None
    shares = (ctx.counts / ctx.counts.sum() if ctx.p is None                    # ScaleBiO: λ = softmax(p)
              else torch.softmax(ctx.p.detach().float(), 0)).tolist()
    # each source's share of the generic training pool: what uniform sampling trains on
    ids = ctx.generic.train.source_id
    base = (torch.bincount(ids, minlength=len(ctx.generic.sources)).float() / len(ids)).tolist()
    return {n: {"share": s, "base": b} for n, s, b in zip(ctx.generic.sources, shares, base)}


def progress_line(rec, ms, ctx):
    """The one fixed-format line printed at each evaluation (and the target's share, if known)."""
    gv, target, share = rec["generic_valid_loss"], ctx.info.get("target_source"), rec.get("source_share")
    train_loss = "—" if rec["train_loss"] is None else f"{rec['train_loss']:.3f}"   # None: before any step
    return (f"step {rec['step']:6d} | {rec['phase']:8s} | train {train_loss} | specific valid "
            f"{rec['specific_valid_loss']:.3f} test {rec['specific_test_loss']:.3f} | generic valid "
            f"{'—' if gv is None else f'{gv:.3f}'} | {ms:6.1f} ms/step" + (
                f" | {target} share {share[target]['share']:.2f} (base {share[target]['base']:.2f})"
                if target and share else ""))


def write_summary(ctx):
    """summary.json: the losses at the end of pretraining (and at the best fine-tuning evaluation, by
    specific valid loss), speed, memory, the learned distribution (source_share; ScaleBiO: lambda)."""
    cfg, pre, best = ctx.cfg, ctx.progress["last_eval"].get("pretrain", {}), ctx.progress["best"]
    summary = {"steps": cfg["max_steps"], "method": cfg["method"],
               **{k: pre.get(k) for k in ("specific_valid_loss", "specific_test_loss", "generic_valid_loss")},
               **{k: v for k, v in pre.items() if k.startswith("specific_") and "/" in k}}
    if cfg["finetune_steps"] > 0 and best is not None:
        summary.update({f"{k}_finetuned": best[k] for k in ("specific_test_loss", "specific_valid_loss")},
                       finetune_best_step=best["step"])
    summary.update(ms_per_step=ctx.progress.get("pretrain_ms", 0.0) / max(1, cfg["max_steps"]),
                   peak_mem_mb=peak_mem_mb(ctx.device), train_time_s=ctx.progress["train_time"])
    summary.update({k: pre[k] for k in ("ess", "max_weight", "cds_score_s", "cds_examples_per_s",
                                        "cds_finetune_s", "source_share", "lambda") if k in pre})
    K = cfg["noise_sources"]
    if K and "source_share" in pre:   # denoising: the share of the clean half and of the pure-noise half
        share = [pre["source_share"][n]["share"] for n in ctx.generic.sources]
        summary.update(share_clean_half=sum(share[:K // 2]), share_corrupted_half=sum(share[K // 2:]))
    summary.update(target_source=ctx.info.get("target_source"), config=cfg)
    write_json(os.path.join(cfg["out_dir"], "summary.json"), summary)
    print(result_words(summary, ctx))


def result_words(summary, ctx):
    """The run's result in one sentence: the specific test loss, and whether the target was up-weighted."""
    msg = (f"{summary['method']}: specific test loss {summary['specific_test_loss']:.3f} nats/byte after "
           f"{summary['steps']} steps")
    if "specific_test_loss_finetuned" in summary:
        msg += f", {summary['specific_test_loss_finetuned']:.3f} after fine-tuning"
    target = summary.get("target_source")
    if target and "source_share" in summary:
        sh = summary["source_share"][target]
        last = (summary["steps"] - 1) % ctx.cfg["eval_interval"] + 1      # steps since the evaluation before
        what = ("of ScaleBiO's source weights λ" if "lambda" in summary
                else f"of the examples the model trained on over the last {last} steps")
        up = "up-weighted" if sh["share"] > 1.5 * sh["base"] else "NOT up-weighted"
        msg += (f". The target domain {target!r} was {up}: "
                f"{100 * sh['share']:.0f}% {what} vs {100 * sh['base']:.0f}% of the generic pool "
                f"({sh['share'] / sh['base']:.1f}x)")
    return msg + f". Results in {ctx.cfg['out_dir']}/summary.json"


# ---------------------------------------------------------------------------------------------------
# checkpoints: ctx.state (name → object with state_dict() / load_state_dict()) lists everything a
# checkpoint holds, filled where each piece is made (setup, the methods' setup functions)

# What is not a Module, an Optimizer or a Sampler is wrapped in one of these small classes, each with the
# state_dict() / load_state_dict() pair that save_checkpoint and load_checkpoint call.

class Stateful:
    """The pair from a getter and a setter that already exist (a generator's, torch's random stream)."""
    def __init__(self, get, put):
        self.state_dict, self.load_state_dict = get, put


class InPlace:
    """A tensor or a dict of tensors restored in place: optimisers and ctx keep referring to them (v, p,
    the source counts)."""
    def __init__(self, tensors):
        self.tensors = tensors

    def state_dict(self):
        return self.tensors

    @torch.no_grad()
    def load_state_dict(self, state):
        for t, saved in zip(tensors_in(self.tensors), tensors_in(state)):
            t.copy_(saved)


def tensors_in(x):
    """The tensors of a dict of tensors (in its order), or [x] for one tensor."""
    return list(x.values()) if isinstance(x, dict) else [x]


def restore(d, saved, device="cpu"):
    """A dict restored in place (ctx.progress, ctx.cds): its saved items, and only those; its tensors
    moved to device (a checkpoint loads on the CPU; CDS's Δ is indexed on the device)."""
    d.clear()
    d.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in saved.items()})


class Samplers(list):
    """A list of data.Sampler (one per specific set), saved as the list of their states."""
    def state_dict(self):
        return [s.state_dict() for s in self]

    def load_state_dict(self, states):
        for sampler, state in zip(self, states):
            sampler.load_state_dict(state)


def lisa_state(ctx):
    """ScaleBiO with LISA: the block-draw generators of u and w and their active blocks."""
    return {"gen": {k: g.get_state() for k, g in ctx.lisa_gen.items()}, "active": ctx.lisa_active}


def load_lisa_state(ctx, state):
    """lisa_state's inverse: each generator and active blocks restored, the other blocks frozen again."""
    for k, model in (("u", ctx.u), ("w", ctx.model)):
        ctx.lisa_gen[k].set_state(state["gen"][k])
        ctx.lisa_active[k] = list(state["active"][k])
        bilevel.lisa_freeze(model, ctx.lisa_active[k])


def save_checkpoint(ctx, step):
    """ckpt.pt: the step, the config and every entry of ctx.state, written atomically. torchrun: every
    rank calls it; rank 0 writes, with the states that differ between ranks (RANK_LOCAL) of all ranks,
    and the others wait until it is written."""
    st = {"step": step, "config": ctx.cfg, **{k: obj.state_dict() for k, obj in ctx.state.items()}}
    if ctx.world > 1:
        st["ranks"] = gather({k: st[k].cpu() if torch.is_tensor(st[k]) else st[k]
                              for k in RANK_LOCAL if k in st})
    if ctx.rank == 0:
        atomic_write(os.path.join(ctx.cfg["out_dir"], "ckpt.pt"), lambda p: torch.save(st, p))
    gather(None)        # torchrun: a barrier, so that no rank exits before the checkpoint is written


def load_checkpoint(ctx):
    """Restore ctx from out_dir/ckpt.pt; returns the step to continue from."""
    st = read_checkpoint(os.path.join(ctx.cfg["out_dir"], "ckpt.pt"), "--resume")
    saved = st["config"]
    if ctx.cfg["max_steps"] > saved["max_steps"] and st["step"] >= saved["max_steps"]:
        raise ConfigError(f"--max_steps: the run in {ctx.cfg['out_dir']} finished pretraining at step "
                          f"{saved['max_steps']}; only --finetune_steps can grow now")
    st.update(st.get("ranks", [{}] * ctx.world)[ctx.rank])      # this rank's own random streams
    for k, obj in ctx.state.items():
        if k in st:
            if isinstance(obj, torch.optim.Optimizer):   # `fused` is this run's device's, not the saved run's
                for old, group in zip(st[k]["param_groups"], obj.param_groups):
                    old["fused"] = group["fused"]
            obj.load_state_dict(st[k])
    return st["step"]


# ---------------------------------------------------------------------------------------------------
# devices and processes: --device, peak memory, and the few collectives of data parallelism under
# torchrun (see "data parallel" above). In a single process the collectives do nothing.

def resolve_device(name):
    """--device → a device string, or a one-line ConfigError for an unknown or unavailable device."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available (a CPU-only PyTorch or no visible GPU)")
    return name


def peak_mem_mb(device):
    """Peak memory in MB: allocated tensors on CUDA, the process's maximum resident set on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ranks():
    """(rank, N) of this process among the N that torchrun started: (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_ranks(cfg):
    """(rank, N, this rank's device); joins the process group when N > 1: NCCL with one GPU per
    rank (LOCAL_RANK) on CUDA, gloo on the CPU. The other ranks wait in a collective while rank 0
    evaluates alone: the timeout adds to the default 10 minutes 10 ms per evaluated row (2 h for all)."""
    (rank, world), dev = ranks(), resolve_device(cfg["device"])
    rows = cfg["eval_examples"] * (1 + 2 * len(cfg["specific"].split(";")))
    timeout = datetime.timedelta(minutes=10, seconds=0.01 * rows if rows > 0 else 7200)
    if world > 1 and not dist.is_initialized():
        cuda = torch.device(dev).type == "cuda"
        if cuda:
            dev = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return rank, world, dev


def grads_of(*modules):
    """The .grad of every parameter of the modules that has one."""
    return [p.grad for m in modules for p in m.parameters() if p.grad is not None]


def any_rank(value, device):
    """The largest of the ranks' integer values (e.g. a signal number, 0 for none)."""
    if not dist.is_initialized():
        return value
    flag = torch.tensor(value, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def gather(obj):
    """[every rank's obj] (picklable; tensors on the CPU), on every rank; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------
# the run directory: what train.py writes into out_dir, --overwrite and --resume. A run's files are
# only ever replaced whole (data.atomic_write for config.json, summary.json and ckpt.pt), and
# log.jsonl is cut back to the checkpoint on --resume.

RUN_FILES = ("config.json", "log.jsonl", "summary.json", "ckpt.pt", "weighters")   # what train.py writes


def remove_run_files(out_dir, names):
    """--overwrite: remove only what an earlier run of train.py wrote (RUN_FILES), nothing else."""
    for f in names:
        path = os.path.join(out_dir, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def truncate_log(path, step):
    """On resume: keep the log records up to the checkpoint's step (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def prepare_out_dir(cfg):
    """A fresh run refuses an out_dir holding another run, unless --overwrite (which removes only the
    files train.py writes); --resume keeps everything and cuts log.jsonl back to the checkpoint. Checked
    before any data is read: out_dir is, or can be made, a directory this process can write in."""
    # the nearest folder on the path that exists: out_dir itself, or the one os.makedirs will make it in
    near = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(near):
        near = os.path.dirname(near)
    if not os.path.isdir(near):
        raise ConfigError(f"--out_dir: {near} is a file")
    try:     # a probe file, gone at once (os.access says yes to root, even on a read-only file system)
        tempfile.TemporaryFile(dir=near).close()
    except OSError as e:
        raise ConfigError(f"--out_dir: cannot write in {near} ({e.strerror})") from None
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg["out_dir"], f))]    # what a run left
    if found and not cfg["resume"] and not cfg["overwrite"]:
        raise ConfigError(f"--out_dir: {cfg['out_dir']} holds another run ({', '.join(found)}): continue it "
                          "with --resume, or replace it with --overwrite")
    return found


# ---------------------------------------------------------------------------------------------------
# command line: --help, --key=value, the resume rules, main()

class ConfigError(data.DataError):
    """A bad flag or setting: str(e) is one line naming it."""


# settings a resumed run may change without changing what it computes (besides growing
# finetune_steps, and max_steps while the run is still pretraining)
RESUMABLE = {"resume", "overwrite", "device", "out_dir", "soba_chunks", "eval_batch_size", "compile",
             "data_cache", "data_workers"}
RANK_LOCAL = ("torch_rng", "cuda_rng", "counts")      # differ between torchrun's ranks


def help_text():
    """--help, generated from the config block of this file (so it cannot drift from the defaults)."""
    src = open(__file__, encoding="utf-8").read()
    block = src.split("# ---- config:")[1].split("# ---- end of config")[0].splitlines()[1:]
    lines = ["usage: python train.py [--key=value ...]   (a bool flag alone means True)"]
    for line in block:
        m = re.match(r"(\w+) = (.+?)(?:\s+# (.*))?$", line)
        if m:
            # the range check() holds the setting to (RULES), if any
            rule = "".join(f"; in {r}" for r, keys in RULES.items() if m[1] in keys.split())
            lines.append(f"  --{m[1]:<22} default {m[2]:<22} {m[3] or ''}{rule}".rstrip())
        elif line.startswith("# --- "):
            lines += ["", line[6:]]
    presets = (f"{n} ({p['n_layer']} layers, d={p['n_embd']}, {p['max_steps']} steps)"
               for n, p in PRESETS.items())
    return "\n".join(lines + ["", "methods: " + ", ".join(METHODS), "presets: " + ", ".join(presets), "",
                              f"--resume may change only {', '.join(sorted(RESUMABLE))};",
                              "--finetune_steps may grow, and --max_steps while the run still pretrains."])


def parse_overrides(argv, defaults):
    """nanoGPT-style `--key=value` overrides, each checked against the type of its default; a bool
    flag alone means True."""
    overrides = {}
    for arg in argv:
        key, eq, val = arg[2:].partition("=")
        if not arg.startswith("--") or key not in defaults:
            raise ConfigError(f"{arg}: unknown setting (python train.py --help lists them)"
                              if arg.startswith("--") else f"{arg}: expected --key=value")
        if not eq and not isinstance(defaults[key], bool):
            raise ConfigError(f"--{key}: expected --{key}=VALUE (with '=')")
        overrides[key] = cast(key, val if eq else "True", defaults[key])
    return overrides


def cast(key, val, default):
    """val (a string) as the type of default, or a one-line ConfigError naming --key."""
    bools = {"true": True, "1": True, "false": False, "0": False}
    try:
        return bools[val.lower()] if isinstance(default, bool) else type(default)(val)
    except (KeyError, ValueError):
        what = {"int": "an integer", "float": "a number", "bool": "true or false"}[type(default).__name__]
        raise ConfigError(f"--{key}: expected {what}, got {val!r}") from None


def parse_args(argv, defaults):
    """defaults ← the preset ← the overrides; --resume: the saved settings ← the overrides."""
    overrides = parse_overrides(argv, defaults)
    if overrides.get("resume"):
        cfg = resume_config(overrides, defaults)
    elif overrides.get("init_from"):
        cfg = init_config(overrides, defaults)
    else:
        name = overrides.get("preset", defaults["preset"])
        if name and name not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        cfg = {**defaults, **PRESETS.get(name, {}), **overrides}
        if cfg["method"] == "cds":    # a derived setting keeps its value if max_steps grows on resume
            cfg["cds_pretrain_steps"] = cds_pretrain(cfg)
    check(cfg)
    return cfg


def resume_config(overrides, defaults):
    """The saved settings of the run in --out_dir, with the few changes a resume allows.

    A resumed run must compute what the uninterrupted run would have: so only settings that do not
    change the numbers may differ (RESUMABLE), finetune_steps may grow at any time, and max_steps
    may grow while the run is still pretraining (load_checkpoint checks the step). Settings derived
    from max_steps keep their first values: CDS's phase length is resolved when the run starts, and
    `shuffled` (whose segments are cut from max_steps) cannot grow it."""
    path = os.path.join(overrides.get("out_dir", defaults["out_dir"]), "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: no run to continue in {os.path.dirname(path)} (no config.json)")
    with open(path) as f:
        cfg = {**defaults, **json.load(f)}
    if cfg.get("world_size", 1) != ranks()[1]:     # torchrun's N (absent: 1)
        raise ConfigError(f"--resume: the run in {os.path.dirname(path)} ran in {cfg.get('world_size', 1)} "
                          f"process(es), not {ranks()[1]}: resume it with the same torchrun --nproc_per_node")
    cfg["compile"] = False      # --compile holds for the invocation that gives it: a resume never inherits it
    # the step counts that may grow: `shuffled` cuts its segments from max_steps, so not max_steps
    growable = ("finetune_steps",) if cfg["method"] == "shuffled" else ("finetune_steps", "max_steps")
    for k, v in overrides.items():
        if v != cfg[k] and k not in RESUMABLE and not (k in growable and v > cfg[k]):
            raise ConfigError(f"--{k}: the run in {os.path.dirname(path)} has {k}={cfg[k]!r}; a resumed "
                              f"run may change only {', '.join(sorted(RESUMABLE))} and grow "
                              f"{' and '.join(growable)}")
        cfg[k] = v
    return cfg


def init_config(overrides, defaults):
    """--init_from=RUN: a new run with RUN's settings (those its checkpoint saved), then the overrides. It
    writes to its own --out_dir, and only fine-tunes (max_steps 0) unless --max_steps says otherwise. θ is
    loaded from RUN (in run()), so the model's settings must stay RUN's."""
    saved = read_init(overrides["init_from"])["config"]
    cfg = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    # RUN may have been resumed: its resume (and overwrite, compile) belonged to its own invocations
    cfg.update({**{k: defaults[k] for k in ("out_dir", "resume", "overwrite", "compile")}, "max_steps": 0,
                **overrides})
    for k in ("n_layer", "n_head", "n_embd", "n_hidden", "seq_len"):
        if cfg[k] != saved[k]:
            raise ConfigError(f"--{k}: θ comes from --init_from's run, whose {k} is {saved[k]!r}")
    return cfg


def read_init(path):
    """--init_from's checkpoint: RUN/ckpt.pt for a run dir, else the file itself."""
    return read_checkpoint(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path, "--init_from")


def check(cfg):
    """One-line errors for settings out of range, before any data is read or any file written: every
    error names its flag, the value it got and what it expects."""
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"--{key}: {what}, got {cfg[key]!r}")
    for rule, keys in RULES.items():
        for k in keys.split():
            need(in_range(cfg[k], rule), k, f"must be in {rule}")
    need(cfg["max_steps"] + cfg["finetune_steps"] > 0, "max_steps", "nothing to train: must be positive, or "
         "--finetune_steps must be (a run that only fine-tunes, e.g. from --init_from)")
    # --init_from fine-tunes at a constant rate (the authors: 2e-3 for the baseline, 2e-4 for SOBA and mixing)
    need(cfg["finetune_lr"] > 0 or not cfg["init_from"], "finetune_lr", "must be positive with --init_from")
    for k, choices in (("method", METHODS), ("filter", ("importance", "without_replacement", "top")),
                       ("soba_v_optim", ("adam", "sgd")), ("doc_mode", ("chunk", "first")),
                       ("weighter_init", ("default", "reference")), ("soba_dalpha_v", ("t", "t+1")),
                       ("hvp", ("exact", "finite_difference"))):
        need(cfg[k] in choices, k, f"expected one of {', '.join(choices)}")
    need(not METHODS[cfg["method"]].selects or cfg["batch_size"] <= cfg["big_batch_size"], "batch_size",
         f"must be at most --big_batch_size={cfg['big_batch_size']}")
    for k in ("batch_size", "big_batch_size", "specific_batch_size"):     # global sizes: 1/N per rank
        need(cfg[k] % ranks()[1] == 0, k, f"must be divisible by the {ranks()[1]} processes of torchrun")
    need(cfg["out_dir"], "out_dir", "must name a directory")
    # attention splits d into n_head heads; the sinusoidal positions fill d in (sin, cos) pairs: d even
    need(cfg["n_embd"] % cfg["n_head"] == 0 and cfg["n_embd"] % 2 == 0, "n_embd",
         f"must be even and a multiple of --n_head={cfg['n_head']}")
    # memory sanity, in FP32 bytes: one layer's attention matrix for a batch, and α's activations over B;
    # over 64 GiB is a typo (--seq_len=100000), not an experiment
    rows = max(cfg["batch_size"], cfg["eval_batch_size"], cfg["specific_batch_size"])
    for key, n in (("seq_len", rows * cfg["n_head"] * cfg["seq_len"] ** 2),
                   ("big_batch_size", cfg["big_batch_size"] * cfg["seq_len"] * cfg["weighter_dim"])):
        need(4 * n <= 2**36, key, f"a batch would need {4 * n / 2**30:,.0f} GiB of memory (at most 64)")
    need(not cfg["lisa"] or 0 < cfg["lisa_layers"] <= cfg["n_layer"], "lisa_layers",
         f"must be in 1..n_layer={cfg['n_layer']}")
    need(not cfg["lisa"] or cfg["method"] == "scalebio", "lisa", "only --method=scalebio uses LISA")
    need(cfg["noise_sources"] != 1 and cfg["noise_sources"] >= 0, "noise_sources", "must be 0 (off) or >= 2")
    need(cfg["method"] != "cds" or cds_pretrain(cfg) < cfg["max_steps"], "cds_pretrain_steps",
         f"must leave a selection step within --max_steps={cfg['max_steps']}")
    # an unknown or unavailable device: one line, before any output; torch.compile only on CUDA
    dev = resolve_device(cfg["device"])
    need(dev.startswith("cuda") or not cfg["compile"], "compile", f"runs on CUDA only (the device is {dev})")
    need(not (cfg["compile"] and cfg["lisa"]), "compile", "not with --lisa (each block draw would recompile)")
    need(cfg["method"] != "frozen" or cfg["weighter_ckpt"], "weighter_ckpt", "--method=frozen needs a run")
    need(cfg["method"] != "shuffled" or cfg["weighter_trajectory"], "weighter_trajectory",
         "--method=shuffled needs a run dir that saved weighters/")


def in_range(value, rule):
    """Whether value lies in an interval of RULES, "(0, inf)", "[0, 1)", …: a square bracket includes its end
    (NaN lies in none)."""
    low, high = (float(t) for t in rule[1:-1].split(","))
    above = low <= value if rule[0] == "[" else low < value
    return above and (value <= high if rule[-1] == "]" else value < high)


def run(cfg, defaults):
    """Set up, restore (--resume) or start, train. Nothing is written before the settings and the data
    have been checked; SIGINT / SIGTERM finish the step in progress, checkpoint and exit. Returns the
    exit status. torchrun: rank 0 alone checks and writes out_dir."""
    rank0 = ranks()[0] == 0
    found = prepare_out_dir(cfg) if rank0 else []    # checked first: a refusal costs no data loading
    changed = {k: v for k, v in cfg.items() if v != defaults.get(k) and k not in ("world_size", "inputs")}
    print("settings: " + (" ".join(f"--{k}={v}" for k, v in changed.items()) or "the defaults"))
    if ranks()[1] > 1:
        cfg["world_size"] = ranks()[1]     # saved in config.json: a resume needs the same N
    ctx = setup(cfg)
    # what the run reads (files, sizes, MD5s, example counts), in config.json: a resume must find the same
    cfg["inputs"] = data.fingerprint(cfg, ctx.generic, ctx.specifics)
    start = load_checkpoint(ctx) if cfg["resume"] else 0
    if cfg["init_from"] and not cfg["resume"]:      # θ from another run (α, v, optimisers: fresh)
        ctx.model.load_state_dict(read_init(cfg["init_from"])["model"])
    if rank0:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if cfg["resume"]:
            truncate_log(os.path.join(cfg["out_dir"], "log.jsonl"), start)
        remove_run_files(cfg["out_dir"], [] if cfg["resume"] else found)    # --overwrite
        write_json(os.path.join(cfg["out_dir"], "config.json"), cfg)     # (a resume never inherits compile)
    n_params = sum(p.numel() for p in ctx.model.parameters())
    print(f"{cfg['method']} | θ: {n_params / 1e6:.2f}M params | {ctx.device} | generic "
          f"{len(ctx.generic.train)} train examples, {len(ctx.generic.sources)} sources | specific "
          f"{', '.join(str(len(s.train)) for s in ctx.specifics)}")
    stop = {"sig": None}
    previous = {s: signal.signal(s, lambda n, f: stop.update(sig=n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train_loop(ctx, start, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv):
    """python train.py [--key=value ...]: the exit status is 0, 2 for bad input (one line on stderr,
    naming the flag or the file), or 128 + the signal when stopped by one."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    defaults = {k: globals()[k] for k in config_keys}
    if ranks()[0] > 0:                   # torchrun: rank 0 prints for all
        sys.stdout = open(os.devnull, "w")
    # SIGTERM before training starts (while the corpus is read) stops as Ctrl-C does; run() handles both after
    sigterm = signal.signal(signal.SIGTERM, stopped_early)
    try:
        return run(parse_args(argv, defaults), defaults)
    except (data.DataError, TrainingError) as e:
        if ranks()[0] == 0:      # torchrun: every rank meets the same error, rank 0 prints it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:     # Ctrl-C or SIGTERM before training started (e.g. reading the corpus)
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def stopped_early(signum, frame):
    """The SIGTERM handler until training starts: the KeyboardInterrupt of Ctrl-C, carrying the signal."""
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
