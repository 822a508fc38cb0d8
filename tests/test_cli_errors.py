"""Every bad setting is refused before any work: exit status 2, one line on stderr naming
the flag, no traceback, nothing written."""

from __future__ import annotations

import pytest

from hahnet.cli import commands as cli

BAD = [  # argv (OUT = a fresh directory under tmp_path), words the one line must hold
    (["train", "--gamma", "-1"], "--gamma"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--no-hah", "--ratio", "0.5", "--keep", "0.3", "--sigma", "0.2"], "--no-hah"),
    (["train", "--ratio", "1.5"], "--ratio"),
    (["train", "--keep", "7"], "--keep"),
    (["train", "--sigma", "9e-9", "--sigma", "0"], "--sigma"),
    (["train", "--width", "0"], "--width"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--batch-size", "-3"], "--batch-size"),
    (["train", "--holdout", "1"], "--holdout"),
    (["train", "--snapshots", "0"], "--snapshots"),
    (["train", "--alphas", "x"], "--alphas"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--threads", "-1"], "--threads"),
    (["train", "--dist-timeout", "0"], "--dist-timeout"),
    (["train", "--resume", "RESUME"], "--out"),
    (["train", "--out", "FILE"], "is a file"),
    (["train", "--out", "EVALDIR"], "evaluation report"),
    (["eval", "CKPT", "--limit", "-5"], "--limit"),
    (["eval", "CKPT", "--attack-limit", "-1"], "--attack-limit"),
    (["eval", "CKPT", "--noise-draws", "0"], "--noise-draws"),
    (["eval", "CKPT", "--pgd-steps", "-1"], "--pgd-steps"),
    (["eval", "CKPT", "--eps-linf", "-1"], "--eps-linf"),
    (["eval", "CKPT", "--noise", "-0.1"], "--noise"),
    (["eval", "CKPT", "--threads", "0"], "--threads"),
    (["eval", "CKPT", "--out", "FILE"], "is a file"),
    (["eval", "CKPT", "--out", "RUNDIR"], "training run"),
    (["eval", "CKPT", "--attacks", "strong"], "--attacks"),
    (["eval", "CKPT", "--no-attacks", "--attacks", "all"], "--no-attacks"),
    (["eval", "CKPT", "--transfer-from", "CKPT"], "--attacks adaptive"),
    (["eval", "CKPT", "--attacks", "adaptive", "--bpda", "sigmoid,tanh"], "--bpda"),
    (["eval", "CKPT", "--attacks", "adaptive", "--bpda-temperature", "0"], "--bpda-temperature"),
    (["eval", "CKPT", "--attacks", "adaptive", "--restarts", "0"], "--restarts"),
    (["eval", "CKPT", "--attacks", "all", "--sweep-eps-l2", "0,1"], "--sweep-eps"),
    (["eval", "CKPT", "--norms", "Linf,L1"], "--norms"),
    (["report", "MISSING", "--out", "OUT"], "no such results file"),
    (["report", "EVALDIR", "--out", "EVALDIR"], "holds the input"),
    (["reproduce", "--attacks", "strong"], "--attacks"),
    (["reproduce", "--limit", "-5"], "--limit"),
    (["reproduce", "--attack-limit", "-1"], "--attack-limit"),
    (["reproduce", "--gamma", "-1"], "--gamma"),
    (["reproduce", "--ratio", "1.5"], "--ratio"),
    (["reproduce", "--threads", "0"], "--threads"),
    (["reproduce", "--eval-batch-size", "0"], "--eval-batch-size"),
    (["reproduce", "--out", "FILE"], "is a file"),
    (["reproduce", "--out", "RUNDIR"], "training run"),
    (["bench", "--sections", ""], "--sections"),
    (["bench", "--sections", "nope"], "--sections"),
    (["bench", "--width", "0"], "--width"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--threads", "-1"], "--threads"),
    (["bench", "--precision", "fp16"], "--precision"),
    (["bench", "--out", "OUT"], "directory"),
    (["bench", "--malloc", "tuned"], "whole process"),  # cli.main is not the entry point
    (["sweep", "SWEEP", "--jobs", "0"], "--jobs"),
    (["sweep", "SWEEP", "--threads", "0"], "--threads"),
    (["sweep", "MISSING"], "no sweep file"),
    (["sweep", "SWEEP", "--out", "FILE"], "is a file"),
]


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_setting_is_one_line_exit_2_nothing_written(argv, words, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a directory")
    (tmp_path / "EVALDIR").mkdir()
    (tmp_path / "EVALDIR" / "results.json").write_text("{}")
    (tmp_path / "RUNDIR").mkdir()
    (tmp_path / "RUNDIR" / "train_config.json").write_text("{}")
    (tmp_path / "RESUME").mkdir()
    (tmp_path / "SWEEP").write_text("name = 'x'\nseeds = [1]\n[grid]\nhah = [true]\n")
    (tmp_path / "OUT").mkdir()
    before = snapshot(tmp_path)
    argv = list(argv)
    if argv[0] == "train" and "--resume" in argv:
        argv += ["--out", "OTHER"]
    if argv[0] in ("train", "reproduce") and "--out" not in argv:
        argv += ["--out", "NEW"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err, err
    assert snapshot(tmp_path) == before
