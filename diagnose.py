"""
Diagnostics and reports for adaptive training distributions: will bilevel data selection help
(SAR/GAR, paper section 6.3), what did a run's weighting network learn, which documents of a corpus
does it select, how much sooner does a run reach a target loss (Figure 1), Tables 2 and 3 in one
command, the step cost of every method, and the check to run on a GPU.

    python diagnose.py --help                          # the subcommands; `SUBCOMMAND --help`: its options
    python diagnose.py sar --preset=cpu --generic=DIR --specific=FILE          # will selection help?
    python diagnose.py weights --run=out/soba                                   # what α learned
    python diagnose.py select --run=out/soba --input=CORPUS --output=sel.jsonl --fraction=0.1
    python diagnose.py compare --runs=out/base,out/soba                         # time to a target loss
    python diagnose.py table --preset=cpu --generic=DIR --specific=FILE --out_dir=runs/t2    # Table 2
    python diagnose.py table --preset=cpu --generic=DIR --specifics=DIR --out_dir=runs/t3    # Table 3
    python diagnose.py bench --preset=cpu                                       # ms/step and memory
    python diagnose.py gpucheck --generic=DIR --specific=FILE                   # 10 minutes on one GPU

Options are `--key=value`, as in train.py; sar, table, bench and gpucheck also take any train.py
setting (the model, the data, --preset, --device), which they hand to train.py's own parser. Bad
input: a one-line error naming the file or flag, exit status 2, no half-written output.

Sections, in order:
  options and files   the option tables, their parser and --help; run directories; atomic output
  sar                 Specific and Generic Acceleration Rates of a model θ, with confidence intervals
  documents           a corpus streamed document by document, and cut into windows as train.py does
  weights             per-source shares, concentration, snippets and weight vs loss of a run's α
  select              score any corpus with α, write the k best documents (or a draw of k), O(k) memory
  compare             steps and seconds to a target specific loss, speedups over the baseline
  table               every method × seed (× specific set) by train.py, assembled into Table 2 or 3
  bench               ms/step, ratio to the baseline, peak memory and scoring cost, in one process
  gpucheck            tests/test_cuda.py, short paper-preset runs and the bench, as one JSON report
"""

import contextlib, gzip, heapq, importlib.util, inspect, itertools, json, math, os, platform, random, re
import signal, subprocess, sys, tempfile, time
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import bilevel, data, train, weighter
from model import CONFIG_KEYS
from weighter import Weighter, score

HERE = os.path.dirname(os.path.abspath(__file__))


class DiagnoseError(data.DataError):
    """Bad input. str(e) is one line that names the file or flag."""


def need(ok, message):
    """Bad input unless ok: a one-line DiagnoseError (as train.py's checks)."""
    if not ok:
        raise DiagnoseError(message)


# -----------------------------------------------------------------------------------------------
# options and files
#
# Each subcommand has one table, option=(default, one-line meaning). The parser checks a value
# against its default's type (train.cast, as train.py does) and --help prints the table, so the help
# cannot drift from the code. Subcommands that train or time models pass any other train.py setting
# through, untouched, to train.py's own parser.

def parse_options(argv, table, sub, train_settings):
    """argv → (options, [--key=value strings for train.py]), or a one-line DiagnoseError."""
    opts, passthrough = {key: default for key, (default, _) in table.items()}, []
    see = f"of `{sub}` (see python diagnose.py {sub} --help)"
    for arg in argv:
        need(arg.startswith("--"), f"{arg}: expected --key=value {see}")
        key, eq, val = arg[2:].partition("=")
        if key in table:          # the subcommand's own option: a value of its default's type
            need(eq or isinstance(opts[key], bool), f"--{key}: expected --{key}=VALUE")
            opts[key] = train.cast(key, val if eq else "True", table[key][0])
        else:                     # a train.py setting, for train.py's own parser
            need(train_settings and key in train.config_keys, f"--{key}: unknown option {see}")
            passthrough.append(arg)
    return opts, passthrough


def help_text(sub=None):
    """`python diagnose.py --help`: the subcommands, one line each (their docstring's first line).
    `python diagnose.py SUB --help`: SUB's docstring, then every option with its default and meaning."""
    if sub is None:
        rows = [f"  {s:<9} {fn.__doc__.splitlines()[0]}" for s, (fn, _, _) in COMMANDS.items()]
        return "\n".join(["usage: python diagnose.py SUBCOMMAND --key=value ...\n\nsubcommands:", *rows,
                          "\n`python diagnose.py SUBCOMMAND --help`: its options, defaults and meanings."])
    fn, table, train_settings = COMMANDS[sub]
    lines = [f"usage: python diagnose.py {sub} --key=value ...\n", inspect.cleandoc(fn.__doc__), "\noptions:"]
    lines += [f"  {f'--{key}={default}':<28} {meaning}" for key, (default, meaning) in table.items()]
    if train_settings:
        lines.append("\nAny train.py setting is accepted too (the model, the data, --preset, --device): see "
                     "`python train.py --help`.")
    return "\n".join(lines)


def run_steps(ctx, first, n, desc=None):
    """Training steps first, …, first + n − 1 of ctx's method, each by train.train_step (train.py's
    learning rate, then the method's step); desc labels a tqdm bar (None: no bar)."""
    for i in tqdm(range(first, first + n), desc=desc, leave=False, disable=True if desc is None else None):
        train.train_step(ctx, i)


def train_defaults():
    """train.py's settings and their defaults: its config block."""
    return {k: getattr(train, k) for k in train.config_keys}


