"""A newcomer's first hour with the command line, on small corpora of their own.

Help (`train.py --help`, `-h`, `diagnose.py select --help`); every mistake a newcomer makes is one
line on stderr, exit 2, no traceback and nothing half-written; small or odd corpora train (a generic
pool smaller than the big batch B, an empty generic valid split) or fail with a message that says
what to change; resume from `--resume --out_dir` alone, extend a finished run with
`--finetune_steps`, refuse an out_dir that holds another run unless `--overwrite`, and Ctrl-C at any
time, with an exact resume after it.

The corpora are written by the tests (English-like word salad): a folder of a dozen .txt files of
10-50 KB as --generic, a .jsonl of a few hundred records of 200-2,000 bytes as --specific. Models
are tiny and runs a few steps. CPU budget (~60 s for the file): a `python train.py` that trains pays
~6 s of imports on this machine (torch, then torch._dynamo with the first optimizer), so a
subprocess runs only where the process itself is the point (help, a space-separated flag, Ctrl-C,
`--resume --out_dir` alone) and the rest calls `train.main` in-process: it returns the exit code and
prints the same lines, and an exception escaping it fails the test as a traceback would.
"""

import ast
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import nats_per_byte_by_hand, run_theta, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the same ROOT as conftest's
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--n_hidden=32", "--seq_len=32", "--batch_size=4",
        "--big_batch_size=16", "--specific_batch_size=4", "--max_steps=4", "--eval_interval=2",
        "--eval_examples=16", "--device=cpu"]
METHODS = ("baseline", "mixing", "specific", "dds", "soba", "anograd", "scalebio", "cds", "classifier", "ltr",
           "mwn", "frozen", "shuffled")
LOSSES = ("specific_valid_loss", "specific_test_loss", "generic_valid_loss")


# ----------------------------------------------------------------------------------------------
# corpora

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will market "
         "report people city water history music science river school family company year government "
         "children story light house world night morning found made said came went took small great little "
         "old new long young large early important public local national").split()


def english(rng, n):
    """About n bytes of English-like sentences (no newlines)."""
    out, size = [], 0
    while size < n:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        out.append(s)
        size += len(s) + 1
    return " ".join(out)[:n].rstrip() + "."


def split_of(text):
    """The split data.py's hash gives a document (None if that function is not there to ask)."""
    import data
    try:
        return data.hash_split(data.encode(text))
    except (AttributeError, TypeError):
        return None


def with_split(body, want, tag="Document"):
    """body with a numbered prefix chosen so that the document hashes into split `want`."""
    for k in range(10_000):
        text = f"{tag} {k}. {body}"
        if split_of(text) in (want, None):
            return text
    raise AssertionError(f"no prefix sends the document to {want}")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """generic: a folder of 12 .txt files of 10-50 KB (one document and one source each) that the hash
    splits 10 train / 1 valid / 1 test; specific: a .jsonl of 300 records of 200-2,000 bytes."""
    base = tmp_path_factory.mktemp("corpora")
    rng = random.Random(0)
    generic = base / "generic"
    generic.mkdir()
    for i, want in enumerate(["train"] * 10 + ["valid", "test"]):
        body = english(rng, rng.randint(10_000, 50_000))
        (generic / f"source{i:02d}.txt").write_text(with_split(body, want))
    records = [{"text": f"MARKET REPORT {i}: " + english(rng, rng.randint(200, 2_000))} for i in range(300)]
    specific = write_jsonl(base / "specific.jsonl", records)
    return {"generic": str(generic), "specific": specific, "dir": base}


def merged(*groups):
    """--key=value flags, each later one replacing an earlier one of the same key (none given twice)."""
    out = {}
    for group in groups:
        for arg in group:
            out[arg.split("=", 1)[0]] = arg
    return list(out.values())


def flags(corpora, out_dir, *extra):
    """A tiny run on the test corpora, every window of each document (the pool is large)."""
    data_flags = [f"--generic={corpora['generic']}", f"--specific={corpora['specific']}", "--doc_mode=chunk"]
    return merged(data_flags, TINY, [f"--out_dir={out_dir}"], extra)


# ----------------------------------------------------------------------------------------------
# running train.py

