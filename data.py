"""
Data for the adaptive-training-distribution experiments.

Everything the rest of the code sees is a byte-level `Examples` set: a
(N, seq_len) uint8 tensor of text windows, right-padded with byte 0, plus a
source id and a document id per row. A `Corpus` bundles train/valid/test.

Two kinds of corpora:
  * `load_corpus(spec, ...)`   reads .txt / .jsonl / .jsonl.gz files from disk; with a cache
    directory, through a prepared copy (flat files mapped with np.memmap, built once).
  * `builtin_corpora(seed,...)` builds a small synthetic generic + specific
    pair whose ideal training distribution is known by construction, so the
    whole method can be run (and checked) with no files at all.

`Sampler` draws uniform batches of indices: sample(D, n) in the paper, i.e.
n i.i.d. uniform draws from D, with its own resumable random generator.
"""

import argparse, contextlib, glob, gzip, hashlib, html, inspect, io, itertools, json, os, re, shutil
import subprocess, sys, tarfile, time, urllib.request, zlib
import fcntl       # the build's file lock (POSIX)
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl.gz", ".jsonl", ".txt")   # longest first: ".jsonl.gz" before ".jsonl"
MAX_BAD_FRACTION = 0.25  # a file with more NUL / control / invalid-UTF-8 characters is "binary"


class DataError(Exception):
    """Bad input. str(e) is ONE line that names the file (or flag) and the problem."""


# -----------------------------------------------------------------------------
# containers

@dataclass
class Examples:
    x: torch.Tensor          # (N, seq_len) uint8, byte 0 = padding (always right-padded)
    source_id: torch.Tensor  # (N,) int64, index into `sources`
    doc_id: torch.Tensor     # (N,) int64, global document index (windows of one doc share it)
    sources: list            # list[str] source names, shared by train/valid/test of one corpus

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx) -> "Examples":
        # idx: (M,) LongTensor of row indices, or (N,) bool mask
        return Examples(self.x[idx], self.source_id[idx], self.doc_id[idx], self.sources)


@dataclass
class Corpus:
    train: Examples
    valid: Examples
    test: Examples
    sources: list            # list[str]
    name: str                # the spec string, or "builtin:generic" / "builtin:specific"
    doc_hash: np.ndarray = None  # (n_docs,) int64: a hash of each document's bytes, by doc id (files only)


def _examples(x: np.ndarray, source_id: np.ndarray, doc_id: np.ndarray, sources: list) -> Examples:
    # numpy -> torch; x (N, L) uint8, source_id (N,), doc_id (N,)
    return Examples(torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)),
                    torch.from_numpy(np.asarray(source_id, dtype=np.int64)),
                    torch.from_numpy(np.asarray(doc_id, dtype=np.int64)), list(sources))


# -----------------------------------------------------------------------------
# text -> bytes

def encode(text: str) -> bytes:
    """The text normalisation used everywhere: newlines (\\n, \\r) and tabs become
    spaces, NUL characters are dropped, the rest is UTF-8 (unencodable -> '?').
    Since NUL never survives, byte 0 is free to mean padding."""
    text = text.replace("\0", "").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    return text.encode("utf-8", errors="replace")


def hash_split(b: bytes) -> str:
    """Deterministic 80/10/10 split of a document from its (normalised) bytes.
    Identical documents always land in the same split (no train/test leak)."""
    h = int(hashlib.md5(b).hexdigest()[:8], 16) % 10
    return "train" if h < 8 else ("valid" if h == 8 else "test")


