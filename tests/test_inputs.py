"""Every setting and input checked before any work: ranges (train.RULES), the output directory, memory
sanity, --compile off CUDA, contamination between the generic pool and a specific set, the inputs'
fingerprint on --resume, sources with no training example, empty files, encodings, and diagnose.py's
own checks. Each bad case is one line on stderr, exit 2, and nothing written into the out_dir."""

import gc
import json
import os
import signal
import time
import warnings

import pytest
import torch

from test_cli import TINY, assert_one_line_error, corpora, run, write_jsonl  # noqa: F401 (fixtures)
import data  # noqa: E402
import diagnose  # noqa: E402
import train  # noqa: E402


@pytest.mark.parametrize("flags, needle", [
    (["--lr=-1"], "--lr"), (["--meta_lr=-1"], "--meta_lr"), (["--weight_decay=-1"], "--weight_decay"),
    (["--scalebio_lr_p=-1"], "--scalebio_lr_p"), (["--dropout=1.5"], "--dropout"), (["--dropout=-0.5"], "--dropout"),
    (["--warmup=0"], "--warmup"), (["--warmup=-10"], "--warmup"), (["--weighter_kernel=0"], "--weighter_kernel"),
    (["--n_head=3", "--n_embd=63"], "--n_embd"), (["--seq_len=100000"], "--seq_len"), (["--lr=nan"], "--lr"),
    (["--big_batch_size=100000000"], "--big_batch_size"), (["--method=mixing", "--generic_weight=2"],
                                                            "--generic_weight"),
    (["--rho=-1"], "--rho"), (["--soba_v_lr=-1"], "--soba_v_lr"), (["--out_dir="], "--out_dir")])
def test_out_of_range_settings_are_one_line_and_write_nothing(tmp_path, run, flags, needle):
    out = tmp_path / "out"
    res = run([f"--out_dir={out}", *flags] if flags != ["--out_dir="] else flags)
    assert res.returncode == 2
    assert_one_line_error(res, needle, out_dir=out)


