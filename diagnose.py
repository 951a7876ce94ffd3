"""
Diagnostics and reports for adaptive training distributions: is bilevel data selection likely to
help (SAR/GAR, paper section 6.3), what did the weighting network learn, which documents of a corpus
does it select, how much faster did a run reach a target loss (Figure 1), and Table 2 in one command.

    python diagnose.py sar --ckpt=out/ckpt.pt                       # SAR/GAR of a trained model
    python diagnose.py sar --preset=cpu --generic=DIR --specific=FILE --pretrain_steps=300
    python diagnose.py weights --run=out                            # per-source shares, ESS, snippets, weight vs loss
    python diagnose.py select --run=out --input=CORPUS --output=sel.jsonl --fraction=0.1
    python diagnose.py compare --runs=out/base,out/soba             # time to a target loss, speedups
    python diagnose.py table --generic=DIR --specific=FILE --preset=cpu --seeds=0,1 --out_dir=runs/t2
    python diagnose.py bench --preset=cpu                           # ms/step and memory of every method

Options are `--key=value` as in train.py; `sar` and `table` also take any train.py setting (the
model, the data, the preset), which they hand to train.py's own machinery. Bad input gives a one-line
error and exit status 2.
"""

import gzip
import heapq
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import bilevel
import data
import train
from model import ByteLM, ModelConfig
from weighter import score

HERE = os.path.dirname(os.path.abspath(__file__))


class DiagnoseError(Exception):
    """Bad input. str(e) is one line."""


# -----------------------------------------------------------------------------------------------
# options: `--key=value` checked against typed defaults, like train.py

def parse_options(argv, defaults, sub, train_keys=False):
    """→ (options, train_argv). With train_keys, any train.py setting not in `defaults` is passed
    through untouched (as a list of `--key=value` strings) for train.py's own parser."""
    opts, passthrough = dict(defaults), []
    for arg in argv:
        if not arg.startswith("--"):
            raise DiagnoseError(f"{arg}: expected --key=value")
        key, eq, val = arg[2:].partition("=")
        if key in defaults:
            if not eq and not isinstance(defaults[key], bool):
                raise DiagnoseError(f"--{key}: expected --{key}=VALUE")
            opts[key] = train.cast(key, val if eq else "True", defaults[key])
        elif train_keys and key in train.config_keys:
            passthrough.append(arg)
        else:
            raise DiagnoseError(f"--{key}: unknown setting for `{sub}`")
    return opts, passthrough


def train_defaults():
    return {k: getattr(train, k) for k in train.config_keys}


def load_ckpt(path, flag="--ckpt"):
    """A train.py checkpoint (a ckpt.pt, or a run directory holding one) → its dict."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    return train.read_checkpoint(path, flag)


def read_log(run):
    """A run's log.jsonl → list of records (a torn last line of a running job is skipped)."""
    path = os.path.join(run, "log.jsonl")
    if not os.path.isdir(run):
        raise DiagnoseError(f"--run: no such run directory: {run}")
    if not os.path.isfile(path):
        raise DiagnoseError(f"{run}: no log.jsonl (not a train.py run directory?)")
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_config(run):
    cfg = read_json(os.path.join(run, "config.json"))
    if cfg is None:
        raise DiagnoseError(f"{run}: no config.json (not a train.py run directory?)")
    return {**train_defaults(), **cfg}


def main_model(cfg, state=None):
    """θ: the ByteLM of a config, with a checkpoint's weights if given, in eval mode (no dropout)."""
    keys = ("n_layer", "n_head", "n_embd", "n_hidden", "seq_len", "dropout")
    model = ByteLM(ModelConfig(**{k: cfg[k] for k in keys}))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def snippet(x, width=90):
    """A window of bytes → one printable line."""
    text = bytes(x).rstrip(b"\0").decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text)[:width]


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# -----------------------------------------------------------------------------------------------
# sar: Specific and Generic Acceleration Rates (section 6.3, Table 8)
#
#   a_norm(x, B) = ∇ℓ(x; θ)ᵀ ∇ℓ(B; θ) / ‖∇ℓ(B; θ)‖,     ℓ(B; θ) = (1/|B|) Σ_{x'∈B} ℓ(x'; θ)
#   SAR = E_{x~D_specific, B_specific, B_generic} 1{a_norm(x, B_specific) > a_norm(x, B_generic)}
#   GAR = E_{x~D_generic,  B_specific, B_generic} 1{a_norm(x, B_generic) > a_norm(x, B_specific)}
#
# The inner products for a whole batch of x are one backward pass each (bilevel.per_example_dot):
# no per-example gradient is ever formed.

SAR_OPTIONS = dict(ckpt="", pretrain_steps=300, draws=20, n_examples=64, out_json="", save_ckpt="")


def unit_batch_grad(model, theta, x_batch):
    """∇ℓ(B; θ) / ‖∇ℓ(B; θ)‖ for the batch mean loss ℓ(B; θ), as a parameter-shaped dict."""
    g, _ = bilevel.grad_at(model, theta, x_batch)
    norm = bilevel.dot(g, g).sqrt()
    return {k: t / norm for k, t in g.items()}


def alignments(model, x, B_specific, B_generic):
    """(a_norm(x, B_specific), a_norm(x, B_generic)) for every row of x: (n,), (n,)."""
    theta = bilevel.theta_of(model)
    u_specific = unit_batch_grad(model, theta, B_specific)
    u_generic = unit_batch_grad(model, theta, B_generic)
    _, a_specific = bilevel.per_example_dot(model, theta, x, u_specific)   # (n,)
    _, a_generic = bilevel.per_example_dot(model, theta, x, u_generic)     # (n,)
    return a_specific, a_generic


def acceleration_indicators(model, x_specific, x_generic, B_specific, B_generic):
    """One draw of (B_specific, B_generic): the SAR indicators over x_specific (n_s,) and the GAR
    indicators over x_generic (n_g,), both bool."""
    a_s, a_g = alignments(model, torch.cat([x_specific, x_generic]), B_specific, B_generic)  # (n_s + n_g,)
    n_s = len(x_specific)
    sar = a_s[:n_s] > a_g[:n_s]       # specific x: the specific batch helps it more
    gar = a_g[n_s:] > a_s[n_s:]       # generic x: the generic batch helps it more
    return sar, gar


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a binomial rate k/n (treats every indicator as independent)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def bootstrap_over_draws(ind, n_boot=2000, seed=0):
    """95% percentile interval of the mean of ind (draws, n), resampling whole draws: the n
    indicators of one draw share the same two batches, so they are not independent."""
    per_draw = ind.float().mean(1)                                            # (draws,)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(per_draw), (n_boot, len(per_draw)), generator=g)  # (n_boot, draws)
    means = per_draw[idx].mean(1)                                             # (n_boot,)
    return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()