def windows(b: bytes, seq_len: int, doc_mode: str) -> tuple[bytes, int]:
    """Cut one document into fixed-length windows. Returns (data, n) where data
    holds n * seq_len bytes (right-padded with 0) and n is the number of windows.

    "first": the paper's choice, only the first seq_len bytes of the document.
    "chunk": consecutive non-overlapping windows covering the whole document; a
             last partial window is kept only if it holds >= seq_len // 4 bytes
             or is the document's only window (short documents are never lost).
    "first" is the default (the paper's); with few, long documents it throws away
    most of the text: a generic set of ~16k documents (~58 MB) gives only ~16k
    examples with "first", but ~250k at seq_len=256 with "chunk". The paper's
    C4 has ~30M documents, so "first 256 bytes" still leaves it a huge pool."""
    if doc_mode == "first":
        return b[:seq_len] + bytes(max(0, seq_len - len(b))), 1
    n_full, rem = divmod(len(b), seq_len)
    if rem > 0 and (rem >= seq_len // 4 or n_full == 0):     # keep the last, partial window
        return b + bytes(seq_len - rem), n_full + 1
    return b[: n_full * seq_len], n_full


# -----------------------------------------------------------------------------
# reading files

def _suffix(path: str) -> str:
    return next((s for s in SUFFIXES if path.endswith(s)), "")


def resolve_files(spec: str, flag: str = "--generic") -> list[str]:
    """spec: a file, a directory (searched recursively), a glob, or a
    comma-separated list of those. Returns the files, sorted within each part,
    duplicates removed. (File names containing commas are not supported.)"""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DataError(f"{flag}: empty corpus spec {spec!r}")
    files = []
    for part in parts:
        p = os.path.expanduser(part)
        matches = [p] if os.path.exists(p) else []
        if glob.has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
        if not matches:
            raise DataError(f"{flag}: no such file or directory: {part}")
        found = []
        for m in matches:
            if os.path.isdir(m):  # directories: every readable file below, recursively
                found += sorted(os.path.join(d, f) for d, _, fs in os.walk(m) for f in fs if _suffix(f))
            elif _suffix(m) or not glob.has_magic(p):
                found.append(m)  # a file named explicitly is kept (and its type checked when read)
        if not found:
            raise DataError(f"{flag}: {part}: contains no .txt, .jsonl or .jsonl.gz file")
        files += found
    return list(dict.fromkeys(files))


def _decode(raw: bytes) -> tuple[str, int]:
    # (text, how many invalid UTF-8 sequences became U+FFFD): .txt and .jsonl read bytes alike
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _records(path: str, progress=None):
    # yields (text, source, split, n invalid) for each record of a file: a .txt file is one document (its
    # source: the file name); a .jsonl one JSON record per line: {"text": str, "source": str?, "split": str?}
    name = os.path.basename(path)[: -len(_suffix(path))]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        if path.endswith(".txt"):
            text, n_invalid = _decode(f.read())
            yield text, name, None, n_invalid
            return
        raw, at = getattr(f, "fileobj", f), 0      # the file on disk (under gzip): bytes read = raw.tell()
        for lineno, line in enumerate(f, 1):
            if progress is not None and lineno % 4096 == 0:
                progress(raw.tell() - at)
                at = raw.tell()
            if not line.strip():
                continue  # blank lines are skipped
            where = f"{path}:{lineno}"
            text, n_invalid = _decode(line)     # invalid UTF-8 becomes U+FFFD, as in a .txt file
            try:
                rec = json.loads(text)
            except ValueError:
                raise DataError(f"{where}: not valid JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f'{where}: record has no "text" field')
            source, split = rec.get("source") or name, rec.get("split")  # null/"" source: file name
            if not isinstance(source, str):
                raise DataError(f'{where}: "source" must be a string, got {source!r}')
            if split is not None and split not in SPLITS:
                raise DataError(f'{where}: unknown split {split!r} (expected "train", "valid" or "test")')
            yield rec["text"], source, split, n_invalid


def read_documents(path, with_text=False, hash_splits=True, skip_empty=False, progress=None, warn=print):
    """Yields (bytes, source, split) for each non-empty document of one file;
    split is one of SPLITS (a record's own "split", else the hash split; with
    hash_splits=False, None when the record gives none). Any problem becomes a
    one-line DataError.
    with_text: (bytes, source, split, text), text as read (what `diagnose.py
    select` writes out), bytes its normalised encoding (what the models read).
    Invalid UTF-8 (in .txt and .jsonl alike) is read as U+FFFD, counted in a warning. skip_empty: a file
    with no document is skipped with a warning (one of several files), not an error.
    progress: called now and then with the bytes of the file read since its last call; warn: what
    receives the warnings (a prepared copy keeps them, to repeat them when it is mapped)."""
    if not _suffix(path):
        raise DataError(f"{path}: unsupported file type (expected .txt, .jsonl or .jsonl.gz)")
    n_chars = n_bad = n_docs = n_replaced = 0
    try:
        for text, source, split, n_invalid in _records(path, progress):
            b = encode(text)
            n_chars += len(text)
            # characters that real text hardly ever contains: NULs, other control characters (bytes < 32
            # once encoded), and U+FFFD (what undecodable bytes turn into)
            n_bad += text.count("\0") + b.count("\ufffd".encode())
            n_bad += np.count_nonzero(np.frombuffer(b, np.uint8) < 32)
            n_replaced += n_invalid
            if not b or b.isspace():
                continue  # empty documents give no examples
            n_docs += 1
            split = split or (hash_split(b) if hash_splits else None)   # None: not given, not hashed
            yield (b, source, split) + ((text,) if with_text else ())
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({_one_line(e)})") from None
    except OSError as e:  # missing, unreadable, a directory, ...
        raise DataError(f"{path}: cannot read: {_one_line(e.strerror or e)}") from None
    if n_bad > MAX_BAD_FRACTION * n_chars:
        raise DataError(f"{path}: no usable text ({100 * n_bad / n_chars:.0f}% NUL, control or "
                        f"invalid UTF-8 characters: binary file?)")
    if n_docs == 0 and skip_empty:
        warn(f"warning: {path}: an empty file (no document): skipped")
    elif n_docs == 0:
        raise DataError(f"{path}: empty file (no document)")
    if n_replaced:
        warn(f"warning: {path}: {n_replaced} invalid UTF-8 sequences, read as U+FFFD")


def _one_line(e) -> str:
    return " ".join(str(e).split())


def load_corpus(spec, seq_len, doc_mode="chunk", flag="--generic", cache="off", workers=0) -> Corpus:
    """Read every file of `spec` (see resolve_files) into a byte-level Corpus.
    Sources are sorted by name; doc_id counts documents in reading order over
    all files and splits; doc_hash holds 64 bits of the MD5 of each document's bytes, by doc id
    (contamination). Raises DataError on any bad input.
    cache: a --data_cache value ("" = the user's cache directory): the same Corpus, from a prepared
    copy of the files there (load_prepared, built by `workers` processes); "off": read into memory,
    by the same steps (_prepare_parts, _join) into in-memory buffers."""
    if doc_mode not in ("first", "chunk"):
        raise DataError(f"{flag}: unknown doc_mode {doc_mode!r} (expected 'first' or 'chunk')")
    if seq_len < 1:
        raise DataError(f"{flag}: seq_len must be >= 1, got {seq_len}")
    files = resolve_files(spec, flag)
    if cache != "off":
        return load_prepared(files, spec, seq_len, doc_mode, flag, cache_root(cache), workers)
    # the steps of a prepared copy's build (_build), in one process, into buffers: {name: io.BytesIO}
    parts, out = [{} for _ in files], {}
    results = _prepare_parts(files, parts, seq_len, doc_mode, workers=1)
    return _corpus(out, _join(results, parts, out, seq_len, f"{flag}: {spec}"), seq_len, spec)


# -----------------------------------------------------------------------------
# prepared pools: a corpus read once into flat files that every later run maps (nanoGPT's train.bin)
#
# A prepared copy is one directory of the cache: per split, `SPLIT.x` ((N, seq_len) uint8 windows) and
# `SPLIT.source_id`, `SPLIT.doc_id` ((N,) int64), and `doc_hash` ((n_docs,) little-endian int64, by doc
# id), raw; then manifest.json (the inputs' paths, sizes and modification times, seq_len, doc_mode,
# FORMAT; the sources, the row counts and the readers' warnings, repeated on every load). A run maps the
# files with np.memmap: it reads only the pages of the rows it draws, and the OS page cache holds them
# once for all the processes that map them (torchrun's ranks). Disk: N · (seq_len + 16) + 8 n_docs bytes.
# The in-memory read ("off") takes the same steps with a dict of io.BytesIO buffers in place of files.

FORMAT = 2          # the copy's layout and split rule: a new value rebuilds every prepared copy
POOLS = "adaptive-training-pools"   # the cache's subdirectory
BLOCK = 1 << 22     # bytes of windows buffered before a write, and copied at a time (bounded memory)
NAMES = [f"{s}.{k}" for s in SPLITS for k in ("x", "source_id", "doc_id")] + ["doc_hash"]   # a store's arrays


def cache_root(cache: str) -> str:
    """--data_cache: a directory, or "" for the user's cache directory ($XDG_CACHE_HOME, else ~/.cache)."""
    return os.path.expanduser(cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", POOLS))


def load_prepared(files, spec, seq_len, doc_mode, flag, root, workers=0) -> Corpus:
    """load_corpus(spec, ...) from its prepared copy under root, built first when it is missing or stale
    (an input's size or modification time, a setting or FORMAT changed). One process builds, under a file
    lock; one that comes while it builds waits, then maps the new copy."""
    # what identifies an input's version: [absolute path, size, modification time in ns]
    stats = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    want = {"format": FORMAT, "seq_len": seq_len, "doc_mode": doc_mode, "files": stats}
    # one directory per (file list, settings), named for people who look into the cache
    key = hashlib.sha1(json.dumps([f[0] for f in stats]).encode()).hexdigest()
    name = re.sub(r"[^\w.-]", "_", os.path.basename(spec.rstrip("/")))[:40]
    path = os.path.join(root, f"{name}-{seq_len}-{doc_mode}-f{FORMAT}-{key[:12]}")
    manifest = _manifest(path, want)
    if manifest is None:
        try:
            os.makedirs(root, exist_ok=True)
            with open(path + ".lock", "a") as lock:
                # one process builds: the others wait here (the lock goes with the file, or the process)
                fcntl.flock(lock, fcntl.LOCK_EX)
                manifest = _manifest(path, want)      # another process may have built it meanwhile
                if manifest is None:
                    manifest = _build(path, files, want, spec, flag, workers)
        except OSError as e:
            raise DataError(f"--data_cache: cannot write in {root} ({_one_line(e)}); DIR or off") from None
    return _corpus(path + "/", manifest, seq_len, spec)


def _manifest(path: str, want: dict):
    # the prepared copy's manifest if it is complete (written last) and matches `want`, else None
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if all(m.get(k) == v for k, v in want.items()) else None


def _build(path: str, files: list, want: dict, spec: str, flag: str, workers: int) -> dict:
    """Prepare `files` into path, under the lock: each file into its own part (_prepare_file, in
    parallel, path/parts/I.*), then the parts joined in file order by load_corpus's rules (_join).
    Everything is written into path.tmpPID, renamed to path at the end: an interrupted build leaves no
    copy that a run uses."""
    for old in glob.glob(glob.escape(path) + ".tmp*"):       # what an interrupted build left
        shutil.rmtree(old, ignore_errors=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.join(tmp, "parts"))
        parts = [os.path.join(tmp, "parts", f"{i}.") for i in range(len(files))]
        results = _prepare_parts(files, parts, want["seq_len"], want["doc_mode"], workers)
        manifest = dict(want, **_join(results, parts, tmp + "/", want["seq_len"], f"{flag}: {spec}"))
        shutil.rmtree(os.path.join(tmp, "parts"))
        write_json(os.path.join(tmp, "manifest.json"), manifest)
        shutil.rmtree(path, ignore_errors=True)   # a stale copy (a run that maps it keeps its pages)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _sink(stack: contextlib.ExitStack, store, name: str):
    # where an array of a store is written: the file store+name (a path prefix), or a buffer (store: a dict)
    if isinstance(store, dict):
        return store.setdefault(name, io.BytesIO())
    return stack.enter_context(open(store + name, "wb", buffering=BLOCK))


def _array(store, name: str, dtype) -> np.ndarray:
    # an array of a store, as written: a buffer's view, or the file mapped copy-on-write ("c": writable for
    # torch.from_numpy, never written back, read as touched; an empty file cannot be mapped)
    if isinstance(store, dict):
        return np.frombuffer(store[name].getbuffer(), dtype)
    if os.path.getsize(store + name) == 0:
        return np.zeros(0, dtype)
    return np.memmap(store + name, dtype, "c")


def _split(store, split: str, seq_len: int) -> list:
    # a split's rows: x (N, L) uint8, source_id (N,), doc_id (N,) int64
    x = _array(store, f"{split}.x", np.uint8).reshape(-1, seq_len)
    return [x, _array(store, f"{split}.source_id", np.int64), _array(store, f"{split}.doc_id", np.int64)]


def _corpus(store, m: dict, seq_len: int, spec: str) -> Corpus:
    # the Corpus that _join wrote in store (m: what it returned); its readers' warnings, on every load
    for warning in m["warnings"]:
        print(warning)
    splits = [_examples(*_split(store, s, seq_len), m["sources"]) for s in SPLITS]
    return Corpus(*splits, list(m["sources"]), spec, _array(store, "doc_hash", "<i8"))     # (n_docs,)


def _prepare_file(path: str, part, seq_len: int, doc_mode: str, skip_empty: bool, progress=None) -> dict:
    """One file's documents into the store `part` (SPLIT.{x,source_id,doc_id}, doc_hash), streaming, each
    cut into windows. Returns what joining the parts needs: the file's sources (first-seen order), its
    documents, its rows per split, the sources with a train document, and, per source, its hash-split
    valid/test documents (how many; where the first is: split, row, windows): the small-set rule (_join);
    and read_documents' warnings."""
    rows = dict.fromkeys(SPLITS, 0)
    names, in_train, held, n_docs, warnings = {}, set(), {}, 0, []
    with contextlib.ExitStack() as stack:
        out = {name: _sink(stack, part, name) for name in NAMES}
        for b, source, given in read_documents(path, hash_splits=False, skip_empty=skip_empty,
                                               progress=progress, warn=warnings.append):
            split = given or hash_split(b)
            k = names.setdefault(source, len(names))
            chunk, n = windows(b, seq_len, doc_mode)
            if split == "train":
                in_train.add(k)
            elif given is None:
                held.setdefault(k, [0, (split, rows[split], n)])[0] += 1
            out[f"{split}.x"].write(chunk)                                        # (n, seq_len) bytes
            out[f"{split}.source_id"].write(k.to_bytes(8, sys.byteorder) * n)     # (n,) int64: k, per window
            out[f"{split}.doc_id"].write(n_docs.to_bytes(8, sys.byteorder) * n)   # (n,) int64: and the doc id
            out["doc_hash"].write(hashlib.md5(b).digest()[:8])    # (1,) little-endian int64: 64 bits of MD5
            rows[split] += n
            n_docs += 1
    return {"names": list(names), "n_docs": n_docs, "rows": rows, "in_train": in_train, "held": held,
            "warnings": warnings}


def _prepare_parts(files: list, parts: list, seq_len: int, doc_mode: str, workers: int) -> list:
    """_prepare_file for each file, in `workers` processes (0: one a file, at most one a CPU), under a
    progress bar in bytes read from disk: a file at a time, or as it is read with one process. An empty
    file among several is skipped (a single named one is an error)."""
    workers = min(len(files), workers or os.cpu_count() or 1)
    sizes = [os.path.getsize(f) for f in files]
    jobs = [(f, p, seq_len, doc_mode, len(files) > 1) for f, p in zip(files, parts)]
    # on a terminal only (stderr), and gone when done: an error stays the one line it is
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"preparing {len(files)} file(s)",
              disable=None, leave=False) as bar:
        if workers == 1:        # in this process: the bar moves as each file is read
            return [_prepare_file(*job, bar.update) for job in jobs]
        results = []
        with ProcessPoolExecutor(workers) as pool:          # processes: a file each, in turn
            for r, size in zip(pool.map(_prepare_file, *zip(*jobs)), sizes):    # in file order
                results.append(r)
                bar.update(size)
    return results


def _join(results: list, parts: list, out, seq_len: int, where: str) -> dict:
    """The parts into the store `out`, rows in load_corpus's order: each split's documents in file order,
    then the documents the small-set rule moves to train at the end of train. Source ids become
    indices into the sorted names, doc ids count documents over all files. Returns the sources, the rows
    per split and the readers' warnings; no training row is an error (where: "--flag: spec")."""
    names = list(dict.fromkeys(n for r in results for n in r["names"]))      # first-seen order over files
    sources = sorted(names)               # sorted source names, so ids do not depend on file order
    remaps = [np.array([sources.index(n) for n in r["names"]], dtype=np.int64) for r in results]
    first_doc = np.cumsum([0] + [r["n_docs"] for r in results])              # each file's first doc id
    # the small-set rule: a source with >= 2 documents, none of which hashed into train, gets its first
    # (lowest doc id) hash-split one moved to train (otherwise it would never be trained on); a split given
    # in a .jsonl record is kept. From the parts' summaries: moved = [(part, split, row, n)]
    k_of = {n: k for k, n in enumerate(names)}
    in_train, count, first = set(), {}, {}
    for p, r in enumerate(results):
        in_train.update(k_of[r["names"][j]] for j in r["in_train"])
        for j, (c, where) in r["held"].items():
            k = k_of[r["names"][j]]
            count[k] = count.get(k, 0) + c
            first.setdefault(k, (p, *where))       # the earliest file holds the lowest doc id
    # the order this set expression iterates in is the order of the moved rows in train
    moved = [first[k] for k in set(range(len(names))) - in_train if count.get(k, 0) >= 2]
    rows = {}
    with contextlib.ExitStack() as stack:
        dst = {name: _sink(stack, out, name) for name in NAMES}
        for split in SPLITS:
            to = [dst[f"{split}.{k}"] for k in ("x", "source_id", "doc_id")]
            for p, r in enumerate(results):
                # the part's rows [lo, row), then the n rows of a document moved to train are skipped
                skip = sorted((row, n) for q, s, row, n in moved if (q, s) == (p, split))
                lo = 0
                for row, n in skip + [(r["rows"][split], 0)]:
                    _copy_rows(to, *_split(parts[p], split, seq_len), lo, row, remaps[p], first_doc[p])
                    lo = row + n
            if split == "train":
                for p, s, row, n in moved:
                    _copy_rows(to, *_split(parts[p], s, seq_len), row, row + n, remaps[p], first_doc[p])
            rows[split] = to[1].tell() // 8
        for part in parts:               # the documents' hashes, by doc id: the files' in file order
            dst["doc_hash"].write(_array(part, "doc_hash", np.uint8))
    if rows["train"] == 0:
        raise DataError(f"{where}: no training examples ({first_doc[-1]} documents, none in the train split)")
    return {"sources": sources, "rows": rows, "warnings": [w for r in results for w in r["warnings"]]}


def _copy_rows(dst: list, x, source_id, doc_id, lo: int, hi: int, remap, first_doc: int):
    # rows [lo, hi) of a part's split (x, source_id, doc_id) appended to dst, a block at a time; source
    # ids: the file's first-seen order -> the sorted names; doc ids: the file's -> over all files
    step = max(1, BLOCK // x.shape[1])
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        dst[0].write(x[a:b])                         # (n, L)
        dst[1].write(remap[source_id[a:b]])          # (n,)
        dst[2].write(doc_id[a:b] + first_doc)        # (n,)


def load_data(cfg: dict, pool_needed: int = 1):
    """train.py's corpora from its settings: (generic Corpus, [specific Corpus, ...], info) from the
    --generic and --specific specs, or the built-in corpus when both are empty. `;` in --specific
    separates several specific sets (a multi-task outer loss, Appendix B). Batches are drawn with
    replacement, so a generic pool smaller than the pool_needed examples drawn per step only warns;
    so does an empty generic valid split (its loss is a diagnostic). The specific sets must have
    valid and test documents and at least one batch of training examples."""
    generic, specific, seq_len, seed = cfg["generic"], cfg["specific"], cfg["seq_len"], cfg["seed"]
    read = {"doc_mode": cfg["doc_mode"], "cache": cfg["data_cache"], "workers": cfg["data_workers"]}
    if not generic and not specific:
        g, s, info = builtin_corpora(seed, seq_len)
        specifics = [s]
    elif not generic or not specific:
        raise DataError("--generic and --specific: give both (or neither, for the built-in corpus)")
    else:
        # through prepared copies in --data_cache (mapped, built once), or read into memory ("off")
        g = load_corpus(generic, seq_len, flag="--generic", **read)
        specifics = [load_corpus(s, seq_len, flag="--specific", **read) for s in specific.split(";")]
        info = {}
        g = trained_sources(g)
        check_overlap(g, specifics, cfg.get("allow_overlap", False))
    # the denoising setting (ScaleBiO): the generic train/valid/test re-labelled into K sources, source k
    # corrupted with probability min(1, 2k/K) (noisy_sources). It reads the whole pool and holds a corrupted
    # copy in memory (a prepared pool's memory map is not enough here)
    K = cfg["noise_sources"]
    if K:
        splits = [noisy_sources(e, K, seed + 300 + i) for i, e in enumerate((g.train, g.valid, g.test))]
        g, info = Corpus(*splits, splits[0].sources, f"{g.name}+noise{K}"), {}
    for s in specifics:
        if cfg["specific_train_docs"]:
            s.train = document_subset(s.train, cfg["specific_train_docs"], seed)
        for split in ("valid", "test"):
            if len(getattr(s, split)) == 0:
                raise DataError(f"--specific: {s.name} has an empty {split} split (no document fell in it; "
                                f'give it documents, e.g. with a "split" field in .jsonl records)')
        if len(s.train) < cfg["specific_batch_size"]:
            raise DataError(f"--specific: {s.name} has {len(s.train)} training examples, fewer than "
                            f"--specific_batch_size={cfg['specific_batch_size']} (lower it)")
    if len(g.train) < pool_needed:
        print(f"warning: --generic: {len(g.train)} training examples, fewer than the {pool_needed} drawn per "
              "step: batches are drawn with replacement, so examples repeat; --doc_mode=chunk gives more")
    if len(g.valid) == 0:
        print("warning: --generic: no document fell in the valid split; the generic valid loss is skipped")
    return g, specifics, info


def trained_sources(g: Corpus) -> Corpus:
    """The generic corpus without its sources that have no training example (a single short .txt whose
    document hashed into valid or test): no weight, no share of the pool can be learned for them (a
    warning lists them once). Valid and test keep every document, their ids into their own full
    Examples.sources (only their bytes are evaluated)."""
    counts = torch.bincount(g.train.source_id, minlength=len(g.sources))                    # (K,)
    if counts.all():
        return g
    empty = [n for n, c in zip(g.sources, counts.tolist()) if c == 0]
    shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    print(f"warning: --generic: {len(empty)} of {len(g.sources)} sources have no training example: left out "
          f"of the source weights and shares: {shown}")
    new_id = torch.cumsum(counts > 0, 0) - 1                            # (K,) old source id -> new id
    sources = [n for n, c in zip(g.sources, counts.tolist()) if c > 0]
    train = Examples(g.train.x, new_id[g.train.source_id], g.train.doc_id, sources)
    return Corpus(train, g.valid, g.test, sources, g.name, g.doc_hash)


def check_overlap(g: Corpus, specifics: list, allow: bool):
    """Contamination, by a hash of each document's bytes (all of it, as read): a specific set's valid or
    test document that is also in the generic corpus is an error naming the files and the count (allow: a
    warning); documents shared by a specific set's own splits are a warning with their counts."""
    # every generic document, whatever its split: identical documents share a hash split, so a copy of
    # the specific file in --generic would otherwise sit in generic valid/test, one edit from training
    pool = {}                                                         # {hash: the document's source}
    for e in (g.train, g.valid, g.test):
        # e's documents (their doc ids), and the row of each one's first window
        ids, rows = np.unique(e.doc_id.numpy(), return_index=True)
        pool.update(zip(g.doc_hash[ids].tolist(), (e.sources[i] for i in e.source_id[rows].tolist())))
    for s in specifics:
        h = {split: s.doc_hash[np.unique(getattr(s, split).doc_id.numpy())].tolist() for split in SPLITS}
        shared = [k for split in ("valid", "test") for k in h[split] if k in pool]
        if shared:
            where = sorted({pool[k] for k in shared})
            more = " …" if len(where) > 5 else ""
            msg = (f"{len(shared)} valid/test documents of --specific {s.name} are also in the generic "
                   f"corpus (--generic {g.name}, sources {', '.join(where[:5])}{more})")
            if not allow:
                raise DataError(f"{msg}: remove them from --generic, or --allow_overlap")
            print(f"warning: {msg} (--allow_overlap)")
        seen = {split: set(h[split]) for split in SPLITS}
        pairs = [(a, b, sum(k in seen[a] for k in h[b])) for a, b in (("train", "valid"), ("train", "test"),
                                                                       ("valid", "test"))]
        counts = [f"{n} {b} documents copy {a} ones" for a, b, n in pairs if n]
        if counts:
            print(f"warning: --specific {s.name}: {', '.join(counts)}")


def fingerprint(cfg: dict, g: Corpus, specifics: list) -> dict:
    """What a run reads: each input file's size and MD5 (its content: a copy, a fresh extraction or a
    `touch` still resumes), and each corpus's example counts.
    On --resume (cfg["inputs"] saved by the run): a one-line DataError naming what changed."""
    now = {}
    for flag, specs in (("--generic", [cfg["generic"]]), ("--specific", cfg["specific"].split(";"))):
        for path in (f for spec in specs if spec for f in resolve_files(spec, flag)):
            with open(path, "rb") as f:
                md5 = hashlib.file_digest(f, "md5").hexdigest()
            now[f"{flag} file {os.path.abspath(path)}"] = f"{os.path.getsize(path)} bytes, MD5 {md5}"
    for c in [g, *specifics]:
        now[f"{c.name} examples"] = f"{len(c.train)} train, {len(c.valid)} valid, {len(c.test)} test"
    saved = cfg.get("inputs") if cfg["resume"] else None
    if saved is not None and saved != now:
        diff = [f"{k}: {saved.get(k, 'absent')} -> {now.get(k, 'absent')}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        raise DataError(f"--resume: the data changed since the run started ({'; '.join(diff[:3])}"
                        f"{'; …' if len(diff) > 3 else ''}): resume with the same files, or start a new run")
    return now


def set_names(specifics: list) -> list:
    """Names of the specific sets in logs: "specific" for one; for several (Appendix B), each spec's
    file or directory name without its extension ("reuters21578"), or the whole spec if two clash."""
    if len(specifics) == 1:
        return ["specific"]
    names = [os.path.basename(s.name.rstrip("/")).split(".")[0] or s.name for s in specifics]
    return names if len(set(names)) == len(names) else [s.name for s in specifics]


def eval_subset(examples: Examples, n: int, seed: int) -> Examples:
    """A fixed random subset of n examples (all when n = 0), the same at every evaluation."""
    if n == 0 or len(examples) <= n:
        return examples
    return examples.subset(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n])


def eval_sets(g: Corpus, specifics: list, names: list, n: int, device) -> dict:
    """The evaluated sets, as (N, T) byte tensors on the device: generic valid and, per specific set,
    its valid and test splits (fixed subsets of n examples each; 0 = all)."""
    out = {"generic_valid": eval_subset(g.valid, n, 0).x.to(device)}
    for name, s in zip(names, specifics):
        out[f"{name}_valid"] = eval_subset(s.valid, n, 1).x.to(device)
        out[f"{name}_test"] = eval_subset(s.test, n, 2).x.to(device)
    return out


def read_checkpoint(path: str, flag: str) -> dict:
    """torch.load(weights_only=True) of a checkpoint file, or a one-line DataError naming the flag."""
    if not os.path.isfile(path):
        raise DataError(f"{flag}: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__})") from None


def atomic_write(path, write):
    """write(tmp), then rename: a file is whole or absent, never half-written."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_json(path, obj):
    """config.json and summary.json: indented JSON, written atomically."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def document_subset(examples: Examples, n: int, seed: int, flag: str = "--specific_train_docs") -> Examples:
    """The windows of a fixed random subset of n documents (a draw by seed among the distinct
    doc_ids of `examples`): how the scarce-specific-data regime keeps N training documents."""
    docs = torch.unique(examples.doc_id)                                        # (D,) sorted doc ids
    if not 1 <= n <= len(docs):
        raise DataError(f"{flag}: {n} is not in 1..{len(docs)} (the number of training documents)")
    keep = docs[torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))[:n]]  # (n,)
    return examples.subset(torch.isin(examples.doc_id, keep))


# -----------------------------------------------------------------------------
# the built-in synthetic corpus

GENERIC_SHARES = {"target": 0.05, "related": 0.15, "unrelated_a": 0.25,
                  "unrelated_b": 0.25, "unrelated_c": 0.25, "noise": 0.05}
ORACLE = {"target": 1.0, "related": 0.5, "unrelated_a": 0.0,
          "unrelated_b": 0.0, "unrelated_c": 0.0, "noise": 0.0}
VOCAB, N_LETTERS = 300, 10
SUCC_P = np.array([0.48, 0.24, 0.16, 0.12])  # Zipf-ish probabilities of the 4 likely successors
EPS = 0.05                                   # otherwise: any word, uniformly


def _domain(rng) -> dict:
    # a vocabulary of VOCAB pseudo-words (length 2-8) over the domain's own
    # N_LETTERS letters, drawn with Zipf-ish letter frequencies, and a chain
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))[rng.choice(26, N_LETTERS, replace=False)]
    p = 1.0 / np.arange(1, N_LETTERS + 1)
    chars = rng.choice(letters, size=(4 * VOCAB, 8), p=p / p.sum())  # (4V, 8) candidate spellings
    lens = rng.integers(2, 9, size=4 * VOCAB)
    words = list(dict.fromkeys("".join(c[:n]) for c, n in zip(chars, lens)))[:VOCAB]
    assert len(words) == VOCAB  # 1200 candidates leave far more than 300 distinct words
    return {"words": words, "succ": _chain(rng)}


