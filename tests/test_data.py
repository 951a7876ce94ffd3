"""Tests for data.py: reading corpora, windows, bad input, built-in corpus, Sampler."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import DataError, load_corpus  # noqa: E402


# -----------------------------------------------------------------------------
# helpers

def write_jsonl(path, records, gz=False):
    lines = "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def rows(ex):
    # Examples -> list of bytes, one per row (padding included)
    return [bytes(r) for r in ex.x.tolist()]


def all_rows(corpus):
    return rows(corpus.train) + rows(corpus.valid) + rows(corpus.test)


@pytest.fixture
def three_files(tmp_path):
    # one file of each kind, one in a subdirectory; all documents in train
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "alpha.txt").write_text("hello txt", encoding="utf-8")
    write_jsonl(d / "sub" / "beta.jsonl", [{"text": "jsonl one", "split": "train"},
                                           {"text": "jsonl two", "split": "train", "source": "custom"}])
    write_jsonl(d / "gamma.jsonl.gz", [{"text": "gz doc", "split": "train"}], gz=True)
    (d / "ignored.csv").write_text("a,b\n")
    # alpha.txt has no split field: give it a text that hashes to train
    assert data.hash_split(data.encode("hello txt")) == "train"
    return d


# -----------------------------------------------------------------------------
# reading

def test_directory_reads_all_kinds_and_source_rule(three_files):
    c = load_corpus(str(three_files), seq_len=16)
    # source = record's "source", else file name without extension
    assert c.sources == ["alpha", "beta", "custom", "gamma"]
    got = {r.rstrip(b"\0"): c.sources[s] for r, s in zip(rows(c.train), c.train.source_id.tolist())}
    assert got == {b"hello txt": "alpha", b"jsonl one": "beta", b"jsonl two": "custom", b"gz doc": "gamma"}
    assert c.train.x.dtype == torch.uint8 and c.train.x.shape == (4, 16)
    assert c.train.source_id.dtype == torch.int64 and c.train.doc_id.dtype == torch.int64
    assert sorted(c.train.doc_id.tolist()) == [0, 1, 2, 3]
    assert len(c.valid) == 0 and len(c.test) == 0
    assert c.train.sources is not None and c.valid.sources == c.sources
    assert c.name == str(three_files)


def test_glob_and_comma_list(three_files):
    d = three_files
    g = load_corpus(str(d / "**" / "*.jsonl*"), seq_len=16)
    assert g.sources == ["beta", "custom", "gamma"]
    lst = load_corpus(f"{d / 'alpha.txt'}, {d / 'gamma.jsonl.gz'}", seq_len=16)
    assert lst.sources == ["alpha", "gamma"] and len(lst.train) == 2
    # duplicates in the list are read once
    dup = load_corpus(f"{d / 'alpha.txt'},{d}", seq_len=16)
    assert len(dup.train) == 4


def test_honoured_splits(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": "a train doc", "split": "train"},
                                          {"text": "a valid doc", "split": "valid"},
                                          {"text": "a test doc", "split": "test"},
                                          {"text": "another test doc", "split": "test"}])
    c = load_corpus(str(f), seq_len=32)
    assert [r.rstrip(b"\0") for r in rows(c.train)] == [b"a train doc"]
    assert [r.rstrip(b"\0") for r in rows(c.valid)] == [b"a valid doc"]
    assert [r.rstrip(b"\0") for r in rows(c.test)] == [b"a test doc", b"another test doc"]
    assert c.valid.doc_id.tolist() == [1] and c.test.doc_id.tolist() == [2, 3]  # global doc index


def test_hash_split_deterministic_and_80_10_10(tmp_path):
    texts = [f"document number {i} with some words" for i in range(1000)]
    f = write_jsonl(tmp_path / "h.jsonl", [{"text": t} for t in texts])
    c1, c2 = load_corpus(str(f), 64), load_corpus(str(f), 64)
    for a, b in zip((c1.train, c1.valid, c1.test), (c2.train, c2.valid, c2.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.doc_id, b.doc_id)
    n = np.array([len(c1.train), len(c1.valid), len(c1.test)])
    assert n.sum() == 1000
    assert 750 <= n[0] <= 850 and 70 <= n[1] <= 130 and 70 <= n[2] <= 130, n
    # it is exactly the documented md5 rule
    for i in (0, 1, 2, 3, 500):
        b = texts[i].encode()
        h = int(__import__("hashlib").md5(b).hexdigest()[:8], 16) % 10
        split = "train" if h < 8 else "valid" if h == 8 else "test"
        assert b.ljust(64, b"\0") in rows(getattr(c1, split))


def test_encode_normalisation():
    assert data.encode("a\nb\tc\rd\0e") == b"a b c de"
    assert data.encode("caf\u00e9") == "caf\u00e9".encode("utf-8")
    assert data.encode("x\ud800y") == b"x?y"  # lone surrogate: replaced, no exception


def test_first_and_chunk_windows_by_hand(tmp_path):
    # normalised: "ab cd efghij" (newline and tab -> space, NUL dropped), 12 bytes
    (tmp_path / "w.txt").write_text("ab\ncd\te\0fghij", encoding="utf-8")
    assert data.hash_split(b"ab cd efghij") == "train"
    spec = str(tmp_path / "w.txt")
    first = load_corpus(spec, seq_len=5, doc_mode="first")
    assert rows(first.train) == [b"ab cd"]
    first16 = load_corpus(spec, seq_len=16, doc_mode="first")
    assert rows(first16.train) == [b"ab cd efghij\0\0\0\0"]
    # chunk, L=5: 2 full windows + "ij" (2 bytes >= 5 // 4 = 1): kept, padded
    chunk = load_corpus(spec, seq_len=5, doc_mode="chunk")
    assert rows(chunk.train) == [b"ab cd", b" efgh", b"ij\0\0\0"]
    assert chunk.train.doc_id.tolist() == [0, 0, 0] and chunk.train.source_id.tolist() == [0, 0, 0]
    # chunk, L=10: "ab cd efgh" + tail "ij" (2 bytes >= 10 // 4 = 2): kept, padded
    assert rows(load_corpus(spec, 10).train) == [b"ab cd efgh", b"ij" + bytes(8)]
    # chunk, L=11: tail "j" (1 byte < 11 // 4 = 2) is dropped
    assert rows(load_corpus(spec, 11).train) == [b"ab cd efghi"]
    # a document shorter than L is its only window: kept, padded
    assert rows(load_corpus(spec, 20).train) == [b"ab cd efghij" + bytes(8)]


def test_windows_function():
    assert data.windows(b"abcdefghi", 4, "chunk") == (b"abcdefghi" + bytes(3), 3)  # tail 1 >= 4 // 4
    assert data.windows(b"abcdefghi", 8, "chunk") == (b"abcdefgh", 1)              # tail 1 < 8 // 4
    assert data.windows(b"abc", 8, "first") == (b"abc" + bytes(5), 1)


def test_examples_subset(three_files):
    c = load_corpus(str(three_files), seq_len=16)
    sub = c.train.subset(torch.tensor([2, 0]))
    assert len(sub) == 2 and torch.equal(sub.x[1], c.train.x[0]) and sub.sources == c.sources
    mask = c.train.source_id == c.sources.index("gamma")
    assert rows(c.train.subset(mask)) == [b"gz doc".ljust(16, b"\0")]


# -----------------------------------------------------------------------------
# bad input: one-line DataError naming the file (or the flag)

def bad_cases(tmp_path):
    # (name, spec, text expected in the message)
    cases = []
    p = tmp_path / "empty.txt"; p.write_bytes(b"")
    cases.append(("empty txt", str(p), "empty.txt"))
    p = tmp_path / "empty.jsonl"; p.write_bytes(b"")
    cases.append(("empty jsonl", str(p), "empty.jsonl"))
    p = tmp_path / "blank.jsonl"; p.write_text("\n\n  \n")
    cases.append(("only blank lines", str(p), "blank.jsonl"))
    p = tmp_path / "random.txt"; p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    cases.append(("binary txt", str(p), "random.txt"))
    p = tmp_path / "utf16.txt"; p.write_bytes("some text in utf-16\n".encode("utf-16-le") * 50)
    cases.append(("NUL-heavy txt", str(p), "utf16.txt"))
    p = tmp_path / "notgz.jsonl.gz"; p.write_text('{"text": "plain, not gzipped"}\n')
    cases.append(("not gzip", str(p), "notgz.jsonl.gz"))
    p = tmp_path / "trunc.jsonl.gz"; p.write_bytes(gzip.compress(b'{"text": "x"}\n' * 500)[:60])
    cases.append(("truncated gzip", str(p), "trunc.jsonl.gz"))
    p = write_jsonl(tmp_path / "badjson.jsonl", [{"text": "ok"}, "{not json"])
    cases.append(("invalid JSON", str(p), "badjson.jsonl:2: not valid JSON"))
    p = tmp_path / "badutf8.jsonl"; p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    # invalid UTF-8 reads as U+FFFD in .jsonl as in .txt: a file of it is "binary"
    cases.append(("invalid UTF-8 in JSON", str(p), "badutf8.jsonl: no usable text"))
    p = write_jsonl(tmp_path / "notext.jsonl", [{"text": "ok"}, {}, {"body": "x"}])
    cases.append(("no text field", str(p), 'notext.jsonl:2: record has no "text" field'))
    p = write_jsonl(tmp_path / "numtext.jsonl", [{"text": 3}])
    cases.append(("non-string text", str(p), 'numtext.jsonl:1: record has no "text" field'))
    p = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    cases.append(("record not an object", str(p), "list.jsonl:1:"))
    p = write_jsonl(tmp_path / "split.jsonl", [{"text": "a", "split": "train"}, {"text": "b", "split": "dev"}])
    cases.append(("unknown split", str(p), "split.jsonl:2: unknown split"))
    p = write_jsonl(tmp_path / "alltest.jsonl", [{"text": "a", "split": "test"}, {"text": "b", "split": "valid"}])
    cases.append(("no training examples", str(p), "--generic"))
    p = write_jsonl(tmp_path / "emptytexts.jsonl", [{"text": ""}, {"text": " \n "}])
    cases.append(("only empty texts", str(p), "emptytexts.jsonl"))
    p = tmp_path / "data.csv"; p.write_text("a,b\n")
    cases.append(("unsupported file named explicitly", str(p), "data.csv"))
    (tmp_path / "nothing_here").mkdir()
    cases.append(("directory without corpus files", str(tmp_path / "nothing_here"), "nothing_here"))
    cases.append(("missing path", str(tmp_path / "missing.jsonl"), "--generic: no such file or directory"))
    cases.append(("glob matching nothing", str(tmp_path / "*.nope"), "--generic: no such file or directory"))
    cases.append(("missing path in a list", f"{tmp_path / 'empty.txt'},{tmp_path / 'gone'}", "--generic"))
    cases.append(("empty spec", " , ", "--generic"))
    return cases


def test_bad_inputs_raise_one_line_data_error(tmp_path):
    cases = bad_cases(tmp_path)
    for name, spec, expect in cases:
        with pytest.raises(DataError) as e:
            load_corpus(spec, seq_len=16)
        msg = str(e.value)
        assert "\n" not in msg, (name, msg)
        assert expect in msg, (name, msg)


def test_flag_is_used_in_messages(tmp_path):
    with pytest.raises(DataError, match="^--specific: no such file or directory"):
        load_corpus(str(tmp_path / "nope"), 16, flag="--specific")
    with pytest.raises(DataError, match="doc_mode"):
        load_corpus(str(tmp_path), 16, doc_mode="middle")


def test_good_file_is_not_rejected_as_binary(tmp_path):
    # accented text, a few control characters: still fine
    p = tmp_path / "ok.txt"
    p.write_text("Caf\u00e9 na\u00efve \u00fcber \x07 bell, d\u00e9j\u00e0 vu. " * 20, encoding="utf-8")
    if data.hash_split(data.encode(p.read_text(encoding="utf-8"))) == "train":
        assert len(load_corpus(str(p), 64).train) > 0
    assert sum(1 for _ in data.read_documents(str(p))) == 1


# -----------------------------------------------------------------------------
# built-in corpus

SMALL = dict(n_generic=2000, n_specific_train=50, n_specific_eval=20)


def test_builtin_deterministic_and_shapes():
    g1, s1, i1 = data.builtin_corpora(0, 64, **SMALL)
    g2, s2, i2 = data.builtin_corpora(0, 64, **SMALL)
    for a, b in [(g1.train, g2.train), (g1.valid, g2.valid), (g1.test, g2.test),
                 (s1.train, s2.train), (s1.valid, s2.valid), (s1.test, s2.test)]:
        assert torch.equal(a.x, b.x) and torch.equal(a.source_id, b.source_id) and torch.equal(a.doc_id, b.doc_id)
    assert i1 == i2
    assert g1.train.x.shape == (2000, 64) and g1.train.x.dtype == torch.uint8
    assert len(g1.valid) == len(g1.test) == 200
    assert (len(s1.train), len(s1.valid), len(s1.test)) == (50, 20, 20)
    assert not (g1.train.x == 0).any()  # documents fill seq_len: no padding


def test_builtin_sources_shares_and_oracle():
    g, s, info = data.builtin_corpora(1, 128, **SMALL)
    names = ["target", "related", "unrelated_a", "unrelated_b", "unrelated_c", "noise"]
    assert g.sources == names and s.sources == ["target"]
    assert set(s.train.source_id.tolist()) == {0}
    counts = np.bincount(g.train.source_id.numpy(), minlength=6)
    assert (counts > 0).all()
    assert counts[0] / counts.sum() <= 0.10
    assert info["target_source"] == "target"
    assert info["oracle"]["target"] == 1.0 and info["oracle"]["noise"] == 0.0 and 0 < info["oracle"]["related"] < 1
    assert abs(sum(info["base_rate"].values()) - 1) < 1e-9
    assert info["base_rate"]["target"] == pytest.approx(counts[0] / counts.sum())
    # byte statistics: noise is printable ASCII, text domains are lowercase + " ."
    noise = g.train.x[g.train.source_id == 5]
    assert noise.min() >= 32 and noise.max() <= 126
    text = g.train.x[g.train.source_id == 0]
    allowed = set(b"abcdefghijklmnopqrstuvwxyz .")
    assert set(torch.unique(text).tolist()) <= allowed
    # specific documents are fresh draws, not copies of generic target documents
    gen_target = set(rows(g.train.subset(g.train.source_id == 0)))
    assert not gen_target & set(all_rows(s))
    # doc ids are global and unique within each corpus
    ids = torch.cat([g.train.doc_id, g.valid.doc_id, g.test.doc_id])
    assert len(torch.unique(ids)) == len(ids)


def test_builtin_seeds_differ():
    a, sa, _ = data.builtin_corpora(0, 64, **SMALL)
    b, sb, _ = data.builtin_corpora(1, 64, **SMALL)
    assert not torch.equal(a.train.x, b.train.x)
    assert not torch.equal(sa.train.x, sb.train.x)


# -----------------------------------------------------------------------------
# Sampler

def test_sampler_same_seed_same_indices():
    a, b, c = data.Sampler(100, seed=3), data.Sampler(100, seed=3), data.Sampler(100, seed=4)
    ia, ib, ic = a.sample(64), b.sample(64), c.sample(64)
    assert torch.equal(ia, ib) and not torch.equal(ia, ic)
    assert ia.dtype == torch.int64 and ia.shape == (64,) and 0 <= ia.min() and ia.max() < 100


def test_sampler_state_round_trip(tmp_path):
    s = data.Sampler(1000, seed=7)
    s.sample(10)
    torch.save(s.state_dict(), tmp_path / "sampler.pt")
    expected = [s.sample(32) for _ in range(3)]
    fresh = data.Sampler(1000, seed=123)  # a different seed: state must override it
    fresh.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    got = [fresh.sample(32) for _ in range(3)]
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