def rate_summary(ind):
    """ind: (draws, n) bool → {rate, bootstrap CI, Wilson CI, n}."""
    k, n = int(ind.sum()), ind.numel()
    return {"rate": k / n, "ci95_bootstrap_draws": bootstrap_over_draws(ind), "ci95_wilson": wilson(k, n), "n": n}


def sar_setup(opts, train_argv):
    """(ctx, where θ came from): train.py's data/model machinery, θ from --ckpt or pretrained here."""
    if opts["ckpt"]:
        st = load_ckpt(opts["ckpt"])
        cfg, defaults = {**train_defaults(), **st["config"]}, train_defaults()
        for arg in train_argv:            # explicit settings override the checkpoint's (e.g. --specific)
            key, _, val = arg[2:].partition("=")
            if key == "preset":
                raise DiagnoseError("--preset: not used with --ckpt (the checkpoint's own config is)")
            cfg[key] = train.cast(key, val, defaults[key])
        cfg.update(method="baseline", resume=False)
        ctx = train.setup(cfg)
        ctx.model.load_state_dict(st["model"])
        return ctx, f"{opts['ckpt']} (step {st.get('step')})"
    # a model pretrained here on uniform generic data (the paper's θ_t "trained on the generic
    # distribution for t steps"), with train.py's own step and schedule
    cfg = train.parse_args(train_argv + ["--method=baseline", f"--max_steps={opts['pretrain_steps']}",
                                         "--finetune_steps=0"], train_defaults())
    ctx = train.setup(cfg)
    for step in tqdm(range(opts["pretrain_steps"]), desc="pretrain (baseline)", leave=False, disable=None):
        for group in ctx.opt.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        ctx.step = step
        train.step_baseline(ctx, step)
    if opts["save_ckpt"]:    # θ_t for later `sar --ckpt=...` calls (pretraining never reads the specific set)
        st = {"step": opts["pretrain_steps"], "config": cfg, "model": ctx.model.state_dict()}
        train.atomic_write(opts["save_ckpt"], lambda p: torch.save(st, p))
    return ctx, f"baseline pretrained here for {opts['pretrain_steps']} steps"


def cmd_sar(argv):
    opts, train_argv = parse_options(argv, SAR_OPTIONS, "sar", train_keys=True)
    if opts["draws"] < 1 or opts["n_examples"] < 1:
        raise DiagnoseError("--draws and --n_examples: must be positive")
    ctx, origin = sar_setup(opts, train_argv)
    if len(ctx.specifics) > 1:
        raise DiagnoseError("--specific: sar takes one specific set")
    cfg, model, b, n = ctx.cfg, ctx.model.eval(), ctx.cfg["batch_size"], opts["n_examples"]
    spec, gen = ctx.specifics[0], ctx.generic
    g = torch.Generator().manual_seed(cfg["seed"] + 1000)
    draw = lambda ex, k: ex.x[torch.randint(len(ex), (k,), generator=g)].to(ctx.device)  # k uniform rows
    sar, gar = [], []
    for _ in tqdm(range(opts["draws"]), desc="SAR/GAR draws", leave=False, disable=None):
        # fresh training batches B_specific, B_generic and fresh held-out x of both kinds
        B_specific, B_generic = draw(spec.train, b), draw(gen.train, b)       # (b, T) each
        x_specific, x_generic = draw(spec.valid, n), draw(gen.valid, n)       # (n, T) each
        s, r = acceleration_indicators(model, x_specific, x_generic, B_specific, B_generic)
        sar.append(s.cpu())
        gar.append(r.cpu())
    res = {"sar": rate_summary(torch.stack(sar)), "gar": rate_summary(torch.stack(gar)),
           "theta": origin, "generic": cfg["generic"] or "builtin", "specific": cfg["specific"] or "builtin",
           "batch_size": b, "draws": opts["draws"], "n_examples_per_draw": n}
    for name in ("sar", "gar"):
        r = res[name]
        lo, hi = r["ci95_bootstrap_draws"]
        wlo, whi = r["ci95_wilson"]
        print(f"{name.upper()} {100 * r['rate']:5.1f}%  95% CI {100 * lo:.1f}-{100 * hi:.1f} (bootstrap over "
              f"{opts['draws']} draws; Wilson {100 * wlo:.1f}-{100 * whi:.1f} over {r['n']} examples)")
    print(f"θ: {origin} | |B| = {b} | paper Table 8, LM (c4, reuters): SAR 86.2%, GAR 69.4%; chance = 50%")
    if opts["out_json"]:
        train.atomic_write(opts["out_json"], lambda p: json.dump(res, open(p, "w"), indent=1))
    return 0


# -----------------------------------------------------------------------------------------------
# streaming documents (select, weights): file by file, record by record, never a whole corpus

def iter_documents(spec, flag="--input"):
    """(text, source, split, bytes) for every non-empty document of a corpus spec, in train.py's
    reading order. `text` is the raw text (for writing out); `bytes` its normalised encoding, what
    the models read. Uses data.py's readers, so the same files and records are accepted."""
    for path in data.resolve_files(spec, flag):
        if not data._suffix(path):
            raise data.DataError(f"{path}: unsupported file type (expected .txt, .jsonl or .jsonl.gz)")
        reader = data._read_txt if path.endswith(".txt") else data._read_jsonl
        try:
            for text, source, split in reader(path):
                b = data.encode(text)
                if b and not b.isspace():
                    yield text, source, split or data.hash_split(b), b
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise data.DataError(f"{path}: not a valid gzip file ({' '.join(str(e).split())})") from None
        except OSError as e:
            raise data.DataError(f"{path}: cannot read: {e.strerror or e}") from None


def as_rows(chunk, seq_len):
    """Windows from data.windows → (n, seq_len) uint8 tensor."""
    return torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(-1, seq_len)