def test_help_prints_each_rule_beside_its_setting(run):
    lines = run(["--help"]).stdout.splitlines()
    assert any(l.split()[0] == "--dropout" and l.endswith("in [0, 1)") for l in lines if l.strip())
    assert any(l.split()[0] == "--lr" and l.endswith("in (0, inf)") for l in lines if l.strip())
    for keys in train.RULES.values():      # every rule names real settings (a typo would be skipped)
        assert set(keys.split()) <= set(train.config_keys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--compile is refused on the CPU only")
def test_compile_is_refused_on_the_cpu(tmp_path, run):
    assert_one_line_error(run([f"--out_dir={tmp_path / 'o'}", "--compile"]), "--compile", "CUDA")


def test_bad_out_dir_fails_before_the_data_is_read(tmp_path, run, monkeypatch):
    def no_loading(*args):
        raise AssertionError("data loaded before --out_dir was checked")
    monkeypatch.setattr(data, "load_data", no_loading)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        res = run([f"--out_dir={out}", *TINY])
        assert res.returncode == 2
        assert_one_line_error(res, "--out_dir", "is a file")
    assert (tmp_path / "file").read_text() == "x"
    if os.path.isdir("/proc"):      # a place no one writes in, root included
        assert_one_line_error(run(["--out_dir=/proc/run", *TINY]), "--out_dir", "cannot write in /proc")


def test_a_resume_never_inherits_compile_and_shuffled_names_its_rule(tmp_path):
    cfg = {**diagnose.train_defaults(), "method": "shuffled", "weighter_trajectory": "x", "compile": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert train.parse_args(["--resume", f"--out_dir={tmp_path}"], diagnose.train_defaults())["compile"] is False
    with pytest.raises(train.ConfigError) as e:
        train.parse_args(["--resume", f"--out_dir={tmp_path}", "--max_steps=900"], diagnose.train_defaults())
    assert str(e.value).endswith("grow finetune_steps")


def test_generic_holding_the_specific_file_is_refused_with_the_count(tmp_path, corpora, run, capsys):
    gen, spec = corpora
    out = tmp_path / "out"
    res = run([f"--generic={gen},{spec}", f"--specific={spec}", f"--out_dir={out}", *TINY])
    cfg = train.parse_args([f"--generic={gen},{spec}", f"--specific={spec}", *TINY], diagnose.train_defaults())
    g, (s,), _ = data.load_data(dict(cfg, allow_overlap=True))
    # independently: the specific file is all in --generic, so every valid/test document of it counts
    n = sum(split != "train" for _, _, split in data.read_documents(spec))
    assert n == len(torch.unique(torch.cat([s.valid.doc_id, s.test.doc_id]))) > 0
    assert_one_line_error(res, f"{n} valid/test documents", spec, "--allow_overlap", out_dir=out)
    assert "warning:" in capsys.readouterr().out


def test_overlaps_between_a_specific_sets_own_splits_warn_with_counts(tmp_path, corpora, capsys):
    docs = [f"document number {i} about the market" for i in range(60)]
    spec = tmp_path / "s.jsonl"
    recs = [{"text": t, "split": "train"} for t in docs] + [{"text": docs[0], "split": "valid"},
                                                            {"text": docs[1], "split": "test"},
                                                            {"text": "fresh valid", "split": "valid"}]
    spec.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = train.parse_args([f"--generic={corpora[0]}", f"--specific={spec}", *TINY], diagnose.train_defaults())
    data.load_data(cfg)
    out = capsys.readouterr().out
    assert "1 valid documents copy train ones, 1 test documents copy train ones" in out


def test_resume_refuses_changed_data(tmp_path, corpora, run):
    gen, spec = corpora
    out = tmp_path / "out"
    args = [f"--generic={gen}", f"--specific={spec}", f"--out_dir={out}", *TINY, "--method=baseline"]
    assert run(args).returncode == 0
    assert "inputs" in json.loads((out / "config.json").read_text())
    os.utime(spec, ns=(10**18, 10**18))             # the same bytes, a new modification time: resumes
    assert run([f"--out_dir={out}", "--resume"]).returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f != "weighters"}
    time.sleep(0.01)
    write_jsonl(tmp_path / "specific.jsonl", [f"a new document {i}" for i in range(300)])
    res = run([f"--out_dir={out}", "--resume"])
    assert_one_line_error(res, "--resume: the data changed", "specific.jsonl")
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != "weighters"} == before
    assert diagnose.main(["compare", f"--runs={out}", "--metric=foo"]) == 2       # a metric the log lacks


def test_sources_without_training_examples_and_empty_files(tmp_path, capsys):
    d = tmp_path / "txt"
    d.mkdir()
    texts = {f"f{i}": f"a short file number {i} with words" for i in range(40)}
    for name, t in texts.items():
        (d / f"{name}.txt").write_text(t)
    (d / "empty.txt").write_text("")
    g = data.load_corpus(str(d), 32, "first")
    assert "empty.txt" in capsys.readouterr().out        # skipped with a warning, not an error
    held = [n for n in g.sources if n not in {g.sources[i] for i in g.train.source_id.tolist()}]
    assert held        # some single-document sources hashed into valid / test only
    kept = data.trained_sources(g)
    assert "have no training example" in capsys.readouterr().out
    assert sorted(kept.sources) == sorted(set(g.sources) - set(held))
    assert torch.bincount(kept.train.source_id, minlength=len(kept.sources)).all()
    assert [kept.sources[i] for i in kept.train.source_id.tolist()] == [     # every row keeps its name
        g.sources[i] for i in g.train.source_id.tolist()]
    assert kept.valid is g.valid and kept.test is g.test     # evaluation keeps every document
    with pytest.raises(data.DataError, match="empty.txt"):     # a single named empty file: an error
        data.load_corpus(str(d / "empty.txt"), 32)


def test_invalid_utf8_is_read_and_counted_the_same_in_txt_and_jsonl(tmp_path, capsys):
    raw = b"caf\xe9 au lait, a latin-1 byte in otherwise plain text"
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "' + raw + b'"}\n')
    docs = [list(data.read_documents(str(tmp_path / f)))[0][0] for f in ("a.txt", "b.jsonl")]
    assert docs[0] == docs[1] == raw.decode("utf-8", errors="replace").encode()
    assert capsys.readouterr().out.count("1 invalid UTF-8 sequences, read as U+FFFD") == 2