def _chain(rng) -> np.ndarray:
    # (VOCAB, 4) the likely successors of each word, in SUCC_P order
    return np.stack([rng.choice(VOCAB, 4, replace=False) for _ in range(VOCAB)])


def _walk(rng, chains: list, mix: list, n: int, T: int) -> np.ndarray:
    # n random walks of T words; at each step, each walk follows chains[j]
    # with probability mix[j] (the "related" domain mixes two chains)
    succ = np.stack(chains)                                 # (n_chains, VOCAB, 4)
    ids = np.empty((n, T), dtype=np.int64)                  # (n, T) word ids
    w = rng.integers(VOCAB, size=n)                         # (n,) current word
    for t in range(T):
        ids[:, t] = w
        k = rng.choice(4, size=n, p=SUCC_P)                 # (n,) which successor
        j = rng.choice(len(chains), size=n, p=mix)          # (n,) which chain
        # with probability EPS a jump to any word, else the chosen successor
        w = np.where(rng.random(n) < EPS, rng.integers(VOCAB, size=n), succ[j, w, k])   # (n,)
    return ids


def _render(rng, words: list, ids: np.ndarray, seq_len: int) -> np.ndarray:
    # word ids (n, T) -> text "w w w. w w ..." with a ". " every 6-14 words,
    # truncated to seq_len bytes -> (n, seq_len) uint8
    n, T = ids.shape
    ends = np.cumsum(rng.integers(6, 15, size=(n, T // 6 + 1)), axis=1) - 1  # last word of each sentence
    dot = np.zeros((n, T + 1), dtype=bool)        # (n, T + 1): the ends past the last word go to column T
    np.put_along_axis(dot, np.minimum(ends, T), True, axis=1)
    vocab = np.array(words + [w + "." for w in words], dtype=object)  # id + VOCAB = word with a period
    tokens = vocab[ids + VOCAB * dot[:, :T]]                          # (n, T) str
    docs = [" ".join(row).encode()[:seq_len].ljust(seq_len, b"\0") for row in tokens.tolist()]
    return np.frombuffer(bytearray().join(docs), np.uint8).reshape(n, seq_len)


def builtin_corpora(seed, seq_len, n_generic=20000, n_specific_train=400, n_specific_eval=200) -> tuple:
    """The built-in experiment: a synthetic generic pool with a small hidden
    minority of in-domain text, and a small specific (target) set.

    Domains. Each text domain is a first-order Markov chain over words: a
    vocabulary of 300 pseudo-words (2-8 letters) spelled with the domain's own
    10 lowercase letters (so byte statistics differ between domains); each
    word has 4 likely successors (probabilities .48/.24/.16/.12, and a 5%
    chance of jumping to any word), so there is structure for a model to
    learn. A document is a walk of such words joined by spaces, with ". "
    every 6-14 words, truncated to exactly seq_len bytes (one example per
    document, no padding).

    Generic corpus (sources and their share of n_generic training documents):
        target       5%  the target domain itself, a small minority
        related     15%  the target's vocabulary; each next word follows the
                         target's chain with prob 0.5, else its own chain
        unrelated_a 25%  } own vocabulary and chain each
        unrelated_b 25%  }
        unrelated_c 25%  }
        noise        5%  uniformly random printable ASCII bytes (32..126)
    Train has exactly n_generic documents; valid and test each get another
    n_generic // 10 documents, with the same shares (on top of the pool, not
    carved out of it). Each split is shuffled.

    Specific corpus: fresh documents of the target domain (new draws, not the
    generic ones): n_specific_train train, n_specific_eval valid and
    n_specific_eval test; its single source is "target".

    info: {"target_source": "target",
           "oracle":    the ideal weight of each generic source, known by
                        construction: target 1.0 (an ideal sampler puts all its
                        mass there), related 0.5 (partially helpful: half its
                        transitions are the target's), unrelated/noise 0.0,
           "base_rate": each source's share of generic train (uniform sampling)}
    A good data selector should move weight from the base rate toward the oracle.
    Deterministic in seed (numpy default_rng(seed)); a few seconds to build."""
    rng = np.random.default_rng(seed)
    names = list(GENERIC_SHARES)
    target = _domain(rng)
    related_chain = _chain(rng)
    others = {s: _domain(rng) for s in ("unrelated_a", "unrelated_b", "unrelated_c")}

    n_eval = max(1, n_generic // 10)
    sizes = (n_generic, n_eval, n_eval)  # generic train, valid, test
    counts = {s: [round(GENERIC_SHARES[s] * m) for m in sizes] for s in names}  # source -> 3 sizes
    for i, m in enumerate(sizes):  # rounding leftovers go to unrelated_c
        counts["unrelated_c"][i] += m - sum(counts[s][i] for s in names)
    n_spec = [n_specific_train, n_specific_eval, n_specific_eval]

    T = seq_len // 3 + 1  # a word plus its space is >= 3 bytes, so T words always fill seq_len
    def make(source: str, n: int) -> np.ndarray:  # -> (n, seq_len) uint8
        if source == "noise":
            return rng.integers(32, 127, size=(n, seq_len), dtype=np.uint8)
        if source == "related":
            ids = _walk(rng, [target["succ"], related_chain], [0.5, 0.5], n, T)  # (n, T)
            return _render(rng, target["words"], ids, seq_len)
        dom = target if source == "target" else others[source]
        return _render(rng, dom["words"], _walk(rng, [dom["succ"]], [1.0], n, T), seq_len)

    # one draw per source; target also provides the specific documents
    x = {s: make(s, sum(counts[s]) + (sum(n_spec) if s == "target" else 0)) for s in names}

    def splits(n_docs: dict, pool: dict, sources: list, shuffle: bool) -> list[Examples]:
        # n_docs: source -> [n train, n valid, n test]; pool: source -> (n, seq_len) rows, cut in that order
        blocks = {s: np.split(pool[s], np.cumsum(n_docs[s]))[:3] for s in sources}   # source -> 3 row blocks
        out, first_doc = [], 0
        for i in range(3):  # train, valid, test
            xs = np.concatenate([blocks[s][i] for s in sources])                       # (n, seq_len)
            src = np.concatenate([np.full(n_docs[s][i], k) for k, s in enumerate(sources)])   # (n,)
            perm = rng.permutation(len(src)) if shuffle else np.arange(len(src))
            out.append(_examples(xs[perm], src[perm], first_doc + np.arange(len(src)), sources))
            first_doc += len(src)
        return out

    generic = Corpus(*splits(counts, x, names, shuffle=True), names, "builtin:generic")
    spec_pool = {"target": x["target"][sum(counts["target"]):]}  # the draws after the generic ones
    specific = Corpus(*splits({"target": n_spec}, spec_pool, ["target"], shuffle=False),
                      ["target"], "builtin:specific")
    base = np.bincount(generic.train.source_id.numpy(), minlength=len(names)) / max(1, len(generic.train))
    info = {"target_source": "target", "oracle": dict(ORACLE),
            "base_rate": {s: float(base[k]) for k, s in enumerate(names)}}
    return generic, specific, info


# -----------------------------------------------------------------------------
# sampling

class Sampler:
    """Uniform sampling of batches from an Examples set, sample(D, n) in the
    paper: n i.i.d. uniform draws (with replacement). Owns its generator, so
    each data stream is reproducible and resumable on its own."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"Sampler needs a non-empty set, got n={n}")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.LongTensor:
        # (n,) int64 indices in [0, self.n)
        return torch.randint(self.n, (n,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state()}  # ByteTensor: loads with weights_only=True

    def load_state_dict(self, d) -> None:
        self.generator.set_state(d["rng"])


# -----------------------------------------------------------------------------
# the denoising setting (ScaleBiO's denoising experiment)

def noise_rates(K: int) -> list:
    """Corruption probability of source k = 0..K-1: min(1, 2k/K). With K = 10 (the ScaleBiO
    setting, "source k corrupted with probability 0.2·k"): 0, .2, .4, .6, .8 for the first half
    and 1 (pure noise) for the second half."""
    return [min(1.0, 2.0 * k / K) for k in range(K)]


def noisy_sources(examples: Examples, K: int, seed: int) -> Examples:
    """Re-label a (clean) Examples set into K equal sources at random, and corrupt each example of
    source k with probability noise_rates(K)[k]: its non-pad bytes are replaced by uniformly
    random printable bytes (32..126), its length (padding) is kept. Source names say the rate,
    e.g. "s3_noise0.6". Deterministic in seed; the input is not modified."""
    g = torch.Generator().manual_seed(seed)
    N = len(examples)
    rates = torch.tensor(noise_rates(K))                                        # (K,)
    source_id = torch.randperm(N, generator=g) % K                              # (N,) equal sizes, random
    corrupt = torch.rand(N, generator=g) < rates[source_id]                     # (N,) bool
    x = examples.x.clone()                                                      # (N, T) uint8
    noise = torch.randint(32, 127, x.shape, generator=g, dtype=torch.uint8)     # (N, T)
    # a byte is kept where it is padding or its row is clean: (N, T)
    x = torch.where((x == 0) | ~corrupt[:, None], x, noise)
    names = [f"s{k}_noise{r:.1f}" for k, r in enumerate(rates.tolist())]
    return Examples(x, source_id, examples.doc_id.clone(), names)


# -----------------------------------------------------------------------------
# the paper's data, a benchmark, the command line: python data.py {c4,reuters,prepare,bench} --help

C4_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.{:05d}-of-01024.json.gz"
REUTERS_URL = "https://kdd.ics.uci.edu/databases/reuters21578/reuters21578.tar.gz"


def get_c4(out: str = "c4", docs: int = 100000, first_bytes: int = 0, shards: str = "") -> int:
    """The first `docs` documents of C4's English training shards (C4_URL, streamed one after the other;
    or the local .json.gz files of the comma list `shards`) as out/c4-NNNNN.jsonl.gz, records
    {"text", "source": "c4"}. first_bytes > 0 keeps a document's first first_bytes bytes as encode() makes
    them, whole characters: the paper's examples are the first 256 (seq_len=256, doc_mode=first)."""
    os.makedirs(out, exist_ok=True)
    sources = shards.split(",") if shards else [C4_URL.format(i) for i in range(1024)]
    done = 0
    for i, src in enumerate(sources[:docs]):       # a shard gives at least one document
        path = os.path.join(out, f"c4-{i:05d}.jsonl.gz")
        with _open(src) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines, gzip.open(
                path + ".tmp", "wt", encoding="utf-8") as f:
            for line in itertools.islice(lines, docs - done):
                text = json.loads(line)["text"]        # C4's records: {"text", "timestamp", "url"}
                if first_bytes:
                    text = encode(text)[:first_bytes].decode("utf-8", errors="ignore")
                f.write(json.dumps({"text": text, "source": "c4"}) + "\n")
                done += 1
        os.replace(path + ".tmp", path)
        if done == docs:
            break
    return done


def get_reuters(out: str = "reuters", archive: str = "") -> dict:
    """Reuters-21578 (REUTERS_URL, downloaded; or `archive`, a local copy of that .tar.gz) as
    out/reuters21578.jsonl.gz with the ModApte split: the documents with TOPICS="YES", those with
    LEWISSPLIT="TRAIN" in train, "TEST" in valid and test in turn; the others are left out. A document
    is its TITLE and BODY, SGML entities decoded. Returns the documents per split."""
    os.makedirs(out, exist_ok=True)
    counts, path = dict.fromkeys(SPLITS, 0), os.path.join(out, "reuters21578.jsonl.gz")
    # the archive streamed ("r|gz"): its members in their order, reut2-000.sgm to reut2-021.sgm
    with _open(archive or REUTERS_URL) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar, gzip.open(
            path + ".tmp", "wt", encoding="utf-8") as f:
        for member in (m for m in tar if m.name.endswith(".sgm")):
            sgm = tar.extractfile(member).read().decode("latin-1")
            for attributes, doc in re.findall(r"<REUTERS([^>]*)>(.*?)</REUTERS>", sgm, re.S):
                a = dict(re.findall(r'(\w+)="([^"]*)"', attributes))
                text = " ".join(_sgml(doc, tag) for tag in ("TITLE", "BODY")).strip()
                if a.get("TOPICS") != "YES" or a.get("LEWISSPLIT") not in ("TRAIN", "TEST") or not text:
                    continue
                # ModApte's test documents alternate: valid, test, valid, ...
                n_test = counts["valid"] + counts["test"]
                split = "train" if a["LEWISSPLIT"] == "TRAIN" else SPLITS[1 + n_test % 2]
                f.write(json.dumps({"text": text, "source": "reuters21578", "split": split}) + "\n")
                counts[split] += 1
    os.replace(path + ".tmp", path)
    return counts


def _sgml(doc: str, tag: str) -> str:
    # an SGML element's text, entities (&lt;, &#3;) decoded, control characters dropped; "" if absent
    m = re.search(f"<{tag}>(.*?)</{tag}>", doc, re.S)
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", html.unescape(m.group(1))) if m else ""


def _open(src: str):
    # a URL (the standard library's urllib) or a local file, opened for reading bytes
    return urllib.request.urlopen(src, timeout=60) if "://" in src else open(src, "rb")


def prepare(spec="", seq_len=128, doc_mode="first", data_cache="", data_workers=0, draws=100) -> dict:
    """Prepare a corpus (once: before torchrun, say) or map its prepared copy, then draw `draws` batches of
    512 training rows; returns the rows, the load's seconds and the process's RssAnon (MiB)."""
    t = time.perf_counter()
    c = load_corpus(spec, seq_len, doc_mode, "--spec", data_cache, data_workers)
    load_s = time.perf_counter() - t
    sampler, total = Sampler(len(c.train), 0), 0
    for _ in range(draws):
        total += int(c.train.x[sampler.sample(512)].sum())     # a batch gathered from the pool
    # the process's anonymous memory (its heap; not the file pages that a map reads), Linux only
    with open("/proc/self/status") as f:
        rss = next((int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon:")), None)
    return {"rows": {s: len(getattr(c, s)) for s in SPLITS}, "load_s": round(load_s, 3), "rss_anon_mb": rss}


def bench(docs=100000, dir="/tmp/pool_bench", seq_len=128, doc_mode="chunk", data_workers=0) -> dict:
    """A synthetic corpus of `docs` documents (1.5-2.3 KB of letters and spaces, 8 .jsonl.gz files, kept
    in dir for the next bench) loaded by fresh processes: into memory (no cache), prepared, mapped again."""
    spec = os.path.join(dir, f"docs{docs}")
    if not os.path.isdir(spec):   # the documents: slices of one long random text (written once, then reused)
        rng = np.random.default_rng(0)
        text = "".join(rng.choice(list("etaoinshrdlu     "), 1 << 22))   # (4M,) letters, words of ~4
        os.makedirs(spec + ".tmp", exist_ok=True)
        for i in range(8):
            n = len(range(i, docs, 8))         # the docs spread evenly over the 8 files
            with gzip.open(f"{spec}.tmp/part{i}.jsonl.gz", "wt", compresslevel=1) as f:
                for start, size in zip(rng.integers(0, len(text) - 2300, n), rng.integers(1500, 2300, n)):
                    f.write(json.dumps({"text": text[start: start + size]}) + "\n")
        os.rename(spec + ".tmp", spec)
    # each process draws 100 batches of 512 rows after the load
    shutil.rmtree(os.path.join(dir, "cache"), ignore_errors=True)
    out = {"docs": docs, "MiB": sum(os.path.getsize(f) for f in resolve_files(spec)) / 2**20}
    for name, cache in (("in_memory", "off"), ("prepared", f"{dir}/cache"), ("mapped", f"{dir}/cache")):
        cmd = [sys.executable, os.path.abspath(__file__), "prepare", f"--spec={spec}", f"--seq_len={seq_len}",
               f"--doc_mode={doc_mode}", f"--data_cache={cache}", f"--data_workers={data_workers}"]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)    # its bar and errors: shown
        out[name] = r = json.loads(p.stdout.splitlines()[-1])
        print(f"{name}: {docs / r['load_s']:.0f} docs/s, {out['MiB'] / r['load_s']:.1f} MiB/s, {r}")
    return out


COMMANDS = {"c4": get_c4, "reuters": get_reuters, "prepare": prepare, "bench": bench}


def main(argv=None) -> int:
    """python data.py COMMAND --key=value ...: a command is a function above, its options its arguments."""
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        sub = commands.add_parser(name, help=fn.__doc__.split(". ")[0], description=fn.__doc__)
        for p in inspect.signature(fn).parameters.values():
            sub.add_argument(f"--{p.name}", type=type(p.default), default=p.default)
    args = vars(parser.parse_args(argv))
    try:
        out = COMMANDS[args.pop("command")](**args)
    except (DataError, OSError, ValueError, KeyError, tarfile.TarError, subprocess.CalledProcessError) as e:
        print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