def reservoir_windows(spec, seq_len, doc_mode, split, n, seed):
    """A uniform sample of n windows (examples, as train.py makes them) of one split: reservoir
    sampling (Algorithm R), memory O(n). → (x (n, T) uint8, [source, ...])."""
    rng, keep, i = random.Random(seed), [], 0
    for _, source, s, b in iter_documents(spec, "--generic"):
        if s != split:
            continue
        for row in as_rows(data.windows(b, seq_len, doc_mode)[0], seq_len):
            if len(keep) < n:
                keep.append((row, source))
            else:
                j = rng.randrange(i + 1)
                if j < n:
                    keep[j] = (row, source)
            i += 1
    if not keep:
        raise DiagnoseError(f"{spec}: no {split} examples")
    return torch.stack([r for r, _ in keep]), [s for _, s in keep]


# -----------------------------------------------------------------------------------------------
# weights: what the weighting network learned

WEIGHTS_OPTIONS = dict(run="", n_examples=2000, n_snippets=5, bins=10, seed=0, plot="")


def share_tables(records, method):
    """Per-source share of trained-on examples at each evaluation and at the end, vs base rate."""
    recs = [r for r in records if r.get("source_share")]
    if not recs:
        print("\nno per-source shares in log.jsonl (this method does not select generic examples)")
        return
    cols = recs if len(recs) <= 6 else [recs[round(i * (len(recs) - 1) / 5)] for i in range(6)]
    final = recs[-1]["source_share"]
    order = sorted(final, key=lambda s: -final[s]["share"] / max(final[s]["base"], 1e-12))
    what = "λ (per-source weight)" if method == "scalebio" else "share of the examples trained on"
    print(f"\n## {what} per source, over pretraining (sorted by final share / base rate)")
    header = ["source", "base"] + [f"step {r['step']}" for r in cols] + ["final / base"]
    rows = [[s, f"{final[s]['base']:.3f}"] + [f"{r['source_share'][s]['share']:.3f}" for r in cols]
            + [f"{final[s]['share'] / max(final[s]['base'], 1e-12):.2f}x"] for s in order]
    print(markdown(header, rows))


def concentration_table(records, cfg):
    """ESS and max weight of w over B_generic^big, with the losses, at each evaluation."""
    recs = [r for r in records if "ess" in r]
    if not recs:
        return
    print(f"\n## concentration of w(x; α) over B_generic^big (|B| = {cfg['big_batch_size']}; uniform: "
          f"ESS = |B|, max weight = {1 / cfg['big_batch_size']:.4f})")
    rows = [[r["step"], f"{r['ess']:.1f}", f"{r['ess'] / cfg['big_batch_size']:.3f}", f"{r['max_weight']:.4f}",
             f"{r['specific_valid_loss']:.3f}", f"{r['generic_valid_loss']:.3f}"] for r in recs]
    print(markdown(["step", "ESS", "ESS / |B|", "max weight", "specific valid", "generic valid"], rows))


def ranks(a):
    """Ranks 0..n-1 of a 1-d array, ties sharing their mean rank (for Spearman's ρ)."""
    a = np.asarray(a, dtype=np.float64)
    r = np.empty(len(a))
    r[np.argsort(a, kind="mergesort")] = np.arange(len(a))
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]


def correlations(a, b):
    """(Pearson r, Spearman ρ) of two 1-d arrays."""
    return float(np.corrcoef(a, b)[0, 1]), float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def weighter_report(run, cfg, opts):
    """Score a sample of generic valid examples with the run's α: snippets, per source, vs loss."""
    st = load_ckpt(run)
    try:
        weighter, _ = train.load_weighter(os.path.join(run, "ckpt.pt"))
    except train.ConfigError as e:
        print(f"\nno text-scoring weighting network to inspect ({str(e).split(': ', 1)[-1]})")
        return None
    if cfg["generic"]:
        x, sources = reservoir_windows(cfg["generic"], cfg["seq_len"], cfg["doc_mode"], "valid",
                                       opts["n_examples"], opts["seed"])
    else:   # the built-in synthetic corpus: rebuilt from the run's seed
        g = data.builtin_corpora(cfg["seed"], cfg["seq_len"])[0].valid
        idx = torch.randperm(len(g), generator=torch.Generator().manual_seed(opts["seed"]))[:opts["n_examples"]]
        x, sources = g.x[idx], [g.sources[i] for i in g.source_id[idx].tolist()]
    s = score(weighter, x)                                                       # (n,) s(x; α)
    with torch.no_grad():
        model = main_model(cfg, st["model"])
        loss = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])   # (n,) ℓ(x; θ)
    step = st.get("step") or 0
    phase = (f"after {step - cfg['max_steps']} fine-tuning steps" if step > cfg["max_steps"] else
             "end of pretraining" if step == cfg["max_steps"] else "mid-pretraining")
    print(f"\n## {len(x)} generic valid examples scored by α (score s = log w + const), ℓ by θ at step "
          f"{step} ({phase})")
    order = torch.argsort(s, descending=True)
    k = opts["n_snippets"]
    for title, idx in (("highest", order[:k]), ("lowest", order[-k:])):
        print(f"\n{title}-weighted:")
        for i in idx.tolist():
            print(f"  s={s[i]:+.3f} ℓ={loss[i]:.2f} {sources[i]:>22s} | {snippet(x[i])}")
    by_source = {}
    for src, v in zip(sources, s.tolist()):
        by_source.setdefault(src, []).append(v)
    print("\nmean score per source in the sample:")
    print(markdown(["source", "n", "mean s"], [[src, len(v), f"{np.mean(v):+.3f}"] for src, v in
                                              sorted(by_source.items(), key=lambda kv: -np.mean(kv[1]))]))
    r, rho = correlations(s.numpy(), loss.numpy())
    print(f"\nweight vs loss: Pearson r = {r:+.3f}, Spearman ρ = {rho:+.3f} (of s(x; α) and ℓ(x; θ))")
    edges = torch.quantile(s, torch.linspace(0, 1, opts["bins"] + 1))
    b = torch.bucketize(s, edges[1:-1], right=True)                              # (n,) bin of each x
    rows = []
    for j in range(opts["bins"]):
        m = b == j
        if m.any():
            top = Counter(src for src, keep in zip(sources, m.tolist()) if keep).most_common(1)[0][0]
            rows.append([j + 1, f"{s[m].min():+.3f}..{s[m].max():+.3f}", int(m.sum()), f"{loss[m].mean():.3f}", top])
    print(markdown(["score bin", "s range", "n", "mean ℓ", "top source"], rows))
    return {"pearson": r, "spearman": rho}


