"""Resumable evaluations (hahnet.eval.journal): an evaluation stopped mid-way reuses the
attack rows and batches it finished and ends with the numbers of one that never stopped;
a row is reused only for the same model, images, settings and inputs, a batch only within
such a row; a damaged row is ignored;
`hahnet eval` and a sweep keep the rows until their report is written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_cifar, make_random_uint8, make_tiny_net
from hahnet.config import EvalSettings
from hahnet.eval.journal import Journal, model_digest, tensor_digest
from hahnet.eval.results import AttackResult, EpsSweep, jsonable
from hahnet.eval.runner import SHARED_ROWS, evaluate_model

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
SETTINGS = EvalSettings(suite="adaptive", norms=("Linf",), noise_sigmas=(), layer_stats=False,
                        attack_limit=None, eps_linf=16 / 255, apgd_steps=4, pgd_steps=2,
                        pgd_restarts=1, square_limit=4, square_queries=10, attack_batch_size=8,
                        adaptive_limit=8, sweep_limit=4, sweep_eps_linf=(8 / 255, 32 / 255),
                        restarts=1, transfer_steps=2, bpda=("sigmoid",))


class Stop(Exception):
    """Stands for a kill: raised when a chosen attack phase starts."""


def data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    return make_random_uint8(n, seed=3), torch.arange(n) % CLASSES


def evaluate(journal: Journal | None = None, stop_at: str | None = None,
             opened: list[str] | None = None, settings: EvalSettings = SETTINGS,
             model: torch.nn.Module | None = None, stop_after: int = 0,
             sizes: dict[str, list[int]] | None = None):
    """``stop_at``: stop when that phase opens, or after its first ``stop_after`` batches;
    ``sizes`` gets each phase's batch sizes."""
    def progress(phase: str, total: int):
        if opened is not None:
            opened.append(phase)
        if phase == stop_at and not stop_after:
            raise Stop
        done = []
        if sizes is not None:
            sizes[phase] = done

        def batch(n: int) -> None:
            done.append(n)
            if phase == stop_at and len(done) == stop_after:
                raise Stop
        return batch

    x, y = data()
    return evaluate_model(model or make_tiny_net(True, CLASSES), x, y, settings,
                          progress=progress, journal=journal,
                          sources=[("plain", make_tiny_net(False, CLASSES))])


