"""hahnet sweep: parsing and refusal of bad files, the whole grid run on a tiny data set
(two processes), reuse of finished runs and evaluations, resuming a half-trained run,
refusing a run directory trained with other settings, and the seed-paired gain."""

from __future__ import annotations

import json
import math

import pytest

from hahnet.cli import commands as cli
from hahnet.experiments import sweep as sw, sweep_summary
from hahnet.reporting import sweep as sweep_report
from conftest import TINY_SWEEP as BASE, TINY_SWEEP_EVAL as EVAL, make_cifar as write_cifar

EXTRA_RUN = """
[[runs]]
name = "hah-alphas-x2"
hah = true
alphas = [0.009, 0.005, 0.0026, 0.002, 0.0016, 0.001]
"""
SWEEP = BASE + EXTRA_RUN + EVAL


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete sweep: (sweep file, out dir, data dir, progress lines)."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_cifar(root / "data", n_train=60, n_test=8)
    file = root / "tiny.toml"
    file.write_text(SWEEP)
    lines: list[str] = []
    sw.run(sw.load(file), root / "out", str(data), cache_dir=str(root / "cache"), jobs=2,
           threads=1, progress=lines.append)
    return file, root / "out", data, lines


def test_parse_grid_runs_names_and_partners():
    spec = sw.loads(SWEEP, "tiny.toml")
    assert [r.key for r in spec.runs] == ["std-seed1", "std-seed2", "hah-seed1", "hah-seed2",
                                          "hah-alphas-x2-seed1", "hah-alphas-x2-seed2"]
    assert spec.runs[2].config.hah and spec.runs[2].config.seed == 1
    assert spec.settings.pgd_steps == 0 and spec.settings.square_limit == 0
    assert spec.epochs_of(spec.runs[0]) == (1, 2)
    assert sw.partner(spec, "hah") == "std" and sw.partner(spec, "hah-alphas-x2") == "std"


@pytest.mark.parametrize("text, message", [
    ("seeds = []", "seeds must be a non-empty list"),
    ("[train]\nwidht = 1.0", r"unknown training setting\(s\) \['widht'\]"),
    ("[grid]\nwidth = 0.5", "every entry is a non-empty list"),
    ("[eval]\nsplit = 'train'", "split must be 'holdout' or 'test'"),
    ("[eval]\nattack_limt = 3", r"unknown setting\(s\) \['attack_limt'\]"),
    ("[train]\nepochs = 0", "epochs must be >= 1"),
    ("[[runs]]\nhah = true", "needs a name"),
    ("bogus = 1", r"unknown top-level key\(s\) \['bogus'\]"),
    ("[adaptive]\nlimit = 3", r"\['limit'\] set\(s\) the images, which \[adaptive\] shares"),
    ("[adaptive]\nseeds = [9]", r"seeds must be a list of the sweep's seeds \[2022\]"),
    ("[adaptive]\nattacks = 'paper'", 'attacks must be "adaptive" or "all"'),
    ("[adaptive]\nrestart = 1", r"\[adaptive\]: unknown setting\(s\) \['restart'\]"),
    ("[adaptive]\nrestarts = 0", r"\[adaptive\]: .*restarts must be >= 1"),
    ("adaptive = 1", r"\[adaptive\]: must be a table"),
])
def test_bad_sweep_files_are_refused_with_the_reason(text, message):
    with pytest.raises(sw.SweepError, match=message):
        sw.loads(text, "bad.toml")


def test_eval_attacks_key_chooses_the_suite():
    assert sw.loads(BASE + EVAL + 'attacks = "adaptive"').settings.suite == "adaptive"
    off = sw.loads(BASE + EVAL + "attacks = false").settings
    assert not off.attacks and off.suite == "paper"
    with pytest.raises(sw.SweepError, match="attacks must be one of paper, standard"):
        sw.loads(BASE + EVAL + "attacks = 3")
    with pytest.raises(ValueError, match="suite must be one of paper"):
        sw.loads(BASE + EVAL + 'attacks = "strong"')


