"""Host synchronisations per training step: at most one (the finiteness check of θ's gradient before its
step), for every method, outside the exceptions listed below with their reasons.

On CUDA a host synchronisation (`.item()`, `bool(t)`, `int(t)`, `.cpu()`, `.tolist()`, `torch.bincount`,
whose kernel reads its input's range back) empties the GPU's queue. A CPU cannot see a CUDA stall, so
the tests work from the code:
  1. dynamic: a TorchDispatchMode counts `aten::_local_scalar_dense` (what `.item()`, `bool(t)`, `int(t)`,
     `float(t)` call) during each `train.train_step`, on the tiny built-in corpus, for every method;
  2. static: the source of the step functions (train.py's, from train_step and METHODS down, and the
     per-step part of train_loop), of bilevel.py and of weighter.py's per-step functions holds none of
     `.cpu()`, `.tolist()`, `.item()`, `torch.bincount`, nor a `.to(...device...)` without non_blocking
     (a CPU tensor's copy that the host waits for), outside the listed exceptions. The index draws move
     by weighter.to_device: pinned memory, non_blocking.
A count on the CPU cannot tell a CPU tensor from one that would be on the GPU: the reads of CPU tensors
that stay on the CPU in a CUDA run (random draws from CPU generators) are listed as exceptions by the
function that makes them, with that reason.
"""

import ast
import collections
import functools
import inspect
import os
import sys
import textwrap
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bilevel  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import weighter  # noqa: E402

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--n_hidden=32", "--seq_len=32", "--batch_size=4",
        "--big_batch_size=16", "--specific_batch_size=4", "--weighter_dim=8", "--eval_examples=16",
        "--outer_every=1", "--device=cpu", "--cds_pretrain_steps=2", "--cds_finetune_steps=2"]
STEPS = 5

# reads of a scalar allowed outside the one per step, by the train.py / bilevel.py / weighter.py function
# whose line makes them (the innermost frame of those files), with the reason
ALLOWED_READS = {
    "specific_batch": "int() of a CPU tensor: which specific set, drawn by the CPU generator (several sets)",
    "load": "Replay.load (shuffled): int() of σ, a CPU permutation, at a segment's first step",
    "any_rank": "torchrun's stop check: the ranks agree on a signal (not in a one-process step)",
}
# the steps allowed more than one: CDS's one-off Δ scoring step (it also fine-tunes a copy of θ, whose
# steps each check their gradient)
ONE_OFF = {"cds": "the step that fine-tunes θ_ft and scores every generic example (Δ, once)"}
# the calls of the static check allowed in a function, with the reason
ALLOWED_CALLS = {
    ("train", "step_along_grads", ".item()"): "in the error raised after a non-finite gradient only",
    ("bilevel", "lisa_sample", ".tolist()"): "LISA's block draw every lisa_interval steps: a CPU tensor",
    ("weighter", "filter_batch", ".cpu()"): "the importance filter draws on the CPU (torch.multinomial)",
    ("weighter", "to_device", ".to(device)"): "its path off CUDA; on CUDA: pinned memory, non_blocking",
    ("bilevel", "losses_of", ".to(device)"): "x: rows of the examples on the device in a run (a no-op); "
                                             "diagnose.py passes CPU rows, outside training",
}
SYNCING = (".cpu()", ".tolist()", ".item()", "torch.bincount")
HERE = {os.path.join(ROOT, f) for f in ("train.py", "bilevel.py", "weighter.py", "data.py", "model.py")}


