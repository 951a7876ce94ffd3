"""Fine-tuning as the authors did (train.py --init_from, --finetune_lr): a new run whose θ starts from
another run's checkpoint, with that run's settings, trained on the specific set with a fresh AdamW at a
constant learning rate; and --finetune_lr inside one run. Tiny models on the built-in corpus, seconds."""

import json
import os
import signal

import torch

import train
from test_train import read_outputs, sigterm_during_stop_check, tensors_of, without_timing

SMALL = ["--n_layer=1", "--n_embd=32", "--n_hidden=64", "--seq_len=64", "--batch_size=16",
         "--specific_batch_size=16", "--big_batch_size=128", "--eval_examples=100", "--weighter_dim=8"]


def ckpt(d):
    return torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True)


def pretrained(tmp_path, method="baseline"):
    """A finished 20-step run (no fine-tuning) to start from."""
    run = tmp_path / f"pre_{method}"
    assert train.main([f"--out_dir={run}", f"--method={method}", "--max_steps=20", "--eval_interval=10",
                       "--seed=3", *SMALL]) == 0
    return run


def test_init_from_starts_at_the_runs_theta_with_its_settings_and_a_fresh_adamw(tmp_path):
    run = pretrained(tmp_path)
    out = tmp_path / "ft"
    lr = 1e-3
    assert train.main([f"--init_from={run}", f"--finetune_lr={lr}", "--finetune_steps=1", "--eval_interval=1",
                       f"--out_dir={out}"]) == 0
    summary, log = read_outputs(out)
    before, after, pre_summary = ckpt(run), ckpt(out), json.load(open(run / "summary.json"))
    # RUN's settings (seed, model, data), a fresh out_dir, no pretraining
    cfg = summary["config"]
    assert cfg["seed"] == 3 and cfg["n_embd"] == 32 and cfg["max_steps"] == 0 and cfg["out_dir"] == str(out)
    # step 0 evaluates θ as loaded: RUN's final losses, bit for bit
    assert [r["step"] for r in log] == [0, 1] and [r["phase"] for r in log] == ["pretrain", "finetune"]
    assert log[0]["train_loss"] is None
    for k in ("specific_valid_loss", "specific_test_loss", "generic_valid_loss"):
        assert log[0][k] == summary[k] == pre_summary[k], k
    # a fresh AdamW, one step: its step count is 1, and its first update is −lr · g / (|g| + ε) (m̂/(√v̂ + ε)
    # bias-corrected, ε = 1e-9): every parameter moved by lr at most, and by lr exactly unless |g| ~ ε (a
    # continued AdamW's moments would make most updates differ from lr)
    assert all(s["step"] == 1 for s in after["opt"]["state"].values())
    moved = torch.cat([(after["model"][k] - before["model"][k]).flatten() for k in before["model"]]).abs()
    assert moved.max() <= lr * (1 + 1e-3)
    assert ((moved - lr).abs() < 1e-3 * lr).float().mean() > 0.9
    # the lr is constant, and the best fine-tuning evaluation is kept
    assert log[1]["lr"] == lr and summary["finetune_best_step"] == 1
    assert summary["specific_valid_loss_finetuned"] == log[1]["specific_valid_loss"]


def test_finetune_lr_in_one_run_restarts_adamw_at_a_constant_rate(tmp_path):
    """--finetune_lr without --init_from: pretraining as always, then a fresh AdamW at that constant rate."""
    out = tmp_path / "run"
    assert train.main([f"--out_dir={out}", "--method=baseline", "--max_steps=10", "--finetune_steps=3",
                       "--finetune_lr=3e-4", "--eval_interval=5", *SMALL]) == 0
    _, log = read_outputs(out)
    assert [r["lr"] for r in log if r["phase"] == "finetune"] == [3e-4]
    assert all(s["step"] == 3 for s in ckpt(out)["opt"]["state"].values())     # counted from fine-tuning
    assert train.lr_at(9, train.parse_args(["--finetune_lr=3e-4"], {k: getattr(train, k)
                                                                    for k in train.config_keys})) != 3e-4


def test_init_from_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """Uninterrupted vs stopped by SIGTERM after step 4 and resumed (--resume): the same logs and tensors."""
    run = pretrained(tmp_path, "soba")
    flags = [f"--init_from={run}", "--finetune_lr=2e-4", "--finetune_steps=10", "--eval_interval=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main([*flags, f"--out_dir={full}"]) == 0
    with monkeypatch.context() as m:
        sigterm_during_stop_check(m, 3)
        assert train.main([*flags, f"--out_dir={cut}"]) == 128 + signal.SIGTERM
    assert ckpt(cut)["step"] == 4
    assert train.main(["--resume", f"--out_dir={cut}"]) == 0
    (s_full, log_full), (s_cut, log_cut) = read_outputs(full), read_outputs(cut)
    assert without_timing(log_cut) == without_timing(log_full)
    assert s_cut["specific_test_loss_finetuned"] == s_full["specific_test_loss_finetuned"]
    a, b = tensors_of(ckpt(full)), tensors_of(ckpt(cut))
    assert a.keys() == b.keys() and all(torch.equal(t, b[k]) for k, t in a.items())


def test_init_from_a_resumed_run_starts_a_new_run(tmp_path):
    """A resumed run's checkpoint saves resume=True in its settings: --init_from must not inherit it (it
    would look for a checkpoint in the new out_dir and stop)."""
    run = tmp_path / "run"
    assert train.main([f"--out_dir={run}", "--method=baseline", "--max_steps=4", "--eval_interval=2", *SMALL]) == 0
    assert train.main(["--resume", f"--out_dir={run}", "--max_steps=4", "--finetune_steps=2"]) == 0
    assert ckpt(run)["config"]["resume"] is True
    out = tmp_path / "ft"
    assert train.main([f"--init_from={run}", "--finetune_lr=1e-4", "--finetune_steps=2", "--eval_interval=1",
                       f"--out_dir={out}"]) == 0
    summary, log = read_outputs(out)
    assert summary["config"]["resume"] is False and [r["step"] for r in log] == [0, 1, 2]


def test_init_from_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    run = pretrained(tmp_path)
    out = tmp_path / "ft"
    cases = {"--n_layer": ["--n_layer=2", "--finetune_lr=1e-3"],      # θ's shape is RUN's
             "--finetune_lr": ["--finetune_steps=5"],                  # a constant rate must be given
             "--init_from": ["--finetune_lr=1e-3"]}
    for flag, extra in cases.items():
        src = tmp_path / "missing" if flag == "--init_from" else run
        capsys.readouterr()
        assert train.main([f"--init_from={src}", f"--out_dir={out}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {flag}"), err
        assert not out.exists()