def read_json(path):
    """A JSON file's value, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    try:
        return json.load(open(path))
    except ValueError:
        raise DiagnoseError(f"{path}: not valid JSON") from None


def read_run(run):
    """A train.py run directory → (its log.jsonl records, its config completed with today's defaults
    for the settings it predates). A torn last log line, of a run still writing, is skipped."""
    cfg = read_json(os.path.join(run, "config.json"))
    need(cfg is not None and os.path.isfile(os.path.join(run, "log.jsonl")),
         f"{run}: not a train.py run directory (no config.json and log.jsonl)")
    records = []
    for line in open(os.path.join(run, "log.jsonl")):
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records, {**train_defaults(), **cfg}


def save(path, what):
    """Write `what` (text, a JSON-able dict, or a function that writes the path it is given) to path
    through a temporary file renamed at the end (data.atomic_write): a reader never sees half a
    file, a failure leaves none, and open() gives the file the umask's permissions (0644 under the
    usual 022; tempfile's would be 0600)."""
    def write_text(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(what if isinstance(what, str) else json.dumps(what, indent=1) + "\n")
    try:
        data.atomic_write(path, what if callable(what) else write_text)
    finally:                   # after a failure: no temporary file left behind
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


def markdown(header, rows):
    """A markdown table: a header row, then one row per list of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def fmt(v, spec=".3f", none="—"):
    """A number in a table cell; `none` for a missing one."""
    return none if v is None else format(v, spec)


# -----------------------------------------------------------------------------------------------
# sar: Specific and Generic Acceleration Rates (section 6.3, Table 8)
#
# Will data selection help? To first order, a step on a batch B changes the loss of an example x
# by −η ∇ℓ(x; θ)ᵀ∇ℓ(B; θ): the batches that help x are those whose gradient aligns with x's.
#   a_norm(x, B) = ∇ℓ(x; θ)ᵀ ∇ℓ(B; θ) / ‖∇ℓ(B; θ)‖,    ℓ(B; θ) = (1/|B|) Σ_{x'∈B} ℓ(x'; θ)
#   SAR = E_{x~D_specific, B_specific, B_generic} 1{a_norm(x, B_specific) > a_norm(x, B_generic)}
#   GAR = E_{x~D_generic,  B_specific, B_generic} 1{a_norm(x, B_generic) > a_norm(x, B_specific)}
# The inner products of a whole batch of x are one backward pass each (bilevel.per_example_dot): no
# per-example gradient is ever formed.

SAR_OPTIONS = dict(
    ckpt=("", "θ from this train.py checkpoint (ckpt.pt or run directory); else pretrained here"),
    pretrain_steps=(300, "without --ckpt: baseline steps on the generic data that give θ"),
    draws=(20, "draws of (B_specific, B_generic, held-out examples x)"),
    n_examples=(64, "held-out examples x of each kind per draw (at most 1024)"),
    out_json=("", "also write the rates and their intervals here"),
    save_ckpt=("", "without --ckpt: save the pretrained θ here, for later `sar --ckpt=...`"))


def unit(g):
    """u(B) = ∇ℓ(B; θ) / ‖∇ℓ(B; θ)‖, parameter-shaped, from g = ∇ℓ(B; θ)."""
    norm = bilevel.dot(g, g).sqrt()
    return {k: t / norm for k, t in g.items()}


def alignments(model, x, B_specific, B_generic):
    """(a_norm(x, B_specific), a_norm(x, B_generic)) for every row of x: (n,), (n,)."""
    theta = bilevel.theta_of(model)
    # a_norm(x, B) = ∇ℓ(x; θ)ᵀ u(B): (n,) for each batch, one backward pass each
    return tuple(bilevel.per_example_dot(model, theta, x, unit(bilevel.grad_at(model, theta, B)[0]))[1]
                 for B in (B_specific, B_generic))


def acceleration_indicators(model, x_specific, x_generic, B_specific, B_generic):
    """One draw of (B_specific, B_generic): the SAR indicators over x_specific (n_s,) and the GAR
    indicators over x_generic (n_g,), both bool: the batch of x's own kind helps x more."""
    a_s, a_g = alignments(model, torch.cat([x_specific, x_generic]), B_specific, B_generic)  # (n_s + n_g,)
    n_s = len(x_specific)
    return a_s[:n_s] > a_g[:n_s], a_g[n_s:] > a_s[n_s:]


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a binomial rate k/n, n > 0 (treats every indicator as independent)."""
    p, c = k / n, z * z / n
    # (p + z²/2n ± z √(p(1−p)/n + z²/4n²)) / (1 + z²/n)
    centre, half = (p + c / 2) / (1 + c), z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return centre - half, centre + half


def bootstrap_over_draws(ind, n_boot=2000, seed=0):
    """95% percentile interval of the mean of ind (draws, n), resampling whole draws: the n
    indicators of one draw share the same two batches, so they are not independent."""
    per_draw = ind.float().mean(1)                                            # (draws,)
    # (n_boot, draws): the draws of each resample, drawn with replacement
    idx = torch.randint(len(per_draw), (n_boot, len(per_draw)), generator=torch.Generator().manual_seed(seed))
    means = per_draw[idx].mean(1)                                             # (n_boot,)
    return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()


def rate_summary(ind, n_docs):
    """ind: (draws, n) bool → {rate, bootstrap CI, Wilson CI over the n_docs distinct documents, n}."""
    rate, n = ind.float().mean().item(), ind.numel()
    return dict(rate=rate, ci95_bootstrap_draws=bootstrap_over_draws(ind), n=n, n_docs=n_docs,
                ci95_wilson=wilson(rate * n_docs, n_docs))


def sar_setup(opts, train_argv):
    """(ctx, where θ came from, its training steps): train.py's data and model, θ read from --ckpt or
    pretrained here on uniform generic data (the paper's θ_t, "trained on the generic distribution
    for t steps") with train.py's own step and learning-rate schedule."""
    ckpt, steps = opts["ckpt"], opts["pretrain_steps"]
    if ckpt:
        # the checkpoint fixes the preset and θ's shape: a flag for them would not match its state_dict
        fixed = [a.split("=")[0] for a in train_argv if a[2:].split("=")[0] in ("preset", *CONFIG_KEYS)]
        need(not fixed, f"{', '.join(fixed)}: not with --ckpt (the checkpoint fixes the model's settings)")
        st = data.read_checkpoint(os.path.join(ckpt, "ckpt.pt") if os.path.isdir(ckpt) else ckpt, "--ckpt")
        need("model" in st and "config" in st, f"--ckpt: {ckpt} holds no model θ (a weighters/ snapshot?)")
        # the checkpoint's settings, and the ones given here over them (e.g. another --specific)
        defaults = {**train_defaults(), **st["config"], "preset": "", "resume": False}
        ctx = train.setup(train.parse_args(train_argv + ["--method=baseline"], defaults))
        ctx.model.load_state_dict(st["model"])
        return ctx, f"{ckpt} (step {st['step']})", st["step"]
    cfg = train.parse_args(train_argv + ["--method=baseline", f"--max_steps={steps}", "--finetune_steps=0"],
                           train_defaults())
    ctx = train.setup(cfg)
    run_steps(ctx, 0, steps, desc="pretrain (baseline)")
    if opts["save_ckpt"]:    # θ_t for later `sar --ckpt=...` (pretraining never reads the specific set)
        st = {"step": steps, "config": cfg, "model": ctx.model.state_dict()}
        save(opts["save_ckpt"], lambda p: torch.save(st, p))
    return ctx, f"baseline pretrained here for {steps} steps", steps


def cmd_sar(opts, train_argv):
    """will data selection help? Specific and Generic Acceleration Rates of θ (section 6.3)

    θ is a baseline model pretrained here on the generic data (--pretrain_steps), or read from
    --ckpt. Each draw takes fresh batches B_specific, B_generic of b = --batch_size training examples
    and fresh held-out examples; prints both rates with 95% intervals and what they mean:

    SAR: the share of specific examples whose gradient aligns better with a specific batch than with a
    generic one; GAR: the share of generic examples aligned better with the generic batch (chance: 50%).
    High SAR with a lower GAR: the specific loss is hard to improve from generic data as it comes, which
    is where data selection helps. Both near 50%: generic batches help as much, or the first-order view
    cannot tell them apart, and bilevel selection is unlikely to help. Paper, Table 8: language modelling
    (C4 -> Reuters) SAR 86.2%, GAR 69.4%; image classification, where selection did not help, 50.3%,
    49.8%."""
    need(opts["draws"] > 0 and 0 < opts["n_examples"] <= 1024, "--draws: > 0; --n_examples: in 1..1024")
    ctx, origin, steps = sar_setup(opts, train_argv)
    need(len(ctx.specifics) == 1, "--specific: sar takes one specific set")
    if steps < 200:      # a θ this close to its initialisation: the rates say little about training
        print(f"warning: θ trained {steps} steps (< 200): the rates are not meaningful yet", file=sys.stderr)
    cfg, b, n, spec, gen = ctx.cfg, ctx.cfg["batch_size"], opts["n_examples"], ctx.specifics[0], ctx.generic
    g, ind, docs = torch.Generator().manual_seed(cfg["seed"] + 1000), [], []
    for _ in tqdm(range(opts["draws"]), desc="SAR/GAR draws", leave=False, disable=None):
        # each draw: fresh held-out x (n, T) of both kinds, fresh training batches B_specific, B_generic
        # (b, T): x_specific, x_generic, B_specific, B_generic, each of uniform draws of rows
        rows = [(e, torch.randint(len(e), (k,), generator=g))
                for e, k in ((spec.valid, n), (gen.valid, n), (spec.train, b), (gen.train, b))]
        ind.append(acceleration_indicators(ctx.model.eval(), *(e.x[i].to(ctx.device) for e, i in rows)))
        docs.append([e.doc_id[i] for e, i in rows[:2]])     # the held-out documents drawn (with repeats)
    # the Wilson interval over the distinct held-out documents: a repeat draw is not a new observation
    n_docs = [len(torch.unique(torch.cat([d[k] for d in docs]))) for k in (0, 1)]
    sar, gar = (rate_summary(torch.stack([pair[k].cpu() for pair in ind]), n_docs[k]) for k in (0, 1))
    res = dict(sar=sar, gar=gar, theta=origin, theta_steps=steps, generic=cfg["generic"] or "builtin",
               specific=cfg["specific"] or "builtin", batch_size=b, draws=len(ind), n_examples_per_draw=n)
    for name in ("sar", "gar"):
        r, (lo, hi), (wlo, whi) = res[name], res[name]["ci95_bootstrap_draws"], res[name]["ci95_wilson"]
        print(f"{name.upper()} {100 * r['rate']:5.1f}%  95% CI {100 * lo:.1f}-{100 * hi:.1f} (bootstrap over "
              f"{opts['draws']} draws; Wilson {100 * wlo:.1f}-{100 * whi:.1f} over {r['n_docs']} documents)")
    # then the docstring's last paragraph: what the rates mean
    print(f"θ: {origin} | |B| = {b}\n\n" + inspect.cleandoc(cmd_sar.__doc__).split(":\n\n")[-1])
    if opts["out_json"]:
        save(opts["out_json"], res)
    return 0


# -----------------------------------------------------------------------------------------------
# documents: a corpus streamed file by file, record by record, never whole in memory (for select)

def documents(spec, chosen, n_max):
    """(index, (bytes, source, split, text)) of the non-empty documents of a corpus spec, in train.py's
    reading order: those whose index is in the set `chosen`, or (chosen None) the first n_max (0: all).
    `text` as read (what select writes out), `bytes` its normalised encoding (what the models read).
    data.read_documents reads them, so the same files and records pass."""
    files = data.resolve_files(spec, "--input")
    docs = enumerate(itertools.chain.from_iterable(data.read_documents(f, with_text=True) for f in files))
    if chosen is not None:
        docs = ((i, d) for i, d in docs if i in chosen)
    return itertools.islice(docs, n_max or None)


def doc_windows(b, seq_len, how):
    """A document's windows as train.py cuts them (data.windows; "first": its first seq_len bytes,
    the paper's example; "chunk": all of them) → (n, seq_len) uint8."""
    return torch.frombuffer(bytearray(data.windows(b, seq_len, how)[0]), dtype=torch.uint8).view(-1, seq_len)


# -----------------------------------------------------------------------------------------------
# weights: what the weighting network learned

WEIGHTS_OPTIONS = dict(
    run=("", "a train.py run directory"),
    n_examples=(2000, "generic valid examples scored by α (a uniform sample)"),
    n_snippets=(5, "highest- and lowest-weighted examples shown"),
    bins=(10, "score bins of the weight-vs-loss table"),
    seed=(0, "seed of the sample"),
    plot=("", "also draw the shares and the losses into this PNG file (needs matplotlib)"))

def enrichment(share):
    """A source's share of the examples trained on ÷ its base rate (its share of the generic pool)."""
    return share["share"] / max(share["base"], 1e-12)


def share_tables(records, cfg):
    """Per-source share of trained-on examples at (up to 6) evaluations, against the base rate; and
    the concentration of w over B_generic^big (effective sample size, max weight)."""
    recs, B = [r for r in records if r.get("source_share")], cfg["big_batch_size"]
    if not recs:
        print("\nno per-source shares in log.jsonl (this method does not select generic examples)")
    else:       # the columns: every evaluation, or 6 spread evenly (the first and the last among them)
        cols = recs if len(recs) <= 6 else [recs[round(i * (len(recs) - 1) / 5)] for i in range(6)]
        final = recs[-1]["source_share"]
        what = "λ (per-source weight)" if cfg["method"] == "scalebio" else "share of the examples trained on"
        order = sorted(final, key=lambda s: -enrichment(final[s]))          # the most up-weighted first
        rows = [[s, f"{final[s]['base']:.3f}"] + [f"{r['source_share'][s]['share']:.3f}" for r in cols]
                + [f"{enrichment(final[s]):.2f}x"] for s in order]
        print(f"\n## {what} per source, over pretraining (sorted by final share / base rate)\n"
              + markdown(["source", "base"] + [f"step {r['step']}" for r in cols] + ["final / base"], rows))
    # ESS = (Σ w)² / Σ w² over B_generic^big: |B| for uniform weights, 1 for a one-hot
    rows = [[r["step"], f"{r['ess']:.1f}", f"{r['ess'] / B:.3f}", f"{r['max_weight']:.4f}"]
            + [fmt(r.get(k + "_valid_loss")) for k in ("specific", "generic")] for r in records if "ess" in r]
    if rows:
        print(f"\n## concentration of w(x; α) over B_generic^big (|B| = {B}; uniform: ESS = |B|, max weight "
              f"= {1 / B:.4f})\n" + markdown(["step", "ESS", "ESS / |B|", "max weight", "specific valid",
                                             "generic valid"], rows))


def weighter_report(run, cfg, opts):
    """A uniform sample of generic valid examples scored by the run's α: the highest- and lowest-
    scored, and how the score s(x; α) goes with the loss ℓ(x; θ) of the run's θ."""
    try:
        alpha, st = weighter.load_weighter(run, "--run")
    except data.DataError as e:
        print(f"\nno text-scoring weighting network to inspect ({str(e).split(': ', 1)[-1]})")
        return
    # the run's data and model, as train.py builds them (on this machine's CPU)
    ctx = train.setup({**cfg, "method": "baseline", "device": "cpu", "compile": False})
    ctx.model.load_state_dict(st["model"])
    g = ctx.generic.valid
    idx = torch.randperm(len(g), generator=torch.Generator().manual_seed(opts["seed"]))[:opts["n_examples"]]
    x, sources = g.x[idx], [g.sources[i] for i in g.source_id[idx].tolist()]       # (n, T)
    with torch.no_grad():
        loss = torch.cat([ctx.model.eval()(x[i:i + 256]) for i in range(0, len(x), 256)])   # (n,) ℓ(x; θ)
    s = score(alpha, x)                                                                 # (n,) s(x; α)
    print(f"\n## {len(x)} generic valid examples scored by α (score s = log w + const), ℓ by θ at step "
          f"{st['step']} (pretraining: {cfg['max_steps']} steps)")
    order, k = torch.argsort(s, descending=True).tolist(), opts["n_snippets"]
    for title, part in (("highest", order[:k]), ("lowest", order[-k:])):
        print(f"\n{title}-weighted:")
        for i in part:        # the window's text (data.encode made newlines and tabs spaces)
            text = bytes(x[i]).decode(errors="replace")[:80]
            print(f"  s={s[i]:+.3f} ℓ={loss[i]:.2f} {sources[i]:>22s} | {text}")
    weight_vs_loss(s, loss, sources, opts["bins"])


def ranks(v):
    """The ranks of a tensor's values, (n,) (ties, rare in floats, broken by order)."""
    return np.argsort(np.argsort(v.numpy(), kind="stable"))


def weight_vs_loss(s, loss, sources, bins):
    """How the scores s (n,) go with the losses (n,): Pearson's r and Spearman's ρ (Pearson's r of
    the ranks), and a table of the loss in quantile bins of s."""
    r, rho = float(np.corrcoef(s, loss)[0, 1]), float(np.corrcoef(ranks(s), ranks(loss))[0, 1])
    print(f"\nweight vs loss: Pearson r = {r:+.3f}, Spearman ρ = {rho:+.3f} (of s(x; α) and ℓ(x; θ))")
    edges = torch.quantile(s, torch.linspace(0, 1, bins + 1))            # (bins + 1,) quantiles of s
    b = torch.bucketize(s, edges[1:-1], right=True)                      # (n,) the bin of each x
    rows = []
    for j in range(bins):
        m = b == j                                                       # (n,) x in bin j
        if m.any():
            top = Counter(sources[i] for i in m.nonzero()[:, 0].tolist()).most_common(1)[0][0]
            s_range = f"{s[m].min():+.3f}..{s[m].max():+.3f}"
            rows.append([j + 1, s_range, int(m.sum()), f"{loss[m].mean():.3f}", top])
    print(markdown(["score bin", "s range", "n", "mean ℓ", "top source"], rows))


def plot(path, panels):
    """A PNG of side-by-side panels over the steps of runs' evaluations, each (title, y label,
    {label: (steps, values)}, a dashed level or None)."""
    import matplotlib.pyplot as plt     # figures are only saved: any backend, no display needed
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, curves, level) in zip(axes[0], panels):
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, label=label)
        if level is not None:
            ax.axhline(level, color="gray", linestyle="--", label=f"target {level:.3f}")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    print(f"\nplot: {path}")


