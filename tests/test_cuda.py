"""CUDA: every method trains on the GPU, and the GPU computes what the CPU computes.

Skipped as a whole on a machine without CUDA (CI), but always collected. In-process `train.main`
runs with tiny settings on tiny corpora the tests write, so the file takes about a minute on a GPU.

Tolerances (each test says why):
  * weighter.score, CUDA vs CPU: rtol 1e-4 (atol 1e-4 of the largest score), with TF32 off. The
    same float32 arithmetic in another summation order differs by ~1e-6; TF32 (10-bit mantissa,
    on by default for cuDNN convolutions) would differ by ~1e-3 and is not what is being checked.
  * filter_batch: exactly the same indices (its random draws come from the CPU generator).
  * baseline after 20 steps, CUDA vs CPU: 2e-3 nats/byte. train.py runs the main model under bf16
    autocast on CUDA (8-bit mantissa: ~4e-3 relative rounding per matmul output), the CPU in
    float32. Measured on a CPU with bf16 autocast on and off, the same 20 steps differ by < 1e-3;
    2e-3 leaves room for CUDA's own kernels and catches a skipped step (the loss falls by ~1.5
    nats/byte over these 20 steps) and another data order (0.003-0.006 on the CPU).
  * one SOBA step, CUDA vs CPU, float32 with TF32 off and no autocast (bilevel.soba_step, both H v
    products): rtol 1e-4 (finite differences: 1e-3, their two gradients' rounding divided by ε), atol
    1e-5 of the largest entry. The same arithmetic in another summation order differs by ~1e-6.
  * resume on CUDA vs an uninterrupted CUDA run: 1e-3 nats/byte. Some CUDA kernels are not
    deterministic (atomic adds in attention's and the embedding's backward), so two identical
    CUDA runs already differ by float32 rounding, which bf16 autocast can amplify to ~1e-4.
  * a CUDA checkpoint resumed on the CPU vs the uninterrupted CUDA run: 5e-3 (the steps after the
    resume, up to 90 of SOBA, run in float32 instead of bf16, as in the CPU-vs-CUDA comparison).
These tolerances were set from CPU measurements; no GPU has run them yet (diagnose.py gpucheck runs
this file).
"""

import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time

import pytest
import torch

from conftest import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the same ROOT as conftest's
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"     # the device under test
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--n_hidden=32", "--seq_len=32", "--batch_size=4",
        "--big_batch_size=16", "--specific_batch_size=4", "--eval_examples=16", "--weighter_dim=8",
        "--cds_finetune_steps=2", "--doc_mode=chunk"]
METHODS = ("baseline", "mixing", "specific", "dds", "soba", "anograd", "scalebio", "cds", "classifier", "ltr",
           "mwn")
LOSSES = ("specific_valid_loss", "specific_test_loss", "generic_valid_loss")

WORDS = ("the of and to in a is that for it as was with be by on not this are from at which have an they "
         "market report people city water history music science river school family company year house "
         "world night morning found made said came went took small great little old new long young").split()


def english(rng, n, extra=()):
    words = WORDS + list(extra)
    out = []
    while sum(len(s) + 1 for s in out) < n:
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(out)[:n]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """generic: 3 sources of 100 documents of 200-600 bytes; specific: 150 documents."""
    base = tmp_path_factory.mktemp("cuda_corpora")
    rng = random.Random(0)
    generic = [{"text": english(rng, rng.randint(200, 600), extra=[f"{src}word{k}" for k in range(5)]),
                "source": src} for src in ("news", "code", "books") for _ in range(100)]
    specific = [{"text": "MARKET REPORT " + english(rng, rng.randint(200, 600))} for _ in range(150)]
    return {"generic": write_jsonl(base / "generic.jsonl", generic),
            "specific": write_jsonl(base / "specific.jsonl", specific)}


def merged(*groups):
    """--key=value flags, each later one replacing an earlier one of the same key (none given twice)."""
    out = {}
    for group in groups:
        for arg in group:
            out[arg.split("=", 1)[0]] = arg
    return list(out.values())


def main(*args):
    """train.main in this process → its exit code."""
    import train
    try:
        return train.main(list(args))
    except SystemExit as e:
        return e.code


def run(corpora, out_dir, *extra):
    """A tiny run on DEVICE that must succeed → its summary.json."""
    args = merged([f"--generic={corpora['generic']}", f"--specific={corpora['specific']}"], TINY,
                  [f"--device={DEVICE}", f"--out_dir={out_dir}"], extra)
    assert main(*args) == 0, args
    return read_json(out_dir, "summary.json")


