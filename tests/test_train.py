"""End-to-end tests of train.py on the built-in synthetic corpus (no files needed).

The runs are short but real: the default model on the built-in corpus, seeded, so every number
below is reproducible. The slowest test is the target-share one: 60 steps of each sparse method
with the default config (about a minute each on a shared 2-core CPU).
"""

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

import bilevel
import data
import train
from conftest import nats_per_byte_by_hand, run_theta

# ----------------------------------------------------------------------------------------------
# helpers


def run_main(out_dir, *flags):
    """train.main in-process; returns (summary dict, list of log.jsonl records)."""
    code = train.main([f"--out_dir={out_dir}", *flags])
    assert code == 0
    return read_outputs(out_dir)


def read_outputs(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return summary, log


# The default config with only the run length and the evaluation shortened. The source share in
# summary.json counts the examples trained on since the previous evaluation, here steps 40-60.
SHARE_STEPS = 60
SHARE_FLAGS = (f"--max_steps={SHARE_STEPS}", "--eval_interval=20", "--eval_examples=200")


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """One run per sparse method with the default config, shared by the tests of this module."""
    cache = {}

    def get(method):
        if method not in cache:
            out = tmp_path_factory.mktemp(f"default_{method}")
            cache[method] = (out, *run_main(out, f"--method={method}", *SHARE_FLAGS))
        return cache[method]
    return get


# ----------------------------------------------------------------------------------------------
# a default run: outputs and learning


def test_default_run_learns_and_writes_outputs(default_runs):
    out, summary, log = default_runs("soba")            # soba is the default method
    assert summary["config"]["method"] == train.method == "soba"
    # the specific valid loss against two byte models computed here: from about a uniform one's, ln 256
    # (step 20), to within 0.5 nats of a unigram model fitted to the specific training bytes (step 60)
    assert [r["step"] for r in log] == [20, 40, 60]
    specific = data.builtin_corpora(0, 128)[1]
    counts = torch.bincount(specific.train.x[specific.train.x != 0].long(), minlength=256).double() + 0.5
    valid = data.eval_subset(specific.valid, 200, 1).x                       # the evaluated examples
    unigram = -torch.log(counts / counts.sum())[valid[valid != 0].long()].mean().item()   # ≈ 2.15
    assert math.log(256) - 1 < log[0]["specific_valid_loss"] < math.log(256), log
    assert log[-1]["specific_valid_loss"] < unigram + 0.5, (unigram, log)
    for key in ("steps", "specific_valid_loss", "specific_test_loss", "generic_valid_loss", "ms_per_step",
                "peak_mem_mb", "config", "source_share", "target_source"):
        assert key in summary, key
    assert summary["steps"] == SHARE_STEPS
    assert summary["specific_valid_loss"] == log[-1]["specific_valid_loss"]
    assert summary["ms_per_step"] > 0 and summary["peak_mem_mb"] > 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == SHARE_STEPS
    assert {"model", "weighter", "v"} <= set(ckpt)


@pytest.mark.parametrize("method", ["dds", "soba", "anograd"])
def test_sparse_methods_upweight_the_target_source(default_runs, method):
    """The built-in generic pool holds 5% of target-domain documents; the learned weighting must
    at least triple their share of what the main model trains on."""
    _, summary, _ = default_runs(method)
    target = summary["target_source"]
    share = summary["source_share"][target]
    print(f"{method}: target share {share['share']:.3f} (base {share['base']:.3f}), "
          f"{share['share'] / share['base']:.1f}x")
    assert share["base"] == pytest.approx(0.05, abs=0.005)
    assert share["share"] >= 3 * share["base"], share


# ----------------------------------------------------------------------------------------------
# exact resume after SIGTERM

# every method; frozen and shuffled replay the weighting network(s) of a short soba run
RESUME_METHODS = ["baseline", "mixing", "specific", "dds", "soba", "anograd", "cds", "classifier", "ltr", "mwn",
                  "scalebio", "frozen", "shuffled"]
RESUME_STEPS, SIGNAL_AT = 40, 13
RESUME_FLAGS = [f"--max_steps={RESUME_STEPS}", "--eval_interval=10", "--eval_examples=100", "--n_layer=1",
                "--n_embd=32", "--n_hidden=64", "--seq_len=64", "--batch_size=16", "--specific_batch_size=16",
                "--big_batch_size=128"]


def without_timing(records):
    """Log records without wall-clock measurements (elapsed_s, cds_score_s, cds_examples_per_s, ...)."""
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("_per_s"))} for r in records]