def cli(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def main_in_process(capsys, *args):
    """train.main in this process: (exit code, stdout, stderr)."""
    import train
    torch.set_num_threads(1)
    code = train.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err



def assert_one_line_error(code, stderr, *needles):
    """Exit 2, no traceback, exactly one non-empty line on stderr, holding every needle (a str, or
    a compiled regex)."""
    assert "Traceback" not in stderr, stderr
    assert code == 2, (code, stderr)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    for n in needles:
        assert (n.search(lines[0]) if isinstance(n, re.Pattern) else n in lines[0]), (n, lines[0])
    return lines[0]


def snapshot(d):
    """{relative path: bytes} of every file below d ({} if d does not exist)."""
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def nothing_written(out_dir):
    return not os.path.exists(out_dir) or os.listdir(out_dir) == []


def read_run(out_dir):
    """(summary.json, log.jsonl records, config.json) of a run directory."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(l) for l in f if l.strip()]
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    return summary, log, config


def read_run_log_steps(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(l)["step"] for l in f if l.strip()]


def without_timing(records):
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("_per_s"))} for r in records]


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def evaluated(out_dir, corpora, doc_mode):
    """The specific test loss of a finished run recomputed: its final θ (ckpt.pt) on the fixed subset of
    eval_examples test examples that every evaluation uses (seq_len 32), Σ nats / Σ bytes by hand."""
    import data
    test = data.load_corpus(corpora["specific"], 32, doc_mode, flag="--specific").test
    return nats_per_byte_by_hand(run_theta(out_dir), data.eval_subset(test, 16, 2).x)


@pytest.fixture(scope="module")
def run_a(corpora, tmp_path_factory):
    """One finished tiny soba run (4 steps, chunk mode), in-process: (dir, its stdout + stderr)."""
    import train
    torch.set_num_threads(1)
    out, text = tmp_path_factory.mktemp("run_a") / "run", io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        code = train.main(flags(corpora, out))
    assert code == 0, text.getvalue()
    return out, text.getvalue()


# ----------------------------------------------------------------------------------------------
# help

def config_block(path):
    """[(key, default, its source literal, its trailing comment)] of a module's `key = constant`
    settings (lower-case module-level names bound to an int, float, bool or str), in file order."""
    src = open(os.path.join(ROOT, path), encoding="utf-8").read()
    lines = src.splitlines()
    out = []
    for node in ast.parse(src).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        key = node.targets[0].id
        if key.startswith("_") or not key.islower():
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if type(value) not in (int, float, bool, str):
            continue
        tail = lines[node.lineno - 1][node.value.end_col_offset:] if node.end_lineno == node.lineno else ""
        comment = tail.split("#", 1)[1].strip() if "#" in tail else ""
        out.append((key, value, ast.get_source_segment(src, node.value), comment))
    return out


def literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def dict_literal(path, name):
    """{key: value (None where not a literal)} of a module-level `NAME = {...}` or `NAME = dict(...)`
    (None if the module has no such NAME)."""
    src = open(os.path.join(ROOT, path), encoding="utf-8").read()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            v = node.value
            if isinstance(v, ast.Dict):
                return {ast.literal_eval(k): literal(x) for k, x in zip(v.keys, v.values)}
            if isinstance(v, ast.Call) and getattr(v.func, "id", None) == "dict":
                return {kw.arg: literal(kw.value) for kw in v.keywords}
    return None


def setting_line(lines, key):
    """Index of the first help line that starts with `--key`, else with `key` (None if none)."""
    for pat in (rf"^\s*--{re.escape(key)}\b", rf"^\s*{re.escape(key)}\b"):
        i = next((i for i, l in enumerate(lines) if re.match(pat, l)), None)
        if i is not None:
            return i
    return None


def shows_default(line, value, literal):
    if value == "":
        return True                                   # an empty string can be shown many ways
    cands = {str(value), repr(value), literal or str(value)}
    if isinstance(value, float):
        cands.add(format(value, "g"))
    if isinstance(value, str):
        cands.add(f'"{value}"')
    return any(re.search(rf"(?<![\w.]){re.escape(c.lower())}(?![\w.])", line.lower()) for c in cands)


@pytest.fixture(scope="module")
def train_help():
    res = cli("train.py", "--help")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    return res.stdout


def test_help_lists_every_setting_with_its_default_and_comment(train_help):
    lines = train_help.splitlines()
    settings = config_block("train.py")
    assert len(settings) > 30, settings               # the config block was found
    where = []
    for key, value, literal, comment in settings:
        i = setting_line(lines, key)
        assert i is not None, f"--help does not list {key}"
        here = lines[i] + " " + (lines[i + 1] if i + 1 < len(lines) else "")
        assert shows_default(lines[i], value, literal), (key, value, lines[i])
        words = re.findall(r"[A-Za-z]{4,}", comment)
        if words:                     # its one-line comment (on its line, or wrapped to the next)
            assert any(w.lower() in here.lower() for w in words), (key, comment, lines[i])
        where.append(i)
    assert where == sorted(where), "--help does not list the settings in the config block's order"
    for m in METHODS:
        assert re.search(rf"\b{m}\b", train_help), f"--help does not list the method {m}"
    for p in dict_literal("train.py", "PRESETS") or ("cpu", "small", "paper"):
        assert re.search(rf"\b{p}\b", train_help), f"--help does not list the preset {p}"


def test_dash_h_prints_the_same_help(train_help):
    res = cli("train.py", "-h")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == train_help


def test_diagnose_select_help_lists_its_options_with_defaults():
    res = cli("diagnose.py", "select", "--help")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    options = dict_literal("diagnose.py", "SELECT_OPTIONS") or {"run": "", "input": "", "fraction": ""}
    assert options
    for key, value in options.items():
        words = []
        if isinstance(value, tuple):                  # (default, help text)
            value, words = value[0], re.findall(r"[A-Za-z]{4,}", value[1])
        i = setting_line(lines, key)
        assert i is not None, f"`diagnose.py select --help` does not list --{key}"
        assert not words or any(w.lower() in lines[i].lower() for w in words), (key, lines[i])
        assert value is None or shows_default(lines[i], value, None), (key, value, lines[i])


# ----------------------------------------------------------------------------------------------
# one-line errors: exit 2, no traceback, nothing written into a fresh out_dir

def test_space_separated_value_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    res = cli("train.py", f"--out_dir={out}", "--max_steps", "30")
    assert_one_line_error(res.returncode, res.stderr, "--max_steps")
    assert nothing_written(out)


@pytest.mark.parametrize("flag,needle", [
    ("--no_such_flag=3", "--no_such_flag"),     # unknown flag
    ("--lr=fast", "--lr"),                      # a value that does not parse as the default's type
    ("--max_steps=0", "--max_steps"),           # nothing to train
    ("--device=gpu", "--device"),               # not a device
    pytest.param("--device=cuda", "--device",   # a device this machine does not have
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_flag_is_a_one_line_error(capsys, tmp_path, corpora, flag, needle):
    out = tmp_path / "out"
    code, _, err = main_in_process(capsys, *flags(corpora, out, flag))
    assert_one_line_error(code, err, needle)
    assert nothing_written(out)


def test_specific_set_with_an_empty_split_is_an_error_naming_that_split(capsys, tmp_path, corpora):
    rng = random.Random(1)
    for empty, present in (("valid", "test"), ("test", "valid")):
        recs = [{"text": english(rng, 300), "split": s} for s in ["train"] * 40 + [present] * 5]
        spec = write_jsonl(tmp_path / f"no_{empty}.jsonl", recs)
        out = tmp_path / f"out_{empty}"
        code, _, err = main_in_process(capsys, *flags(corpora, out, f"--specific={spec}"))
        line = assert_one_line_error(code, err, empty)
        assert "valid/test" not in line and "valid or test" not in line, line    # it says WHICH split
        assert nothing_written(out)


def test_specific_set_smaller_than_its_batch_says_how_many_and_which_flag(capsys, tmp_path, corpora):
    rng = random.Random(2)
    recs = [{"text": english(rng, 20), "split": s} for s in ["train"] * 3 + ["valid"] * 3 + ["test"] * 3]
    spec = write_jsonl(tmp_path / "three.jsonl", recs)      # 3 one-window training documents < 4
    out = tmp_path / "out"
    code, _, err = main_in_process(capsys, *flags(corpora, out, f"--specific={spec}"))
    assert_one_line_error(code, err, "--specific_batch_size", re.compile(r"(?<!\d)3(?!\d)"))
    assert nothing_written(out)


@pytest.mark.parametrize("n", [100_000, -1])
def test_specific_train_docs_out_of_range_is_a_one_line_error(capsys, tmp_path, corpora, n):
    out = tmp_path / "out"
    code, _, err = main_in_process(capsys, *flags(corpora, out, f"--specific_train_docs={n}"))
    assert_one_line_error(code, err, "--specific_train_docs")
    assert nothing_written(out)


def test_document_subset_keeps_n_whole_documents_chosen_by_seed(corpora):
    import data
    # many windows a document
    train = data.load_corpus(corpora["specific"], 32, "chunk", flag="--specific").train
    a = data.document_subset(train, 7, 0, "--specific_train_docs")
    assert len(set(a.doc_id.tolist())) == 7
    for d in set(a.doc_id.tolist()):               # every window of a kept document is kept
        assert (a.doc_id == d).sum() == (train.doc_id == d).sum()
    again = data.document_subset(train, 7, 0, "--specific_train_docs")
    assert a.x.equal(again.x) and a.doc_id.equal(again.doc_id)           # fixed by the seed
    other = data.document_subset(train, 7, 1, "--specific_train_docs")
    assert set(other.doc_id.tolist()) != set(a.doc_id.tolist())
    with pytest.raises(data.DataError, match="--specific_train_docs"):
        data.document_subset(train, len(set(train.doc_id.tolist())) + 1, 0, "--specific_train_docs")


def test_specific_train_docs_keeps_valid_and_test_and_draws_only_training_documents(corpora):
    import data
    import train
    cfg = {**{k: getattr(train, k) for k in train.config_keys}, "generic": corpora["generic"],
           "specific": corpora["specific"], "seq_len": 32, "doc_mode": "chunk", "specific_batch_size": 2}
    (full,), (sub,) = (data.load_data(dict(cfg, specific_train_docs=n))[1] for n in (0, 5))
    for split in ("valid", "test"):                       # untouched: the same examples, in order
        assert getattr(sub, split).x.equal(getattr(full, split).x)
    assert len(set(sub.train.doc_id.tolist())) == 5
    # the splits against the data's own rule recomputed from the documents: an 80/10/10 hash of each
    # record's bytes (no record gives a split), cut into the same windows
    windows = {split: set() for split in ("train", "valid", "test")}
    with open(corpora["specific"]) as f:
        for line in f:
            b = data.encode(json.loads(line)["text"])
            chunk, n = data.windows(b, 32, "chunk")
            windows[data.hash_split(b)].update(chunk[i * 32:(i + 1) * 32] for i in range(n))
    rows = {split: {bytes(r) for r in getattr(full, split).x.numpy()} for split in ("valid", "test")}
    assert rows == {split: windows[split] for split in ("valid", "test")}
    assert {bytes(r) for r in sub.train.x.numpy()} <= windows["train"] - windows["valid"] - windows["test"]


# ----------------------------------------------------------------------------------------------
# small and odd corpora

def test_pool_smaller_than_the_big_batch_warns_and_trains(capsys, tmp_path, corpora, monkeypatch):
    """The default --doc_mode=first keeps one example per document: a dozen .txt files give ~10
    training examples, fewer than |B| = 16. B is drawn with replacement, so the run trains, after
    a one-line hint to use --doc_mode=chunk: each B of k = 16 uniform draws among N examples holds
    N(1 − (1 − 1/N)^k) distinct ones on average."""
    import train
    drawn, big_batch = [], train.big_batch

    def record(ctx):                        # B's indices, as train.py draws them
        idx_B, x_B = big_batch(ctx)
        drawn.append(idx_B)
        return idx_B, x_B
    monkeypatch.setattr(train, "big_batch", record)
    out = tmp_path / "out"
    code, stdout, stderr = main_in_process(capsys, f"--generic={corpora['generic']}",
                                           f"--specific={corpora['specific']}", *TINY, "--max_steps=40",
                                           f"--out_dir={out}")
    text = stdout + stderr
    assert code == 0, text
    assert len([l for l in text.splitlines() if "--doc_mode=chunk" in l]) == 1, text
    summary, log, _ = read_run(out)
    assert log[-1]["step"] == 40
    N = int(re.search(r"generic (\d+) train examples", text)[1])
    assert N < 16 and len(drawn) == 40 and all(len(idx) == 16 and idx.max() < N for idx in drawn)
    distinct = sum(len(idx.unique()) for idx in drawn) / len(drawn)
    # 40 draws of B: the mean's standard deviation is below 0.2 for N ≈ 10
    assert distinct == pytest.approx(N * (1 - (1 - 1 / N) ** 16), abs=0.6), (distinct, N)
    assert summary["specific_test_loss"] == pytest.approx(evaluated(out, corpora, "first"), rel=1e-5)


def test_chunk_run_completes_and_prints_only_the_overrides(run_a, corpora):
    out, text = run_a
    # the pool is large: no hint; the only warning: the fixture's 2 one-document sources hashed out of train
    assert [l for l in text.lower().splitlines() if "warning" in l] == [
        "warning: --generic: 2 of 12 sources have no training example: left out of the source weights and "
        "shares: source10, source11"], text
    summary, log, config = read_run(out)
    assert [r["step"] for r in log] == [2, 4]
    assert summary["specific_test_loss"] == pytest.approx(evaluated(out, corpora, "chunk"), rel=1e-5)
    # printed: the settings given; not printed: the others (defaults); saved: all of them
    settings = {k: v for k, v, _, _ in config_block("train.py")}
    given = ("n_embd", "n_hidden", "seq_len", "big_batch_size", "specific_batch_size", "max_steps",
             "eval_interval", "eval_examples", "doc_mode", "generic", "specific", "out_dir")
    defaults = ("lisa_interval", "scalebio_lr_p", "scalebio_weight_decay", "weighter_kernel",
                "cds_finetune_steps", "soba_v_optim", "generic_weight", "noise_sources", "eval_batch_size",
                "save_weighter_every")
    for k in given:
        assert re.search(rf"\b{k}\b", text), f"the run does not print its setting {k}"
    for k in defaults:
        if k in settings:
            assert not re.search(rf"\b{k}\b", text), f"the run prints {k}, left at its default"
    assert set(settings) <= set(config), set(settings) - set(config)
    assert (config["n_embd"], config["max_steps"], config["doc_mode"]) == (16, 4, "chunk")


def test_empty_generic_valid_split_warns_and_trains_without_it(capsys, tmp_path, corpora):
    rng = random.Random(3)
    recs = [{"text": english(rng, rng.randint(100, 400)), "split": s} for s in ["train"] * 60 + ["test"] * 6]
    generic = write_jsonl(tmp_path / "generic.jsonl", recs)
    out = tmp_path / "out"
    code, stdout, stderr = main_in_process(capsys, f"--generic={generic}",
                                           f"--specific={corpora['specific']}", *TINY, f"--out_dir={out}")
    text = stdout + stderr
    assert code == 0, text
    warnings = [l for l in text.splitlines() if "warning" in l.lower() and "valid" in l.lower()]
    assert len(warnings) == 1, text
    summary, log, _ = read_run(out)
    assert [r["step"] for r in log] == [2, 4]
    for rec in (summary, *log):
        assert rec.get("generic_valid_loss") is None, rec            # skipped: absent or null
    assert summary["specific_test_loss"] == pytest.approx(evaluated(out, corpora, "first"), rel=1e-5)


def test_every_source_with_two_documents_keeps_training_data(tmp_path):
    """80/10/10 by a hash of the text; a source whose documents all hash outside train gets one
    (and only one) of them moved to train. The other sources' documents stay where they hashed."""
    import data
    rng = random.Random(4)
    big = [english(rng, 300) for _ in range(40)]
    rare = [with_split(english(rng, 300), s, tag="Rare") for s in ("valid", "test")]
    if None in {split_of(t) for t in big + rare}:
        pytest.skip("data.hash_split / data.encode are not there to predict the split")
    path = write_jsonl(tmp_path / "generic.jsonl", [{"text": t, "source": "big"} for t in big] +
                       [{"text": t, "source": "rare"} for t in rare])
    c = data.load_corpus(path, 32, "first", flag="--generic")
    count = {split: {s: int((e.source_id == c.sources.index(s)).sum()) for s in ("big", "rare")}
             for split, e in (("train", c.train), ("valid", c.valid), ("test", c.test))}
    assert count["train"]["rare"] == 1, count
    assert sum(count[s]["rare"] for s in count) == 2, count                # moved, not copied
    hashed = [split_of(t) for t in big]
    assert {s: count[s]["big"] for s in count} == {s: hashed.count(s) for s in count}, count
    again = data.load_corpus(path, 32, "first", flag="--generic")
    assert again.train.x.equal(c.train.x)                                # the same document every time


# ----------------------------------------------------------------------------------------------
# resume, extend, out_dir

def test_resume_may_only_grow_finetune_steps_once_pretraining_ended(capsys, tmp_path, run_a):
    run = tmp_path / "run"
    shutil.copytree(run_a[0], run)
    a_summary, a_log, _ = read_run(run)
    before = snapshot(run)
    # a setting that changes the computation: refused, the run left as it was
    code, _, err = main_in_process(capsys, "--resume", f"--out_dir={run}", "--lr=0.01")
    assert_one_line_error(code, err, re.compile(r"\blr\b"))
    assert snapshot(run) == before
    # a finished run extended by fine-tuning: its settings come from config.json
    code, stdout, stderr = main_in_process(capsys, "--resume", f"--out_dir={run}", "--finetune_steps=2")
    assert code == 0, stdout + stderr
    summary, log, config = read_run(run)
    assert [(r["step"], r["phase"]) for r in log] == [(2, "pretrain"), (4, "pretrain"), (6, "finetune")]
    assert without_timing(log[:2]) == without_timing(a_log)
    assert summary["specific_test_loss"] == a_summary["specific_test_loss"]     # the pretrained model's
    assert finite(summary.get("specific_test_loss_finetuned")), summary
    assert config["finetune_steps"] == 2 and config["n_embd"] == 16
    # --max_steps may grow only while the run is still pretraining
    before = snapshot(run)
    code, _, err = main_in_process(capsys, "--resume", f"--out_dir={run}", "--max_steps=8")
    assert_one_line_error(code, err, "--max_steps")
    assert snapshot(run) == before


def test_resume_may_grow_max_steps_while_still_pretraining(capsys, tmp_path, corpora):
    """Ctrl-C (SIGINT to this process, from a thread, once the first evaluation is logged) during
    pretraining, then `--resume --max_steps=<larger>`: the run goes on to the new length."""
    import threading
    run = tmp_path / "run"

    def ctrl_c():
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run / "log.jsonl").exists() and (run / "log.jsonl").read_text().strip():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)
    signal.signal(signal.SIGINT, lambda *_: None)       # a late signal finds this, not pytest's handler
    thread = threading.Thread(target=ctrl_c, daemon=True)
    thread.start()
    run_flags = flags(corpora, run, "--max_steps=60", "--eval_interval=2")
    code, stdout, stderr = main_in_process(capsys, *run_flags)
    thread.join()
    assert code == 130, stdout + stderr
    assert read_run_log_steps(run)[-1] < 60, "the run ended before SIGINT arrived"
    code, stdout, stderr = main_in_process(capsys, "--resume", f"--out_dir={run}", "--max_steps=70")
    assert code == 0, stdout + stderr
    summary, log, config = read_run(run)
    assert log[-1]["step"] == 70 and config["max_steps"] == 70 and finite(summary["specific_test_loss"])