@pytest.fixture(scope="module", autouse=True)
def small_builtin_corpus():
    """A 2000-example built-in generic pool, built once."""
    builtin = data.builtin_corpora
    small = functools.lru_cache(maxsize=None)(functools.partial(builtin, n_generic=2000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "builtin_corpora", small)
        yield


class ScalarReads(TorchDispatchMode):
    """Records, for each aten::_local_scalar_dense, the project function whose line called it, unless
    torch.optim's code is on the stack: the CPU optimisers read their step counter, a CPU tensor (also in a
    CUDA run without `fused`); on CUDA train.py builds the fused ones, which read none."""
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()
            if not any(f"{os.sep}torch{os.sep}optim{os.sep}" in f.filename for f in stack):
                ours = [f for f in stack if f.filename in HERE]
                self.reads.append(f"{ours[-1].name}: {ours[-1].line}" if ours else "?")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def soba_run(tmp_path_factory):
    """A 4-step SOBA run whose α (ckpt.pt, weighters/) frozen and shuffled use."""
    out = tmp_path_factory.mktemp("syncs") / "soba"
    assert train.main([*TINY, "--method=soba", "--max_steps=4", "--eval_interval=2", f"--out_dir={out}"]) == 0
    return out


CASES = {m: [] for m in train.METHODS if m not in ("frozen", "shuffled")}
CASES.update({"soba --hvp=finite_difference": ["--method=soba", "--hvp=finite_difference"],
              "soba --soba_chunks=2 --soba_dalpha_v=t+1": ["--method=soba", "--soba_chunks=2",
                                                           "--soba_dalpha_v=t+1"],
              "soba --filter=importance": ["--method=soba", "--filter=importance"],
              "scalebio --lisa": ["--method=scalebio", "--lisa", "--lisa_interval=2", "--lisa_layers=1",
                                  "--n_layer=2"],
              "frozen": ["--method=frozen"], "shuffled": ["--method=shuffled"]})


@pytest.mark.parametrize("case", list(CASES))
def test_at_most_one_scalar_read_per_step(case, tmp_path, request):
    extra = CASES[case] or [f"--method={case}"]
    if case == "frozen":
        extra.append(f"--weighter_ckpt={request.getfixturevalue('soba_run')}")
    if case == "shuffled":
        extra.append(f"--weighter_trajectory={request.getfixturevalue('soba_run')}")
    cfg = train.parse_args([*TINY, *extra, f"--out_dir={tmp_path}"],
                           {k: getattr(train, k) for k in train.config_keys})
    cfg["max_steps"] = STEPS
    ctx = train.setup(cfg)
    for step in range(STEPS):
        one_off = cfg["method"] in ONE_OFF and not ctx.cds and step >= train.cds_pretrain(cfg)
        with ScalarReads() as mode:
            train.train_step(ctx, step)
        reads = [r for r in mode.reads if r.split(":")[0] not in ALLOWED_READS]
        assert one_off or len(reads) <= 1, (case, step, collections.Counter(reads))
        if case == "baseline":          # the counter sees the one read: the finiteness check
            assert [r.split(":")[0] for r in reads] == ["step_along_grads"], reads
    if cfg["method"] in ONE_OFF:
        assert ctx.cds, "the CDS scoring step was not reached"


# ----------------------------------------------------------------------------------------------
# static: the per-step code holds no call known to synchronise on CUDA

def called_names(fn):
    """The names a function calls as `name(...)`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def train_step_functions():
    """train.py's functions a training step runs: train_step, every METHODS row's functions (partial's
    keywords included) and what they call by name, transitively."""
    todo = [train.train_step]
    for method in train.METHODS.values():
        step = method.step
        todo += [step.func, *step.keywords.values()] if isinstance(step, functools.partial) else [step]
    seen = {}
    while todo:
        fn = todo.pop()
        if fn is None or fn.__name__ in seen:
            continue
        seen[fn.__name__] = fn
        todo += [getattr(train, n) for n in called_names(fn)
                 if inspect.isfunction(getattr(train, n, None)) and getattr(train, n).__module__ == "train"]
    return seen


def per_step_loop_source():
    """The body of train_loop's `for step in bar:` up to the evaluation (what runs on every step)."""
    src = textwrap.dedent(inspect.getsource(train.train_loop))
    return src[src.index("for step in bar:"):src.index("if done % cfg[\"eval_interval\"]")]


def offences(module, name, src):
    found = [call for call in SYNCING if call in src]
    # a copy to the device that waits for the host: `.to(...device...)` without non_blocking=True
    for node in ast.walk(ast.parse(textwrap.dedent(src))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to":
            args = [ast.unparse(a) for a in node.args] + [ast.unparse(k.value) for k in node.keywords]
            if any("device" in a for a in args) and not any(k.arg == "non_blocking" for k in node.keywords):
                found.append(f".to({', '.join(args)})")
    return [f"{module}.{name}: {call}" for call in found if (module, name, call) not in ALLOWED_CALLS]


def test_step_functions_call_nothing_that_synchronises():
    found = offences("train", "train_loop (per step)", per_step_loop_source())
    steps = train_step_functions()
    assert {"step_sparse", "outer_soba", "step_along_grads", "soba_v_update", "step_cds"} <= set(steps)
    for name, fn in steps.items():
        found += offences("train", name, inspect.getsource(fn))
    for name, fn in inspect.getmembers(bilevel, inspect.isfunction):
        if fn.__module__ == "bilevel":
            found += offences("bilevel", name, inspect.getsource(fn))
    for name, fn in inspect.getmembers(bilevel.Ranks, inspect.isfunction):
        found += offences("bilevel", name, inspect.getsource(fn))
    for fn in (weighter.score, weighter.filter_batch, weighter.effective_sample_size, weighter.Replay.load,
               weighter.to_device):
        found += offences("weighter", fn.__name__, inspect.getsource(fn))
    assert not found, found


def test_the_static_check_flags_what_it_looks_for():
    assert offences("train", "x", "ctx.counts += torch.bincount(i)\nn = t.item()") == [
        "train.x: .item()", "train.x: torch.bincount"]
    assert offences("train", "step_along_grads", "norm.item()") == []
    assert offences("train", "x", "i = idx.to(ctx.device)\nj = idx.pin_memory().to(ctx.device, non_blocking=True)"
                    ) == ["train.x: .to(ctx.device)"]


# ----------------------------------------------------------------------------------------------
# --compile and LISA: each block draw changes requires_grad, which breaks torch.compile's guards (a
# recompilation per draw, then eager after 8 graphs): refused. The device check passes as on a GPU.

def test_compile_is_refused_with_lisa(monkeypatch):
    monkeypatch.setattr(train, "resolve_device", lambda name: "cuda")
    defaults = {k: getattr(train, k) for k in train.config_keys}
    args = ["--method=scalebio", "--compile", "--device=cuda"]
    assert train.parse_args(args, defaults)["compile"]
    with pytest.raises(train.ConfigError, match="--compile: not with --lisa"):
        train.parse_args([*args, "--lisa"], defaults)
