"""hahnet reproduce / presets: presets, saved evaluations read back exactly, reuse only of
matching runs and evaluations, and the whole command on a tiny data set."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hahnet.cli import commands as cli
from hahnet.reporting import evaluation as report
from hahnet import eval as evaluation
from hahnet.config import PAPER_EPS, parse_numbers
from hahnet.eval import attacks, metrics, results, runner
from hahnet.nn.hah import winners
from hahnet.experiments import reproduce as rp
from hahnet.experiments.presets import PRESETS, get_preset
from conftest import make_cifar as write_cifar
from conftest import make_random_uint8 as random_uint8
from conftest import make_tiny_net as tiny_net
from hahnet.training.rundir import RunDir

TINY = ["--width", "0.0625", "--epochs", "1", "--batch-size", "16", "--limit", "12", "--attack-limit", "3",
        "--apgd-steps", "2", "--square-limit", "2", "--noise", "0.1", "--threads", "1"]


def tiny_result(seed: int = 0) -> evaluation.results.EvalResult:
    images, labels = random_uint8(6, seed=seed), torch.arange(6) % 3
    settings = evaluation.EvalSettings(noise_sigmas=(0.05, 0.1), noise_draws=2, attack_limit=4,
                               apgd_steps=2, pgd_steps=2, pgd_restarts=1, square_limit=2,
                               square_queries=5)
    return runner.evaluate_model(tiny_net(), images, labels, settings, name="tiny",
                             info={"epoch": 3})


def test_presets_are_complete_and_valid():
    assert set(PRESETS) == {"paper", "cpu", "demo"}
    for preset in PRESETS.values():
        settings, limit = preset.eval_settings()
        assert settings.eps_linf == pytest.approx(2 / 255) and settings.eps_l2 == 0.25
        assert 0.1 in settings.noise_sigmas
        assert preset.train["arch"] == "vgg16" and preset.train["demote"] == 1.0
    assert get_preset("paper").train["width"] == 1.0 and get_preset("paper").train["epochs"] == 100
    assert get_preset("cpu").eval_settings()[1] is None  # clean and noise on all 10,000
    assert get_preset("cpu").eval_settings()[0].attack_limit == 1000
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of paper, cpu, demo"):
        get_preset("nope")
    with pytest.raises(ValueError, match="preset demo: .*bogus"):
        get_preset("demo").eval_settings(bogus=1)


def test_saved_results_read_back_to_the_same_report(tmp_path):
    result = tiny_result()
    report.write_report([result], tmp_path, {"path": "x", "name": "tiny"})
    (back,), data = evaluation.results.read_results(tmp_path / "results.json")
    assert data["name"] == "tiny"
    assert report.summary(back) == report.summary(result)
    for table in (report.main_table, report.noise_table, report.attack_table,
                  report.sparsity_table, report.snr_table):
        assert table([back]) == table([result])
    assert back.attacks["Linf"].apgd.robust == result.attacks["Linf"].apgd.robust
    assert back.filters == result.filters


@pytest.mark.parametrize("content, message", [
    (None, "no such results file"),
    ("{not json", "not a readable results.json"),
    ('{"format": "other"}', "not a hahnet evaluation"),
    ('{"format": "hahnet-eval-1", "models": [{"name": "x"}]}', "incomplete results"),
])
def test_bad_results_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        evaluation.results.read_results(path)
    assert "\n" not in str(error.value)


def test_a_saved_evaluation_is_reused_only_for_the_same_checkpoint_and_settings():
    settings = evaluation.EvalSettings(attack_limit=4)
    cached = replace(tiny_result(), settings=rp.settings_record(settings, 100),
                     info={"epoch": 3, "config": {"width": 0.25}})
    info = {"epoch": 3, "config": {"width": 0.25}}
    assert rp.reusable(cached, info, settings, 100)
    assert not rp.reusable(cached, info, settings, None)                       # other subset
    assert not rp.reusable(cached, info, replace(settings, apgd_steps=50), 100)  # other attack
    assert not rp.reusable(cached, {**info, "epoch": 4}, settings, 100)         # newer weights
    older = replace(cached, settings={k: v for k, v in cached.settings.items()
                                      if k not in ("suite", "restarts", "bpda")})
    assert rp.reusable(older, info, settings, 100)  # saved before the suites: the paper's ran
    assert not rp.reusable(older, info, replace(settings, suite="all"), 100)


def test_history_keeps_the_last_entry_of_each_epoch_and_rejects_broken_lines(tmp_path):
    lines = [{"epoch": 0, "train_acc": 0.1}, {"epoch": 1, "train_acc": 0.2},
             {"epoch": 1, "train_acc": 0.3}]  # epoch 1 logged again after a resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [e["train_acc"] for e in RunDir(tmp_path).history()] == [0.1, 0.3]
    assert RunDir(tmp_path / "missing").history() == []
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics line"):
        RunDir(tmp_path).history()


def test_reproduce_trains_evaluates_reports_and_reuses(tmp_path, capsys):
    data, out = write_cifar(tmp_path / "cifar"), tmp_path / "exp"
    argv = ["reproduce", "--preset", "demo", "--data", str(data), "--out", str(out)] + TINY
    argv += ["--attacks", "adaptive", "--restarts", "1", "--adaptive-limit", "2"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"report: {out / 'report.md'}" in captured.out
    assert "| Clean | 92.5% | 87.3% |" in captured.out
    text = (out / "report.md").read_text()
    assert "# Reproducing the paper: preset demo" in text and "## Training" in text
    assert "hahnet reproduce --preset demo" in text
    for name in ("training.png", "noise.png", "sparsity.png", "snr.png", "filters.png"):
        assert (out / name).stat().st_size > 1000
    results, _ = evaluation.results.read_results(out / "results.json")
    assert [r.name for r in results] == ["standard", "hah"]
    assert [r.model["hah"] for r in results] == [False, True]
    assert results[0].n_images == 12 and results[0].attacks["L2"].apgd.n_images == 3
    document = json.loads((out / "results.json").read_text())
    assert document["preset"] == "demo" and document["train"]["width"] == 0.0625
    transfer = [r.attacks["Linf"].adaptive.rows["transfer"] for r in results]  # each other's
    assert [list(t.stages) for t in transfer] == [["from hah", "from hah (BPDA sigmoid)"],
                                                  ["from standard"]]
    assert "## Adaptive attacks: the worst case per image" in text
    assert (out / "sweep-hah.png").stat().st_size > 1000

    before = (out / "results.json").read_text()
    assert cli.main(argv) == 0  # everything done: nothing is trained or evaluated again
    err = capsys.readouterr().err
    assert "standard: trained (1 epochs)" in err and "hah: reusing the evaluation" in err
    assert "APGD" not in err
    assert json.loads(before)["models"] == json.loads((out / "results.json").read_text())["models"]


def test_reproduce_refuses_a_run_directory_with_other_settings(tmp_path, capsys):
    data, out = write_cifar(tmp_path / "cifar"), tmp_path / "exp"
    argv = ["reproduce", "--data", str(data), "--out", str(out), "--no-attacks"] + TINY[:6]
    assert cli.main(argv + ["--limit-train", "20"]) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--limit-train", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hahnet reproduce: error: {out / 'standard'} holds a run with other settings "
                   f"(limit_train 20 there vs 30 wanted); pass another --out or delete "
                   f"{out / 'standard'}")


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "--preset", "huge"], "unknown preset 'huge'"),
    (["reproduce", "--hah"], "reproduce trains both networks; drop --hah"),
    (["reproduce", "--eval-batch-size", "0"], "argument --eval-batch-size: '0' is not an integer >= 1"),
    (["presets", "huge"], "unknown preset 'huge'"),
])
def test_reproduce_bad_options_are_one_line_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_presets_command_prints_every_setting(capsys):
    assert cli.main(["presets", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: A faithful scale-down")
    assert "train.width = 0.25" in out and "eval.attack_limit = 1000" in out


def test_eval_on_the_held_out_split_matches_the_accuracy_training_logged(tmp_path, capsys):
    data, run = write_cifar(tmp_path / "cifar"), tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(run), "--holdout", "0.2",
                     "--hah", "--width", "0.0625", "--epochs", "1", "--batch-size", "8",
                     "--threads", "1"]) == 0
    logged = RunDir(run).history()[-1]
    assert logged["eval_split"] == "holdout"
    assert cli.main(["eval", str(run), "--data", str(data), "--split", "holdout",
                     "--no-attacks", "--out", str(tmp_path / "rep"), "--threads", "1"]) == 0
    (result,), meta = evaluation.results.read_results(tmp_path / "rep" / "results.json")
    assert meta["split"] == "holdout" and result.n_images == 10  # 20% of 50 training images
    assert result.clean_accuracy == pytest.approx(logged["eval_acc"], abs=1e-12)

    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "plain"),
                     "--width", "0.0625", "--epochs", "1", "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "plain"), "--data", str(data), "--split",
                     "holdout"]) == 2
    assert "was trained without --holdout, so no training images are held out; evaluate it " \
           "with --split test" in capsys.readouterr().err
