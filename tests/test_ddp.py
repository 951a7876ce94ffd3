"""Data parallelism under torchrun (train.py), on the CPU with gloo and two processes spawned here.

1. One data-parallel step is the whole batch's computation (tests/test_ddp_invariance.py checks the
   same for all 13 methods against a run in one process; this file checks it against independent
   gradients). Each rank records what it drew (the whole B, the filter's S, its rows of B_specific)
   and copies of θ, α, v and their optimisers before the step; the reference, in this process, steps
   the copies along gradients recomputed by plain autograd (tests/test_wiring.py's helpers):
     θ: AdamW on the uniform mean loss of the whole S (baseline: of both ranks' uniform rows);
     α: Adam along the outer gradient with w = softmax over all of R (DDS, Anograd) or S (SOBA);
     v: Adam along d_v = H_S v + ∇L_specific on the whole S and B_specific.
   The wrong alternatives (θ on rank 0's rows alone, the per-rank softmax) give other numbers.
2. A 2-process `torchrun` run with two specific sets, stopped by SIGTERM sent to rank 1 only, stops
   both ranks at the same step; resumed under torchrun, it ends with the uninterrupted run's losses
   and state (the choice of the specific set is a shared draw, saved once).
The file takes about a minute on a shared 2-core CPU.
"""

import copy
import functools
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from test_train import read_outputs, tensors_of, two_specific_sets, without_timing  # noqa: E402
from test_wiring import (TINY, adam_on, anograd_grad, assert_update, dds_grad, differs, params,  # noqa: E402
                         soba_dv, soba_grad, theta_after, weights_over)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = data.builtin_corpora
METHODS = ("baseline", "dds", "anograd", "soba")
WARMUP = 2                 # data-parallel steps before the checked one (Adam moments not empty)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ctx(method, out_dir):
    """A tiny float64 run as tests/test_wiring.py builds it (α's scores scaled up, a non-zero v)."""
    defaults = {k: getattr(train, k) for k in train.config_keys}
    ctx = train.setup(train.parse_args([f"--method={method}", f"--out_dir={out_dir}", *TINY], defaults))
    ctx.model.double()
    if ctx.weighter is not None:
        ctx.weighter.double()
        with torch.no_grad():
            ctx.weighter.head.weight.mul_(20.0)
    if ctx.v is not None:
        g = torch.Generator().manual_seed(3)
        for t in ctx.v.values():
            t.data = 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    return ctx


def take_step(ctx, step):
    """One pretraining step as train.train_loop takes it."""
    return train.train_step(ctx, step).idx


def recording(seen, name, f):
    def wrapper(*args, **kwargs):
        out = f(*args, **kwargs)
        seen.setdefault(name, []).append(out)
        return out
    return wrapper


def state_of(ctx):
    """Copies of θ, α and v (empty lists for what the method does not have)."""
    return dict(theta=params(ctx.model), alpha=params(ctx.weighter) if ctx.weighter else [],
                v=[t.detach().clone() for t in ctx.v.values()] if ctx.v else [])


def worker(rank, port, out_dir):
    """One rank: for each method, WARMUP steps, then the recorded step → out_dir/METHOD_RANK.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    small = functools.lru_cache(maxsize=None)(lambda seed, seq_len: BUILTIN(seed, seq_len, n_generic=2000))
    data.builtin_corpora = small
    originals = {k: getattr(train, k) for k in ("big_batch", "specific_batch", "filter_batch")}
    for method in METHODS:
        ctx = make_ctx(method, os.path.join(out_dir, method))
        for step in range(WARMUP):
            take_step(ctx, step)
        before = copy.deepcopy(dict(model=ctx.model, opt=ctx.opt, weighter=ctx.weighter,
                                    meta_opt=ctx.meta_opt, v=ctx.v, v_opt=ctx.v_opt))
        seen = {}
        for k, f in originals.items():
            setattr(train, k, recording(seen, k, f))
        idx = take_step(ctx, WARMUP)
        for k, f in originals.items():
            setattr(train, k, f)
        torch.save(dict(before=before, seen=seen, x=ctx.x_train[idx], after=state_of(ctx), cfg=ctx.cfg),
                   os.path.join(out_dir, f"{method}_{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    """Both ranks' records, {method: [rank 0's, rank 1's]}, from one spawn of two processes."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return {m: [torch.load(out / f"{m}_{r}.pt", weights_only=False) for r in range(2)] for m in METHODS}


def shards(recs, name):
    return [r["seen"][name][0] for r in recs]


def interleave(parts):
    """The ranks' rows [(n/2, …), (n/2, …)] → the whole batch (n, …): row i from rank i % 2."""
    return torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])