def sigterm_during_stop_check(monkeypatch, step):
    """A real SIGTERM to this process at the worst moment: while train_loop agrees on a stop at the end
    of `step` (inside any_rank, after this step's flag was read). The run must stop after step + 1."""
    calls, original_any_rank = [], train.any_rank

    def any_rank(value, device):
        calls.append(value)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)     # train.run's handler sets the flag
        return original_any_rank(value, device)
    monkeypatch.setattr(train, "any_rank", any_rank)


@pytest.fixture(scope="module")
def weighter_run(tmp_path_factory):
    """A short soba run whose final weighter (ckpt.pt) and trajectory (weighters/) frozen and shuffled use."""
    out = tmp_path_factory.mktemp("weighter_run")
    assert train.main([f"--out_dir={out}", "--method=soba", *RESUME_FLAGS]) == 0
    return out


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_resume_after_sigterm_is_exact(tmp_path, method, request, monkeypatch, capsys):
    """In-process runs (the subprocess path is tested with Ctrl-C in test_newcomer.py and with torchrun
    in test_ddp.py): uninterrupted vs stopped by SIGTERM after step 14 and resumed."""
    flags = [f"--method={method}", *RESUME_FLAGS]
    if method == "frozen":
        flags.append(f"--weighter_ckpt={request.getfixturevalue('weighter_run')}")
    if method == "shuffled":
        flags.append(f"--weighter_trajectory={request.getfixturevalue('weighter_run')}")
    if method == "cds":     # Δ is computed at step 10, before the stop, and must come back from the checkpoint
        flags.append("--cds_finetune_steps=10")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    assert train.main([f"--out_dir={full_dir}", *flags]) == 0
    with monkeypatch.context() as m:
        sigterm_during_stop_check(m, SIGNAL_AT)
        assert train.main([f"--out_dir={cut_dir}", *flags]) == 128 + signal.SIGTERM
    assert f"stopped after step {SIGNAL_AT + 1}; continue: python train.py --resume" in capsys.readouterr().out
    stopped_at = torch.load(cut_dir / "ckpt.pt", map_location="cpu", weights_only=True)["step"]
    assert stopped_at == SIGNAL_AT + 1, stopped_at
    assert train.main([f"--out_dir={cut_dir}", *flags, "--resume"]) == 0

    s_full, log_full = read_outputs(full_dir)
    s_cut, log_cut = read_outputs(cut_dir)
    for k in ("specific_valid_loss", "specific_test_loss", "generic_valid_loss", "source_share", "lambda"):
        assert s_cut.get(k) == s_full.get(k), k
    assert without_timing(log_cut) == without_timing(log_full)
    a = torch.load(full_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    b = torch.load(cut_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == RESUME_STEPS
    # every tensor of the final state (θ, α, v, ScaleBiO's u and p, CDS's Δ, optimizer moments,
    # random generator states) is bit-identical
    assert tensors_of(a).keys() == tensors_of(b).keys()
    for k, t in tensors_of(a).items():
        assert torch.equal(t, tensors_of(b)[k]), k
    assert "model" in a


def tensors_of(obj, prefix=""):
    """{path: tensor} for every tensor nested in a checkpoint's dicts and lists."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(tensors_of(v, f"{prefix}/{k}"))
    return out


# ----------------------------------------------------------------------------------------------
# fine-tuning


def test_finetune_lowers_specific_test_loss(tmp_path):
    """30 generic steps then 30 steps on the specific training set: lower specific test loss than the
    pretrained model, and than 60 generic steps (so it is the specific data, not just more steps)."""
    small = ["--method=baseline", "--eval_interval=10", "--eval_examples=200", "--n_layer=1", "--n_embd=32",
             "--n_hidden=64"]
    summary, log = run_main(tmp_path / "ft", "--max_steps=30", "--finetune_steps=30", *small)
    longer, _ = run_main(tmp_path / "generic60", "--max_steps=60", *small)
    assert [r["phase"] for r in log] == ["pretrain"] * 3 + ["finetune"] * 3
    assert summary["specific_test_loss"] == log[2]["specific_test_loss"]     # the pretrained model's
    assert summary["specific_test_loss_finetuned"] < summary["specific_test_loss"] - 0.05, summary
    assert summary["specific_test_loss_finetuned"] < longer["specific_test_loss"] - 0.05, (summary, longer)
    finetuned = [r for r in log if r["phase"] == "finetune"]
    best = min(finetuned, key=lambda r: r["specific_valid_loss"])
    assert summary["specific_test_loss_finetuned"] == best["specific_test_loss"]


# ----------------------------------------------------------------------------------------------
# several specific sets (the paper's Appendix B)

def test_each_outer_batch_comes_from_one_specific_set_chosen_uniformly():
    sets = [SimpleNamespace(train=SimpleNamespace(x=torch.full((50, 4), v, dtype=torch.uint8))) for v in (1, 2, 3)]
    ctx = SimpleNamespace(specifics=sets, specific_x=[s.train.x for s in sets],
                          specific_samplers=[data.Sampler(50, i) for i in range(3)],
                          cfg={"specific_batch_size": 5}, gen=torch.Generator().manual_seed(0), device="cpu",
                          rank=0, world=1, ranks=bilevel.ONE)
    firsts = []
    for _ in range(600):
        batch = train.specific_batch(ctx)
        assert batch.shape == (5, 4) and len(batch.unique()) == 1          # one set per batch
        firsts.append(int(batch[0, 0]))
    counts = [firsts.count(v) for v in (1, 2, 3)]
    assert all(150 < c < 250 for c in counts), counts                     # ~200 each (binomial sd ~11.5)


def two_specific_sets(tmp_path, n_generic=200, n_specific=60):
    """--generic and --specific flags for a generic file and two specific sets, news and code (written here)."""
    def write(name, docs):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    write("generic.jsonl", [f"generic document number {i} " * 4 for i in range(n_generic)])
    write("news.jsonl", [f"NEWS ITEM {i}: markets rose today " * 3 for i in range(n_specific)])
    write("code.jsonl", [f"def f{i}(x):\n    return x + {i}\n" * 3 for i in range(n_specific)])
    specific = f"{tmp_path / 'news.jsonl'};{tmp_path / 'code.jsonl'}"
    return [f"--generic={tmp_path / 'generic.jsonl'}", f"--specific={specific}"]


def test_several_specific_sets_are_evaluated_each_and_averaged(tmp_path):
    summary, log = run_main(tmp_path / "run", *two_specific_sets(tmp_path), "--method=soba", "--max_steps=4", "--eval_interval=2", "--batch_size=4", "--big_batch_size=16",
                            "--specific_batch_size=4", "--seq_len=32", "--n_layer=1", "--n_embd=16", "--n_hidden=32")
    # each set's loss, independently: the final θ (ckpt.pt, no fine-tuning) on that set's examples (all of
    # them: fewer than eval_examples), Σ nats / Σ non-pad bytes from the logits by hand
    model = run_theta(tmp_path / "run")
    for split in ("valid", "test"):
        per_set = [summary[f"specific_{split}_loss/{name}"] for name in ("news", "code")]
        assert summary[f"specific_{split}_loss"] == pytest.approx(sum(per_set) / 2, rel=1e-6)
        for name, loss in zip(("news", "code"), per_set):
            x = getattr(data.load_corpus(str(tmp_path / f"{name}.jsonl"), 32, "first"), split).x
            assert 0 < len(x) < summary["config"]["eval_examples"]
            assert loss == pytest.approx(nats_per_byte_by_hand(model, x), rel=1e-5), (name, split)
    assert f"specific_test_loss/news" in log[-1]