def test_write_json_closes_its_file(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.write_json(str(tmp_path / "x.json"), {"a": 1})
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_sigterm_while_loading_is_a_message_and_143(tmp_path, run, monkeypatch):
    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)          # the handler interrupts this
    monkeypatch.setattr(data, "load_data", terminated)
    res = run([f"--out_dir={tmp_path / 'out'}", *TINY])
    assert res.returncode == 143 and "interrupted before training started" in res.stderr
    assert not os.path.exists(tmp_path / "out")
    assert signal.getsignal(signal.SIGTERM) is not train.stopped_early     # restored


def test_finetune_records_hold_no_stale_method_statistics(tmp_path, run):
    out = tmp_path / "out"
    assert run([f"--out_dir={out}", *TINY, "--finetune_steps=2"]).returncode == 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert "ess" in log[1] and log[-1]["phase"] == "finetune"
    assert "ess" not in log[-1] and "max_weight" not in log[-1] and "grad_norm" in log[-1]


@pytest.mark.parametrize("argv, needles", [
    (["table", "--out_dir=OUT", "--methods=sobaa"], ["--methods", "sobaa"]),
    (["sar", "--n_examples=100000"], ["--n_examples"]),
    (["sar", "--ckpt=OUT", "--n_layer=4"], ["--n_layer", "--ckpt"]),
    (["select", "--run=OUT", "--input=GEN", "--output=OUT/x.txt", "--fraction=0.1"], ["--output", ".jsonl"]),
    (["select", "--run=OUT", "--input=GEN", "--output=GEN.jsonl", "--fraction=0.1"], ["exists", "--overwrite"])])
def test_diagnose_checks(tmp_path, corpora, capsys, argv, needles):
    gen = corpora[0]
    open(gen + ".jsonl", "w").close()
    argv = [a.replace("OUT", str(tmp_path)).replace("GEN", gen) for a in argv]
    assert diagnose.main(argv) == 2
    assert_one_line_error(type("R", (), dict(returncode=2, stdout="", stderr=capsys.readouterr().err)), *needles)
    assert not os.path.exists(tmp_path / "x.txt") and os.path.getsize(gen + ".jsonl") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="gpucheck runs on CUDA")
def test_gpucheck_refuses_the_cpu_unless_asked(capsys):
    assert diagnose.main(["gpucheck", "--steps=1"]) == 2
    assert "--device=cpu" in capsys.readouterr().err


def test_a_resume_builds_its_optimisers_for_its_own_device(tmp_path):
    """A checkpoint holds each optimiser's `fused` flag (True from a CUDA run); a resume on another
    device takes this device's flag (None on the CPU), and CDS's Δ comes back on the run's device."""
    out = tmp_path / "run"
    assert train.main([*TINY, "--method=soba", "--max_steps=2", f"--out_dir={out}"]) == 0
    st = torch.load(out / "ckpt.pt", weights_only=True)
    for k in ("opt", "meta_opt", "v_opt"):
        for group in st[k]["param_groups"]:
            group["fused"] = True                                   # as a CUDA run saves them
    torch.save(st, out / "ckpt.pt")
    cfg = train.parse_args(["--resume", f"--out_dir={out}", "--finetune_steps=2"], diagnose.train_defaults())
    ctx = train.setup(cfg)
    assert train.load_checkpoint(ctx) == 2
    assert [g["fused"] for o in (ctx.opt, ctx.meta_opt, ctx.v_opt) for g in o.param_groups] == [None] * 3
    train.restore(ctx.progress, {"delta": torch.zeros(3, dtype=torch.float64)}, device="meta")
    assert ctx.progress["delta"].device.type == "meta"           # a saved tensor moves to the device


def test_torchrun_waits_for_rank_0_s_evaluation(monkeypatch):
    """NCCL's timeout (10 minutes by default) grows with the rows rank 0 evaluates alone: 10 ms a row."""
    got = {}
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: got.update(t=timeout))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for examples, specific, seconds in ((2000, "a", 600 + 60), (100, "a;b", 600 + 5), (0, "a", 600 + 7200)):
        train.init_ranks({"device": "cpu", "eval_examples": examples, "specific": specific})
        assert got["t"].total_seconds() == pytest.approx(seconds)
