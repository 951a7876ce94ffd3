"""Prepared pools (data.load_prepared): the same Corpus as today's in-memory read (load_corpus with
cache="off", the independent computation), bit for bit; rebuilt when an input changes; never half-built;
built once when several processes ask at once; a run resumes from one exactly. And the converters of the
paper's data (C4, Reuters-21578), on small files written here in the sources' own formats."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import data
import train
from test_train import read_outputs, sigterm_during_stop_check, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_texts(n, prefix):
    """n texts that the 80/10/10 hash puts in valid or test (a source made of them has no train document)."""
    out, i = [], 0
    while len(out) < n:
        text = f"{prefix} held-out document number {i} " * 3
        if data.hash_split(data.encode(text)) != "train":
            out.append(text)
        i += 1
    return out


def jsonl(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def corpus(tmp_path):
    """Every reading rule at once: .txt, .jsonl, .jsonl.gz; given and hashed splits; sources named by
    record or by file; documents longer than a window; sources whose documents all hashed into valid/test
    (12 of them, with their two documents in different files: the small-set rule moves the first to
    train), one such source with a single document (kept out of train), one given only valid/test."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "ü", "中文"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(120)]
    (d / "a_plain.txt").write_text(docs[0] * 3, encoding="utf-8")
    jsonl(d / "b_mixed.jsonl", [{"text": t, "source": f"src{i % 3}"} for i, t in enumerate(docs[1:60])]
          + [{"text": t, "split": "valid", "source": "given_held"} for t in docs[60:63]]
          + [{"text": t, "source": f"moved{k:02d}"} for k, t in enumerate(held_texts(12, "first"))]
          + [{"text": held_texts(1, "lonely")[0], "source": "lonely"}, {"text": ""}])
    jsonl(d / "sub" / "c_gz.jsonl.gz", [{"text": t, "split": ("train", "test")[i % 2]} for i, t in
                                        enumerate(docs[63:])]
          + [{"text": t, "source": f"moved{k:02d}"} for k, t in enumerate(held_texts(12, "second"))])
    return str(d)


def assert_same(a, b):
    assert a.sources == b.sources and a.name == b.name
    assert a.doc_hash.dtype == b.doc_hash.dtype and np.array_equal(a.doc_hash, b.doc_hash)
    for split in data.SPLITS:
        x, y = getattr(a, split), getattr(b, split)
        assert x.sources == y.sources
        for k in ("x", "source_id", "doc_id"):
            u, v = getattr(x, k), getattr(y, k)
            assert u.dtype == v.dtype and u.equal(v), (split, k)


@pytest.mark.parametrize("doc_mode,workers", [("first", 1), ("chunk", 1), ("chunk", 2), ("first", 3)])
def test_prepared_equals_in_memory(corpus, tmp_path, doc_mode, workers):
    memory = data.load_corpus(corpus, 16, doc_mode, cache="off")
    # the fixture's rules all apply: moved sources in train, the lonely one and the given one not
    train_sources = {memory.sources[k] for k in memory.train.source_id.tolist()}
    assert {f"moved{k:02d}" for k in range(12)} <= train_sources
    assert not {"lonely", "given_held"} & train_sources
    built = data.load_corpus(corpus, 16, doc_mode, cache=str(tmp_path / "cache"), workers=workers)
    mapped = data.load_corpus(corpus, 16, doc_mode, cache=str(tmp_path / "cache"), workers=workers)
    assert_same(built, memory)
    assert_same(mapped, memory)
    # the examples are a map of the prepared file, not a copy in the process's memory
    if os.path.exists("/proc/self/maps"):
        start = mapped.train.x.data_ptr()
        with open("/proc/self/maps") as f:
            regions = [line.split() for line in f]
        owner = [r[-1] for r in regions if int(r[0].split("-")[0], 16) <= start < int(r[0].split("-")[1], 16)]
        assert owner and owner[0].endswith("train.x"), owner


def test_doc_hash_and_warnings_on_every_load(corpus, tmp_path, capsys):
    """doc_hash against its definition (64 bits of each document's MD5, in reading order, from
    read_documents); the readers' warnings (invalid UTF-8, an empty file skipped) on the build and
    again when the copy is mapped."""
    with open(os.path.join(corpus, "d_bad.txt"), "wb") as f:
        f.write("caf\u00e9 ".encode() * 20 + b"\xff\xfe bad bytes")
    open(os.path.join(corpus, "e_empty.jsonl"), "w").close()
    want = [int.from_bytes(hashlib.md5(b).digest()[:8], "little", signed=True)
            for f in data.resolve_files(corpus) for b, _, _ in data.read_documents(f, skip_empty=True)]
    capsys.readouterr()
    for cache in ("off", str(tmp_path / "cache"), str(tmp_path / "cache")):      # memory, built, mapped
        c = data.load_corpus(corpus, 16, cache=cache)
        assert c.doc_hash.tolist() == want
        out = capsys.readouterr().out
        assert "d_bad.txt: 2 invalid UTF-8 sequences" in out and "e_empty.jsonl: an empty file" in out, out