@pytest.mark.parametrize("present", ["config.json", "log.jsonl", "ckpt.pt"])
def test_out_dir_holding_a_run_is_refused(capsys, tmp_path, corpora, run_a, present):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_a[0] / present, run / present)
    before = snapshot(run)
    code, _, err = main_in_process(capsys, *flags(corpora, run))
    assert_one_line_error(code, err, "--out_dir", "--resume", "--overwrite")
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(capsys, tmp_path, corpora, run_a):
    run = tmp_path / "run"
    shutil.copytree(run_a[0], run)
    (run / "notes.txt").write_text("my notes")
    (run / "mine").mkdir()
    (run / "mine" / "plot.png").write_bytes(b"\x89PNG not really")
    (run / "weighters").mkdir(exist_ok=True)
    (run / "weighters" / "step_999.pt").write_bytes(b"a stale snapshot")
    code, stdout, stderr = main_in_process(capsys, *flags(corpora, run, "--overwrite"))
    assert code == 0, stdout + stderr
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "mine" / "plot.png").read_bytes() == b"\x89PNG not really"
    assert not (run / "weighters" / "step_999.pt").exists()
    summary, log, _ = read_run(run)
    a_summary, _, _ = read_run(run_a[0])
    assert [r["step"] for r in log] == [2, 4]                            # a new log, not appended to
    assert {k: summary[k] for k in LOSSES} == {k: a_summary[k] for k in LOSSES}   # a fresh run, same seed