def plot_run(records, path):
    """PNG of the shares of the examples trained on, for the 8 most up-weighted sources, and of the
    losses, over the evaluations of the run."""
    recs = [r for r in records if r.get("source_share")]
    final = recs[-1]["source_share"] if recs else {}
    top = sorted(final, key=lambda s: -enrichment(final[s]))[:8]
    steps, all_steps = [r["step"] for r in recs], [r["step"] for r in records]
    shares = {s: (steps, [r["source_share"][s]["share"] for r in recs]) for s in top}
    losses = {k: (all_steps, [r[k] for r in records]) for k in ("specific_valid_loss", "generic_valid_loss")}
    plot(path, [("top sources, by share / base", "share of the examples trained on", shares, None),
                ("losses", "nats / byte", losses, None)])


def cmd_weights(opts, _):
    """what a run's α learned: shares per source, concentration, snippets, weight vs loss

    From the run's log.jsonl: each source's share of the examples θ trained on against its share of
    the generic pool, and the effective sample size of w over B_generic^big. From its checkpoint: a
    sample of generic valid examples scored by α, with the loss ℓ(x; θ) of each."""
    need(opts["run"], "--run: give a train.py run directory")
    need(not opts["plot"] or importlib.util.find_spec("matplotlib"),     # first, not after the report
         "--plot: needs matplotlib, which is not installed here (pip install matplotlib)")
    records, cfg = read_run(opts["run"])
    print(f"# {opts['run']}: method {cfg['method']}, {len(records)} evaluations")
    share_tables(records, cfg)
    weighter_report(opts["run"], cfg, opts)
    if opts["plot"]:
        plot_run(records, opts["plot"])
    return 0


# -----------------------------------------------------------------------------------------------
# select: score any corpus with a trained α and write the selected documents
#
# Bounded memory: the corpus is read document by document, twice. Pass 1 scores every document and
# keeps only a min-heap of the k best (key, index) pairs, O(k) numbers whatever the corpus size and
# no text. Pass 2 reads the corpus again and writes the kept documents, in reading order.
#   mode=top:    key = s(x; α), the k highest scores, exactly.
#   mode=sample: key = s(x; α) + Gumbel noise: the top k of these is a draw of k documents without
#                replacement, each next one ∝ w(x) = exp(s(x; α)) (Gumbel top-k trick, as the
#                filter of Algorithm 1, here over the whole corpus instead of one big batch).
# --max_docs=N reads N documents drawn uniformly over the whole input (a pass 0 counts the documents
# and draws N indices), not the first N of its first files (that is --first_docs). With --fraction,
# k = ⌈fraction · N⌉ needs the number N of documents read: a counting pass finds it.