@pytest.mark.parametrize("method", METHODS)
def test_one_data_parallel_step_is_the_whole_batch_computation(method, ranks_out):
    recs = ranks_out[method]
    snap, cfg = recs[0]["before"], recs[0]["cfg"]
    theta_t, b = params(snap["model"]), cfg["batch_size"]
    if method == "baseline":
        x_S = interleave([r["x"] for r in recs])                          # the uniform rows, in draw order
    else:
        # the whole B on both ranks, one filter (the shared stream) and each rank on its rows of S
        (_, x_B), (_, x_B1) = (r["seen"]["big_batch"][0] for r in recs)
        S, S1 = shards(recs, "filter_batch")
        assert torch.equal(x_B, x_B1) and torch.equal(S, S1) and len(S) == b
        x_S = x_B[S]
        assert all(torch.equal(r["x"], x_S[i::2]) for i, r in enumerate(recs))
        x_spec = interleave(shards(recs, "specific_batch"))
    # θ: AdamW from the copied optimiser on the uniform mean loss of the whole S
    snap_ns = type("Snap", (), dict(model=snap["model"], opt=snap["opt"]))
    theta_next = recs[0]["after"]["theta"]
    assert_update(theta_next, theta_t, theta_after(snap_ns, x_S, cfg, WARMUP))
    assert differs(theta_after(snap_ns, x_S[0::2], cfg, WARMUP), theta_next, theta_t)   # no all-reduce
    if method == "baseline":
        return
    # α: Adam along the outer gradient of the whole batch, w = softmax over all of R (DDS, Anograd) or
    # S (SOBA); the per-rank softmax (each rank's own normaliser, the ranks' mean) is another update
    model, weighter = snap["model"], snap["weighter"]

    def outer_grad(x_R, x_S, x_spec):
        if method == "dds":
            return dds_grad(model, weighter, x_R, x_spec, cfg["rho"], weights_over(weighter, x_R))
        if method == "anograd":
            w = F.softplus(weighter.a) * weights_over(weighter, x_R)
            return anograd_grad(model, weighter, x_R, x_spec, w)
        return soba_grad(model, weighter, x_S, snap["v"], weights_over(weighter, x_S))
    alpha_t, alpha_next = params(weighter), recs[0]["after"]["alpha"]
    expected = adam_on(weighter, snap["meta_opt"], outer_grad(x_B[:b], x_S, x_spec))
    per_rank = [outer_grad(x_B[:b][r::2], x_S[r::2], x_spec[r::2]) for r in range(2)]
    per_rank_mean = [None if g0 is None else (g0 + g1) / 2 for g0, g1 in zip(*per_rank)]
    # Anograd's scale a gets a gradient that is 0 up to rounding (the cosine is scale-invariant)
    names = [n for n, _ in weighter.named_parameters()]
    keep = [j for j, n in enumerate(names) if not (method == "anograd" and n == "a")]
    assert_update(*([t[j] for j in keep] for t in (alpha_next, alpha_t, expected)), rtol=1e-6)
    wrong = adam_on(weighter, snap["meta_opt"], per_rank_mean)
    assert differs([wrong[j] for j in keep], [alpha_next[j] for j in keep], [alpha_t[j] for j in keep])
    if method != "soba":
        return
    # v: Adam (copied optimiser, η = lr_at(t)) along d_v = H_S v + ∇L_specific on the whole batches
    d_v = soba_dv(model, x_S, x_spec, snap["v"])[0]
    v, v_opt = copy.deepcopy((snap["v"], snap["v_opt"]))
    v_opt.param_groups[0]["lr"] = train.lr_at(WARMUP, cfg)
    for k, t in v.items():
        t.grad = d_v[k].detach()
    v_opt.step()
    assert_update(recs[0]["after"]["v"], [t.detach() for t in snap["v"].values()],
                  [t.detach() for t in v.values()], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# 3. interrupt and resume under torchrun

FLAGS = ["--method=soba", "--max_steps=30", "--eval_interval=10", "--eval_examples=100", "--n_layer=1",
         "--n_embd=32", "--n_hidden=64", "--seq_len=64", "--batch_size=16", "--specific_batch_size=16",
         "--big_batch_size=128", "--device=cpu"]


def torchrun(out_dir, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(launcher + [os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rank_pid(proc, rank):
    """The pid of torchrun's worker with RANK=rank."""
    for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} among torchrun's workers")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers' pids")
def test_sigterm_on_one_rank_then_resume_under_torchrun_is_exact(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    flags = FLAGS + two_specific_sets(tmp_path, n_generic=300, n_specific=80)
    full = torchrun(full_dir, *flags)                                   # the uninterrupted run, alongside
    cut = torchrun(cut_dir, *flags)
    log_path, deadline = cut_dir / "log.jsonl", time.time() + 300
    while not (log_path.exists() and log_path.read_text().strip()):    # first evaluation (step 10) written
        assert cut.poll() is None and time.time() < deadline, cut.communicate()
        time.sleep(0.05)
    rank0, rank1 = rank_pid(cut, 0), rank_pid(cut, 1)
    os.kill(rank0, signal.SIGSTOP)        # held: the run cannot finish before rank 1 has its signal
    os.kill(rank1, signal.SIGTERM)        # rank 1 only
    time.sleep(0.5)
    os.kill(rank0, signal.SIGCONT)
    out, _ = cut.communicate(timeout=300)
    assert cut.returncode != 0 and "stopped after step" in out, out
    ckpt = torch.load(cut_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert 10 <= ckpt["step"] < 30 and len(ckpt["ranks"]) == 2, ckpt["step"]
    assert f"continue: torchrun --standalone --nproc_per_node=2 train.py --resume --out_dir={cut_dir}" in out
    # a resume in one process is refused: the run's random streams are per rank
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume",
                              f"--out_dir={cut_dir}"], capture_output=True, text=True)
    assert refused.returncode == 2 and "2 process(es), not 1" in refused.stderr
    resumed = torchrun(cut_dir, "--resume")
    for proc in (resumed, full):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    s_full, log_full = read_outputs(full_dir)
    s_cut, log_cut = read_outputs(cut_dir)
    for k in ("specific_valid_loss", "specific_test_loss", "generic_valid_loss", "source_share"):
        assert s_cut[k] == s_full[k], k
    assert without_timing(log_cut) == without_timing(log_full)
    a = torch.load(full_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    b = torch.load(cut_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    for k, t in tensors_of(a).items():
        assert torch.equal(t, tensors_of(b)[k]), k