def test_sweep_evaluation_runs_the_chosen_suite(finished, tmp_path):
    """A sweep file's `attacks = "standard"` reaches the evaluation: AutoAttack continues
    the paper's cascade, and the sweep's metrics carry the worst case."""
    _, out, data, _ = finished
    spec = sw.loads(BASE + EVAL + 'attacks = "standard"\nfab_steps = 2\nautoattack_queries = 10')
    run = spec.runs[1]
    target = tmp_path / "eval.json"
    sw.eval_task(str(sw.run_dir(out, run)), str(target), spec.settings.to_dict(), spec.split,
                 spec.limit, spec.limit_seed, str(data), str(tmp_path / "cache"), 1, "cpu")
    result = sw.read_eval(target)
    adaptive = result.attacks["Linf"].adaptive
    assert list(adaptive.rows) == ["AutoAttack"]
    assert list(adaptive.rows["AutoAttack"].stages) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    metrics = sweep_summary.metrics_of(result)
    assert metrics["worst_linf"] == adaptive.worst.accuracy <= metrics["apgd_linf"]


def test_sweep_evaluation_resumes_from_the_rows_a_stopped_one_saved(finished, tmp_path,
                                                                     monkeypatch):
    """A sweep's evaluation keeps its attack rows beside its target until the target is
    written, and reuses them: a row saved by a stopped evaluation (here marked by an
    accuracy no attack gives) is what the next one reports."""
    from hahnet.eval.journal import Journal

    _, out, data, _ = finished
    spec = sw.loads(BASE + EVAL)
    target = tmp_path / "eval.json"
    args = (str(sw.run_dir(out, spec.runs[1])), str(target), spec.settings.to_dict(),
            spec.split, spec.limit, spec.limit_seed, str(data), str(tmp_path / "cache"), 1, "cpu")
    with monkeypatch.context() as m:
        m.setattr(Journal, "clear", lambda self: None)  # as if stopped before the end
        sw.eval_task(*args)
    rows = sorted(target.with_suffix(".partial").glob("*.json"))
    assert len(rows) == len(spec.settings.norms)
    for row in rows:
        document = json.loads(row.read_text())
        document["value"]["accuracy"] = 0.123
        row.write_text(json.dumps(document))
    sw.eval_task(*args)
    result = sw.read_eval(target)
    assert [suite.apgd.accuracy for suite in result.attacks.values()] == [0.123] * len(rows)
    assert not target.with_suffix(".partial").exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(sw.SweepError, match="no sweep file at"):
        sw.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(sw.SweepError, match="is not valid TOML"):
        sw.load(tmp_path / "bad.toml")


def test_whole_sweep_trains_evaluates_and_reports_progress(finished):
    file, out, _, lines = finished
    spec = sw.load(file)
    assert lines[0].startswith("tiny: 6 runs, 0 of 18 tasks already done; 6 to train, 12 to evaluate")
    assert lines[-1].startswith("[18/18] evaluated ") and "ETA 0 min" in lines[-1]
    for run in spec.runs:
        assert (sw.run_dir(out, run) / "snapshots" / "epoch1.safetensors").exists()
        for epoch in (1, 2):
            assert sw.eval_file(out, run, epoch).exists()


def test_summary_gain_is_paired_by_seed(finished):
    file, out, _, _ = finished
    spec = sw.load(file)
    summary = sweep_summary.summarise(spec, out)
    per = {(r["name"], r["seed"], r["epoch"]): r["metrics"] for r in summary["runs"]}
    assert len(per) == 12
    gain = next(g for g in summary["gains"] if g["name"] == "hah" and g["epoch"] == 2)
    assert gain["baseline"] == "std" and gain["seeds"] == [1, 2]
    for key in ("clean", "noise0.1", "apgd_linf", "apgd_l2"):
        diffs = [per[("hah", s, 2)][key] - per[("std", s, 2)][key] for s in (1, 2)]
        assert gain["metrics"][key]["values"] == pytest.approx(diffs)
        assert gain["metrics"][key]["mean"] == pytest.approx(sum(diffs) / 2)
        assert gain["metrics"][key]["sd"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2))
    row = next(t for t in summary["table"] if t["name"] == "std" and t["epoch"] == 1)
    assert row["seeds"] == 2 and row["metrics"]["clean"]["values"] == \
        [per[("std", s, 1)]["clean"] for s in (1, 2)]
    hah_curve = summary["curves"]["hah"]
    assert [c["epoch"] for c in hah_curve] == [1, 2] and len(hah_curve[0]["grad_ratios"]) == 6
    assert summary["curves"]["std"][0]["grad_ratios"] == []