def test_default_cache_is_under_xdg_cache_home(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_root("") == str(tmp_path / "xdg" / data.POOLS)
    assert data.cache_root("~/pools") == os.path.expanduser("~/pools")
    data.load_corpus(corpus, 16, cache="")
    (copy,) = [p for p in os.listdir(tmp_path / "xdg" / data.POOLS) if not p.endswith(".lock")]
    manifest = json.load(open(tmp_path / "xdg" / data.POOLS / copy / "manifest.json"))
    assert manifest["format"] == data.FORMAT and manifest["seq_len"] == 16 and len(manifest["files"]) == 3


def test_a_changed_input_or_setting_rebuilds(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    first = data.load_corpus(corpus, 16, cache=cache)
    path = os.path.join(corpus, "b_mixed.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more document, for source src0", "source": "src0"}) + "\n")
    again = data.load_corpus(corpus, 16, cache=cache)
    assert_same(again, data.load_corpus(corpus, 16, cache="off"))
    assert sum(len(getattr(again, s)) for s in data.SPLITS) > sum(len(getattr(first, s)) for s in data.SPLITS)
    # the same size, a new modification time: rebuilt too (an edit in place)
    with open(path, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace("alpha", "ALPHA"))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert_same(data.load_corpus(corpus, 16, cache=cache), data.load_corpus(corpus, 16, cache="off"))
    assert_same(data.load_corpus(corpus, 24, cache=cache), data.load_corpus(corpus, 24, cache="off"))


def test_an_interrupted_build_is_never_used(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = data._join

    def killed(*args):
        original(*args)                  # every file written, only the rename missing
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "_join", killed)
    with pytest.raises(KeyboardInterrupt):
        data.load_corpus(corpus, 16, cache=str(cache))
    assert [p for p in os.listdir(cache) if not p.endswith(".lock")] == []
    monkeypatch.undo()
    # what a killed process leaves (a complete-looking copy under its temporary name) is not used, and goes
    good = data.load_corpus(corpus, 16, cache=str(cache))
    (copy,) = [p for p in os.listdir(cache) if not p.endswith(".lock")]
    os.rename(cache / copy, cache / f"{copy}.tmp999")
    assert_same(data.load_corpus(corpus, 16, cache=str(cache)), good)
    assert sorted(os.listdir(cache)) == [copy, f"{copy}.lock"]


CHILD = """
import sys, time, data
prepare = data._prepare_parts
def slow(*args):          # hold the lock a while: the other process comes while this one builds
    print("building", file=sys.stderr)
    time.sleep(2)
    return prepare(*args)
data._prepare_parts = slow
c = data.load_corpus(sys.argv[1], 16, "chunk", cache=sys.argv[2])
print(int(c.train.x.sum()), len(c.train), len(c.valid), len(c.test))
"""


def test_two_processes_preparing_at_once_build_once(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, corpus, cache], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    memory = data.load_corpus(corpus, 16, "chunk", cache="off")
    want = f"{int(memory.train.x.sum())} {len(memory.train)} {len(memory.valid)} {len(memory.test)}"
    assert [o.strip() for o, _ in outs] == [want, want]
    assert sum("building" in e for _, e in outs) == 1, [e for _, e in outs]     # one built, one mapped
    assert_same(data.load_corpus(corpus, 16, "chunk", cache=cache), memory)


FLAGS = ["--max_steps=20", "--eval_interval=10", "--eval_examples=50", "--n_layer=1", "--n_embd=16",
         "--n_hidden=32", "--seq_len=16", "--batch_size=8", "--specific_batch_size=4", "--big_batch_size=32",
         "--weighter_dim=8", "--doc_mode=chunk", "--method=soba"]


def test_run_on_a_prepared_pool_is_the_in_memory_run_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    # the specific file is one of the generic corpus's: its contamination allowed (a warning)
    flags = [f"--generic={corpus}", f"--specific={corpus}/b_mixed.jsonl", "--allow_overlap", *FLAGS]
    memory, cut = tmp_path / "memory", tmp_path / "cut"
    assert train.main([f"--out_dir={memory}", *flags, "--data_cache=off"]) == 0
    with monkeypatch.context() as m:
        sigterm_during_stop_check(m, 7)
        assert train.main([f"--out_dir={cut}", *flags, f"--data_cache={tmp_path / 'cache'}"]) == 143
    assert train.main([f"--out_dir={cut}", "--resume"]) == 0            # the saved --data_cache: mapped
    (s_memory, log_memory), (s_cut, log_cut) = read_outputs(memory), read_outputs(cut)
    for k in ("specific_valid_loss", "specific_test_loss", "generic_valid_loss", "source_share"):
        assert s_cut[k] == s_memory[k], k
    assert without_timing(log_cut) == without_timing(log_memory)


