"""Shared test setup: import path, tiny models, and hygiene for in-process `train.main` runs."""

import json
import os
import shutil
import signal
import sys
import tempfile

import pytest
import torch

# the machine's few cores are shared: one intra-op thread avoids OpenMP spinning under contention
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import ByteLM  # noqa: E402
from weighter import Weighter  # noqa: E402

# the tiny transformer every unit test uses: a few thousand parameters, milliseconds per step
TINY = dict(n_layer=1, n_head=2, n_embd=16, n_hidden=32, seq_len=12, dropout=0.0)


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ByteLM.from_config(TINY).to(dtype)


def tiny_weighter(seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    w = Weighter(dim=8, kernel=3).to(dtype)
    with torch.no_grad():   # larger scores than the default init, so that w(x; α) is far from uniform
        w.head.weight.mul_(20.0)
    return w


def random_bytes(b, T=12, seed=0, pad_from=None):
    """(b, T) uint8 non-zero bytes; rows listed in pad_from {row: t} are zero-padded from t on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (b, T), generator=g, dtype=torch.uint8)
    for row, t in (pad_from or {}).items():
        x[row, t:] = 0
    return x


def pytest_configure(config):
    """A run on corpus files prepares copies of them in the user's cache directory (data.cache_root, under
    $XDG_CACHE_HOME): during the tests, a temporary directory, never ~/.cache. Set before the test modules
    are imported, since some copy os.environ for their subprocesses then."""
    config.saved_xdg = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = config.xdg_tmp = tempfile.mkdtemp(prefix="xdg_cache_")


def pytest_unconfigure(config):
    shutil.rmtree(config.xdg_tmp, ignore_errors=True)
    if config.saved_xdg is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = config.saved_xdg


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """train.run installs SIGINT/SIGTERM handlers; put pytest's back after each in-process run."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def write_jsonl(path, records):
    """records (dicts) as a .jsonl file, one per line; returns the path as a string."""
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def nats_per_byte_by_hand(model, x):
    """The evaluation metric recomputed: Σ −log p(byte) / Σ non-pad bytes over the rows of x (N, T), in
    float64 from θ's logits (byte 0 is padding)."""
    with torch.no_grad():
        logp = torch.log_softmax(model.eval().logits(x).double(), -1)           # (N, T, 256)
    nll = -logp.gather(-1, x.long()[..., None]).squeeze(-1)                     # (N, T)
    mask = x != 0                                                               # (N, T)
    return (nll[mask].sum() / mask.sum()).item()


def run_theta(out_dir):
    """The θ of a train.py run's checkpoint (ckpt.pt), in a ByteLM built from its config.json."""
    with open(os.path.join(out_dir, "config.json")) as f:
        model = ByteLM.from_config(json.load(f))
    model.load_state_dict(torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu",
                                     weights_only=True)["model"])
    return model
