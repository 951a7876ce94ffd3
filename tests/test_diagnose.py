"""Tests for diagnose.py (--help, sar, weights, select, compare, table, bench, gpucheck) and train.py's
section-6 methods (frozen, shuffled). Everything runs on tiny corpora and models in seconds on a CPU."""

import gzip
import importlib.util
import inspect
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import diagnose  # noqa: E402
import train  # noqa: E402
import weighter  # noqa: E402
from model import ByteLM, ModelConfig  # noqa: E402
from weighter import Weighter, score  # noqa: E402
from conftest import nats_per_byte_by_hand, run_theta  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------------------------
# helpers: a tiny corpus pair and a tiny trained run

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--n_hidden=32", "--seq_len=32", "--weighter_dim=8",
        "--batch_size=4", "--big_batch_size=16", "--specific_batch_size=4", "--warmup=2",
        "--eval_interval=2", "--eval_examples=32", "--eval_batch_size=32"]


def write_jsonl(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def doc(source, i, split):
    # three recognisable kinds of text, ~60-100 bytes each
    text = {"news": f"Reuters reported on day {i} that shares of company {i % 7} rose {i % 5} pct in trade.",
            "code": f"def f_{i}(x):\n    return x * {i} + {i % 3}  # code {i}",
            "noise": "".join(chr(33 + (i * 7919 + k * 104729) % 90) for k in range(70))}[source]
    return {"text": text, "source": source, "split": split}


def specific_set(path, source):
    """A specific set of one kind of text: 30 training documents, 10 valid, 10 test."""
    return write_jsonl(path, [doc(source, 1000 + i, "train") for i in range(30)] +
                       [doc(source, 2000 + i, s) for i, s in enumerate(["valid", "test"] * 10)])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    gen = d / "generic"
    gen.mkdir()
    for src in ("news", "code", "noise"):
        write_jsonl(gen / f"{src}.jsonl", [doc(src, i, "train") for i in range(60)] +
                    [doc(src, 100 + i, "valid") for i in range(10)] + [doc(src, 200 + i, "test") for i in range(5)])
    return str(gen), specific_set(d / "specific.jsonl", "news")


def train_run(out_dir, corpora, *extra):
    gen, spec = corpora
    defaults = diagnose.train_defaults()
    cfg = train.parse_args(TINY + [f"--generic={gen}", f"--specific={spec}", f"--out_dir={out_dir}"] + list(extra),
                           defaults)
    assert train.run(cfg, defaults) == 0


@pytest.fixture(scope="module")
def soba_run(tmp_path_factory, corpora):
    out = str(tmp_path_factory.mktemp("runs") / "soba")
    train_run(out, corpora, "--method=soba", "--max_steps=4", "--finetune_steps=2")
    return out


def one_line_error(capsys):
    """The stderr of a refused command: exactly one line, `error: ...`."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def normal_mode(path):
    """A file created by open() honours the umask (0644 under the usual 022); tempfile's would be 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


# -----------------------------------------------------------------------------------------------
# --help: generated from the option tables; unknown options

def test_help_lists_subcommands_and_every_option_with_default_and_meaning(capsys):
    assert diagnose.main(["-h"]) == 0
    short = capsys.readouterr().out
    assert diagnose.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == short
    for sub, (fn, _, _) in diagnose.COMMANDS.items():                   # one line each: its docstring's first
        assert [line.split(None, 1) for line in out.splitlines() if line.startswith(f"  {sub} ")] == [
            [sub, fn.__doc__.splitlines()[0]]]
    assert set(diagnose.COMMANDS) == {"sar", "weights", "select", "compare", "table", "bench", "gpucheck"}
    for sub, (fn, table, train_settings) in diagnose.COMMANDS.items():
        assert diagnose.main([sub, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python diagnose.py {sub} --key=value")
        assert inspect.cleandoc(fn.__doc__) in out                      # what it does, then its options
        for key, (default, meaning) in table.items():
            assert isinstance(meaning, str) and meaning and "\n" not in meaning
            line = next(line for line in out.splitlines() if line.strip().startswith(f"--{key}="))
            assert line.strip().startswith(f"--{key}={default}") and line.rstrip().endswith(meaning)
        assert ("python train.py --help" in out) == train_settings
    assert {s for s, (_, _, t) in diagnose.COMMANDS.items() if t} == {"sar", "table", "bench", "gpucheck"}
    assert diagnose.main(["select", "-h"]) == 0 and "--first_docs=False" in capsys.readouterr().out


def test_help_and_errors_from_the_command_line():
    run = lambda *a: subprocess.run([sys.executable, "diagnose.py", *a], cwd=ROOT, capture_output=True, text=True)
    p = run("--help")
    assert p.returncode == 0 and "gpucheck" in p.stdout and not p.stderr
    p = run("compare", "--bogus=1")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --bogus: unknown option of `compare` (see python diagnose.py compare --help)"]


def test_cli_errors(capsys):
    assert diagnose.main(["nope"]) == 2
    assert diagnose.main(["compare", "--bogus=1"]) == 2
    assert diagnose.main(["compare", "positional"]) == 2
    assert diagnose.main(["select", "--run"]) == 2                      # a non-bool option needs =VALUE
    assert diagnose.main(["select", "--sample=many"]) == 2              # and a value of its default's type
    err = capsys.readouterr().err
    assert err.count("error:") == 5 and all(line.startswith("error: ") for line in err.strip().splitlines())
    assert "--bogus" in err and "positional" in err and "--run" in err and "--sample" in err


# -----------------------------------------------------------------------------------------------
# sar: batched inner products against explicit per-example gradients

def brute_force_alignments(model, x, B):
    """a_norm(x, B) with explicit per-example gradients: (n,)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])
    g_B = flat(torch.autograd.grad(model(B).mean(), params))                      # ∇ℓ(B)
    per_example = torch.stack([flat(torch.autograd.grad(model(x[i:i + 1]).sum(), params))
                               for i in range(len(x))])                           # (n, P) ∇ℓ(x)
    return per_example @ (g_B / g_B.norm())


def test_sar_inner_products_and_rates_match_brute_force():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_hidden=32, seq_len=12, dropout=0.0)).eval()
    letters = lambda n: torch.randint(97, 102, (n, 12), dtype=torch.uint8)        # "specific": 5 letters
    ascii_ = lambda n: torch.randint(32, 127, (n, 12), dtype=torch.uint8)         # "generic": any ASCII
    sar_fast, gar_fast, sar_slow, gar_slow = [], [], [], []
    for _ in range(3):   # three draws of (B_specific, B_generic, x)
        B_s, B_g, x_s, x_g = letters(6), ascii_(6), letters(8), ascii_(8)
        x = torch.cat([x_s, x_g])
        a_s, a_g = diagnose.alignments(model, x, B_s, B_g)
        b_s, b_g = brute_force_alignments(model, x, B_s), brute_force_alignments(model, x, B_g)
        torch.testing.assert_close(a_s, b_s, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a_g, b_g, rtol=1e-4, atol=1e-7)
        assert (b_s - b_g).abs().min() > 1e-4 * b_s.abs().max()   # no near-ties: indicators are well defined
        s, g = diagnose.acceleration_indicators(model, x_s, x_g, B_s, B_g)
        sar_fast.append(s), gar_fast.append(g)
        sar_slow.append(b_s[:8] > b_g[:8]), gar_slow.append(b_g[8:] > b_s[8:])
    assert torch.equal(torch.stack(sar_fast), torch.stack(sar_slow))
    assert torch.equal(torch.stack(gar_fast), torch.stack(gar_slow))
    r = diagnose.rate_summary(torch.stack(sar_fast), 8)      # 8 distinct held-out documents
    assert r["rate"] == torch.stack(sar_slow).float().mean().item()
    assert r["ci95_wilson"][0] <= r["rate"] <= r["ci95_wilson"][1]


def test_rate_intervals():
    # Wilson interval of 8/10 (textbook value 0.490 .. 0.943)
    lo, hi = diagnose.wilson(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    # identical draws: the bootstrap over draws has zero width at the rate
    ind = torch.tensor([[True, True, False, True]] * 5)
    assert diagnose.bootstrap_over_draws(ind) == pytest.approx((0.75, 0.75))
    # draws that disagree: a wide interval around the mean
    ind = torch.tensor([[True] * 4] * 5 + [[False] * 4] * 5)
    lo, hi = diagnose.bootstrap_over_draws(ind)
    assert lo < 0.3 and hi > 0.7


def test_sar_cli_pretrains_and_reads_a_checkpoint(corpora, soba_run, tmp_path, capsys):
    gen, spec = corpora
    out = tmp_path / "sar.json"
    rc = diagnose.main(["sar", f"--generic={gen}", f"--specific={spec}", "--pretrain_steps=2", "--draws=3",
                        "--n_examples=4", f"--out_json={out}", f"--save_ckpt={tmp_path}/theta.pt"] + TINY)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["sar"]["n"] == res["gar"]["n"] == 12 and 0 <= res["sar"]["rate"] <= 1 and res["theta_steps"] == 2
    captured = capsys.readouterr()
    # what the rates mean (section 6.3, Table 8), and a one-line warning: θ has trained 2 < 200 steps
    assert "SAR" in captured.out and "86.2%" in captured.out and "69.4%" in captured.out
    assert "which is where data selection helps" in " ".join(captured.out.split())
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: θ trained 2 steps (< 200)") and "not meaningful" in warning[0]
    assert normal_mode(out) and normal_mode(tmp_path / "theta.pt")
    # the same θ read back: the same rates (same seed, same draws)
    assert diagnose.main(["sar", f"--ckpt={tmp_path}/theta.pt", "--draws=3", "--n_examples=4", f"--out_json={out}"]) == 0
    again = json.loads(out.read_text())
    assert again["sar"]["rate"] == res["sar"]["rate"] and again["gar"]["rate"] == res["gar"]["rate"]
    # a θ that has trained long enough: no warning
    st = torch.load(tmp_path / "theta.pt", weights_only=True)
    torch.save({**st, "step": 250}, tmp_path / "theta250.pt")
    capsys.readouterr()
    assert diagnose.main(["sar", f"--ckpt={tmp_path}/theta250.pt", "--draws=2", "--n_examples=3"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert diagnose.main(["sar", f"--ckpt={soba_run}/ckpt.pt", "--draws=2", "--n_examples=3"]) == 0
    capsys.readouterr()
    assert diagnose.main(["sar", f"--ckpt={tmp_path}/none.pt"]) == 2
    assert f"{tmp_path}/none.pt" in one_line_error(capsys)


# -----------------------------------------------------------------------------------------------
# compare: time to a target loss on hand-made logs

def fake_run(d, method, losses, elapsed, summary=None, **config):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"method": method, **config}, f)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for i, (loss, t) in enumerate(zip(losses, elapsed)):
            f.write(json.dumps({"step": 100 * (i + 1), "phase": "pretrain", "elapsed_s": t,
                                "specific_valid_loss": loss, "specific_test_loss": loss + 0.01}) + "\n")
        f.write(json.dumps({"step": 999, "phase": "finetune", "elapsed_s": 999, "specific_valid_loss": 0.1}) + "\n")
    if summary is not None:
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(summary, f)
    return d


def test_time_to_target_interpolates():
    recs = [{"step": 100 * (i + 1), "phase": "pretrain", "elapsed_s": 15.0 * (i + 1), "specific_valid_loss": v}
            for i, v in enumerate([1.9, 1.5, 1.3, 1.2])]
    recs.append({"step": 900, "phase": "finetune", "elapsed_s": 1.0, "specific_valid_loss": 0.0})
    # crosses 1.4 halfway between step 200 (1.5) and step 300 (1.3)
    assert diagnose.time_to_target(recs, 1.4) == pytest.approx((250.0, 37.5))
    assert diagnose.time_to_target(recs, 1.4, interpolate=False) == (300.0, 45.0)
    assert diagnose.time_to_target(recs, 1.3) == pytest.approx((300.0, 45.0))      # exactly at an eval
    assert diagnose.time_to_target(recs, 2.5) == (100.0, 15.0)                      # below from the first eval
    assert diagnose.time_to_target(recs, 1.0) == (None, None)                       # fine-tuning does not count


def test_compare_speedups(tmp_path, capsys):
    base = fake_run(str(tmp_path / "base"), "baseline", [2.0, 1.8, 1.6, 1.5, 1.4], [10, 20, 30, 40, 50])
    soba = fake_run(str(tmp_path / "soba"), "soba", [1.9, 1.5, 1.3, 1.2, 1.1], [15, 30, 45, 60, 75],
                    summary={"steps": 500, "specific_valid_loss": 1.1, "specific_test_loss": 1.11, "ms_per_step": 150.0})
    out = tmp_path / "cmp.md"
    assert diagnose.main(["compare", f"--runs={soba},{base}", f"--out={out}"]) == 0
    res = json.loads((tmp_path / "cmp.json").read_text())
    assert res["target"] == 1.4 and res["baseline"] == base          # the run whose method is baseline, not the first
    r = res["runs"][soba]
    assert r["steps_to_target"] == pytest.approx(250) and r["seconds_to_target"] == pytest.approx(37.5)
    assert r["speedup_steps"] == pytest.approx(2.0) and r["speedup_time"] == pytest.approx(50 / 37.5)
    assert res["runs"][base]["speedup_time"] == pytest.approx(1.0)
    assert "2.00x" in capsys.readouterr().out and "2.00x" in out.read_text()
    assert normal_mode(out) and normal_mode(tmp_path / "cmp.json")
    assert diagnose.main(["compare", f"--runs={base},{soba}", "--target=1.0"]) == 0
    assert "not reached" in capsys.readouterr().out
    assert diagnose.main(["compare", f"--runs={tmp_path}/missing"]) == 2
    assert f"{tmp_path}/missing" in one_line_error(capsys)


def test_compare_draws_the_pretraining_curves_and_the_target(tmp_path, monkeypatch):
    base = fake_run(str(tmp_path / "base"), "baseline", [2.0, 1.8, 1.6], [10, 20, 30])
    soba = fake_run(str(tmp_path / "soba"), "soba", [1.9, 1.5, 1.3], [15, 30, 45])
    drawn = []
    with monkeypatch.context() as m:     # what would be drawn, with or without matplotlib here
        m.setattr(importlib.util, "find_spec", lambda name, *a: object())
        m.setattr(diagnose, "plot", lambda path, panels: drawn.append((path, panels)))
        assert diagnose.main(["compare", f"--runs={base},{soba}", f"--out={tmp_path / 'cmp.md'}"]) == 0
    [(path, [(_, ylabel, curves, level)])] = drawn
    assert path == str(tmp_path / "cmp.png") and ylabel == "specific_valid_loss" and level == 1.6
    points = {label: list(zip(steps, values)) for label, (steps, values) in curves.items()}
    assert points == {"baseline: base": [(100, 2.0), (200, 1.8), (300, 1.6)],     # no fine-tuning record
                      "soba: soba": [(100, 1.9), (200, 1.5), (300, 1.3)]}
    if importlib.util.find_spec("matplotlib"):
        assert diagnose.main(["compare", f"--runs={base},{soba}", f"--out={tmp_path / 'real.md'}"]) == 0
        assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_a_baseline_and_one_specific_set(tmp_path, capsys):
    a = fake_run(str(tmp_path / "a"), "soba", [2.0, 1.5], [10, 20], specific="reuters.jsonl")
    b = fake_run(str(tmp_path / "b"), "dds", [2.0, 1.6], [10, 20], specific="reuters.jsonl")
    assert diagnose.main(["compare", f"--runs={a},{b}"]) == 2                # no run trained as the baseline
    assert "--baseline" in one_line_error(capsys)
    assert diagnose.main(["compare", f"--runs={a},{b}", f"--baseline={b}"]) == 0
    assert "(baseline)" in capsys.readouterr().out
    base = fake_run(str(tmp_path / "base"), "baseline", [2.0, 1.8], [10, 20], specific="reuters.jsonl")
    other = fake_run(str(tmp_path / "other"), "soba", [2.0, 1.5], [10, 20], specific="pubmed.jsonl")
    few = fake_run(str(tmp_path / "few"), "soba", [2.0, 1.5], [10, 20], specific="reuters.jsonl",
                   specific_train_docs=100)
    out = tmp_path / "cmp.md"
    for run in (other, few):                  # another specific set, or another subset of it: refused
        assert diagnose.main(["compare", f"--runs={base},{run}", f"--out={out}"]) == 2
        assert run in one_line_error(capsys) and not out.exists()
        assert diagnose.main(["compare", f"--runs={base},{run}", "--force"]) == 0
    assert diagnose.main(["compare", f"--runs={base},{a}"]) == 0


@pytest.mark.parametrize("setting, base_cfg, run_cfg", [
    ("seed", dict(specific="r.jsonl", specific_train_docs=30),
     dict(specific="r.jsonl", specific_train_docs=30, seed=1)),
    ("seed", dict(), dict(seed=1)),                        # the built-in corpus is drawn from the seed
    ("doc_mode", dict(specific="r.jsonl"), dict(specific="r.jsonl", doc_mode="chunk")),
    ("seq_len", dict(specific="r.jsonl"), dict(specific="r.jsonl", seq_len=64)),
    ("eval_examples", dict(specific="r.jsonl"), dict(specific="r.jsonl", eval_examples=500)),
    ("specific", dict(specific="r.jsonl"), dict(specific="r.jsonl;p.jsonl"))])
def test_compare_refuses_other_specific_data_or_evaluation(tmp_path, capsys, setting, base_cfg, run_cfg):
    """A run whose specific data or evaluation differs from the baseline's is refused in one line naming
    the setting and both values (--force compares anyway); a seed that draws no specific data is fine."""
    base = fake_run(str(tmp_path / "base"), "baseline", [2.0, 1.8], [10, 20], **base_cfg)
    run = fake_run(str(tmp_path / "run"), "soba", [2.0, 1.5], [10, 20], **run_cfg)
    assert diagnose.main(["compare", f"--runs={base},{run}"]) == 2
    err = one_line_error(capsys)
    defaults = diagnose.train_defaults()
    theirs, ours = {**defaults, **run_cfg}[setting], {**defaults, **base_cfg}[setting]
    assert f"{run}: {setting}={theirs!r}, the baseline's {setting}={ours!r}" in err and "--force" in err
    assert diagnose.main(["compare", f"--runs={base},{run}", "--force"]) == 0
    other_seed = fake_run(str(tmp_path / "s2"), "soba", [2.0, 1.5], [10, 20], specific="r.jsonl", seed=2)
    if base_cfg == dict(specific="r.jsonl"):         # a whole specific file: the seed does not change it
        assert diagnose.main(["compare", f"--runs={base},{other_seed}"]) == 0


# -----------------------------------------------------------------------------------------------
# select: exact top-k, atomic output, never the input, O(k) memory, a uniform --max_docs sample

@pytest.fixture
def scored_corpus(tmp_path):
    torch.manual_seed(1)
    w = Weighter(dim=8, kernel=3)
    ckpt = tmp_path / "wrun"
    ckpt.mkdir()
    torch.save({"weighter": w.state_dict(), "config": {"weighter_dim": 8, "weighter_kernel": 3, "seq_len": 16,
                                                        "method": "soba"}}, ckpt / "ckpt.pt")
    docs = [doc(src, i, "train") for i in range(15) for src in ("news", "code", "noise")]
    a = write_jsonl(tmp_path / "a.jsonl", docs[:20])
    b = write_jsonl(tmp_path / "b.jsonl.gz", docs[20:])
    # the expected score of each document: s(x; α) of its first 16 normalised bytes
    x = torch.stack([diagnose.doc_windows(data.encode(d["text"]), 16, "first")[0] for d in docs])
    return str(ckpt), f"{a},{b}", docs, score(w.eval(), x)


def read_out(path):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_select_top_k_exact(scored_corpus, tmp_path, monkeypatch, capsys):
    run, inp, docs, s = scored_corpus
    biggest = []
    push = diagnose.TopK.push
    monkeypatch.setattr(diagnose.TopK, "push", lambda self, *a: (push(self, *a), biggest.append(len(self.heap))))
    out = tmp_path / "sel.jsonl"
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--sample=7", "--batch=4"]) == 0
    got = read_out(out)
    assert len(got) == 7 and max(biggest) == 7            # never more than k documents kept
    assert {r["text"] for r in got} == {docs[i]["text"] for i in torch.topk(s, 7).indices.tolist()}
    for r in got:
        i = [d["text"] for d in docs].index(r["text"])
        assert r["source"] == docs[i]["source"] and r["score"] == pytest.approx(s[i].item(), abs=1e-5)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert normal_mode(out)                              # not tempfile's 0600
    # --fraction: k = ⌈fraction · N⌉ after a counting pass, same top set
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--fraction=0.2"]) == 2
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--fraction=0.2",
                          "--overwrite"]) == 0
    assert {r["text"] for r in read_out(out)} == {docs[i]["text"] for i in torch.topk(s, 9).indices.tolist()}
    # the report lists every input source, even one with nothing selected, with share ÷ base rate
    report = capsys.readouterr().out.split("selected 9 of 45 documents")[1]
    for src in ("news", "code", "noise"):
        n = sum(d["source"] == src for d in (docs[i] for i in torch.topk(s, 9).indices.tolist()))
        assert f"| {src} | {n} | {n / 9:.3f} | 0.333 | {(n / 9) / (1 / 3):.2f}x |" in report


def test_select_max_docs_draws_uniformly_over_the_whole_input(scored_corpus, tmp_path):
    run, inp, docs, _ = scored_corpus
    texts = [d["text"] for d in docs]
    picked = {}
    for seed in (0, 0, 1):          # --fraction=1: every document read is written, in reading order
        out = tmp_path / f"max{seed}.jsonl"
        assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--fraction=1",
                              "--max_docs=10", f"--seed={seed}", "--overwrite"]) == 0
        idx = [texts.index(r["text"]) for r in read_out(out)]
        assert len(idx) == 10 and idx == sorted(idx)
        assert picked.setdefault(seed, idx) == idx      # seeded: the same draw again
    assert picked[0] != picked[1] and picked[0] != list(range(10))
    # uniform over the whole input: over 6 more seeds, the second file (25 of the 45 documents) gives
    # about 25/45 of the documents read, and most documents are read at least once
    second, seen = 0, set()
    for seed in range(2, 8):
        out = tmp_path / "max.jsonl"
        assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--fraction=1",
                              "--max_docs=10", f"--seed={seed}", "--overwrite"]) == 0
        idx = [texts.index(r["text"]) for r in read_out(out)]
        second, seen = second + sum(i >= 20 for i in idx), seen | set(idx)
    assert 20 <= second <= 47 and len(seen) >= 30          # expected 33.3 and 33.8
    out = tmp_path / "first.jsonl"
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--fraction=1",
                          "--max_docs=10", "--first_docs"]) == 0
    assert [r["text"] for r in read_out(out)] == texts[:10]            # the first 10, in file order
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--fraction=0.5",
                          "--max_docs=100", "--overwrite"]) == 0                       # more than the corpus holds: all 45
    assert len(read_out(out)) == 23


def test_select_sample_and_mean_modes(scored_corpus, tmp_path):
    run, inp, docs, _ = scored_corpus
    out = tmp_path / "sel.jsonl.gz"
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out}", "--sample=10",
                          "--mode=sample", "--doc_score=mean"]) == 0
    got = read_out(out)
    assert len(got) == len({r["text"] for r in got}) == 10
    assert normal_mode(out)
    # a draw ∝ exp(s), not the top-k: another seed draws another set
    out2 = tmp_path / "sel2.jsonl"
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={out2}", "--sample=10",
                          "--mode=sample", "--doc_score=mean", "--seed=1"]) == 0
    assert {r["text"] for r in read_out(out2)} != {r["text"] for r in got}


def test_select_refuses_its_input_and_bad_options(scored_corpus, tmp_path, capsys):
    run, inp, _, _ = scored_corpus
    a = inp.split(",")[0]
    before = open(a).read()
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={a}", "--sample=3"]) == 2
    assert diagnose.main(["select", f"--run={run}", f"--input={tmp_path}", f"--output={a}", "--sample=3"]) == 2
    assert open(a).read() == before
    out = f"--output={tmp_path}/o.jsonl"
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", out]) == 2                     # no k
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", out, "--sample=3", "--mode=x"]) == 2
    assert diagnose.main(["select", f"--run={tmp_path}", f"--input={inp}", out, "--sample=3"]) == 2  # no ckpt
    capsys.readouterr()
    # a bad file half-way through: one line naming it, nothing written
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"no_text": 1}])
    assert diagnose.main(["select", f"--run={run}", f"--input={inp},{bad}", out, "--sample=3"]) == 2
    assert bad in one_line_error(capsys) and not os.path.exists(f"{tmp_path}/o.jsonl")
    assert diagnose.main(["select", f"--run={run}", f"--input={inp}", f"--output={tmp_path}/no/dir/o.jsonl",
                          "--sample=3"]) == 2
    assert f"{tmp_path}/no/dir/o.jsonl" in one_line_error(capsys)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_topk_keeps_k_and_earlier_ties():
    t = diagnose.TopK(3)
    for i, v in enumerate([5, 1, 9, 5, 7, 5, 0]):
        t.push(v, i, float(v))
        assert len(t.heap) <= 3
    assert t.kept() == {2: 9.0, 4: 7.0, 0: 5.0}            # the tie at 5 keeps the first document


# -----------------------------------------------------------------------------------------------
# weights

def test_weights_report_on_a_real_run(soba_run, tmp_path, capsys):
    assert diagnose.main(["weights", f"--run={soba_run}", "--n_examples=40", "--bins=4"]) == 0
    out = capsys.readouterr().out
    for text in ("share of the examples trained on", "news", "ESS", "highest-weighted", "Spearman", "score bin"):
        assert text in out
    assert "plot:" not in out and not os.path.exists(os.path.join(soba_run, "weights.png"))   # only when asked
    assert diagnose.main(["weights", "--run=/nonexistent/run"]) == 2
    assert "/nonexistent/run" in one_line_error(capsys)


def test_weights_plot_only_when_asked_and_only_with_matplotlib(soba_run, tmp_path, capsys):
    png = tmp_path / "w.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert diagnose.main(["weights", f"--run={soba_run}", f"--plot={png}"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and not png.exists()       # refused before any report
        assert captured.err.startswith("error: --plot: needs matplotlib") and captured.err.count("\n") == 1
    else:
        assert diagnose.main(["weights", f"--run={soba_run}", f"--plot={png}"]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and normal_mode(png)


def test_weights_on_a_scalebio_run(corpora, tmp_path, capsys):
    train_run(str(tmp_path), corpora, "--method=scalebio", "--max_steps=2")
    assert diagnose.main(["weights", f"--run={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "λ (per-source weight)" in out and "| news |" in out and "no text-scoring weighting network" in out


def test_weights_on_the_builtin_corpus(tmp_path, capsys):
    defaults = diagnose.train_defaults()
    cfg = train.parse_args(TINY + ["--method=soba", "--max_steps=2", f"--out_dir={tmp_path}"], defaults)
    assert train.run(cfg, defaults) == 0
    assert diagnose.main(["weights", f"--run={tmp_path}", "--n_examples=30", "--bins=3"]) == 0
    assert "target" in capsys.readouterr().out            # the built-in corpus's hidden in-domain source


def test_bad_run_directories_give_one_line(tmp_path, capsys):
    bad = fake_run(str(tmp_path / "bad"), "soba", [2.0], [1])
    open(os.path.join(bad, "config.json"), "w").write("{not json")
    for argv in (["weights", f"--run={bad}"], ["compare", f"--runs={bad}"], ["weights", f"--run={tmp_path}"],
                 ["table", f"--out_dir={tmp_path}", "--seeds=0,x"], ["bench", "--methods=nope"],
                 ["gpucheck", "--steps=0"], ["sar", "--n_layer=many"]):
        assert diagnose.main(argv) == 2, argv
        one_line_error(capsys)


# -----------------------------------------------------------------------------------------------
# table: Table 2 (one specific set) and Table 3 (several, one after another)

def test_table_assembles_from_run_dirs(tmp_path, capsys):
    for m, s, pre, ft in [("baseline", 0, 1.2, 0.9), ("baseline", 1, 1.4, 0.8), ("soba", 0, 1.0, 0.7)]:
        os.makedirs(tmp_path / f"{m}_s{s}")
        with open(tmp_path / f"{m}_s{s}" / "summary.json", "w") as f:
            json.dump({"method": m, "specific_test_loss": pre, "specific_test_loss_finetuned": ft, "ms_per_step": 10.0}, f)
    assert diagnose.main(["table", f"--out_dir={tmp_path}", "--assemble_only=True"]) == 0
    res = json.loads((tmp_path / "table.json").read_text())["methods"]
    assert res["baseline"]["pretrain"] == pytest.approx([1.3, math.sqrt(0.02)])
    assert res["baseline"]["finetune"][0] == pytest.approx(0.85) and res["baseline"]["seeds"] == [0, 1]
    assert res["soba"]["pretrain"] == [1.0, None] and res["cds"]["seeds"] == []
    md = (tmp_path / "table.md").read_text()
    assert "| Baseline | 1.300 ± 0.141 | 0.850 ± 0.071 |" in md and "| Sparse SOBA | 1.000 | 0.700 |" in md
    assert "| CDS | — | — |" in md and "1.019" in md
    assert normal_mode(tmp_path / "table.md") and normal_mode(tmp_path / "table.json")
    assert diagnose.main(["table", f"--out_dir={tmp_path}", "--method=soba"]) == 2


def test_table_reuses_a_finished_run_only_with_the_settings_it_would_give_it(tmp_path, capsys):
    """Finished runs (config.json, log.jsonl, summary.json, as train.py leaves them): kept when config.json,
    completed with today's defaults, holds the settings the table gives the run, up to what a resume may
    change and the bookkeeping keys; else a one-line refusal naming the setting, before any run. Only the
    --seeds asked for make the table, whatever else lies in OUT_DIR."""
    argv = ["--max_steps=2", "--n_embd=16", "--specific_train_docs=5"]
    for seed, loss in ((0, 1.5), (1, 1.7), (2, 9.0)):
        cfg = train.parse_args(argv + ["--method=baseline", f"--seed={seed}"], diagnose.train_defaults())
        del cfg["method"], cfg["weighter_init"]          # a setting the run predates: today's default
        cfg.update(eval_batch_size=7, device="cpu", out_dir="elsewhere", world_size=2, inputs={"files": []})
        fake_run(str(tmp_path / f"baseline_s{seed}"), "baseline", [2.0, loss], [10, 20], **cfg,
                 summary={"method": "baseline", "specific_test_loss": loss})
    table = ["table", f"--out_dir={tmp_path}", "--methods=baseline", "--seeds=0,1"]
    assert diagnose.main(table + argv) == 0
    assert capsys.readouterr().out.count("exists, kept") == 2
    res = json.loads((tmp_path / "table.json").read_text())["methods"]
    assert set(res) == {"baseline"} and res["baseline"]["seeds"] == [0, 1]        # not seed 2's run
    assert res["baseline"]["pretrain_values"] == [1.5, 1.7]
    assert res["baseline"]["pretrain"][0] == pytest.approx(1.6)
    for extra, needle in ((["--lr=0.01"], "lr=0.002 in its config.json, lr=0.01 here"),
                          (["--specific_train_docs=6"], "specific_train_docs=5 in its config.json"),
                          (["--weighter_init=reference"], "weighter_init='default' in its config.json")):
        assert diagnose.main(table + argv + extra) == 2
        err = one_line_error(capsys)
        assert f"{tmp_path / 'baseline_s0'}: a finished run with {needle}" in err, err
    assert sorted(os.listdir(tmp_path)) == [f"baseline_s{s}" for s in range(3)] + ["table.json", "table.md"]


def test_table_runs_train_py_once_per_method_and_seed(corpora, tmp_path, capsys):
    gen, spec = corpora
    args = ["table", f"--out_dir={tmp_path}", "--methods=baseline,not_a_method", "--seeds=0", "--max_steps=2",
            "--finetune_steps=2", f"--generic={gen}", f"--specific={spec}"] + TINY
    assert diagnose.main(args) == 2 and "not_a_method" in capsys.readouterr().err      # named before any run
    args[2] = "--methods=baseline"
    assert diagnose.main(args) == 0
    summary = json.loads((tmp_path / "baseline_s0" / "summary.json").read_text())
    assert summary["config"]["max_steps"] == 2 and "specific_test_loss_finetuned" in summary
    res = json.loads((tmp_path / "table.json").read_text())
    assert res["methods"]["baseline"]["pretrain"][0] == pytest.approx(summary["specific_test_loss"])
    mtime = os.path.getmtime(tmp_path / "baseline_s0" / "summary.json")
    assert diagnose.main(args) == 0                               # a finished run is kept, not redone
    assert os.path.getmtime(tmp_path / "baseline_s0" / "summary.json") == mtime
    assert "exists, kept" in capsys.readouterr().out


def test_table_runs_every_specific_set_of_a_folder(corpora, tmp_path, capsys):
    """--specifics=DIR: each file is one specific set, run into OUT_DIR/SET/METHOD_sSEED, and the
    table has a column per set (the paper's Table 3)."""
    gen, _ = corpora
    sets = tmp_path / "sets"
    sets.mkdir()
    files = {"news": specific_set(sets / "news.jsonl", "news"), "code": specific_set(sets / "code.jsonl.gz", "code")}
    args = ["table", f"--out_dir={tmp_path}/t3", "--methods=baseline", "--seeds=0", f"--specifics={sets}",
            "--max_steps=2", f"--generic={gen}"] + TINY
    assert diagnose.main(args) == 0
    summaries = {}
    for name, path in files.items():
        summaries[name] = json.loads((tmp_path / "t3" / name / "baseline_s0" / "summary.json").read_text())
        assert summaries[name]["config"]["specific"] == path
    assert summaries["news"]["specific_test_loss"] != summaries["code"]["specific_test_loss"]
    res = json.loads((tmp_path / "t3" / "table.json").read_text())["sets"]
    assert set(res) == {"news", "code"}
    for name in files:
        assert res[name]["baseline"]["pretrain"][0] == pytest.approx(summaries[name]["specific_test_loss"])
    md = (tmp_path / "t3" / "table.md").read_text()
    assert "| Method | code | news |" in md and "| + ft. | — | — |" in md
    assert (f"| Baseline | {summaries['code']['specific_test_loss']:.3f} | "
            f"{summaries['news']['specific_test_loss']:.3f} |") in md
    capsys.readouterr()
    assert diagnose.main(args) == 0 and capsys.readouterr().out.count("exists, kept") == 2   # resumable
    assert diagnose.main(args + [f"--specific={files['news']}"]) == 2                       # one or the other
    assert "--specific" in one_line_error(capsys)


def test_table_jobs_run_in_parallel_like_one_at_a_time(corpora, tmp_path, capsys):
    gen, spec = corpora
    common = ["--seeds=0,1", "--max_steps=3", f"--generic={gen}", f"--specific={spec}"] + TINY
    assert diagnose.main(["table", f"--out_dir={tmp_path / 'one'}", "--methods=baseline"] + common) == 0
    assert diagnose.main(["table", f"--out_dir={tmp_path / 'two'}", "--methods=baseline", "--jobs=2"] + common) == 0
    one = json.loads((tmp_path / "one" / "table.json").read_text())["methods"]["baseline"]["pretrain_values"]
    two = json.loads((tmp_path / "two" / "table.json").read_text())["methods"]["baseline"]["pretrain_values"]
    assert len(two) == 2 and two == pytest.approx(one, rel=1e-4)      # same runs, whatever the thread count
    assert "step      3" in (tmp_path / "two" / "baseline_s1" / "train.out").read_text()
    assert "end   baseline seed 1: status 0" in capsys.readouterr().out
    assert diagnose.main(["table", f"--out_dir={tmp_path / 'two'}", "--jobs=0"]) == 2


def test_table_ctrl_c_stops_every_job_with_a_checkpoint(corpora, tmp_path):
    """SIGINT to `table --jobs=2` reaches both running train.py processes: each writes its checkpoint
    and exits 130, no further run starts, and the table notes the interruption (exit status 1)."""
    gen, spec = corpora
    cmd = [sys.executable, os.path.join(ROOT, "diagnose.py"), "table",
           f"--out_dir={tmp_path}", "--methods=baseline,mixing,cds", "--seeds=0", "--jobs=2", "--max_steps=1000000",
           f"--generic={gen}", f"--specific={spec}"] + TINY
    # SIGINT at its default in the child, also when pytest itself runs in the background (`cmd &`
    # starts it with SIGINT ignored, and Python then installs no KeyboardInterrupt handler);
    # a session of its own, so that a failure below can stop the whole process group
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        logs = [tmp_path / f"{m}_s0" / "log.jsonl" for m in ("baseline", "mixing")]
        deadline = time.time() + 120
        while not all(p.exists() and p.stat().st_size > 0 for p in logs) and time.time() < deadline:
            time.sleep(0.2)                                       # both runs have evaluated at least once
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)              # no train.py left running after a failure
    assert proc.returncode == 1, out
    for m in ("baseline", "mixing"):
        assert f"end   {m} seed 0: status 130" in out
        assert (tmp_path / f"{m}_s0" / "ckpt.pt").exists() and not (tmp_path / f"{m}_s0" / "summary.json").exists()
    assert not (tmp_path / "cds_s0").exists()                # never started
    assert "interrupted during baseline seed 0; rerun the same command to continue" in (tmp_path / "table.md").read_text()


# -----------------------------------------------------------------------------------------------
# bench and gpucheck

def test_cpu_peak_memory_counts_live_tensors():
    def fn():
        a = torch.ones(1024, 1024)              # 4 MiB
        b = torch.ones(2048, 1024)              # 8 MiB while a is alive: peak 12 MiB
        del a, b
        c = torch.ones(512, 1024)               # 2 MiB after both are freed: the peak stays 12
        return c.sum()
    assert diagnose.cpu_peak_mb(fn) == pytest.approx(12.0, abs=0.1)


def test_bench_times_whole_outer_cycles(corpora, tmp_path, capsys):
    gen, spec = corpora
    out = tmp_path / "bench.json"
    assert diagnose.main(["bench", "--methods=soba", "--steps=2", "--warmup=1", "--outer_every=2", "--rounds=3",
                          f"--generic={gen}", f"--specific={spec}", f"--out_json={out}"] + TINY) == 0
    saved = json.loads(out.read_text())
    res = saved["methods"]
    assert set(res) == {"baseline", "soba"}
    for r in res.values():                   # the median of the 3 rounds
        assert len(r["ms_per_step_rounds"]) == 3 and r["ms_per_step"] == sorted(r["ms_per_step_rounds"])[1]
        assert r["trained_bytes_per_s"] == pytest.approx(4 * 32 / (r["ms_per_step"] / 1000))
        assert r["mfu"] is None                                            # no peak FLOP/s for a CPU
    assert res["soba"]["ratio"] == pytest.approx(res["soba"]["ms_per_step"] / res["baseline"]["ms_per_step"])
    assert res["soba"]["ratio_rounds"] == pytest.approx([a / b for a, b in zip(res["soba"]["ms_per_step_rounds"],
                                                                               res["baseline"]["ms_per_step_rounds"])])
    assert res["soba"]["step_memory_mb"] > 0 and 0 < res["soba"]["score_fraction"]
    assert res["soba"]["score_fraction"] == pytest.approx(res["soba"]["score_ms"] / res["baseline"]["ms_per_step"])
    assert res["baseline"]["score_fraction"] is None
    assert "passes_ms" not in saved and "scoring_ms" not in saved     # what a user needs, not its history
    assert "| soba |" in capsys.readouterr().out
    assert diagnose.main(["bench", "--rounds=0", f"--generic={gen}", f"--specific={spec}"] + TINY) == 2
    assert "--rounds" in capsys.readouterr().err


def test_peak_flops_table_matches_the_specific_name_first():
    peak = lambda name: next((tf for key, tf in diagnose.PEAK_BF16_TFLOPS if key in name), None)
    assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756 and peak("NVIDIA H200") == 989
    assert peak("NVIDIA A100-SXM4-80GB") == 312 and peak("NVIDIA L4") == 121 and peak("NVIDIA L40S") == 362
    assert peak("Tesla T4") is None


def test_gpucheck_cpu_dry_run_writes_a_complete_report(corpora, tmp_path, capsys):
    gen, spec = corpora
    tests = tmp_path / "test_fake_cuda.py"        # stands in for tests/test_cuda.py: 2 pass, 1 skips, 1 fails
    tests.write_text("import pytest\ndef test_a(): pass\ndef test_b(): pass\n"
                     "@pytest.mark.skip\ndef test_c(): pass\ndef test_d(): assert False\n")
    tiny = [a for a in TINY if not a.startswith("--big_batch_size")]       # |B| = 128·b by default
    rc = diagnose.main(["gpucheck", "--device=cpu", "--preset=cpu", "--steps=2", "--bench_steps=1", "--bench_warmup=1",
                        f"--tests={tests}", f"--run_dir={tmp_path}/gc", f"--generic={gen}", f"--specific={spec}"] + tiny)
    assert rc == 1                                 # a failing test: the report is written, the exit status says so
    out = capsys.readouterr().out
    assert "| soba |" in out and "MFU" in out and f"report: {tmp_path}/gc/gpucheck.json" in out
    path = tmp_path / "gc" / "gpucheck.json"
    rep = json.loads(path.read_text())
    assert normal_mode(path)
    assert set(rep) == {"device", "device_type", "peak_bf16_tflops", "n_params", "process_peak_memory_mb",
                        "torch_version", "cuda_version", "preset", "batch_size", "big_batch_size", "seq_len",
                        "outer_every", "tests", "train", "methods", "wall_s"}
    assert isinstance(rep["device"], str) and rep["device"].strip() and rep["device_type"] == "cpu"
    assert rep["torch_version"] == torch.__version__ and rep["cuda_version"] == torch.version.cuda
    assert rep["peak_bf16_tflops"] is None and rep["preset"] == "cpu"
    model = ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_hidden=32, seq_len=32, dropout=0.0))
    assert rep["n_params"] == sum(p.numel() for p in model.parameters())
    assert (rep["batch_size"], rep["big_batch_size"], rep["seq_len"], rep["outer_every"]) == (4, 512, 32, 1)
    assert 10 < rep["process_peak_memory_mb"] < 1e5 and 0 < rep["wall_s"] < 600
    assert rep["tests"] == {"file": str(tests), "present": True, "exit_status": 1, "passed": 2, "failed": 1,
                            "skipped": 1, "errors": 0}
    assert set(rep["train"]) == {"baseline", "soba"}
    for m, r in rep["train"].items():       # the train.py runs: 2 steps, an outer step on every step, 128·b
        summary = json.loads((tmp_path / "gc" / m / "summary.json").read_text())
        assert summary["config"]["outer_every"] == 1 and summary["config"]["big_batch_size"] == 512
        assert summary["config"]["preset"] == "cpu" and summary["config"]["method"] == m
        assert r == {"exit_status": 0, "steps": 2, **{k: summary[k] for k in (
            "specific_valid_loss", "specific_test_loss", "generic_valid_loss", "ms_per_step", "peak_mem_mb")}}
        # the reported loss recomputed: the run's final θ on the specific test examples evaluated (eval_examples)
        test = data.eval_subset(data.load_corpus(spec, 32, "first", flag="--specific").test, 32, 2).x
        assert r["specific_test_loss"] == pytest.approx(nats_per_byte_by_hand(run_theta(tmp_path / "gc" / m), test),
                                                        rel=1e-5)
        assert r["ms_per_step"] > 0 and r["peak_mem_mb"] > 10
    assert set(rep["methods"]) == {"baseline", "soba", "dds", "anograd"}
    base = rep["methods"]["baseline"]
    for m, r in rep["methods"].items():     # the bench, in-process: one round of 1 timed step each
        assert r["ms_per_step_rounds"] == [r["ms_per_step"]] and r["ms_per_step"] > 0
        assert r["ratio"] == pytest.approx(r["ms_per_step"] / base["ms_per_step"]) and r["ratio_rounds"] == [r["ratio"]]
        assert r["trained_bytes_per_s"] == pytest.approx(4 * 32 / (r["ms_per_step"] / 1000))
        assert r["step_memory_mb"] > 0 and r["mfu"] is None
        if m == "baseline":
            assert r["ratio"] == 1 and r["score_ms"] is None and r["score_fraction"] is None
        else:                               # scoring B (512 examples) with α, against a baseline step
            assert r["score_ms"] > 0 and r["score_fraction"] == pytest.approx(r["score_ms"] / base["ms_per_step"])


def test_gpucheck_records_a_missing_test_file():
    res = diagnose.run_tests("tests/no_such_test_file.py")
    assert res == {"file": "tests/no_such_test_file.py", "present": False, "exit_status": None, "passed": None,
                   "failed": None, "skipped": None, "errors": None}


# -----------------------------------------------------------------------------------------------
# train.py: frozen and shuffled weighting networks (section 6)

def test_soba_saves_its_weighter_trajectory(soba_run):
    files = sorted(os.listdir(os.path.join(soba_run, "weighters")))
    assert files == ["step_2.pt", "step_4.pt"]               # every pretraining evaluation, not fine-tuning
    last = torch.load(os.path.join(soba_run, "weighters", "step_4.pt"), weights_only=True)
    ckpt = torch.load(os.path.join(soba_run, "ckpt.pt"), weights_only=True)
    for k, v in ckpt["weighter"].items():
        assert torch.equal(v, last["weighter"][k])           # α no longer moves while fine-tuning
    assert last["config"]["seq_len"] == 32                     # self-describing: `select` can use a snapshot
    w, _ = weighter.load_weighter(os.path.join(soba_run, "weighters", "step_2.pt"))
    assert w.embed.weight.shape == (256, 8)


def test_frozen_keeps_the_weighter_fixed_with_another_model_size(soba_run, corpora, tmp_path):
    train_run(str(tmp_path / "frozen"), corpora, "--method=frozen", f"--weighter_ckpt={soba_run}",
              "--max_steps=4", "--n_embd=32", "--weighter_dim=16")   # this run's own weighter_dim is ignored
    src = torch.load(os.path.join(soba_run, "ckpt.pt"), weights_only=True)["weighter"]
    saved = torch.load(tmp_path / "frozen" / "ckpt.pt", weights_only=True)
    for k, v in src.items():               # α as it is after the 4 steps: as it was given
        assert torch.equal(saved["weighter"][k], v)
    log = [json.loads(line) for line in open(tmp_path / "frozen" / "log.jsonl")]
    assert "source_share" in log[-1] and "ess" in log[-1]
    assert not os.path.exists(tmp_path / "frozen" / "weighters")
    with pytest.raises(train.ConfigError):
        train.parse_args(["--method=frozen"], diagnose.train_defaults())
    with pytest.raises(data.DataError):
        train_run(str(tmp_path / "f2"), corpora, "--method=frozen", f"--weighter_ckpt={tmp_path}/none.pt")


def test_shuffled_replays_the_trajectory_in_a_permutation(soba_run, corpora, tmp_path):
    gen, spec = corpora
    cfg = train.parse_args(TINY + [f"--generic={gen}", f"--specific={spec}", "--method=shuffled", "--max_steps=6",
                                   f"--weighter_trajectory={soba_run}", "--seed=2"], diagnose.train_defaults())
    ctx = train.setup(cfg)
    snaps = [torch.load(p, weights_only=True)["weighter"] for p in ctx.replay.files]
    assert ctx.replay.sigma.tolist() == [1, 0]                        # seed 2: not the identity, so order matters
    for step in range(6):
        train.train_step(ctx, step)
        want = snaps[int(ctx.replay.sigma[step * 2 // 6])]            # 2 snapshots → 2 segments of 3 steps
        assert all(torch.equal(ctx.weighter.state_dict()[k], v) for k, v in want.items())
    assert not torch.equal(snaps[0]["head.weight"], snaps[1]["head.weight"])   # the replay is not trivial


# -----------------------------------------------------------------------------------------------
# compare: the authors' curves at equal steps, and the speedup at a horizon

def curve_run(d, method, losses):
    """A fake run dir: {step: loss} as pretraining evaluations (elapsed_s = step / 10)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"method": method}, f)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "phase": "pretrain", "elapsed_s": step / 10,
                                "specific_valid_loss": loss, "specific_test_loss": loss}) + "\n")
    return d


# the authors' logged Reuters valid loss, step: (baseline, SOBA), as in their curves
AUTHORS = {2000: (1.5726, 1.5087), 4000: (1.4581, 1.3677), 6000: (1.4086, 1.2804)}


def test_compare_prints_the_authors_ratio_beside_the_runs_at_equal_steps(tmp_path, capsys, monkeypatch):
    base_losses = {t: 3.0 - t / 10000 for t in range(1000, 7000, 1000)}             # steps 1000 … 6000
    soba_losses = {t: 2.9 - t / 8000 for t in range(1000, 7000, 1000) if t != 4000}   # no evaluation at 4000
    base = curve_run(str(tmp_path / "base"), "baseline", base_losses)
    soba = curve_run(str(tmp_path / "soba"), "soba", soba_losses)
    out = tmp_path / "cmp.md"
    drawn = []
    with monkeypatch.context() as m:     # what would be drawn, with or without matplotlib here
        m.setattr(importlib.util, "find_spec", lambda name, *a: object())
        m.setattr(diagnose, "plot", lambda path, panels: drawn.append((path, panels)))
        assert diagnose.main(["compare", f"--runs={base},{soba}", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    rows = {}
    for line in out.read_text().splitlines():      # the table's rows: | step | ... |
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].isdigit() and len(cells) == 5:
            rows[int(cells[0])] = cells[1:]
    assert set(rows) == set(AUTHORS)               # the authors' steps up to the baseline's last evaluation
    for step, (b, s) in AUTHORS.items():
        ours = f"{soba_losses[step] / base_losses[step]:.3f}" if step in soba_losses else "—"
        assert rows[step] == [f"{b:.4f}", f"{s:.4f}", f"{s / b:.3f}", ours], step
        assert f"| {step} | {b:.4f} | {s:.4f} | {s / b:.3f} | {ours} |" in printed
    assert rows[4000][-1] == "—" and rows[2000][2] == "0.959"
    # the PNG: the authors' ratio drawn on the baseline's curve at their steps
    [(path, [(_, _, curves, _)])] = drawn
    steps, values = curves["the baseline × the authors' SOBA / baseline"]
    assert path == str(tmp_path / "cmp.png") and list(steps) == list(AUTHORS)
    assert values == pytest.approx([base_losses[t] * s / b for t, (b, s) in AUTHORS.items()])
    if importlib.util.find_spec("matplotlib"):
        assert diagnose.main(["compare", f"--runs={base},{soba}", f"--out={tmp_path / 'real.md'}"]) == 0
        assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_names_runs_that_share_a_folder_name_by_their_parents_too(tmp_path, capsys):
    losses = {t: 3.0 - t / 10000 for t in range(1000, 5000, 1000)}
    runs = [curve_run(str(tmp_path / d / n), m, losses)
            for d, n, m in (("e1", "base", "baseline"), ("e1", "soba", "soba"), ("e2", "soba", "soba"))]
    assert diagnose.main(["compare", f"--runs={','.join(runs)}"]) == 0
    header = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| step |"))
    assert header.endswith(f"| {os.path.join('e1', 'soba')} / baseline | {os.path.join('e2', 'soba')} / baseline |")
    assert diagnose.short_names(["a/x", "b/y"]) == {"a/x": "x", "b/y": "y"}


def test_compare_speedup_at_a_horizon(tmp_path, capsys):
    """--horizon=H: the target is the baseline's loss at step H; the speedup is H / the run's steps to it."""
    base = curve_run(str(tmp_path / "base"), "baseline", {t: 3.0 - t / 10000 for t in range(1000, 7000, 1000)})
    soba = curve_run(str(tmp_path / "soba"), "soba", {t: 3.0 - t / 5000 for t in range(1000, 7000, 1000)})
    for horizon in (2000, 4000, 6000):
        assert diagnose.main(["compare", f"--runs={base},{soba}", f"--horizon={horizon}",
                              f"--out={tmp_path / 'h.md'}"]) == 0
        res = json.loads((tmp_path / "h.json").read_text())
        assert res["target"] == pytest.approx(3.0 - horizon / 10000)
        # the run reaches 3 − H/10000 at step H/2 (linear between its evaluations): a speedup of 2
        assert res["runs"][soba]["steps_to_target"] == pytest.approx(horizon / 2)
        assert res["runs"][soba]["speedup_steps"] == pytest.approx(2.0)
    capsys.readouterr()
    assert diagnose.main(["compare", f"--runs={base},{soba}", "--horizon=2500"]) == 2
    assert "--horizon=2500" in one_line_error(capsys)