# -----------------------------------------------------------------------------
# the paper's data: converters, on files in the sources' own formats

def test_c4_shards_to_jsonl_gz(tmp_path):
    shards = []
    for i, texts in enumerate([["first doc\nof shard 0", "second"], ["é" * 20, "third\tone", "not read"]]):
        shards.append(str(tmp_path / f"c4-train.{i:05d}-of-01024.json.gz"))
        jsonl(shards[-1], [{"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": "https://c4.x"}
                           for t in texts])
    assert data.main(["c4", f"--out={tmp_path / 'c4'}", "--docs=4", f"--shards={','.join(shards)}"]) == 0
    assert sorted(os.listdir(tmp_path / "c4")) == ["c4-00000.jsonl.gz", "c4-00001.jsonl.gz"]
    c = data.load_corpus(str(tmp_path / "c4"), 64, "first", cache="off")
    assert c.sources == ["c4"] and sum(len(getattr(c, s)) for s in data.SPLITS) == 4
    # the paper's first bytes: 9 bytes of "éééé…" are 4 whole characters (8 bytes)
    out = tmp_path / "c4_first"
    flags = [f"--out={out}", "--docs=3", "--first_bytes=9", f"--shards={','.join(shards)}"]
    assert data.main(["c4", *flags]) == 0
    texts = [json.loads(line)["text"] for f in sorted(os.listdir(out)) for line in gzip.open(out / f, "rt")]
    assert texts == ["first doc", "second", "é" * 4]


SGM = """<!DOCTYPE lewis SYSTEM "lewis.dtd">
<REUTERS TOPICS="YES" LEWISSPLIT="TRAIN" CGISPLIT="TRAINING-SET" OLDID="5544" NEWID="1">
<DATE>26-FEB-1987 15:01:01.79</DATE><TOPICS><D>cocoa</D></TOPICS>
<TEXT>&#2;
<TITLE>BAHIA COCOA REVIEW</TITLE>
<DATELINE>    SALVADOR, Feb 26 - </DATELINE><BODY>Showers continued &lt;throughout&gt; the week.
 Reuter
&#3;</BODY></TEXT>
</REUTERS>
<REUTERS TOPICS="NO" LEWISSPLIT="TRAIN" CGISPLIT="TRAINING-SET" OLDID="5545" NEWID="2">
<TEXT><TITLE>NO TOPICS</TITLE><BODY>left out</BODY></TEXT></REUTERS>
<REUTERS TOPICS="YES" LEWISSPLIT="NOT-USED" CGISPLIT="TRAINING-SET" OLDID="5546" NEWID="3">
<TEXT><TITLE>NOT USED</TITLE><BODY>left out</BODY></TEXT></REUTERS>
"""


def test_reuters_modapte_to_jsonl_gz(tmp_path):
    tests = "".join(f'<REUTERS TOPICS="YES" LEWISSPLIT="TEST" CGISPLIT="PUBLISHED-TESTSET" NEWID="{i}">\n'
                    f"<TEXT><TITLE>TEST {i}</TITLE><BODY>body &amp; {i}</BODY></TEXT></REUTERS>\n"
                    for i in range(3))
    archive = tmp_path / "reuters21578.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in (("reut2-000.sgm", SGM), ("reut2-001.sgm", tests), ("README.txt", "not sgml")):
            blob = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert data.main(["reuters", f"--out={tmp_path / 'r'}", f"--archive={archive}"]) == 0
    with gzip.open(tmp_path / "r" / "reuters21578.jsonl.gz", "rt") as f:
        records = [json.loads(line) for line in f]
    assert [(r["split"], r["text"]) for r in records] == [
        ("train", "BAHIA COCOA REVIEW Showers continued <throughout> the week.\n Reuter"),
        ("valid", "TEST 0 body & 0"), ("test", "TEST 1 body & 1"), ("valid", "TEST 2 body & 2")]
    c = data.load_corpus(str(tmp_path / "r"), 32, cache=str(tmp_path / "cache"))
    assert (len(c.train), len(c.valid), len(c.test)) == (2, 2, 1) and c.sources == ["reuters21578"]


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert data.main(["prepare", f"--spec={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    assert data.main(["reuters", f"--out={tmp_path}", f"--archive={tmp_path / 'missing.tar.gz'}"]) == 2
    assert "missing.tar.gz" in capsys.readouterr().err
    with pytest.raises(train.ConfigError, match="--data_workers"):
        train.parse_args(["--data_workers=-1"], {k: getattr(train, k) for k in train.config_keys})