SELECT_OPTIONS = dict(
    run=("", "the run (directory, ckpt.pt or weighters/step_N.pt) whose α scores the documents"),
    input=("", "the corpus: file, directory, glob or comma list of .txt/.jsonl/.jsonl.gz"),
    output=("", "the selected documents, as JSON lines (.jsonl or .jsonl.gz); never an input file"),
    fraction=(0.0, "keep this fraction of the documents read, in (0, 1] (or give --sample)"),
    sample=(0, "keep this many documents (or give --fraction)"),
    mode=("top", "top: the k highest scores; sample: a draw of k without replacement ∝ exp(s)"),
    doc_score=("first", "a document's score: s(x; α) of its first window (first) or their mean (mean)"),
    max_docs=(0, "read only this many documents, drawn uniformly over the whole input; 0 = all"),
    first_docs=(False, "with --max_docs: the first max_docs documents in reading order instead"),
    batch=(256, "documents scored together"),
    seed=(0, "seed of the --max_docs draw and of --mode=sample"),
    overwrite=(False, "replace an existing --output"))


class TopK:
    """The k largest (key, index, score) items seen, in a min-heap: memory O(k), no text.
    Among equal keys the earlier document is kept."""

    def __init__(self, k):
        self.k, self.heap = k, []

    def push(self, key, i, s):
        """Offer document i: kept if among the k largest keys so far (ties: the smaller index)."""
        item = (key, -i, s)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif self.heap and item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def kept(self):
        """{document index: score} of the kept documents."""
        return {-i: s for _, i, s in self.heap}


def score_documents(alpha, docs, seq_len, doc_score, n):
    """(index, source, s) of every (index, document) of docs, n documents scored at a time; a
    document's s is the mean of s(x; α) over its first window or over all its windows."""
    docs, how = iter(docs), "first" if doc_score == "first" else "chunk"
    # the next n documents, each with its windows (n_i, seq_len), until there are none
    while todo := [(i, src, doc_windows(b, seq_len, how)) for i, (b, src, *_) in itertools.islice(docs, n)]:
        s = score(alpha, torch.cat([w for *_, w in todo])).split([len(w) for *_, w in todo])  # [(n_i,)]
        yield from ((i, src, c.mean().item()) for (i, src, _), c in zip(todo, s))


def check_select(opts):
    """The options of select, checked before any reading: one-line errors, nothing written."""
    need(opts["run"] and opts["input"] and opts["output"], "--run, --input and --output: required")
    for key, choices in (("mode", ("top", "sample")), ("doc_score", ("first", "mean"))):
        need(opts[key] in choices, f"--{key}: expected {' or '.join(choices)}, got {opts[key]!r}")
    need((opts["fraction"] > 0) != (opts["sample"] > 0), "--fraction / --sample: give one or the other")
    need(opts["fraction"] <= 1 and opts["sample"] >= 0 and opts["max_docs"] >= 0 and opts["batch"] >= 1,
         "--fraction must be in (0, 1]; --sample, --max_docs >= 0; --batch >= 1")
    out, inputs = os.path.realpath(opts["output"]), data.resolve_files(opts["input"])
    need(out not in map(os.path.realpath, inputs) and not os.path.isdir(out),
         f"--output: {opts['output']} is an input file or a directory; not writing it")
    need(os.path.isdir(os.path.dirname(out)), f"--output: {opts['output']}: no such directory")
    need(out.endswith((".jsonl", ".jsonl.gz")), f"--output: {opts['output']}: not a .jsonl or .jsonl.gz name")
    need(opts["overwrite"] or not os.path.exists(out), f"--output: {opts['output']} exists (--overwrite)")


def selection_report(opts, keep, per_source, n_docs):
    """Every input source's share of the selected documents against its share of the input, the most
    enriched first (the top 20 and bottom 5 of many)."""
    how = {"first": "first window", "mean": "windows' mean"}[opts["doc_score"]]
    print(f"selected {len(keep)} of {n_docs} documents (mode {opts['mode']}; a document's score: s(x; α) of "
          f"its {how}) -> {opts['output']}")
    picked = Counter(src for _, src in keep.values())
    share = {src: (picked[src] / max(len(keep), 1), n / n_docs) for src, n in per_source.items()}
    rows = [[src, picked[src], f"{sel:.3f}", f"{inp:.3f}", f"{sel / inp:.2f}x"]
            for src, (sel, inp) in sorted(share.items(), key=lambda kv: (-kv[1][0] / kv[1][1], kv[0]))]
    print(markdown(["source", "selected", "share of selected", "share of input", "ratio"],
                   rows if len(rows) <= 30 else rows[:20] + [["…", "", "", "", ""]] + rows[-5:]))


def cmd_select(opts, _):
    """score a corpus with a run's α and write the k best documents (or a draw of k)

    Any corpus train.py reads (and larger than memory): k = --sample, or --fraction of the documents
    read. The output holds the documents' text, source and score, in reading order; the report
    compares each source's share of the selection with its share of the input."""
    check_select(opts)
    alpha, st = weighter.load_weighter(opts["run"], flag="--run")
    # α's windows: seq_len bytes, as the run it comes from trained it
    seq_len = st.get("config", {}).get("seq_len", train_defaults()["seq_len"])
    n_max, chosen = opts["max_docs"], None
    drawn = n_max and not opts["first_docs"]     # n_max documents drawn uniformly over the whole input
    # pass 0 counts the documents: all N of them to draw from, or the first n_max (0: all); a tqdm bar
    # over the documents, as in pass 1, is shown on a terminal only
    counted = documents(opts["input"], None, 0 if drawn else n_max)
    n_docs = sum(1 for _ in tqdm(counted, desc="counting", unit="doc", leave=False, disable=None))
    if drawn:
        chosen = set(random.Random(opts["seed"]).sample(range(n_docs), min(n_docs, n_max)))  # O(n_max) memory
        n_docs = len(chosen)
    # pass 1: every document scored, the k with the largest keys kept (TopK)
    top, per_source = TopK(opts["sample"] or math.ceil(opts["fraction"] * n_docs)), Counter()
    gen, docs = torch.Generator().manual_seed(opts["seed"]), documents(opts["input"], chosen, n_max)
    scored = score_documents(alpha, docs, seq_len, opts["doc_score"], opts["batch"])
    for i, src, s in tqdm(scored, desc="score", unit="doc", leave=False, disable=None):
        per_source[src] += 1
        key = s
        if opts["mode"] == "sample":    # key = s + G, G = −log(−log U), U ~ Uniform(0, 1), a Gumbel draw
            key = s - math.log(-math.log(torch.rand((), generator=gen).clamp(1e-20, 1.0).item()))
        top.push(key, i, (s, src))
    keep, opener = top.kept(), gzip.open if opts["output"].endswith(".gz") else open

    def write(tmp):           # pass 2: the kept documents, in reading order, as JSON lines
        with opener(tmp, "wt", encoding="utf-8") as f:
            for i, (_, src, split, text) in documents(opts["input"], chosen, n_max):
                if i in keep:
                    rec = {"text": text, "source": src, "split": split, "score": keep[i][0]}
                    f.write(json.dumps(rec) + "\n")
    save(opts["output"], write)
    selection_report(opts, keep, per_source, n_docs)
    return 0


# -----------------------------------------------------------------------------------------------
# compare: final losses and time to a target specific loss (the paper's Figure 1)
#
#   speedup = (steps, or train seconds, the baseline takes to reach the target) / (the same for a run)
# The target is the baseline's final pretraining loss unless --target is given (or --horizon=H: its loss
# at step H, for the speedup at a horizon H). Runs with other specific data (sets, subset, windows) or
# another evaluation (eval_examples) have other losses: they are refused unless --force. Beside them, the
# authors' curves: their SOBA / baseline ratio at each of their evaluations against each run's ratio to the
# baseline at the same step (a run is at a point of its own curve, not at the paper's 300k-step end: the
# authors' ratio falls from 0.96 at 2k steps to 0.85 at 12k).

# the authors' logged Reuters valid loss (nats/byte) of the baseline and of Sparse SOBA, pretraining (their
# 9.5M-parameter model, b = 128, |B| = 16384, evaluated every 2000 steps): step → (baseline, SOBA)
REFERENCE = {2000: (1.5726, 1.5087), 4000: (1.4581, 1.3677), 6000: (1.4086, 1.2804), 8000: (1.3993, 1.2167),
             10000: (1.3744, 1.1812), 12000: (1.3691, 1.1585), 14000: (1.3546, 1.1480),
             16000: (1.3455, 1.1440), 20000: (1.3278, 1.1223), 30000: (1.3089, 1.0968),
             50000: (1.2807, 1.0754), 100000: (1.2548, 1.0522), 200000: (1.2244, 1.0319),
             300000: (1.2097, 1.0180)}

COMPARE_OPTIONS = dict(
    runs=("", "train.py run directories, comma-separated"),
    baseline=("", "the reference run; default: the one among --runs whose method is baseline"),
    target=(0.0, "the target loss; 0 = the baseline's final pretraining value (or at --horizon)"),
    horizon=(0, "the target is the baseline's loss at this step (one of its evaluations); 0 = its last"),
    metric=("specific_valid_loss", "the logged loss the target applies to"),
    interpolate=(True, "interpolate between evaluations (else: the first evaluation at or below)"),
    force=(False, "compare runs with other specific data or evaluation (specific sets, seq_len, ...) anyway"),
    out=("", "also write the table here (markdown), its numbers (.json), the curves (.png, with matplotlib)"))