def plot_run(records, cfg, path):
    """PNG of the source shares and the loss curves, when matplotlib is installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot; the tables above hold the same numbers)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    recs = [r for r in records if r.get("source_share")]
    if recs:
        final = recs[-1]["source_share"]
        top = sorted(final, key=lambda s: -final[s]["share"] / max(final[s]["base"], 1e-12))[:8]
        for src in top:
            line, = ax1.plot([r["step"] for r in recs], [r["source_share"][src]["share"] for r in recs], label=src)
            ax1.axhline(final[src]["base"], color=line.get_color(), ls=":", lw=0.8)
        ax1.set(xlabel="step", ylabel="share of trained-on examples (dotted: base rate)",
                title="top sources by share / base")
        ax1.legend(fontsize=7)
    for key in ("specific_valid_loss", "generic_valid_loss"):
        ax2.plot([r["step"] for r in records], [r[key] for r in records], label=key)
    ax2.set(xlabel="step", ylabel="nats / byte", title=f"{cfg['method']}: losses")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def cmd_weights(argv):
    opts, _ = parse_options(argv, WEIGHTS_OPTIONS, "weights")
    if not opts["run"]:
        raise DiagnoseError("--run: give a train.py run directory")
    records, cfg = read_log(opts["run"]), run_config(opts["run"])
    print(f"# {opts['run']}: method {cfg['method']}, {len(records)} evaluations")
    share_tables(records, cfg["method"])
    concentration_table(records, cfg)
    weighter_report(opts["run"], cfg, opts)
    if opts["plot"] != "none":
        plot_run(records, cfg, opts["plot"] or os.path.join(opts["run"], "weights.png"))
    return 0


# -----------------------------------------------------------------------------------------------
# select: score any corpus with a trained α and write the selected documents
#
# Bounded memory: the corpus is read document by document, twice. Pass 1 scores every document and
# keeps only a min-heap of the k best (key, index) pairs, O(k) numbers whatever the corpus size and
# no text. Pass 2 reads the corpus again and writes the documents whose index was kept, in reading
# order, to a temporary file that replaces --output at the end (os.replace: atomic).
#   mode=top:    key = s(x; α), the k highest scores, exactly.
#   mode=sample: key = s(x; α) + Gumbel noise: the top-k of these is a draw of k documents without
#                replacement, each next one ∝ w(x) = exp(s(x; α)) (Gumbel top-k trick, as the
#                filter of Algorithm 1, here over the whole corpus instead of one big batch).
# With --fraction, k = ⌈fraction · N⌉ needs N: it is --max_docs when given, else a counting pass.

SELECT_OPTIONS = dict(run="", input="", output="", fraction=0.0, sample=0, mode="top", doc_score="first",
                      max_docs=0, batch=256, seed=0)


def doc_windows(b, seq_len, how):
    """The windows a document's score averages: its first seq_len bytes (how="first", the paper's
    example) or all its seq_len windows (how="mean"). → (n, T) uint8."""
    return as_rows(data.windows(b, seq_len, "first" if how == "first" else "chunk")[0], seq_len)


class TopK:
    """The k largest (key, index, score) items seen, in a min-heap: memory O(k), no text.
    Among equal keys the earlier document is kept."""

    def __init__(self, k):
        self.k, self.heap = k, []

    def push(self, key, i, s):
        item = (key, -i, s)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif self.heap and item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def shrink(self, k):
        while len(self.heap) > k:
            heapq.heappop(self.heap)
        self.k = k

    def kept(self):
        """{document index: score} of the kept documents."""
        return {-i: s for _, i, s in self.heap}


def score_documents(weighter, docs, seq_len, how, batch):
    """(index, source, s) for every document, scoring `batch` documents at a time."""
    pending = []

    def flush():
        rows = [doc_windows(b, seq_len, how) for _, _, b in pending]             # [(n_i, T)]
        s = score(weighter, torch.cat(rows))                                     # (Σ n_i,) in chunks: bounded memory
        per_doc = torch.stack([c.mean() for c in s.split([len(r) for r in rows])])  # (len(pending),)
        out = [(i, src, v) for (i, src, _), v in zip(pending, per_doc.tolist())]
        pending.clear()
        return out

    for i, (_, source, _, b) in enumerate(docs):
        pending.append((i, source, b))
        if len(pending) == batch:
            yield from flush()
    if pending:
        yield from flush()


def limited(docs, max_docs):
    for i, d in enumerate(docs):
        if max_docs and i >= max_docs:
            return
        yield d


def check_select(opts):
    for key in ("run", "input", "output"):
        if not opts[key]:
            raise DiagnoseError(f"--{key}: required")
    if opts["mode"] not in ("top", "sample"):
        raise DiagnoseError(f"--mode: expected top or sample, got {opts['mode']!r}")
    if opts["doc_score"] not in ("first", "mean"):
        raise DiagnoseError(f"--doc_score: expected first or mean, got {opts['doc_score']!r}")
    if (opts["fraction"] > 0) == (opts["sample"] > 0):
        raise DiagnoseError("--fraction / --sample: give exactly one (a fraction in (0, 1] or a number of documents)")
    if opts["fraction"] > 1 or opts["sample"] < 0 or opts["max_docs"] < 0 or opts["batch"] < 1:
        raise DiagnoseError("--fraction must be in (0, 1]; --sample, --max_docs >= 0; --batch >= 1")
    inputs = {os.path.realpath(p) for p in data.resolve_files(opts["input"], "--input")}
    out = os.path.realpath(opts["output"])
    if out in inputs:
        raise DiagnoseError(f"--output: {opts['output']} is one of the input files; refusing to overwrite it")
    if os.path.isdir(out):
        raise DiagnoseError(f"--output: {opts['output']} is a directory")


def write_selected(opts, keep):
    """Pass 2: the kept documents, in reading order, as JSON lines, written atomically."""
    path = opts["output"]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        with (gzip.open if path.endswith(".gz") else open)(tmp, "wt", encoding="utf-8") as f:
            for i, (text, source, _, _) in enumerate(limited(iter_documents(opts["input"]), opts["max_docs"])):
                if i in keep:
                    f.write(json.dumps({"text": text, "source": source, "score": keep[i]}) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_select(argv):
    opts, _ = parse_options(argv, SELECT_OPTIONS, "select")
    check_select(opts)
    weighter, st = train.load_weighter(opts["run"], flag="--run")
    seq_len = st["config"].get("seq_len", train.seq_len)     # the windows α was trained on
    docs = lambda: limited(iter_documents(opts["input"]), opts["max_docs"])
    if opts["sample"]:
        k = opts["sample"]
    elif opts["max_docs"]:
        k = math.ceil(opts["fraction"] * opts["max_docs"])      # shrunk below if the corpus is smaller
    else:
        n = sum(1 for _ in tqdm(docs(), desc="counting documents", unit="doc", leave=False, disable=None))
        k = math.ceil(opts["fraction"] * n)
    top, per_source, n_docs = TopK(k), Counter(), 0
    gen = torch.Generator().manual_seed(opts["seed"])
    bar = tqdm(score_documents(weighter, docs(), seq_len, opts["doc_score"], opts["batch"]),
               desc=f"scoring ({opts['mode']} {k})", unit="doc", disable=None)
    for i, source, s in bar:
        per_source[source] += 1
        n_docs += 1
        key = s
        if opts["mode"] == "sample":
            # key = s + G, G = −log(−log U) a Gumbel draw
            u = torch.rand((), generator=gen).clamp(1e-20, 1.0).item()
            key = s - math.log(-math.log(u))
        top.push(key, i, s)
    if opts["fraction"]:
        top.shrink(math.ceil(opts["fraction"] * n_docs))
    keep = top.kept()
    write_selected(opts, keep)
    report_selection(opts, keep, per_source, n_docs)
    return 0


def report_selection(opts, keep, per_source, n_docs):
    """Every input source's share of the selected documents (read back from the output: k records)
    against its share of the input, the most enriched first (the top 20 and bottom 5 of many)."""
    chosen, n_sel = Counter(), len(keep)
    with (gzip.open if opts["output"].endswith(".gz") else open)(opts["output"], "rt", encoding="utf-8") as f:
        for line in f:
            chosen[json.loads(line)["source"]] += 1
    how = "its first window" if opts["doc_score"] == "first" else "the mean over its windows"
    print(f"selected {n_sel} of {n_docs} documents (mode {opts['mode']}; a document's score = s(x; α) "
          f"of {how}) -> {opts['output']}")
    ratio = {src: (chosen[src] / max(n_sel, 1)) / (n / n_docs) for src, n in per_source.items()}
    order = sorted(per_source, key=lambda src: (-ratio[src], src))      # every input source, the most enriched first
    if len(order) > 30:
        order = order[:20] + ["…"] + order[-5:]
    rows = [[src, "", "", "", ""] if src == "…" else
            [src, chosen[src], f"{chosen[src] / max(n_sel, 1):.3f}", f"{per_source[src] / n_docs:.3f}", f"{ratio[src]:.2f}x"]
            for src in order]
    print(markdown(["source", "selected", "share of selected", "share of input", "ratio"], rows))


# -----------------------------------------------------------------------------------------------
# compare: final losses and time to a target specific loss (the paper's Figure 1)

COMPARE_OPTIONS = dict(runs="", baseline="", target=0.0, metric="specific_valid_loss", interpolate=True, out="")


def time_to_target(records, target, key="specific_valid_loss", interpolate=True):
    """(steps, train seconds) at which the pretraining curve first reaches loss <= target, or
    (None, None). Between the last evaluation above the target and the first at or below it, the
    curve is taken as linear in steps and in elapsed_s (interpolate=True); else the first
    evaluation at or below the target. Before the first evaluation nothing is known: a curve
    already below the target there is credited with that first evaluation's step and time."""
    prev = None
    for r in sorted((r for r in records if r.get("phase", "pretrain") == "pretrain"), key=lambda r: r["step"]):
        if r[key] <= target:
            if prev is None or not interpolate:
                return float(r["step"]), float(r["elapsed_s"])
            f = (prev[key] - target) / (prev[key] - r[key])      # in (0, 1]: where the segment crosses
            return (prev["step"] + f * (r["step"] - prev["step"]),
                    prev["elapsed_s"] + f * (r["elapsed_s"] - prev["elapsed_s"]))
        prev = r
    return None, None