# ----------------------------------------------------------------------------------------------
# Ctrl-C

def start(args, log_file):
    """train.py in its own session (so a signal to its group reaches it alone), with SIGINT at its
    default (a shell may start pytest with SIGINT ignored, and children inherit that)."""
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill_group(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


SIGINT_STEPS = 60


def test_ctrl_c_during_training_then_resume_equals_an_uninterrupted_run(capsys, tmp_path, corpora):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_flags = ["--eval_interval=2", f"--max_steps={SIGINT_STEPS}"]     # the signal comes after step 2: 58 to go
    with open(tmp_path / "cut.out", "w") as cut_out:
        cut = start(flags(corpora, cut_dir, *run_flags), cut_out)
    try:
        log_path, deadline = cut_dir / "log.jsonl", time.time() + 240
        while not (log_path.exists() and log_path.read_text().strip()):   # the first evaluation (step 2)
            assert cut.poll() is None, (tmp_path / "cut.out").read_text()
            assert time.time() < deadline, "no evaluation after 240 s"
            time.sleep(0.02)
        os.killpg(cut.pid, signal.SIGINT)                               # what Ctrl-C in a terminal does
        cut.wait(timeout=120)
    finally:
        kill_group(cut)
    out = (tmp_path / "cut.out").read_text()
    assert "Traceback" not in out, out
    assert cut.returncode == 130, (cut.returncode, out)
    assert (cut_dir / "ckpt.pt").exists()
    steps = read_run_log_steps(cut_dir)
    assert steps[-1] < SIGINT_STEPS, f"the run ended (step {steps[-1]}) before SIGINT arrived"
    res = cli("train.py", "--resume", f"--out_dir={cut_dir}")            # its settings from config.json
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    # the uninterrupted run, in this process (one thread, like the subprocesses: the same numbers)
    code, stdout, stderr = main_in_process(capsys, *flags(corpora, full_dir, *run_flags))
    assert code == 0, stdout + stderr
    s_full, log_full, _ = read_run(full_dir)
    s_cut, log_cut, _ = read_run(cut_dir)
    assert [r["step"] for r in log_cut] == [r["step"] for r in log_full]
    for k in LOSSES:
        assert s_cut[k] == s_full[k], (k, s_cut[k], s_full[k])


def test_ctrl_c_during_data_loading_exits_without_a_traceback(tmp_path, corpora):
    """SIGINT while train.py reads a 5 MB generic .jsonl of 30,000 short records (sent as soon as
    /proc shows the file open; if it is never seen open, sent anyway once the process lives on)."""
    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        pytest.skip("needs /proc to see when train.py is reading the corpus")
    rng = random.Random(5)
    pool = english(rng, 60_000)
    starts = [rng.randrange(0, len(pool) - 300) for _ in range(30_000)]
    records = [{"text": f"{i} " + pool[s:s + 150]} for i, s in enumerate(starts)]
    big = write_jsonl(tmp_path / "big.jsonl", records)
    target = os.path.realpath(big)
    with open(tmp_path / "run.out", "w") as log_file:
        proc = start(flags(corpora, tmp_path / "out", f"--generic={big}", "--max_steps=100000"), log_file)
    try:
        fd_dir, deadline, seen = f"/proc/{proc.pid}/fd", time.time() + 30, False
        while not seen and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "run.out").read_text()
            try:
                seen = any(os.path.realpath(os.path.join(fd_dir, fd)) == target for fd in os.listdir(fd_dir))
            except OSError:                       # an fd closed while we looked
                pass
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        out = (tmp_path / "run.out").read_text()
        assert "Traceback" not in out, out
        assert proc.returncode != 0, out
    finally:
        kill_group(proc)