def pretrain_records(records):
    """The evaluations of pretraining, without those of fine-tuning."""
    return [r for r in records if r.get("phase", "pretrain") == "pretrain"]


def losses_at(records, key):
    """{step: the logged loss} of the pretraining evaluations."""
    return {r["step"]: r[key] for r in pretrain_records(records)}


def time_to_target(records, target, key="specific_valid_loss", interpolate=True):
    """(steps, train seconds) at which the pretraining curve first reaches loss <= target, or
    (None, None). Between the last evaluation above the target and the first at or below it, the
    curve is taken as linear in steps and in elapsed_s (interpolate=True); else the first
    evaluation at or below the target. Before the first evaluation nothing is known: a curve
    already below the target there is credited with that first evaluation's step and time."""
    prev = None
    for r in sorted(pretrain_records(records), key=lambda r: r["step"]):
        if r[key] <= target:
            if prev is None or not interpolate:
                return float(r["step"]), float(r["elapsed_s"])
            f = (prev[key] - target) / (prev[key] - r[key])      # in (0, 1]: where the segment crosses
            # steps (seconds) = prev + f · (r − prev)
            return tuple(prev[k] + f * (r[k] - prev[k]) for k in ("step", "elapsed_s"))
        prev = r
    return None, None


def run_info(run):
    """A run's records, config and final pretraining numbers: from summary.json when it exists,
    else from its last pretraining evaluation (a run still going)."""
    records, cfg = read_run(run)
    summ = read_json(os.path.join(run, "summary.json")) or {}
    last = (pretrain_records(records) or [{}])[-1]
    final = {**last, **summ}           # summary.json's numbers, where it has them
    losses = ("specific_valid_loss", "specific_test_loss", "generic_valid_loss")
    return dict(records=records, cfg=cfg, method=cfg["method"], last_pretrain=last,
                steps=final.get("steps") or final.get("step"),
                specific_set=(cfg["specific"], cfg["specific_train_docs"]),
                ms_per_step=final.get("ms_per_step"), **{k: final.get(k) for k in losses},
                finetuned=summ.get("specific_test_loss_finetuned"))


def compare_rows(info, reach, base):
    """Each run's numbers and its table row: final losses, steps and seconds to the target, speedups."""
    numbers, rows = {}, []
    for run, r in info.items():
        steps, secs = reach[run]
        # speedup = (the baseline's steps, or seconds, to the target) / (this run's)
        speedup = [b / a if a and b else None for a, b in zip(reach[run], reach[base])]
        numbers[run] = {**{k: v for k, v in r.items() if k not in ("records", "cfg", "last_pretrain")},
                        "steps_to_target": steps, "seconds_to_target": secs,
                        "speedup_steps": speedup[0], "speedup_time": speedup[1]}
        losses = [fmt(r[k]) for k in ("specific_valid_loss", "specific_test_loss", "finetuned")]
        reached = [fmt(steps, ".0f", "not reached"), fmt(secs, ".1f", "not reached")]
        rows.append([run + " (baseline)" if run == base else run, r["method"], fmt(r["steps"], "d"), *losses,
                     fmt(r["ms_per_step"], ".1f"), *reached, *[f"{v:.2f}x" if v else "—" for v in speedup]])
    return numbers, rows


def short_names(runs):
    """Each run's folder name, with its parent's where two runs share one (e1/soba_s0, e2/soba_s0)."""
    paths = [os.path.normpath(r) for r in runs]
    last = [os.path.basename(p) for p in paths]
    return {r: os.path.relpath(p, os.path.dirname(os.path.dirname(p))) if last.count(n) > 1 else n
            for r, p, n in zip(runs, paths, last)}


def write_comparison(out, text, numbers, info):
    """The table (markdown) to out, its numbers to OUT.json, and with matplotlib the pretraining
    curves and the target to OUT.png: Figure 1 as a picture, next to the table."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    save(out, text + "\n")
    save(stem + ".json", numbers)
    if not importlib.util.find_spec("matplotlib"):
        return
    key, curves = numbers["metric"], {}
    for run, r in info.items():
        at = losses_at(r["records"], key)
        curves[f"{r['method']}: {short_names(info)[run]}"] = (list(at), list(at.values()))
    if rows := numbers["reference"]:
        # the authors' SOBA / baseline ratio drawn on the baseline: where a run on their trajectory would be
        curves["the baseline × the authors' SOBA / baseline"] = ([r[0] for r in rows], [r[1] for r in rows])
    plot(stem + ".png", [("pretraining; target: the baseline's final", key, curves, numbers["target"])])


def reference_rows(info, base, key):
    """At each of the authors' steps where the baseline has an evaluation: [step, the baseline's loss × the
    authors' SOBA / baseline, the authors' baseline, SOBA, SOBA / baseline, then each other run's loss / the
    baseline's at exactly that step (None: the run has no evaluation there)]."""
    at, rows = {run: losses_at(r["records"], key) for run, r in info.items()}, []
    for step in [t for t in REFERENCE if t in at[base]]:
        b, s = REFERENCE[step]
        ratios = [at[run][step] / at[base][step] if step in at[run] else None for run in info if run != base]
        rows.append([step, at[base][step] * s / b, b, s, s / b, *ratios])
    return rows


def cmd_compare(opts, _):
    """steps and time to a target specific loss, speedups over the baseline (Figure 1)

    Every run of --runs must have the baseline's specific data and evaluation (specific,
    specific_train_docs, doc_mode, seq_len, eval_examples, and the seed where it draws the specific
    documents: with specific_train_docs, or the built-in corpus; --force compares anyway). Prints the final
    losses of each run, when it reached the target, and its speedup in steps and in seconds. The
    target with --horizon=H: the baseline's loss at step H (the speedup at a horizon H).
    When the baseline was evaluated at the authors' steps (2000, 4000, …), a second table gives their
    logged Reuters valid losses (baseline, Sparse SOBA, SOBA / baseline; 9.5M parameters, b = 128,
    |B| = 16384) beside each run's loss / the baseline's at exactly that step (—: no evaluation there);
    the PNG draws their ratio on the baseline's curve (where a run on their trajectory would be)."""
    runs = [r for r in opts["runs"].split(",") if r]
    need(runs, "--runs: give run directories, comma-separated")
    info = {run: run_info(run) for run in dict.fromkeys(runs + [opts["baseline"]]) if run}     # read once
    base = opts["baseline"] or next((r for r in runs if info[r]["method"] == "baseline"), None)
    need(base, "--baseline: no run of --runs has method baseline; name one with --baseline=RUN")
    # every run's specific data and its evaluation: the baseline's (runs that differ in one of the settings
    # that change them have other losses). The seed too where it draws the specific documents: the
    # specific_train_docs subset, the built-in corpus. The first setting that differs is named.
    cfg, keys = info[base]["cfg"], ("specific", "specific_train_docs", "doc_mode", "seq_len", "eval_examples")
    if cfg["specific_train_docs"] or not cfg["specific"]:
        keys += ("seed",)
    for run, r in info.items():
        for k in keys:
            need(opts["force"] or r["cfg"][k] == cfg[k], f"{run}: {k}={r['cfg'][k]!r}, the baseline's "
                 f"{k}={cfg[k]!r}: other specific data or evaluation; --force compares anyway")
    key, horizon = opts["metric"], opts["horizon"]
    need(any(key in rec for rec in info[base]["records"]), f"--metric: no {key!r} in {base}/log.jsonl")
    at_base = losses_at(info[base]["records"], key)
    target = opts["target"] or (at_base.get(horizon) if horizon else info[base]["last_pretrain"].get(key))
    need(target is not None, f"{base}: no evaluation for a target (--horizon={horizon}); give --target")
    reach = {run: time_to_target(r["records"], target, key, opts["interpolate"]) for run, r in info.items()}
    numbers, rows = compare_rows(info, reach, base)
    how = "interpolated between evaluations" if opts["interpolate"] else "first evaluation at or below"
    header = ["run", "method", "steps", "specific valid", "specific test", "+ fine-tune test", "ms/step",
              f"steps to {target:.3f}", f"train s to {target:.3f}", "speedup (steps)", "speedup (time)"]
    text = (f"Time to reach {key} <= {target:.4f} ({how}; train seconds = elapsed_s, evaluation excluded). "
            f"Paper, Figure 1: loss 1.3 reached 3.9x faster by Sparse SOBA, 8.5x by frozen weights, than by "
            f"the baseline.\n\n" + markdown(header, rows))
    if ref := reference_rows(info, base, key):     # the baseline was evaluated at one of the authors' steps
        names = [f"{short_names(info)[run]} / baseline" for run in info if run != base]
        header = ["step", "authors' baseline", "authors' SOBA", "authors' SOBA / baseline", *names]
        text += f"\n\nAt equal steps: the authors' Reuters valid loss; each run's {key} / the baseline's\n\n"
        text += markdown(header, [[t, f"{b:.4f}", f"{s:.4f}", *map(fmt, r)] for t, _, b, s, *r in ref])
    print(text)
    if opts["out"]:
        numbers = {"target": target, "metric": key, "baseline": base, "runs": numbers, "reference": ref}
        write_comparison(opts["out"], text, numbers, info)
    return 0