def final_numbers(run, records):
    """Final pretraining losses of a run: summary.json when it exists, else its last pretraining eval."""
    summ = read_json(os.path.join(run, "summary.json")) or {}
    pre = [r for r in records if r.get("phase", "pretrain") == "pretrain"]
    last = pre[-1] if pre else {}
    get = lambda k: summ.get(k, last.get(k))
    return {"steps": get("steps") if summ else last.get("step"), "specific_valid_loss": get("specific_valid_loss"),
            "specific_test_loss": get("specific_test_loss"), "generic_valid_loss": get("generic_valid_loss"),
            "finetuned": summ.get("specific_test_loss_finetuned"), "ms_per_step": summ.get("ms_per_step"),
            "last_pretrain": last}


def fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def cmd_compare(argv):
    opts, _ = parse_options(argv, COMPARE_OPTIONS, "compare")
    runs = [r for r in opts["runs"].split(",") if r]
    if not runs:
        raise DiagnoseError("--runs: give run directories, comma-separated")
    info = {}
    for run in dict.fromkeys(runs + ([opts["baseline"]] if opts["baseline"] else [])):
        records = read_log(run)
        info[run] = {"records": records, "method": run_config(run)["method"], **final_numbers(run, records)}
    base = opts["baseline"] or next((r for r in runs if info[r]["method"] == "baseline"), runs[0])
    key = opts["metric"]
    target = opts["target"] or info[base]["last_pretrain"].get(key)
    if target is None:
        raise DiagnoseError(f"{base}: no pretraining evaluation to take a target from; give --target")
    base_steps, base_s = time_to_target(info[base]["records"], target, key, opts["interpolate"])
    rows, out = [], {"target": target, "metric": key, "baseline": base, "runs": {}}
    for run, r in info.items():
        steps, secs = time_to_target(r["records"], target, key, opts["interpolate"])
        sp_steps = base_steps / steps if steps and base_steps else None
        sp_time = base_s / secs if secs and base_s else None
        out["runs"][run] = {k: v for k, v in r.items() if k not in ("records", "last_pretrain")}
        out["runs"][run].update(steps_to_target=steps, seconds_to_target=secs,
                                speedup_steps=sp_steps, speedup_time=sp_time)
        rows.append([run + (" (baseline)" if run == base else ""), r["method"], fmt(r["steps"], "d"),
                     fmt(r["specific_valid_loss"]), fmt(r["specific_test_loss"]), fmt(r["finetuned"]),
                     fmt(r["ms_per_step"], ".1f"), fmt(steps, ".0f", "not reached"), fmt(secs, ".1f", "not reached"),
                     fmt(sp_steps, ".2f") + ("x" if sp_steps else ""), fmt(sp_time, ".2f") + ("x" if sp_time else "")])
    header = ["run", "method", "steps", "specific valid", "specific test", "+ fine-tune test", "ms/step",
              f"steps to {target:.3f}", f"train s to {target:.3f}", "speedup (steps)", "speedup (time)"]
    how = "interpolated between evaluations" if opts["interpolate"] else "first evaluation at or below"
    text = (f"Time to reach {key} <= {target:.4f} ({how}; "
            f"train seconds = elapsed_s, evaluation excluded). Paper, Figure 1: loss 1.3 reached 3.9x faster by "
            f"Sparse SOBA and 8.5x by frozen weights than by the baseline.\n\n" + markdown(header, rows))
    print(text)
    if opts["out"]:
        train.atomic_write(opts["out"], lambda p: open(p, "w").write(text + "\n"))
        train.atomic_write(os.path.splitext(opts["out"])[0] + ".json", lambda p: json.dump(out, open(p, "w"), indent=1))
    return 0