def test_summary_takes_training_state_from_the_evaluated_checkpoint(finished, tmp_path):
    """A run folder whose log is another training of that run (retrained elsewhere) does
    not lend its training accuracy or gradient ratios to an evaluation it did not make."""
    import shutil
    file, out, _, _ = finished
    spec = sw.load(file)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run = next(r for r in spec.runs if r.key == "hah-seed1")
    log = sw.run_dir(copy, run) / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "train_acc": 0.0, "grad_ratios": [9.0] * 6}) + "\n"
                           for r in rows))
    summary = sweep_summary.summarise(spec, copy)
    for epoch in (1, 2):
        own = sw.read_eval(sw.eval_file(copy, run, epoch)).info["metrics"]
        entry = next(r for r in summary["runs"]
                     if (r["name"], r["seed"], r["epoch"]) == ("hah", 1, epoch))
        assert entry["metrics"]["train_acc"] == own["train_acc"] > 0
        assert entry["grad_ratios"] == own["grad_ratios"] != [9.0] * 6


def test_second_run_reuses_everything_and_cli_writes_the_report(finished, capsys):
    file, out, data, _ = finished
    before = {p: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    assert cli.main(["sweep", str(file), "--out", str(out), "--data", str(data), "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert "18 of 18 tasks already done; 0 to train, 0 to evaluate" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "evals").iterdir()} == before
    report = (out / "report.md").read_text()
    assert "| hah | std | 2 | 2 |" in report and (out / "metrics.png").exists()
    assert json.loads((out / "results.json").read_text())["sweep"] == "tiny"


def test_run_with_other_settings_is_refused_before_any_work(finished, tmp_path, capsys):
    file, out, data, _ = finished
    changed = tmp_path / "tiny.toml"
    changed.write_text(SWEEP.replace("epochs = 2", "epochs = 3"))
    before = sorted(p.name for p in (out / "evals").iterdir())
    assert cli.main(["sweep", str(changed), "--out", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run with other settings (epochs 2 there vs 3 wanted)" in err[0]
    assert sorted(p.name for p in (out / "evals").iterdir()) == before


ADAPTIVE = """
[adaptive]
seeds = [1]
epochs = [2]
norms = ["Linf"]
restarts = 1
adaptive_limit = 2
transfer_steps = 2
bpda = ["identity"]
sweep_limit = 0
cascade = true
"""


def test_adaptive_section_plans_attacks_with_transfer_between_partners(finished, tmp_path):
    """``[adaptive]`` adds one task per chosen seed and epoch, each after the runs it
    transfers from; it inherits ``[eval]``'s settings except those it sets."""
    spec = sw.loads(SWEEP + ADAPTIVE)
    assert spec.adaptive.settings.suite == "adaptive" and spec.adaptive.settings.norms == ("Linf",)
    assert spec.adaptive.settings.apgd_steps == spec.settings.apgd_steps == 2
    assert spec.settings.suite == "paper"
    _, out, _, _ = finished
    trains, evals = sw.plan(spec, out)
    assert trains == [] and {t.label: [s.key for s in t.sources] for t in evals} == {
        "std-seed1@2 (adaptive)": ["hah-seed1", "hah-alphas-x2-seed1"],
        "hah-seed1@2 (adaptive)": ["std-seed1"],
        "hah-alphas-x2-seed1@2 (adaptive)": ["std-seed1"]}
    assert next(t for t in evals if t.run.key == "hah-seed1").needs == ("hah-seed1", "std-seed1")
    untransferred = sw.loads(SWEEP + ADAPTIVE + "transfer = false")
    assert all(t.sources == () for t in sw.plan(untransferred, out)[1])
    assert sw.plan(sw.loads(SWEEP), out) == ([], [])


def test_adaptive_evaluation_adds_the_worst_case_to_the_summary(finished, tmp_path, capsys):
    import shutil

    _, out, data, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    file = tmp_path / "tiny.toml"
    file.write_text(SWEEP + ADAPTIVE)
    assert cli.main(["sweep", str(file), "--out", str(copy), "--data", str(data), "--jobs", "2"]) == 0
    assert "18 of 21 tasks already done; 0 to train, 3 to evaluate" in capsys.readouterr().err
    spec = sw.load(file)
    hah, std = spec.runs[2], spec.runs[0]
    record = json.loads(sw.adaptive_file(copy, hah, 2).read_text())
    assert record["transfer_from"] == ["std-seed1"]
    result = sw.read_eval(sw.adaptive_file(copy, hah, 2))
    rows = result.attacks["Linf"].adaptive.rows
    assert rows["transfer"].params["sources"] == ["std-seed1"] and "BPDA" in rows
    summary = sweep_summary.summarise(spec, copy)
    per = {(r["name"], r["seed"], r["epoch"]): r["metrics"] for r in summary["runs"]}
    assert "worst_linf" not in per[("hah", 2, 2)] and "worst_linf" not in per[("hah", 1, 1)]
    for name in ("std", "hah", "hah-alphas-x2"):
        metrics = per[(name, 1, 2)]
        assert metrics["worst_linf"] <= metrics["apgd_linf"]  # APGD is among the attacks
    gain = next(g for g in summary["gains"] if g["name"] == "hah" and g["epoch"] == 2)
    assert gain["metrics"]["worst_linf"]["n"] == 1 and gain["metrics"]["clean"]["n"] == 2
    assert gain["metrics"]["worst_linf"]["mean"] == pytest.approx(
        per[("hah", 1, 2)]["worst_linf"] - per[("std", 1, 2)]["worst_linf"])
    report = (copy / "report.md").read_text()
    assert "(n=1)" in report and "`[adaptive]` evaluation: seeds 1, epochs 2" in report
    assert "cascaded" in report and result.settings["cascade"]
    before = sw.adaptive_file(copy, std, 2).stat().st_mtime_ns
    assert sw.plan(spec, copy) == ([], [])  # reused: same checkpoint, settings and sources
    assert sw.adaptive_file(copy, std, 2).stat().st_mtime_ns == before
    other = sw.loads(SWEEP + ADAPTIVE.replace("restarts = 1", "restarts = 2"))
    assert len(sw.plan(other, copy)[1]) == 3


def test_eval_and_adaptive_of_one_checkpoint_share_the_apgd_row(finished, tmp_path):
    """Run one after the other, a checkpoint's [adaptive] and [eval] evaluations compute the
    paper's APGD row once (the second reads the first's, wall time and all) and remove
    their shared journal once both are written."""
    import shutil

    _, out, data, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    spec = sw.loads(SWEEP + ADAPTIVE)
    chosen = [r for r in spec.runs if r.seed == 1]
    for run in chosen:
        sw.eval_file(copy, run, 2).unlink()
    sw.run(spec, copy, str(data), cache_dir=str(tmp_path / "cache"), jobs=1)
    for run in chosen:
        paper = sw.read_eval(sw.eval_file(copy, run, 2)).attacks["Linf"]
        adaptive = sw.read_eval(sw.adaptive_file(copy, run, 2)).attacks["Linf"]
        assert paper.apgd == adaptive.apgd and paper.adaptive is None
        assert adaptive.adaptive.worst.accuracy <= adaptive.apgd.accuracy
        assert not sw.journal_dir(copy, run, 2).exists()
    assert sw.sibling_results(spec, copy, sw.Task("eval", chosen[0], 1)) == []
    assert sw.sibling_results(spec, copy, sw.Task("eval", chosen[0], 2)) == [
        sw.adaptive_file(copy, chosen[0], 2)]


def test_an_evaluation_waits_for_its_running_sibling_while_other_work_can_start():
    """Beside a running [adaptive] evaluation of a checkpoint, the scheduler starts other
    work before that checkpoint's [eval] (which would otherwise attack the APGD row again),
    but starts it rather than leave a process idle; training still gates evaluations."""
    spec = sw.loads(SWEEP + ADAPTIVE)
    std, hah = spec.runs[0], spec.runs[2]
    adaptive, paper = sw.Task("adaptive", hah, 2, sources=(std,)), sw.Task("eval", hah, 2)
    other = sw.Task("eval", std, 2)
    assert sw.next_task([paper, other], [adaptive]) is other
    assert sw.next_task([paper], [adaptive]) is paper
    assert sw.next_task([paper, other], [sw.Task("adaptive", hah, 1)]) is paper
    assert sw.next_task([paper, other], []) is paper
    assert sw.next_task([paper, other], [sw.Task("train", hah)]) is other
    assert sw.next_task([paper], [sw.Task("train", hah)]) is None


def test_half_trained_run_is_resumed_not_restarted(tmp_path):
    import torch

    from hahnet.data.datasets import load_dataset
    from hahnet.training.trainer import EpochMetrics, Trainer

    data = write_cifar(tmp_path / "data", n_train=60, n_test=8)
    text = (BASE + EVAL).replace("seeds = [1, 2]", "seeds = [1]")
    spec = sw.loads(text.replace("hah = [false, true]", "hah = [true]"), "one")
    run = spec.runs[0]
    trainer = Trainer(run.config, load_dataset(data), sw.run_dir(tmp_path, run), torch.device("cpu"))
    loss, acc, _ = trainer.train_epoch(0)  # the first epoch only, as a killed run leaves it
    trainer.save(0, EpochMetrics(0, 1e-3, loss, acc, 0.0, "holdout", [], 1.0, 1.0))
    trains, evals = sw.plan(spec, tmp_path)
    assert [t.label for t in trains] == ["hah-seed1"] and len(evals) == 2
    sw.run(spec, tmp_path, str(data), jobs=1)
    lines = [json.loads(l) for l in (sw.run_dir(tmp_path, run) / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1] and lines[0]["seconds"] == 1.0


def test_status_says_what_is_left_and_estimates_it_from_the_closest_measurement(
        finished, tmp_path, monkeypatch):
    """``--status`` reads the directory alone: a finished sweep has nothing left; a cut
    history, a missing run, a missing evaluation and one stopped after saving its attack
    rows are each estimated from their own run, else the same setting's other seed."""
    import shutil

    from hahnet.eval.journal import Journal
    from hahnet.experiments import sweep_status

    file, out, data, _ = finished
    spec = sw.load(file)
    rows = sweep_status.status(spec, out)
    assert len(rows) == 18 and {r.state for r in rows} == {"done"}
    assert sweep_status.seconds_left(rows) == (0.0, 0)

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    runs = {r.key: r for r in spec.runs}
    metrics = sw.run_dir(copy, runs["std-seed2"]) / "metrics.jsonl"
    first = metrics.read_text().splitlines()[0]
    metrics.write_text(first + "\n")  # a run stopped after its first epoch
    shutil.rmtree(sw.run_dir(copy, runs["hah-alphas-x2-seed2"]))
    for epoch in (1, 2):
        sw.eval_file(copy, runs["hah-alphas-x2-seed2"], epoch).unlink()
    hah = runs["hah-seed1"]
    sw.eval_file(copy, hah, 1).unlink()

    def seconds(path):
        return sum(json.loads(path.read_text())["result"]["seconds"].values())

    with monkeypatch.context() as m:  # evaluated, but stopped before the result was written
        m.setattr(Journal, "clear", lambda self: None)
        sw.eval_task(str(sw.run_dir(copy, hah)), str(sw.eval_file(copy, hah, 2)),
                     spec.settings.to_dict(), spec.split, spec.limit, spec.limit_seed,
                     str(data), str(tmp_path / "cache"), 1, "cpu")
    journal = Journal(sw.eval_file(copy, hah, 2).with_suffix(".partial"))
    saved = journal.saved_seconds()
    assert journal.saved_rows() == 2 and set(saved) == {"Linf", "L2"} and min(saved.values()) > 0
    sw.eval_file(copy, hah, 2).unlink()

    by = {r.label: r for r in sweep_status.status(spec, copy)}
    assert (by["std-seed2"].state, by["std-seed2"].progress) == ("partial", "epoch 1 of 2")
    assert by["std-seed2"].seconds_left == pytest.approx(json.loads(first)["seconds"])
    waiting = by["hah-alphas-x2-seed2@1"]
    assert (waiting.state, waiting.progress) == ("to do", "after hah-alphas-x2-seed2")
    other_seed = [json.loads(line)["seconds"] for line in
                  (sw.run_dir(copy, runs["hah-alphas-x2-seed1"]) / "metrics.jsonl").read_text().splitlines()]
    missing = by["hah-alphas-x2-seed2"]
    assert (missing.state, missing.progress) == ("to do", "2 epochs")
    assert missing.seconds_left == pytest.approx(sum(other_seed))  # 2 x the median of 2 epochs
    assert by["hah-alphas-x2-seed2@2"].seconds_left == pytest.approx(
        sum(seconds(sw.eval_file(copy, runs["hah-alphas-x2-seed1"], e)) for e in (1, 2)) / 2)
    seed2 = (seconds(sw.eval_file(copy, runs["hah-seed2"], 1))
             + seconds(sw.eval_file(copy, runs["hah-seed2"], 2))) / 2
    assert (by["hah-seed1@1"].state, by["hah-seed1@1"].progress) == ("to do", "")
    assert by["hah-seed1@1"].seconds_left == pytest.approx(seed2)
    assert (by["hah-seed1@2"].state, by["hah-seed1@2"].progress) == ("partial", "2 attack row(s) saved")
    phases = [sweep_status._eval_seconds(copy, t) for t in sw.tasks(spec)
              if t.kind == "eval" and t.run.key == "hah-seed2"]
    attacks = {norm: sum(p[f"attacks_{norm}"] for p in phases) / 2 for norm in saved}
    rest = sum(v for p in phases for k, v in p.items() if not k.startswith("attacks_")) / 2
    assert by["hah-seed1@2"].seconds_left == pytest.approx(
        rest + sum(max(attacks[norm] - saved[norm], 0.0) for norm in saved))
    assert rest <= by["hah-seed1@2"].seconds_left < seed2  # what resuming measures again
    left, unknown = sweep_status.seconds_left(list(by.values()))
    assert unknown == 0 and left == pytest.approx(sum(r.seconds_left for r in by.values()))
    line = sweep_report.status_summary(list(by.values()), 7200.0, 1, 2)
    assert line == ("12 of 18 tasks done; about 2.0 h of compute left (about 60 min with 2 "
                    "processes, if it splits evenly), plus 1 task(s) not estimated yet "
                    "(nothing comparable measured)")
    assert sweep_report.status_summary(list(by.values()), 0.0, 6, 2) == (
        "12 of 18 tasks done; 6 left, none estimated yet (nothing comparable measured)")


def test_status_gives_each_evaluation_of_a_shared_folder_only_its_own_rows(
        finished, tmp_path, monkeypatch):
    """A checkpoint's [eval] and [adaptive] evaluations keep their rows in one folder; an
    [adaptive] evaluation stopped after its rows were saved leaves the [eval] one (still to
    run) only the APGD row they share, and nothing of it in the other norm."""
    import shutil
    from dataclasses import asdict
    from functools import partial

    from hahnet.eval.journal import Journal
    from hahnet.eval.runner import makes_row
    from hahnet.training import checkpoint
    from hahnet.experiments import sweep_status

    _, out, data, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    spec = sw.loads(SWEEP + ADAPTIVE)
    hah, std = spec.runs[2], spec.runs[0]
    adaptive = next(t for t in sw.tasks(spec) if t.kind == "adaptive" and t.run.key == hah.key)
    journal = sw.journal_dir(copy, hah, 2)
    with monkeypatch.context() as m:  # the rows are saved, the result is not
        m.setattr(Journal, "clear", lambda self: None)
        m.setattr(Journal, "keep_only", lambda self, rows: None)
        sw.eval_task(str(checkpoint.resolve(f"{sw.run_dir(copy, hah)}@2")),
                     str(sw.task_file(copy, adaptive)), asdict(spec.adaptive.settings),
                     spec.split, spec.limit, spec.limit_seed, str(data),
                     str(tmp_path / "cache"), 1, "cpu",
                     [(std.key, str(checkpoint.resolve(f"{sw.run_dir(copy, std)}@2")))],
                     journal=str(journal))
    sw.task_file(copy, adaptive).unlink()
    sw.eval_file(copy, hah, 2).unlink()
    rows = Journal(journal)
    everything = rows.saved_rows()
    assert everything >= 4  # APGD, margin, BPDA, transfer
    paper = partial(makes_row, spec.settings)
    assert rows.saved_rows(paper) == 1 and set(rows.saved_seconds(paper)) == {"Linf"}
    assert rows.saved_rows(partial(makes_row, spec.adaptive.settings)) == everything
    by = {r.label: r for r in sweep_status.status(spec, copy)}
    assert by["hah-seed1@2"].progress == "1 attack row(s) saved"
    assert by["hah-seed1@2 (adaptive)"].progress == f"{everything} attack row(s) saved"
    assert by["hah-seed1@2"].seconds_left > 0  # the l_2 row and the rest are still to run


def test_status_counts_a_resumed_evaluation_at_what_its_rows_cost(finished, tmp_path,
                                                                   monkeypatch):
    """An evaluation finished from its journal restores its attack rows in no time; as a
    measurement for ``--status`` it still counts what those rows cost when they ran (else
    it would promise the next checkpoint's evaluation in minutes)."""
    import shutil

    from hahnet.eval.journal import Journal
    from hahnet.experiments import sweep_status

    file, out, data, _ = finished
    spec = sw.load(file)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    hah = {r.key: r for r in spec.runs}["hah-seed1"]
    task = next(t for t in sw.tasks(spec) if t.kind == "eval" and t.run.key == hah.key
                and t.epoch == 2)
    target = sw.eval_file(copy, hah, 2)
    args = (str(sw.run_dir(copy, hah)), str(target), spec.settings.to_dict(), spec.split,
            spec.limit, spec.limit_seed, str(data), str(tmp_path / "cache"), 1, "cpu")
    target.unlink()
    with monkeypatch.context() as m:  # the first sitting: rows saved, result lost
        m.setattr(Journal, "clear", lambda self: None)
        sw.eval_task(*args)
    first = sw.read_eval(target)
    target.unlink()
    sw.eval_task(*args)  # the second sitting: every attack row from the journal
    resumed = sw.read_eval(target)
    rows = {norm: sweep_status._rows_seconds(suite) for norm, suite in first.attacks.items()}
    assert rows and min(rows.values()) > 0
    assert rows == {norm: sweep_status._rows_seconds(suite)
                    for norm, suite in resumed.attacks.items()}
    others = sum(v for k, v in resumed.seconds.items() if not k.startswith("attacks_"))
    phases = sweep_status._eval_seconds(copy, task)
    assert all(phases[f"attacks_{norm}"] >= seconds for norm, seconds in rows.items())
    assert sum(phases.values()) >= others + sum(rows.values())


def test_cli_status_prints_the_tasks_and_writes_nothing(finished, tmp_path, capsys):
    file, out, _, _ = finished
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert cli.main(["sweep", str(file), "--out", str(out), "--status"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| task | kind | state | progress | left |"
    assert "| hah-seed2@1 | eval | done | saved | - |" in printed
    assert printed[-1] == "18 of 18 tasks done: nothing left"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    for argv, message in [(["--status", "--report-only"], "drop --report-only"),
                          (["--status", "--compare", "width"], "drop --re-evaluate and --status")]:
        assert cli.main(["sweep", str(file), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert cli.main(["sweep", str(file), "--out", str(tmp_path / "none"), "--status"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sweep directory at" in err[0] and not (tmp_path / "none").exists()


def test_plots_keep_each_settings_colour_and_one_epoch_range(tmp_path, monkeypatch):
    """A metric measured for one setting at one epoch only (the worst case of HaH at the
    end) is drawn in that setting's colour, on the epoch range of the other panels."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    def row(name, epoch, keys):
        return {"name": name, "epoch": epoch,
                "metrics": {k: {"mean": 0.5, "sd": None} for k in keys}}

    table = [row("std", 13, ["clean"]), row("std", 40, ["clean"]),
             row("hah", 13, ["clean"]), row("hah", 40, ["clean", "worst_linf"])]
    drawn = Figure()
    monkeypatch.setattr(sweep_report, "figure", lambda path, draw, size: draw(drawn))
    sweep_report.plot_metrics({"table": table}, tmp_path / "metrics.png")
    panels = {ax.get_title(): ax for ax in drawn.axes}
    colours = {title: [to_hex(line.get_color()) for line in ax.get_lines()
                       if line.get_marker() == "o"] for title, ax in panels.items()}
    assert len(set(colours["clean"])) == 2
    assert colours["worst_linf"] == colours["clean"][1:]
    assert panels["worst_linf"].get_xlim() == panels["clean"].get_xlim()
