"""Bad input through the command line: each case is a one-line error that names the file or flag,
a non-zero exit, no traceback, and nothing written into out_dir. The cases call train.main in this
process (an exception would fail the test, as a traceback would); tests/test_newcomer.py runs the
real command line in subprocesses."""

import gzip
import json
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
TINY = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--n_hidden=32", "--seq_len=32", "--batch_size=4",
        "--big_batch_size=16", "--specific_batch_size=4", "--max_steps=4", "--eval_interval=2",
        "--eval_examples=16", "--weighter_dim=8"]


@pytest.fixture
def run(capsys):
    """train.main(args) in this process → (returncode, stdout, stderr), as subprocess.run gives them."""
    def main(args):
        code = train.main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return main


def write_jsonl(path, texts, gz=False):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return str(path)


@pytest.fixture
def corpora(tmp_path):
    words = "the market rose as traders bought shares of the company said on monday".split()
    docs = [" ".join(words[i % 7:] + words[: i % 5]) + f" {i}" for i in range(400)]
    g = write_jsonl(tmp_path / "generic.jsonl", docs)
    s = write_jsonl(tmp_path / "specific.jsonl", [d + " specific" for d in docs[:200]])   # not in generic
    return g, s


def assert_one_line_error(res, *needles, out_dir=None):
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    err = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1, res.stderr
    assert err[0].startswith("error:"), err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    if out_dir is not None:
        assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], os.listdir(out_dir)


# each case: (file name, its bytes or None for "does not exist", what the error line must contain)
BAD_GENERIC_FILES = [
    ("nope.jsonl", None, ["nope.jsonl"]),                                                  # missing path
    ("empty.jsonl", b"", ["empty.jsonl"]),                                                 # empty file
    ("junk.txt", bytes(range(256)) * 64, ["junk.txt"]),   # binary garbage
    ("bad.jsonl", (json.dumps({"text": "fine"}) + "\n{not json\n").encode(), ["bad.jsonl", "2"]),  # line 2 does not parse
    ("notext.jsonl", (json.dumps({"body": "no text field"}) + "\n").encode(), ["notext.jsonl", "text"]),
]


@pytest.mark.parametrize("name,content,needles", BAD_GENERIC_FILES, ids=[c[0] for c in BAD_GENERIC_FILES])
def test_bad_generic_file(tmp_path, corpora, run, name, content, needles):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    res = run([f"--generic={path}", "--specific=" + corpora[1], f"--out_dir={out}", *TINY])
    assert_one_line_error(res, *needles, out_dir=out)


@pytest.mark.parametrize("flag,needle", [
    ("--no_such_flag=3", "--no_such_flag"),              # unknown flag
    ("--batch_size=many", "--batch_size"),               # a value of the wrong type
    ("--big_batch_size=0", "--big_batch_size"),          # a non-positive size
    ("--batch_size=64", "--batch_size"),                 # batch_size larger than big_batch_size (16)
    ("--method=magic", "--method"),                      # an unknown method
])
def test_bad_flags(tmp_path, run, flag, needle):
    out = tmp_path / "out"
    res = run([f"--out_dir={out}", *TINY, flag])
    assert_one_line_error(res, needle, out_dir=out)


def test_specific_set_smaller_than_one_batch(tmp_path, corpora, run):
    small = write_jsonl(tmp_path / "small.jsonl", ["only one short document"])
    out = tmp_path / "out"
    res = run(["--generic=" + corpora[0], f"--specific={small}", f"--out_dir={out}", *TINY])
    assert_one_line_error(res, "--specific", out_dir=out)


def test_mismatched_checkpoint(tmp_path, run):
    out = tmp_path / "out"
    assert run([f"--out_dir={out}", *TINY, "--method=baseline"]).returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    res = run([f"--out_dir={out}", *TINY, "--method=baseline", "--n_embd=32", "--resume"])
    assert_one_line_error(res, "n_embd")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before   # untouched


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A non-finite gradient at step 5 stops the run with a one-line error naming the step, before θ
    takes the step; the checkpoint of step 4 stays as it was."""
    import torch
    original = train.METHODS["baseline"]

    def poisoned(ctx, step):
        if step == 5:     # a NaN in θ: the loss and the gradient of step 5 are NaN
            with torch.no_grad():
                next(ctx.model.parameters()).fill_(float("nan"))
        return original.step(ctx, step)
    monkeypatch.setitem(train.METHODS, "baseline", train.Method(poisoned))
    out = tmp_path / "out"
    assert train.main([f"--out_dir={out}", *TINY, "--method=baseline", "--max_steps=20"]) == 2
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(t).all() for t in ck["model"].values())
    assert not (out / "summary.json").exists()