# -----------------------------------------------------------------------------------------------
# table: every method of Table 2, over seeds, pre-train and fine-tune specific test loss

TABLE_OPTIONS = dict(out_dir="", seeds="0,1", methods="", assemble_only=False, jobs=1)
# paper, Table 2 (Reuters, specific test log-perplexity in nats/byte): method → (name, pre-train, fine-tune)
TABLE2 = {"baseline": ("Baseline", 1.198, 0.864), "mixing": ("Mixing", 0.861, 0.847),
          "cds": ("CDS", 1.067, 0.867), "classifier": ("Domain classif.", 1.098, 0.894),
          "mwn": ("MetaWeightNet", 1.212, 0.868), "ltr": ("LTR", 1.156, 0.879),
          "dds": ("Sparse DDS", 1.039, 0.824), "anograd": ("Sparse Anograd", 1.034, 0.824),
          "soba": ("Sparse SOBA", 1.019, 0.820)}


def train_cmd(method, seed, run_dir, train_argv):
    """The train.py command line of one run; continues an interrupted run."""
    cmd = [sys.executable, os.path.join(HERE, "train.py")] + train_argv + [
        f"--method={method}", f"--seed={seed}", f"--out_dir={run_dir}"]
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        cmd.append("--resume=True")
    return cmd


def run_all(todo, train_argv, jobs):
    """Run (method, seed, run_dir) triples as train.py subprocesses, `jobs` at a time → {(m, s): status}.

    One job: its output goes to the terminal. Several: each run writes RUN_DIR/train.out and gets
    cores // jobs threads (two PyTorch processes that each use every core run ~10x slower on a
    2-core machine than two single-threaded ones); a line is printed when one starts or ends.
    Ctrl-C (or SIGINT) reaches the running train.py processes, which checkpoint and exit; no new
    run starts, and rerunning the command continues where they stopped."""
    env = None if jobs == 1 else dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    status, running, queue, t0 = {}, {}, list(todo), time.time()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                m, s, run_dir = queue.pop(0)
                os.makedirs(run_dir, exist_ok=True)
                cmd = train_cmd(m, s, run_dir, train_argv)
                out = None if jobs == 1 else open(os.path.join(run_dir, "train.out"), "a")
                running[m, s] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env), out)
                print(f"[{time.time() - t0:6.0f}s] start {m} seed {s}: " + " ".join(cmd[1:]), flush=True)
            time.sleep(0.2)
            for key, (proc, out) in list(running.items()):
                if proc.poll() is not None:
                    status[key] = proc.returncode
                    del running[key]
                    out and out.close()
                    print(f"[{time.time() - t0:6.0f}s] end   {key[0]} seed {key[1]}: status {proc.returncode}", flush=True)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)          # a second SIGINT only sets train.py's stop flag again
        for key, (proc, out) in running.items():
            status[key] = proc.wait()
            out and out.close()
            print(f"[{time.time() - t0:6.0f}s] end   {key[0]} seed {key[1]}: status {proc.returncode} (stopped)", flush=True)
    return status