def read_json(out_dir, name):
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def assert_finite_losses(summary):
    for k in LOSSES:
        assert isinstance(summary.get(k), float) and math.isfinite(summary[k]), (k, summary.get(k))



@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# every method runs on the GPU

@pytest.fixture(scope="module")
def soba_run(corpora, tmp_path_factory):
    """A short soba run on DEVICE whose weighting networks (ckpt.pt, weighters/) frozen and shuffled use."""
    out = tmp_path_factory.mktemp("cuda_soba") / "run"
    run(corpora, out, "--method=soba", "--max_steps=6", "--eval_interval=3")
    return out


@pytest.mark.parametrize("method", [*METHODS, "frozen", "shuffled"])
def test_every_method_runs_on_cuda(corpora, tmp_path, method, request):
    extra = [f"--method={method}", "--max_steps=6", "--eval_interval=3"]
    if method == "frozen":
        extra.append(f"--weighter_ckpt={request.getfixturevalue('soba_run')}")
    if method == "shuffled":
        extra.append(f"--weighter_trajectory={request.getfixturevalue('soba_run')}")
    torch.cuda.reset_peak_memory_stats()
    summary = run(corpora, tmp_path / method, *extra)
    assert_finite_losses(summary)
    assert [r["step"] for r in read_log(tmp_path / method)] == [3, 6]
    assert torch.cuda.max_memory_allocated() > 0          # it did run on the GPU


@pytest.mark.parametrize("method", [m for m in METHODS if m != "cds"])    # CDS: one-off Δ scoring step
def test_a_training_step_synchronises_the_host_at_most_once(corpora, tmp_path, method):
    """torch.cuda.set_sync_debug_mode("warn") warns at each operation that makes the host wait for the
    GPU: at most one per step (the finiteness check of θ's gradient, tests/test_syncs.py), from the
    third step on (the first ones build caches)."""
    import warnings
    import train
    args = merged([f"--generic={corpora['generic']}", f"--specific={corpora['specific']}"], TINY,
                  [f"--device={DEVICE}", f"--out_dir={tmp_path}", f"--method={method}", "--outer_every=1"])
    cfg = train.parse_args(args, {k: getattr(train, k) for k in train.config_keys})
    ctx = train.setup(cfg)
    for step in range(5):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train.train_step(ctx, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert step < 2 or len(syncs) <= 1, (method, step, syncs)


# ----------------------------------------------------------------------------------------------
# the weighter's scores and the filter: the same on CPU and CUDA

def test_score_on_cuda_equals_the_cpu(no_tf32):
    """Same weights, same bytes: rtol 1e-4 (see the module docstring)."""
    from weighter import Weighter, score
    torch.manual_seed(0)
    w = Weighter(dim=32, kernel=7)
    with torch.no_grad():
        w.head.weight.mul_(20.0)                          # scores of a few units, not ~0
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (300, 64), generator=g, dtype=torch.uint8)   # (300, 64) bytes
    for row in range(0, 300, 7):
        x[row, (row % 60) + 1:] = 0                       # right padding, as in the corpora
    s_cpu = score(w, x)                                   # (300,)
    s_dev = score(copy.deepcopy(w).to(DEVICE), x.to(DEVICE))
    assert s_dev.device.type == DEVICE
    assert s_cpu.std() > 0.1, s_cpu.std()
    torch.testing.assert_close(s_dev.cpu(), s_cpu, rtol=1e-4, atol=1e-4 * s_cpu.abs().max().item())


@pytest.mark.parametrize("how", ["importance", "without_replacement", "top"])
def test_filter_batch_selects_the_same_examples_on_cuda(how):
    from weighter import filter_batch
    s = torch.randn(512, generator=torch.Generator().manual_seed(2)) * 3      # (|B|,) scores, on the CPU
    idx_cpu = filter_batch(s, 32, how, torch.Generator().manual_seed(7))
    idx_dev = filter_batch(s.to(DEVICE), 32, how, torch.Generator().manual_seed(7))
    assert sorted(idx_dev.cpu().tolist()) == sorted(idx_cpu.tolist())


# ----------------------------------------------------------------------------------------------
# the same run on CPU and CUDA