# -----------------------------------------------------------------------------------------------
# table: every method of Table 2 over seeds, pre-train and fine-tune specific test loss; with
# --specifics, every method on each specific set of a folder, in Table 3's layout (a column a set)

TABLE_OPTIONS = dict(
    out_dir=("", "where the runs (OUT_DIR/METHOD_sSEED), table.md and table.json go"),
    seeds=("0,1", "seeds, comma-separated"),
    methods=("", "train.py methods, comma-separated; empty = the methods of Table 2"),
    specifics=("", "a directory or glob, each file one specific set (Table 3): OUT_DIR/SET/METHOD_sSEED"),
    assemble_only=(False, "only assemble the table from the finished runs"),
    jobs=(1, "train.py processes at a time (each gets cores // jobs threads)"))
# paper, Table 2 (Reuters, specific test log-perplexity in nats/byte): method → (name, pre-train, fine-tune)
TABLE2 = {"baseline": ("Baseline", 1.198, 0.864), "mixing": ("Mixing", 0.861, 0.847),
          "cds": ("CDS", 1.067, 0.867), "classifier": ("Domain classif.", 1.098, 0.894),
          "mwn": ("MetaWeightNet", 1.212, 0.868), "ltr": ("LTR", 1.156, 0.879),
          "dds": ("Sparse DDS", 1.039, 0.824), "anograd": ("Sparse Anograd", 1.034, 0.824),
          "soba": ("Sparse SOBA", 1.019, 0.820)}


def train_cmd(train_argv, run_dir, fresh=False):
    """The train.py command line of one run into run_dir: it continues the run from its checkpoint,
    or starts afresh (--overwrite: replacing an earlier attempt that never checkpointed)."""
    resume = os.path.exists(os.path.join(run_dir, "ckpt.pt")) and not fresh
    return [sys.executable, os.path.join(HERE, "train.py")] + train_argv + [
        f"--out_dir={run_dir}", "--resume=True" if resume else "--overwrite=True"]

def run_all(todo, jobs):
    """Run [(label, train.py command, run_dir)] as subprocesses, `jobs` at a time → {label: status}.

    One job: its output goes to the terminal. Several: each run writes RUN_DIR/train.out and gets
    cores // jobs threads (two PyTorch processes that each use every core run ~10x slower on a
    2-core machine than two single-threaded ones); a line is printed when one starts or ends.
    Ctrl-C (or SIGINT) reaches the running train.py processes, which checkpoint and exit; no new
    run starts, and rerunning the command continues where they stopped."""
    env = None if jobs == 1 else dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    status, running, queue, t0 = {}, {}, list(todo), time.time()     # t0: each start and end is timed from it
    while queue or running:
        try:
            while queue and len(running) < jobs:
                label, cmd, run_dir = queue.pop(0)
                os.makedirs(run_dir, exist_ok=True)
                out = None if jobs == 1 else open(os.path.join(run_dir, "train.out"), "a")
                stderr = None if out is None else subprocess.STDOUT
                running[label] = subprocess.Popen(cmd, stdout=out, stderr=stderr, env=env)
                if out is not None:      # the child writes through its own copy of the file
                    out.close()
                print(f"[{time.time() - t0:6.0f}s] start {label}: " + " ".join(cmd[1:]), flush=True)
            time.sleep(0.2)
            for label, proc in list(running.items()):
                if proc.poll() is not None:
                    status[label] = running.pop(label).returncode
                    print(f"[{time.time() - t0:6.0f}s] end   {label}: status {proc.returncode}", flush=True)
        except KeyboardInterrupt:    # no new run; the running ones checkpoint and exit
            queue.clear()
            for proc in running.values():
                proc.send_signal(signal.SIGINT)      # a second SIGINT only sets train.py's stop flag again
    return status