def mean_std(values):
    """(mean, sample std or None with one value) of the non-missing values, or (None, None)."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def pm(m, s):
    return "—" if m is None else f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else "")


def assemble(out_dir, methods):
    """Group DIR/METHOD_sSEED/summary.json by method → (rows for table.md, table.json dict)."""
    summaries = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        summ = read_json(os.path.join(out_dir, name, "summary.json"))
        method, _, seed = name.rpartition("_s")
        if summ is not None and method and seed.isdigit():
            summaries.setdefault(summ.get("method", method), []).append((int(seed), summ))
    order = methods + sorted(m for m in summaries if m not in methods)
    rows, res = [], {}
    for m in order:
        runs = sorted(summaries.get(m, []), key=lambda t: t[0])
        pre = mean_std([s.get("specific_test_loss") for _, s in runs])
        ft = mean_std([s.get("specific_test_loss_finetuned") for _, s in runs])
        ms = mean_std([s.get("ms_per_step") for _, s in runs])
        name, p_pre, p_ft = TABLE2.get(m, (m, None, None))
        res[m] = {"name": name, "seeds": [sd for sd, _ in runs], "pretrain": pre, "finetune": ft, "ms_per_step": ms,
                  "pretrain_values": [s.get("specific_test_loss") for _, s in runs],
                  "finetune_values": [s.get("specific_test_loss_finetuned") for _, s in runs],
                  "paper": {"pretrain": p_pre, "finetune": p_ft}}
        rows.append([name, pm(*pre), pm(*ft), fmt(ms[0], ".1f"), len(runs), fmt(p_pre), fmt(p_ft)])
    return rows, res


def cmd_table(argv):
    opts, train_argv = parse_options(argv, TABLE_OPTIONS, "table", train_keys=True)
    if not opts["out_dir"]:
        raise DiagnoseError("--out_dir: required (one subdirectory METHOD_sSEED per run)")
    for arg in train_argv:
        if arg[2:].partition("=")[0] in ("method", "seed", "resume"):
            raise DiagnoseError(f"{arg}: `table` sets --method, --seed and --resume itself (see --methods, --seeds)")
    methods = [m for m in opts["methods"].split(",") if m] or list(TABLE2)
    try:
        seeds = [int(s) for s in opts["seeds"].split(",") if s]
    except ValueError:
        raise DiagnoseError(f"--seeds: expected comma-separated integers, got {opts['seeds']!r}") from None
    notes, status = [], {}
    if not opts["assemble_only"]:
        train.parse_args(train_argv + ["--method=baseline"], train_defaults())   # bad settings fail now, not per run
        if opts["jobs"] < 1:
            raise DiagnoseError(f"--jobs: must be at least 1, got {opts['jobs']}")
        todo = []
        for m in methods:
            if m not in train.METHODS:
                notes.append(f"{m}: not a train.py method (train.METHODS = {', '.join(train.METHODS)}); skipped")
                continue
            for s in seeds:
                run_dir = os.path.join(opts["out_dir"], f"{m}_s{s}")
                if os.path.exists(os.path.join(run_dir, "summary.json")):
                    print(f"{m} seed {s}: {run_dir}/summary.json exists, kept", flush=True)
                else:
                    todo.append((m, s, run_dir))
        t0 = time.time()
        status = run_all(todo, train_argv, opts["jobs"])
        for (m, s), rc in status.items():
            if rc in (130, 143):     # stopped by a signal: train.py checkpointed, a rerun continues it
                notes.append(f"interrupted during {m} seed {s}; rerun the same command to continue")
            elif rc != 0:
                notes.append(f"{m} seed {s}: train.py exited with status {rc}")
        if todo:
            notes.append(f"{len(status)} runs took {(time.time() - t0) / 60:.1f} min of wall time ({opts['jobs']} at a time)")
    rows, res = assemble(opts["out_dir"], methods)
    header = ["Method", "Pre-train", "Fine-tune", "ms/step", "seeds", "paper Pre-train", "paper Fine-tune"]
    text = ("Specific test loss (nats/byte), mean ± std over seeds; paper: Table 2 (C4 → Reuters, 9.5M-parameter "
            "model, 300k steps, 5 seeds). Compare the ranking, not the values.\n\n" + markdown(header, rows))
    text += "".join(f"\n- {n}" for n in dict.fromkeys(notes))
    print(text)
    os.makedirs(opts["out_dir"], exist_ok=True)
    train.atomic_write(os.path.join(opts["out_dir"], "table.md"), lambda p: open(p, "w").write(text + "\n"))
    train.atomic_write(os.path.join(opts["out_dir"], "table.json"),
                       lambda p: json.dump({"methods": res, "notes": notes, "train_args": train_argv},
                                           open(p, "w"), indent=1))
    return 1 if any(rc != 0 for rc in status.values()) else 0     # the table still shows the finished runs


# -----------------------------------------------------------------------------------------------
# bench: the cost of one training step of every method, side by side in one process

BENCH_OPTIONS = dict(methods="baseline,mixing,dds,soba,anograd,classifier,ltr,mwn,scalebio", steps=6, warmup=3,
                     rounds=3, out_json="")


def cpu_peak_mb(fn):
    """Peak CPU tensor memory allocated while fn() runs, above what was allocated before, MB.

    Read from the profiler's allocation events ("Total Allocated", counted from the start of
    profiling): the CPU analogue of torch.cuda.max_memory_allocated. The resident set size cannot
    serve: the C allocator keeps freed memory resident, so it reflects earlier steps and methods."""
    from torch.profiler import ProfilerActivity, profile
    saved = os.dup(2)                    # the profiler's C++ side logs to stderr: silence it meanwhile
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    return max([0] + [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]) / 2**20


def run_steps(ctx, method, first, n):
    """Training steps first, …, first + n − 1 of `method` on ctx."""
    for i in range(first, first + n):
        ctx.step = i
        train.STEPS[method](ctx, i)


def ms_per_call(fn, n, device, warmup=1):
    """Wall-clock ms of fn(), averaged over n calls after `warmup` untimed ones (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1000


def step_peak_mb(ctx, method, first):
    """Peak memory of `outer_every` consecutive steps from step `first` (a multiple of outer_every,
    so the outer update is among them), above what was allocated before them, MB."""
    steps = lambda: run_steps(ctx, method, first, ctx.cfg["outer_every"])
    if ctx.device != "cuda":
        return cpu_peak_mb(steps)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    steps()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def pass_timings(ctx, n):
    """ms of the passes the outer updates are made of, on b generic examples x with the model of ctx:
    a forward and backward (fused attention); c(x) = ⟨∇ℓ(x; θ), u⟩ (DDS, Anograd, LTR) by per-example
    step sizes (bilevel.per_example_dot) and by one JVP (bilevel.per_example_dot_jvp); SOBA's
    (ℓ, g, H v, c) both ways (bilevel.soba_terms*). u = v = ∇ℓ of another batch."""
    x = ctx.generic.train.x[: ctx.cfg["batch_size"]].to(ctx.device)
    theta = bilevel.theta_of(ctx.model)
    u, _ = bilevel.grad_at(ctx.model, theta, ctx.generic.train.x[-len(x):].to(ctx.device))
    passes = {"forward_backward": lambda: bilevel.grad_at(ctx.model, theta, x),
              "per_example_dot": lambda: bilevel.per_example_dot(ctx.model, theta, x, u),
              "per_example_dot_jvp": lambda: bilevel.per_example_dot_jvp(ctx.model, theta, x, u),
              "soba_reverse_over_reverse": lambda: bilevel.soba_terms(ctx.model, x, u),
              "soba_forward_over_reverse": lambda: bilevel.soba_terms_forward_over_reverse(ctx.model, x, u)}
    return {name: ms_per_call(fn, n, ctx.device) for name, fn in passes.items()}


def cmd_bench(argv):
    opts, train_argv = parse_options(argv, BENCH_OPTIONS, "bench", train_keys=True)
    methods = [m for m in opts["methods"].split(",") if m]
    for m in methods:
        if m not in train.STEPS:
            raise DiagnoseError(f"--methods: unknown method {m!r}")
    for key in ("steps", "rounds"):
        if opts[key] < 1:
            raise DiagnoseError(f"--{key}: expected a positive integer, got {opts[key]}")
    if "baseline" not in methods:
        methods.insert(0, "baseline")
    ctxs = {}
    for m in methods:                 # every method's model, data and optimizer, side by side
        cfg = train.parse_args(train_argv + [f"--method={m}", "--out_dir=/nonexistent"], train_defaults())
        if m == "cds":
            cfg["cds_pretrain_steps"] = 0
        ctxs[m] = train.setup(cfg)
    cfg = ctxs["baseline"].cfg
    k = cfg["outer_every"]            # time whole cycles of k steps (one outer update each)
    warm, n = k * math.ceil(opts["warmup"] / k), k * math.ceil(opts["steps"] / k)
    for m in methods:
        run_steps(ctxs[m], m, 0, warm)
    # `rounds` rounds, each timing n steps of every method in turn: a slow spell of the machine hits
    # one round of every method rather than all of one method; the median over rounds is reported
    ms = {m: [] for m in methods}
    score_ms = {m: [] for m in methods if getattr(ctxs[m].weighter, "forward_by_lookup", None)}
    x_B = ctxs["baseline"].generic.train.x[: cfg["big_batch_size"]].to(ctxs["baseline"].device)
    for r in range(opts["rounds"]):
        for m in methods:
            ctx = ctxs[m]
            ms[m].append(ms_per_call(lambda: run_steps(ctx, m, warm + r * n, n), 1, ctx.device, warmup=0) / n)
            if m in score_ms:         # the weighter's forward over B_generic^big (no graph)
                score_ms[m].append(ms_per_call(lambda: score(ctx.weighter, x_B), n, ctx.device))
    scoring = {}
    if score_ms:                      # scoring B by the convolution and by lookups, same weighter, same process
        w = ctxs[next(iter(score_ms))].weighter
        scoring = {"convolution": ms_per_call(lambda: score(w, x_B, by_lookup=False), n, ctxs["baseline"].device),
                   "lookup": ms_per_call(lambda: score(w, x_B), n, ctxs["baseline"].device)}
    rows, res = [], {}
    for m in methods:
        ctx = ctxs[m]
        mem = step_peak_mb(ctx, m, warm + opts["rounds"] * n)
        res[m] = {"ms_per_step": float(np.median(ms[m])), "ms_per_step_rounds": ms[m], "step_memory_mb": mem,
                  "trained_bytes_per_s": cfg["batch_size"] * cfg["seq_len"] / (np.median(ms[m]) / 1000),
                  "scanned_bytes_per_s": (cfg["big_batch_size"] if m in train.SELECTING else cfg["batch_size"])
                  * cfg["seq_len"] / (np.median(ms[m]) / 1000)}
        if m in score_ms:
            res[m]["score_ms"] = float(np.median(score_ms[m]))
    base = res["baseline"]
    for m, r in res.items():
        r["ratio"] = r["ms_per_step"] / base["ms_per_step"]
        # the ratio within each round (same spell of the machine): its range says how far to trust r["ratio"]
        r["ratio_rounds"] = [a / b for a, b in zip(r["ms_per_step_rounds"], base["ms_per_step_rounds"])]
        r["memory_ratio"] = r["step_memory_mb"] / max(base["step_memory_mb"], 1e-9)
        r["score_fraction"] = r["score_ms"] / base["ms_per_step"] if "score_ms" in r else None
        spread = f" ({min(r['ratio_rounds']):.2f}–{max(r['ratio_rounds']):.2f})" if len(r["ratio_rounds"]) > 1 else ""
        rows.append([m, f"{r['ms_per_step']:.1f}", f"{r['ratio']:.2f}x{spread}", fmt(r["score_fraction"], ".2f"),
                     f"{r['step_memory_mb']:.1f}", f"{r['memory_ratio']:.2f}x", f"{r['trained_bytes_per_s'] / 1e3:.1f}",
                     f"{r['scanned_bytes_per_s'] / 1e3:.1f}"])
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    header = ["method", "ms/step", "vs baseline (range over rounds)", "scoring B / baseline step", "step memory MB", "memory vs baseline",
              "trained kB/s", "scanned kB/s"]
    text = (f"{dev}, one process; per method the median over {opts['rounds']} rounds of {n} timed steps (whole cycles "
            f"of outer_every steps, the methods in turn in each round) after {warm} warm-up steps; step memory = "
            f"peak tensor memory allocated during one cycle "
            f"(with its outer update), above what was allocated before it.\n\n" + markdown(header, rows))
    passes = pass_timings(ctxs["baseline"], n)
    text += (f"\n\nPasses on b = {cfg['batch_size']} generic examples: forward and backward {passes['forward_backward']:.1f} ms; "
             f"c(x) = ⟨∇ℓ(x; θ), u⟩ (DDS, Anograd, LTR) by per-example step sizes {passes['per_example_dot']:.1f} ms, "
             f"by one JVP {passes['per_example_dot_jvp']:.1f} ms; SOBA's "
             f"(ℓ, g, H v, c) by reverse over reverse {passes['soba_reverse_over_reverse']:.1f} ms, by forward over "
             f"reverse {passes['soba_forward_over_reverse']:.1f} ms.")
    if scoring:
        text += (f" Scoring B ({cfg['big_batch_size']} examples): by the weighter's convolution {scoring['convolution']:.1f} ms, "
                 f"by table lookups (weighter.score) {scoring['lookup']:.1f} ms.")
    print(text)
    if opts["out_json"]:
        train.atomic_write(opts["out_json"], lambda p: json.dump({"device": dev, "methods": res, "train_args": train_argv,
                                                                  "passes_ms": passes, "scoring_ms": scoring},
                                                                 open(p, "w"), indent=1))
    return 0


# -----------------------------------------------------------------------------------------------

COMMANDS = {"sar": cmd_sar, "weights": cmd_weights, "select": cmd_select, "compare": cmd_compare, "table": cmd_table,
            "bench": cmd_bench}


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown subcommand {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (DiagnoseError, train.ConfigError, train.TrainingError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