def test_baseline_on_cuda_matches_the_cpu(corpora, tmp_path):
    """20 steps that move the loss (lr 5e-3 after 5 warm-up steps): within 2e-3 nats/byte (bf16)."""
    extra = ["--method=baseline", "--max_steps=20", "--eval_interval=10", "--lr=5e-3", "--warmup=5"]
    on_dev = run(corpora, tmp_path / "dev", *extra)
    on_cpu = run(corpora, tmp_path / "cpu", *extra, "--device=cpu")
    for k in LOSSES:
        assert abs(on_dev[k] - on_cpu[k]) <= 2e-3, (k, on_dev[k], on_cpu[k])


@pytest.mark.parametrize("hvp,rtol", [("exact", 1e-4), ("finite_difference", 1e-3)])
def test_soba_step_on_cuda_equals_the_cpu(no_tf32, hvp, rtol):
    """bilevel.soba_step from the same θ, α, v and batches on both devices, float32, no autocast:
    d_v, g, ℓ and d_α agree (see the module docstring)."""
    import bilevel
    from conftest import random_bytes, tiny_model, tiny_weighter
    model, weighter = tiny_model(dtype=torch.float32), tiny_weighter(dtype=torch.float32)
    xg, xs = random_bytes(8, seed=10, pad_from={2: 8}), random_bytes(4, seed=11, pad_from={0: 5})
    g = torch.Generator().manual_seed(3)
    v = {k: 0.1 * torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}
    out = {}
    for dev in ("cpu", DEVICE):
        m, w = copy.deepcopy(model).to(dev), copy.deepcopy(weighter).to(dev)
        v_dev = {k: t.to(dev) for k, t in v.items()}
        d_v, grads, losses = bilevel.soba_step(m, w, xg.to(dev), xs.to(dev), v_dev, hvp=hvp)
        d_alpha = torch.cat([p.grad.reshape(-1) for p in w.parameters() if p.grad is not None])
        flat = [torch.cat([t.reshape(-1) for t in d.values()]) for d in (d_v, grads)]
        out[dev] = [t.cpu() for t in (*flat, losses, d_alpha)]
    for name, a, b in zip(("d_v", "g", "losses", "d_alpha"), out[DEVICE], out["cpu"]):
        tol = rtol if name == "d_v" else 1e-4
        torch.testing.assert_close(a, b, rtol=tol, atol=1e-5 * b.abs().max().item(), msg=name)


# ----------------------------------------------------------------------------------------------
# resume on CUDA, and a CUDA checkpoint resumed on the CPU

RESUME_STEPS = 100


def interrupted(args, log_path):
    """train.main(args), with SIGINT sent to this process (Ctrl-C) once log_path holds a record
    → exit code. A signal that arrived after the run would find a no-op handler, not pytest's."""
    def fire():
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.exists(log_path) and open(log_path).read().strip():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)
    signal.signal(signal.SIGINT, lambda *_: None)
    t = threading.Thread(target=fire, daemon=True)
    t.start()
    code = main(*args)
    t.join()
    return code


def test_resume_on_cuda_and_on_the_cpu(corpora, tmp_path):
    extra = ["--method=soba", f"--max_steps={RESUME_STEPS}", "--eval_interval=10"]
    full = run(corpora, tmp_path / "full", *extra)
    cut = tmp_path / "cut"
    args = merged([f"--generic={corpora['generic']}", f"--specific={corpora['specific']}"], TINY,
                  [f"--device={DEVICE}", f"--out_dir={cut}"], extra)
    assert interrupted(args, cut / "log.jsonl") == 130
    stopped = read_log(cut)
    assert stopped[-1]["step"] < RESUME_STEPS, "the run ended before SIGINT arrived"
    on_cpu = tmp_path / "cut_on_cpu"
    shutil.copytree(cut, on_cpu)

    # resumed on CUDA (its settings from config.json) ≈ the uninterrupted run: 1e-3 (module docstring)
    assert main("--resume", f"--out_dir={cut}") == 0
    resumed = read_json(cut, "summary.json")
    for k in LOSSES:
        assert abs(resumed[k] - full[k]) <= 1e-3, (k, resumed[k], full[k])
    assert [r["step"] for r in read_log(cut)] == [r["step"] for r in read_log(tmp_path / "full")]

    # the CUDA checkpoint resumed on the CPU: it loads, keeps the log so far, and ends close (0.05)
    assert main("--resume", f"--out_dir={on_cpu}", "--device=cpu") == 0
    ported = read_json(on_cpu, "summary.json")
    assert_finite_losses(ported)
    for k in LOSSES:
        assert abs(ported[k] - full[k]) <= 5e-3, (k, ported[k], full[k])
    assert read_log(on_cpu)[:len(stopped)] == stopped