def without_seconds(value):
    """The JSON form without wall times (they differ between runs of the same thing)."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    return [without_seconds(v) for v in value] if isinstance(value, list) else value


def attacks_json(result) -> dict:
    return without_seconds(json.loads(json.dumps(jsonable(result.attacks))))


def stopped_in_and_resumed(tmp_path, settings: EvalSettings, phase: str):
    """Stop an evaluation after the first batch of ``phase``; what its journal then held
    (rows, batches) and the evaluation resumed from it."""
    journal = Journal(tmp_path)
    with pytest.raises(Stop):
        evaluate(journal, settings=settings, stop_at=phase, stop_after=1)
    saved = (journal.saved_rows(), journal.saved_batches())
    return saved, evaluate(Journal(tmp_path), settings=settings)


@pytest.fixture(scope="module")
def whole():
    """The evaluation run from start to end without a journal."""
    return evaluate()


def test_a_stopped_evaluation_resumes_and_equals_one_that_never_stopped(whole, tmp_path):
    journal = Journal(tmp_path / "partial")
    with pytest.raises(Stop):
        evaluate(journal, stop_at="BPDA Linf")
    assert journal.saved_rows() == 4  # APGD, PGD, Square, margin finished before the stop
    resumed, opened = [], []
    again = evaluate(Journal(tmp_path / "partial", on_resume=resumed.append), opened=opened)
    assert resumed == ["APGD Linf", "PGD Linf", "Square Linf", "margin Linf"]
    assert not {"APGD Linf", "PGD Linf", "Square Linf", "margin Linf"} & set(opened)
    assert {"BPDA Linf", "transfer Linf"} <= set(opened)
    assert attacks_json(again) == attacks_json(whole)
    assert again.attacks["Linf"].apgd.seconds == pytest.approx(
        whole.attacks["Linf"].apgd.seconds, rel=10)  # the saved row keeps its own time
    assert journal.saved_rows() == 8  # + BPDA, transfer, two sweeps
    journal.clear()
    assert not (tmp_path / "partial").exists()


def test_a_row_stopped_midway_resumes_from_its_last_finished_batch(whole, tmp_path):
    journal = Journal(tmp_path / "partial")
    with pytest.raises(Stop):  # 12 attacked images in batches of 8: stopped after the first
        evaluate(journal, stop_at="APGD Linf", stop_after=1)
    assert (journal.saved_rows(), journal.saved_batches()) == (0, 1)
    assert journal.saved_summary() == "1 batch(es) of an unfinished row"
    seconds = journal.saved_seconds()  # what `hahnet sweep --status` subtracts, per norm
    assert set(seconds) == {"Linf"} and seconds["Linf"] > 0
    again = evaluate(Journal(tmp_path / "partial"))
    assert attacks_json(again) == attacks_json(whole)
    assert journal.saved_batches() == 0  # each row's batches go once the row is saved
    assert journal.saved_rows() == 8


def test_a_cascaded_row_stopped_midway_resumes_from_its_last_finished_batch(tmp_path):
    """With ``cascade`` the adaptive rows attack the survivors gathered into batches; a
    stop inside BPDA keeps its first batch, and the resumed evaluation equals a whole one."""
    settings = EvalSettings(**{**SETTINGS.__dict__, "cascade": True, "eps_linf": 1 / 255,
                               "attack_batch_size": 2, "adaptive_limit": 12, "sweep_limit": 0})
    whole_cascade = evaluate(settings=settings)
    assert sum(whole_cascade.attacks["Linf"].adaptive.rows["margin"].robust) >= 3  # 2+ batches
    saved, again = stopped_in_and_resumed(tmp_path, settings, "BPDA Linf")
    assert saved == (4, 1)
    assert attacks_json(again) == attacks_json(whole_cascade)


def test_adaptive_rows_are_saved_in_their_own_smaller_batches(tmp_path):
    """``adaptive_batch_size`` splits the rows beyond the paper suite into smaller batches,
    each saved as it finishes (a wide network's margin row loses less when stopped), while
    the paper's APGD row keeps ``attack_batch_size``; a stop resumes to the whole result."""
    settings = EvalSettings(**{**SETTINGS.__dict__, "cascade": True, "eps_linf": 1 / 255,
                               "adaptive_limit": 12, "sweep_limit": 0, "adaptive_batch_size": 2})
    sizes: dict[str, list[int]] = {}
    whole_small = evaluate(settings=settings, sizes=sizes)
    assert sizes["APGD Linf"] == [8, 4]
    assert len(sizes["margin Linf"]) >= 2 and max(sizes["margin Linf"]) == 2
    saved, again = stopped_in_and_resumed(tmp_path, settings, "margin Linf")
    assert saved == (3, 1)
    assert attacks_json(again) == attacks_json(whole_small)


@pytest.mark.parametrize("same_model", [True, False])
def test_a_saved_batch_is_reused_only_within_the_same_row(whole, tmp_path, same_model):
    journal = Journal(tmp_path)
    with pytest.raises(Stop):
        evaluate(journal, stop_at="APGD Linf", stop_after=1)
    (path,) = tmp_path.glob("batches/*/*.json")
    document = json.loads(path.read_text())
    assert len(document["value"]["codes"]) == 8
    document["value"]["codes"] = [2] * 8  # marked misclassified clean: visible if reused
    path.write_text(json.dumps(document))
    model = make_tiny_net(True, CLASSES)
    if not same_model:  # the attack call is the same; only the row's key sees the weights
        with torch.no_grad():
            model.classifier.bias[0] += 1e-6
    apgd = evaluate(Journal(tmp_path), model=model).attacks["Linf"].apgd
    if same_model:
        assert apgd.broken_by[:8] == ["clean"] * 8 and not any(apgd.robust[:8])
    else:  # computed afresh: some of the 8 are broken by APGD, as in the whole evaluation
        assert "APGD-CE" in whole.attacks["Linf"].apgd.broken_by[:8]
        assert apgd.broken_by[:8] != ["clean"] * 8


@pytest.mark.parametrize("change", ["settings", "weights", "images", "source"])
def test_rows_are_reused_only_when_made_the_same_way(tmp_path, change):
    evaluate(Journal(tmp_path))
    resumed = []
    journal = Journal(tmp_path, on_resume=resumed.append)
    if change == "settings":
        evaluate(journal, settings=EvalSettings(**{**SETTINGS.__dict__, "apgd_steps": 3}))
        assert resumed == []
    elif change == "weights":
        model = make_tiny_net(True, CLASSES)
        with torch.no_grad():
            model.classifier.bias[0] += 1e-6
        evaluate(journal, model=model)
        assert resumed == []
    elif change == "images":
        x, y = data()
        x[0, 0, 0, 0] ^= 1
        evaluate_model(make_tiny_net(True, CLASSES), x, y, SETTINGS, journal=journal,
                       sources=[("plain", make_tiny_net(False, CLASSES))])
        assert resumed == []
    else:  # another transfer source: only the transfer row is made again
        x, y = data()
        other = make_tiny_net(False, CLASSES)
        with torch.no_grad():
            other.classifier.weight.mul_(2)
        evaluate_model(make_tiny_net(True, CLASSES), x, y, SETTINGS, journal=journal,
                       sources=[("plain", other)])
        assert "transfer Linf" not in resumed and "BPDA Linf" in resumed
        assert len(resumed) == 7


def test_the_apgd_row_is_shared_by_evaluations_that_differ_only_elsewhere(tmp_path):
    """Every suite runs the paper's APGD first on the same attacked images: the paper suite's
    row, saved, is the adaptive suite's (a sweep's [eval] and [adaptive] of one checkpoint
    share their journal); the rows keyed by every setting are not, nor is APGD run with
    another batch size."""
    journal = Journal(tmp_path)
    adaptive = evaluate(journal).attacks["Linf"]
    journal.keep_only(SHARED_ROWS)  # what a sweep leaves for the [eval] still to run
    assert journal.saved_rows() == 1
    paper = EvalSettings(**{**SETTINGS.__dict__, "suite": "paper", "noise_sigmas": (0.1,)})
    resumed = []
    first = evaluate(Journal(tmp_path, on_resume=resumed.append), settings=paper).attacks["Linf"]
    assert resumed == ["APGD Linf"]
    assert first.apgd == adaptive.apgd  # the saved row, its wall time included
    assert first.adaptive is None and first.pgd.seconds != adaptive.pgd.seconds
    resumed.clear()
    evaluate(Journal(tmp_path, on_resume=resumed.append),
             settings=EvalSettings(**{**paper.__dict__, "attack_batch_size": 4}))
    assert resumed == []


def test_damaged_or_foreign_rows_are_ignored_not_fatal(whole, tmp_path):
    journal = Journal(tmp_path)
    evaluate(journal)
    files = sorted(tmp_path.glob("*.json"))
    files[0].write_text("{ cut off mid-wri")
    files[1].write_text(json.dumps({"format": "something else"}))
    document = json.loads(files[2].read_text())
    document["key"]["settings"]["apgd_steps"] = 99  # a row made another way
    files[2].write_text(json.dumps(document))
    resumed = []
    again = evaluate(Journal(tmp_path, on_resume=resumed.append))
    assert len(resumed) == 5
    assert attacks_json(again) == attacks_json(whole)


def test_journal_round_trips_rows_exactly_and_a_reader_writes_nothing(tmp_path):
    row = AttackResult("APGD", "Linf", 2 / 255, 3, 1 / 3, [True, False, False],
                       {"APGD-CE": 2 / 3, "APGD-T": 1 / 3}, 2 / 255, 1.5, {"steps": 100},
                       [None, "clean", "APGD-T"])
    sweep = EpsSweep("Linf", "APGD", 3, [0.01, 0.02], [float("nan"), 0.0], 2.0, {})
    calls = []
    reader = Journal(tmp_path, write=False)
    assert reader.recall("APGD", {"norm": "Linf"}, lambda _: calls.append(1) or row) == row
    assert reader.saved_rows() == 0
    writer = Journal(tmp_path)
    writer.recall("APGD", {"norm": "Linf"}, lambda _: row)
    writer.recall("sweep", {"norm": "Linf"}, lambda _: sweep)

    def never(_):
        raise AssertionError("recomputed a saved row")

    assert Journal(tmp_path).recall("APGD", {"norm": "Linf"}, never) == row
    back = Journal(tmp_path).recall("sweep", {"norm": "Linf"}, never)
    assert math.isnan(back.accuracy[0]) and back.accuracy[1:] == [0.0] and back.eps == sweep.eps
    assert Journal(None).recall("APGD", {}, lambda _: row) is row


def test_digests_see_every_bit():
    a = make_tiny_net(True, CLASSES)
    b = make_tiny_net(True, CLASSES)
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b.features[0].conv.weight.view(-1)[5] = torch.nextafter(
            b.features[0].conv.weight.view(-1)[5], torch.tensor(1.0))
    assert model_digest(a) != model_digest(b)
    x = torch.zeros(2, 3)
    assert tensor_digest(x) != tensor_digest(x.double()) != tensor_digest(x.reshape(3, 2))


def test_cli_eval_keeps_rows_until_the_report_is_written(tmp_path, capsys):
    from hahnet import vgg11
    from hahnet.cli import commands as cli
    from hahnet.cli.commands import build_parser, eval_settings
    from hahnet.training import checkpoint
    from hahnet.training.run import load_data

    folder = make_cifar(tmp_path / "data", n_train=20, n_test=12)
    torch.manual_seed(0)
    checkpoint.save_model(tmp_path / "hah", vgg11(hah=True, hah_layers=2, width=0.0625,
                                                  num_classes=4).eval(),
                          {"epoch": 0, "dataset": {"classes": ["a", "b", "c", "d"]}})
    out = tmp_path / "report"
    args = ["eval", str(tmp_path / "hah"), "--data", str(folder), "--cache-dir",
            str(tmp_path / "cache"), "--limit", "6", "--noise", "0.1", "--noise-draws", "1",
            "--attack-limit", "4", "--apgd-steps", "2", "--pgd-steps", "0", "--square-limit",
            "0", "--norms", "Linf,L2", "--threads", "1", "--out", str(out)]
    assert cli.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert not (out / "partial").exists()
    # What a run stopped after its two attack rows leaves: those rows in OUT/partial.
    model = checkpoint.load(str(tmp_path / "hah"))
    test = load_data(str(folder), str(tmp_path / "cache")).test.limit(6, 0)
    evaluate_model(model, test.images, test.labels, eval_settings(build_parser().parse_args(args)),
                   journal=Journal(out / "partial"))
    assert Journal(out / "partial").saved_rows() == 2
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "2 attack row(s) of an unfinished evaluation" in err
    assert "resumed: APGD Linf" in err and "resumed: APGD L2" in err
    assert not (out / "partial").exists()
    second = json.loads((out / "results.json").read_text())
    assert without_seconds(second["models"]) == without_seconds(first["models"])