def mean_std(values):
    """(mean, sample std or None with one value) of the non-missing values, or (None, None)."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None


def pm(m, s):
    """mean ± std in a table cell (the mean alone with one seed, — with none: mean_std gives a std
    only with a mean)."""
    return fmt(m) if s is None else f"{m:.3f} ± {s:.3f}"


def assemble(out_dir, methods, seeds):
    """OUT_DIR/METHOD_sSEED/summary.json of the methods and seeds asked for (those that finished), and no
    other run of OUT_DIR → {method: its numbers over the seeds}."""
    res = {}
    for m in methods:
        runs = [(s, read_json(os.path.join(out_dir, f"{m}_s{s}", "summary.json"))) for s in seeds]
        runs = [(s, summ) for s, summ in runs if summ is not None]
        pre_v = [s.get("specific_test_loss") for _, s in runs]
        ft_v = [s.get("specific_test_loss_finetuned") for _, s in runs]
        name, p_pre, p_ft = TABLE2.get(m, (m, None, None))
        res[m] = dict(name=name, seeds=[sd for sd, _ in runs], pretrain=mean_std(pre_v),
                      finetune=mean_std(ft_v), ms_per_step=mean_std([s.get("ms_per_step") for _, s in runs]),
                      pretrain_values=pre_v, finetune_values=ft_v, paper=dict(pretrain=p_pre, finetune=p_ft))
    return res


def specific_sets(opts, train_argv):
    """[(set name, its runs' directory, its train.py settings)]: the one set of the train settings,
    or with --specifics one set per file, named by its file name without extension."""
    if not opts["specifics"]:
        return [("", opts["out_dir"], [])]
    need(not any(a.startswith("--specific=") for a in train_argv), "--specifics: not with --specific")
    files = data.resolve_files(opts["specifics"], "--specifics")
    sets = {os.path.basename(f).split(".")[0]: f for f in files}
    need(len(sets) == len(files), f"--specifics: two files share a name ({opts['specifics']})")
    return [(name, os.path.join(opts["out_dir"], name), [f"--specific={f}"]) for name, f in sets.items()]


def setting_changed(run_dir, cfg):
    """How the finished run in run_dir differs from cfg, the settings train.py would save for it (one
    phrase for the first setting that differs), or None. Both are completed with today's defaults; left out:
    what a resume may change (train.RESUMABLE) and config.json's bookkeeping (world_size, inputs)."""
    saved, skip = read_run(run_dir)[1], train.RESUMABLE | {"world_size", "inputs"}
    for k in sorted(saved.keys() | cfg.keys()):
        if k not in skip and saved.get(k) != cfg.get(k):
            return f"{k}={saved.get(k)!r} in its config.json, {k}={cfg.get(k)!r} here"
    return None


def plan_runs(methods, seeds, sets, train_argv):
    """The runs still to do, [(label, train.py command, run_dir)]. A finished run (summary.json) is kept
    if its settings are the ones it would get here (else a one-line error naming the setting); an
    unfinished one continues from its checkpoint (train.py's --resume checks its settings)."""
    todo = []
    for (name, out_dir, extra), m, s in itertools.product(sets, methods, seeds):
        label, run_dir = f"{name} {m} seed {s}".strip(), os.path.join(out_dir, f"{m}_s{s}")
        argv = train_argv + extra + [f"--method={m}", f"--seed={s}"]
        cfg = train.parse_args(argv, train_defaults())        # bad settings fail now, before any run
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            todo.append((label, train_cmd(argv, run_dir), run_dir))
            continue
        changed = setting_changed(run_dir, cfg)
        need(changed is None, f"{run_dir}: a finished run with {changed}; another --out_dir, or remove it")
        print(f"{label}: {run_dir}/summary.json exists, kept", flush=True)
    return todo


def table2(results):
    """Table 2 from {"": assemble's numbers}: a row per method → (caption, header, rows, the numbers
    table.json holds)."""
    header = ["Method", "Pre-train", "Fine-tune", "ms/step", "seeds", "paper Pre-train", "paper Fine-tune"]
    rows = [[r["name"], pm(*r["pretrain"]), pm(*r["finetune"]), fmt(r["ms_per_step"][0], ".1f"),
             len(r["seeds"]), fmt(r["paper"]["pretrain"]), fmt(r["paper"]["finetune"])]
            for r in results[""].values()]
    caption = "; paper: Table 2 (C4 → Reuters, 9.5M parameters, 300k steps)"
    return caption, header, rows, {"methods": results[""]}


def table3(results):
    """Table 3 from {set: assemble's numbers}: a column per set; per method a pre-train row and a
    "+ ft." row → (caption, header, rows, the numbers table.json holds)."""
    rows = []
    for m in dict.fromkeys(m for res in results.values() for m in res):      # each method once, in order
        for key in ("pretrain", "finetune"):
            label = TABLE2.get(m, (m,))[0] if key == "pretrain" else "+ ft."
            rows.append([label] + [pm(*res[m][key]) if m in res else "—" for res in results.values()])
    caption = ", a column per set; paper: Table 3 (C4 → 9 Pile domains)"
    return caption, ["Method", *results], rows, {"sets": results}


def cmd_table(opts, train_argv):
    """run every method × seed (× specific set) by train.py and assemble Table 2 (or Table 3)

    A run whose summary.json exists is kept if its config.json holds the settings this command gives
    it (else a one-line error names the setting); an interrupted one continues from its checkpoint, so
    the same command, run again after Ctrl-C, finishes the table. Only the --methods × --seeds runs
    of OUT_DIR make the table. `;` in --specific still means one
    multi-task outer loss (Appendix B); --specifics makes one table column per file instead."""
    need(opts["out_dir"], "--out_dir: required (one subdirectory METHOD_sSEED per run)")
    need(all(a.split("=")[0] not in ("--method", "--seed", "--resume", "--out_dir") for a in train_argv),
         "--method, --seed, --resume, --out_dir: `table` sets them itself (see --methods, --seeds)")
    need(re.fullmatch(r"\d+(,\d+)*", opts["seeds"]), "--seeds: expected integers, comma-separated")
    methods = [m for m in opts["methods"].split(",") if m] or list(TABLE2)
    unknown = [m for m in methods if m not in train.METHODS]
    need(not unknown, f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(train.METHODS)})")
    sets, seeds, status = specific_sets(opts, train_argv), [int(s) for s in opts["seeds"].split(",")], {}
    if not opts["assemble_only"]:
        need(opts["jobs"] >= 1, f"--jobs: must be at least 1, got {opts['jobs']}")
        status = run_all(plan_runs(methods, seeds, sets, train_argv), opts["jobs"])
    notes = []                  # one for every run that did not finish, from train.py's exit status
    for label, rc in status.items():
        if rc in (130, 143):    # stopped by a signal: train.py checkpointed, and a rerun continues it
            notes.append(f"interrupted during {label}; rerun the same command to continue")
        elif rc != 0:
            notes.append(f"{label}: train.py exited with status {rc}")
    # {set: {method: numbers}}
    results = {name: assemble(out_dir, methods, seeds) for name, out_dir, _ in sets}
    what, header, rows, numbers = (table3 if opts["specifics"] else table2)(results)
    text = (f"Specific test loss (nats/byte), mean ± std over seeds{what}. Compare the ranking, not the "
            f"values.\n\n" + markdown(header, rows) + "".join(f"\n- {n}" for n in dict.fromkeys(notes)))
    print(text)
    os.makedirs(opts["out_dir"], exist_ok=True)
    save(os.path.join(opts["out_dir"], "table.md"), text + "\n")
    save(os.path.join(opts["out_dir"], "table.json"), {**numbers, "notes": notes, "train_args": train_argv})
    return 1 if any(rc != 0 for rc in status.values()) else 0     # the table still shows the finished runs


# -----------------------------------------------------------------------------------------------
# bench: the cost of one training step of every method, side by side in one process
#
# Every method gets its own model, data and optimiser, built by train.setup from the same settings,
# and runs whole cycles of outer_every steps (so that each cycle holds one outer update). Reported:
# ms/step and its ratio to the baseline's; the peak memory of one cycle; the bytes trained on per
# second (b · T per step); the cost of scoring B_generic^big with α as a fraction of a baseline step
# (section 4: the weighting network must be cheap next to the main model); and on known GPUs the
# model FLOPs utilisation
#   MFU ≈ (6 · n_params + 12 · L · d · T) · (b · T bytes trained per step) / (step time) / (peak bf16 FLOP/s)
# (6 FLOPs per parameter and trained byte: forward 2, backward 4; and attention's two T × T matmuls,
# QKᵀ and AV, 2 · 2 · d · T FLOPs per byte and layer forward, ×3 with the backward, as PaLM's appendix B
# counts them (the causal mask's skipped half counted too); the bilevel methods' extra passes are not
# counted, so for those it is the useful share of the work).

BENCH_OPTIONS = dict(
    methods=("baseline,mixing,dds,soba,anograd,classifier,ltr,mwn,scalebio", "train.py methods to time"),
    steps=(6, "timed steps per method and round (rounded up to whole outer_every cycles)"),
    warmup=(3, "untimed steps per method first"),
    rounds=(3, "rounds, each timing every method in turn; the median is reported"),
    out_json=("", "also write the numbers here"))
# peak dense bf16 tensor FLOP/s (TFLOP/s, NVIDIA data sheets; SXM boards unless named), matched in
# this order against torch.cuda.get_device_name(): the more specific names first
PEAK_BF16_TFLOPS = [("GH200", 989), ("H200 NVL", 835), ("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835),
                    ("H100", 989), ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121)]


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
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        events = read_json(os.path.join(tmp, "trace.json"))["traceEvents"]
    return max([0] + [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]) / 2**20


def is_cuda(device):
    """Whether a device string ("cpu", "cuda", "cuda:1") names a GPU."""
    return torch.device(device).type == "cuda"


def ms_per_call(fn, n, device, warmup=1):
    """Wall-clock ms of fn(), averaged over n calls after `warmup` untimed ones. On a GPU the clock is
    read once its queued work is done (nothing to wait for on a CPU)."""
    for _ in range(warmup):
        fn()
    if is_cuda(device):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if is_cuda(device):
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n * 1000


def step_peak_mb(ctx, first):
    """Peak memory of `outer_every` consecutive steps from step `first` (a multiple of outer_every,
    so the outer update is among them), above what was allocated before them, MB."""
    if not is_cuda(ctx.device):
        return cpu_peak_mb(lambda: run_steps(ctx, first, ctx.cfg["outer_every"]))
    before = torch.cuda.memory_allocated(ctx.device)    # the allocator's counts: kept on the host, no sync
    torch.cuda.reset_peak_memory_stats(ctx.device)
    run_steps(ctx, first, ctx.cfg["outer_every"])
    return (torch.cuda.max_memory_allocated(ctx.device) - before) / 2**20


def device_name(device):
    """The GPU's name; or the CPU's (from /proc/cpuinfo where there is one) and its thread count."""
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    info = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""     # Linux
    cpu = re.search(r"model name\s*:\s*(.+)", info)
    cpu = cpu[1] if cpu else platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads"


def time_rounds(ctxs, first, n, rounds, x_B):
    """ms per step of each method, in each round ({method: [ms]}), and the ms of scoring x_B with
    the α of each method that has a text-scoring one ({method: [ms]})."""
    dev, ms = ctxs["baseline"].device, {m: [] for m in ctxs}
    score_ms = {m: [] for m, c in ctxs.items() if isinstance(c.weighter, Weighter)}     # α scores text
    # each round times n steps of every method in turn: a slow spell of the machine hits one round
    # of every method rather than all of one method; the median over rounds is reported
    for r in range(rounds):
        for m, ctx in ctxs.items():
            ms[m].append(ms_per_call(lambda: run_steps(ctx, first + r * n, n), 1, dev, warmup=0) / n)
            if m in score_ms:        # s(x; α) over B_generic^big, without a graph
                score_ms[m].append(ms_per_call(lambda: score(ctx.weighter, x_B), n, dev))
    return ms, score_ms


def bench_result(ctx, ms, ms_base, score_ms, first, peak, n_params):
    """One method's numbers from its ms per step in each round (ms; ms_base: the baseline's), its
    scoring ms (None: no α), the step from which to measure its memory, and the GPU's peak TFLOP/s."""
    t, t_base = float(np.median(ms)), float(np.median(ms_base))
    s = None if score_ms is None else float(np.median(score_ms))
    bytes_per_step = ctx.cfg["batch_size"] * ctx.cfg["seq_len"]           # b · T bytes trained on per step
    # FLOPs per trained byte: 6 per parameter, 12 · L · d · T for attention's QKᵀ and AV (forward, backward)
    flops_per_byte = 6 * n_params + 12 * ctx.cfg["n_layer"] * ctx.cfg["n_embd"] * ctx.cfg["seq_len"]
    return dict(ms_per_step=t, ms_per_step_rounds=ms, ratio=t / t_base,
                # the ratio within each round (one spell of the machine): how far to trust "ratio"
                ratio_rounds=[a / b for a, b in zip(ms, ms_base)], step_memory_mb=step_peak_mb(ctx, first),
                trained_bytes_per_s=bytes_per_step / (t / 1000), score_ms=s,
                score_fraction=None if s is None else s / t_base,
                # MFU ≈ FLOPs per byte · b · T / (t / 1000) / (peak · 10¹²), t in ms and peak in TFLOP/s
                mfu=None if peak is None else flops_per_byte * bytes_per_step / t / peak / 1e9)


def bench(train_argv, methods, steps, warmup, rounds):
    """Time `methods` side by side in this process → ({method: numbers}, {the facts of the timing})."""
    ctxs = {}                      # every method with its own model, data and optimiser
    for m in methods:
        # CDS: time its selecting steps; its uniform phase (i) is the first step only
        cds = ["--cds_pretrain_steps=1"] if m == "cds" else []
        ctxs[m] = train.setup(train.parse_args(train_argv + [f"--method={m}"] + cds, train_defaults()))
    base = ctxs["baseline"]
    cfg, dev, k, name = base.cfg, base.device, base.cfg["outer_every"], device_name(base.device)
    warm, n = k * math.ceil(warmup / k), k * math.ceil(steps / k)       # whole cycles of k steps
    for ctx in ctxs.values():
        run_steps(ctx, 0, warm)
    g = base.generic.train.x                      # B_generic^big: |B| uniform draws, as training makes them
    x_B = g[torch.randint(len(g), (cfg["big_batch_size"],))].to(dev)            # (|B|, T)
    ms, score_ms = time_rounds(ctxs, warm, n, rounds, x_B)
    n_params = sum(p.numel() for p in base.model.parameters())
    peak = next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None) if is_cuda(dev) else None
    res = {m: bench_result(ctx, ms[m], ms["baseline"], score_ms.get(m), warm + rounds * n, peak, n_params)
           for m, ctx in ctxs.items()}
    rows = [[m, f"{r['ms_per_step']:.1f}", f"{r['ratio']:.2f}x", f"{r['step_memory_mb']:.1f}",
             fmt(r["score_fraction"], ".2f"), f"{r['trained_bytes_per_s'] / 1e3:.1f}", fmt(r["mfu"], ".1%")]
            for m, r in res.items()]
    header = ["method", "ms/step", "vs baseline", "peak MB", "scoring B / baseline step", "trained kB/s",
              "MFU"]
    print(f"{name}: the median over {rounds} rounds of {n} steps (the methods in turn), after {warm} warm-up "
          f"steps; peak MB: allocated during one cycle of outer_every steps, above what was allocated "
          f"before.\n\n" + markdown(header, rows))
    # this process's peak memory: allocated GPU memory on CUDA, the resident set size on a CPU
    return res, dict(device=name, device_type=torch.device(dev).type, peak_bf16_tflops=peak, cfg=cfg,
                     n_params=n_params, process_peak_memory_mb=train.peak_mem_mb(dev))


def cmd_bench(opts, train_argv):
    """ms/step, ratio to the baseline, peak memory and scoring cost of each method, in one process

    Every method is built from the same train.py settings (e.g. --preset=cpu) and timed in turn, so
    a change of the machine's speed hits all of them alike."""
    methods = list(dict.fromkeys(["baseline"] + [m for m in opts["methods"].split(",") if m]))
    need(all(m in train.METHODS for m in methods), f"--methods: not all train.py methods: {opts['methods']}")
    need(opts["steps"] > 0 and opts["rounds"] > 0, "--steps, --rounds: must be positive")
    res, facts = bench(train_argv, methods, opts["steps"], opts["warmup"], opts["rounds"])
    if opts["out_json"]:
        save(opts["out_json"], {"device": facts["device"], "methods": res, "train_args": train_argv})
    return 0


# -----------------------------------------------------------------------------------------------
# gpucheck: what a person with one GPU runs, in under 10 minutes, to tell us how the code does there
#
#   (1) tests/test_cuda.py, by pytest in a subprocess: its passed / failed / skipped counts;
#   (2) `steps` steps of the baseline and of Sparse SOBA at the preset (train.py subprocesses, an
#       outer step on every step): their final losses, ms/step and peak memory, from summary.json;
#   (3) bench (the code of `bench`, in this process) of baseline, soba, dds and anograd at the
#       preset with b = 128 and |B| = 128·b (the paper's): ms/step, trained bytes/s, ratio to the
#       baseline, peak memory, the cost of scoring B, and the model FLOPs utilisation.
# All of it goes into one JSON report. With --device=cpu and tiny settings it is a dry run.

GPUCHECK_OPTIONS = dict(
    preset=("paper", "train.py preset of the runs and the timings (paper: Table 1, b = 128)"),
    steps=(200, "training steps of each train.py run (baseline, Sparse SOBA)"),
    bench_steps=(10, "timed steps per method"), bench_warmup=(3, "untimed steps per method first"),
    tests=("tests/test_cuda.py", "the pytest file run first, relative to the repository; empty = none"),
    run_dir=("", "directory of the train.py runs (RUN_DIR/baseline, RUN_DIR/soba); default: a new temp dir"),
    out=("", "the JSON report; default RUN_DIR/gpucheck.json"))


def run_tests(path):
    """(1): pytest on one file in a subprocess → {file, present, exit_status, passed, failed, ...}."""
    res = dict(file=path, present=bool(path) and os.path.isfile(os.path.join(HERE, path)), exit_status=None,
               passed=None, failed=None, skipped=None, errors=None)
    if not res["present"]:
        print(f"{path or 'tests'}: no such test file; no tests run", flush=True)
        return res
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path], cwd=HERE,
                       capture_output=True, text=True)
    res.update(exit_status=p.returncode, passed=0, failed=0, skipped=0, errors=0)
    last = (p.stdout.strip().splitlines() or [""])[-1]          # "1 failed, 5 passed, 2 skipped in 3.1s"
    for count, word in re.findall(r"(\d+) (passed|failed|skipped|error)s?\b", last):
        res["errors" if word == "error" else word] = int(count)
    print(f"{path}: {last}", flush=True)
    return res


def cmd_gpucheck(opts, train_argv):
    """the 10-minute check on one GPU (a dry run on a CPU): tests, short runs, timings, one report

    python diagnose.py gpucheck --generic=DIR --specific=FILE       (on a GPU; or the built-in corpus)
    python diagnose.py gpucheck --device=cpu --preset=cpu --steps=5 --bench_steps=2   (a dry run)
    Exit status 1 if a test failed or a run did not finish; the report is written in every case."""
    t0 = time.time()
    need(opts["steps"] > 0 and opts["bench_steps"] > 0, "--steps and --bench_steps: must be positive")
    # every run and timing: the preset, an outer step on every step, and |B| = 128·b unless given
    argv = [f"--preset={opts['preset']}", "--outer_every=1"] + train_argv
    cfg = train.parse_args(argv, train_defaults())      # bad settings fail here, before any run
    need(is_cuda(train.resolve_device(cfg["device"])) or "--device=cpu" in train_argv,
         "gpucheck: no CUDA device; --device=cpu runs it on the CPU anyway (a dry run: give small sizes)")
    b, run_dir = cfg["batch_size"], opts["run_dir"] or tempfile.mkdtemp(prefix="gpucheck-")
    if not any(a.startswith("--big_batch_size=") for a in train_argv):
        argv.append(f"--big_batch_size={128 * b}")
    tests, runs = run_tests(opts["tests"]), {}                                                    # (1)
    for m in ("baseline", "soba"):                                                                # (2)
        d = os.path.join(run_dir, m)
        run_argv = argv + [f"--method={m}", f"--max_steps={opts['steps']}", "--finetune_steps=0"]
        rc = run_all([(m, train_cmd(run_argv, d, fresh=True), d)], 1)[m]
        if rc in (130, 143):
            return 130               # Ctrl-C: stop here
        summ = (read_json(os.path.join(d, "summary.json")) if rc == 0 else None) or {}
        runs[m] = dict(exit_status=rc, steps=opts["steps"], **{k: summ.get(k) for k in (
            "specific_valid_loss", "specific_test_loss", "generic_valid_loss", "ms_per_step", "peak_mem_mb")})
    res, facts = bench(argv, ["baseline", "soba", "dds", "anograd"], opts["bench_steps"],
                       opts["bench_warmup"], rounds=1)                                            # (3)
    cfg = facts.pop("cfg")
    out = opts["out"] or os.path.join(run_dir, "gpucheck.json")
    save(out, dict(**facts, torch_version=torch.__version__, cuda_version=torch.version.cuda, tests=tests,
                   **{k: cfg[k] for k in ("batch_size", "big_batch_size", "seq_len", "outer_every")},
                   preset=opts["preset"], train=runs, methods=res, wall_s=time.time() - t0))    # the report
    print(f"\n{facts['device']} | torch {torch.__version__} | CUDA {torch.version.cuda} | b = "
          f"{cfg['batch_size']}, |B| = {cfg['big_batch_size']} | report: {out}")
    return 1 if tests["failed"] or tests["errors"] or any(r["exit_status"] for r in runs.values()) else 0


# -----------------------------------------------------------------------------------------------
# name: (function, whose docstring is its --help line; its options; whether it takes train.py settings)
COMMANDS = {"sar": (cmd_sar, SAR_OPTIONS, True), "weights": (cmd_weights, WEIGHTS_OPTIONS, False),
            "select": (cmd_select, SELECT_OPTIONS, False), "compare": (cmd_compare, COMPARE_OPTIONS, False),
            "table": (cmd_table, TABLE_OPTIONS, True), "bench": (cmd_bench, BENCH_OPTIONS, True),
            "gpucheck": (cmd_gpucheck, GPUCHECK_OPTIONS, True)}


def main(argv):
    """`python diagnose.py SUBCOMMAND --key=value ...` → exit status: 0, or 2 with a one-line error."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0 if argv else 2
    try:
        need(argv[0] in COMMANDS, f"{argv[0]}: unknown subcommand (choose from {', '.join(COMMANDS)})")
        if "-h" in argv or "--help" in argv:
            print(help_text(argv[0]))
            return 0
        fn, table, train_settings = COMMANDS[argv[0]]
        opts, train_argv = parse_options(argv[1:], table, argv[0], train_settings)
        return fn(opts, train_argv)
    except (data.DataError, train.TrainingError, OSError) as e:    # DataError: DiagnoseError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
