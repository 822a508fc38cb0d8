"""hahnet sweep --compare: two tiny finished sweeps that differ in width (one at two seeds,
one at a single seed) compared side by side; the gains are each sweep's own paired gains,
other differences and non-training settings are refused, the report has one row per
width and its plots are written."""

from __future__ import annotations

import json
import statistics

import pytest

from hahnet.cli import commands as cli
from hahnet.experiments import sweep as sw, sweep_compare, sweep_summary
from hahnet.reporting import sweep_compare as compare_report
from conftest import TINY_SWEEP, TINY_SWEEP_EVAL, make_cifar as write_cifar

NARROW = TINY_SWEEP.replace('name = "tiny"', 'name = "narrow"') + TINY_SWEEP_EVAL
WIDE = NARROW.replace('name = "narrow"', 'name = "wide"').replace("seeds = [1, 2]", "seeds = [1]") \
    .replace("width = 0.0625", "width = 0.125")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """Two finished sweeps differing in width: [(file, sweep directory)] narrow first."""
    root = tmp_path_factory.mktemp("ladder")
    data = write_cifar(root / "data", n_train=60, n_test=8)
    entries = []
    for name, text in (("narrow", NARROW), ("wide", WIDE)):
        file = root / f"{name}.toml"
        file.write_text(text)
        sw.run(sw.load(file), root / name, str(data), cache_dir=str(root / "cache"), jobs=1)
        entries.append((file, root / name))
    return entries


def _summaries(entries):
    return [sweep_summary.summarise(sw.load(file), out) for file, out in entries]


def test_gains_are_each_sweeps_paired_gains_ordered_by_width(ladder):
    narrow, wide = _summaries(ladder)
    comparison = sweep_compare.compare([wide, narrow], by="width")
    assert [s["value"] for s in comparison["sweeps"]] == [0.0625, 0.125]
    assert comparison["snapshots"] == [sweep_compare.PRE_DROP, sweep_compare.LAST]
    rows = {(g["snapshot"], g["value"]): g for g in comparison["gains"]}
    # 2 epochs, lr drop after round(0.6 * 2) = 1: epoch 1 is the snapshot before it
    assert {(s, v): g["epoch"] for (s, v), g in rows.items()} == {
        (sweep_compare.PRE_DROP, 0.0625): 1, (sweep_compare.PRE_DROP, 0.125): 1,
        (sweep_compare.LAST, 0.0625): 2, (sweep_compare.LAST, 0.125): 2}
    for (snapshot, width), row in rows.items():
        summary = narrow if width == 0.0625 else wide
        per = {(r["name"], r["seed"], r["epoch"]): r["metrics"] for r in summary["runs"]}
        own = next(g for g in summary["gains"] if g["epoch"] == row["epoch"])
        assert row["seeds"] == own["seeds"] == ([1, 2] if width == 0.0625 else [1])
        for key in ("clean", "noise0.1", "apgd_linf", "apgd_l2", "train_acc"):
            diffs = [per[("hah", s, row["epoch"])][key] - per[("std", s, row["epoch"])][key]
                     for s in row["seeds"]]
            stats = row["metrics"][key]
            assert stats["values"] == pytest.approx(diffs) == own["metrics"][key]["values"]
            assert stats["mean"] == pytest.approx(statistics.fmean(diffs))
            assert stats["sd"] == (pytest.approx(statistics.stdev(diffs)) if len(diffs) > 1 else None)


def test_gradient_ratios_per_hah_layer_are_means_over_seeds(ladder):
    narrow, wide = _summaries(ladder)
    comparison = sweep_compare.compare([narrow, wide], by="width", epochs=[2])
    assert comparison["snapshots"] == ["epoch 2"]
    ratios = {r["value"]: r for r in comparison["grad_ratios"]}
    assert set(ratios) == {0.0625, 0.125} and all(r["name"] == "hah" for r in ratios.values())
    runs = [r for r in narrow["runs"] if r["name"] == "hah" and r["epoch"] == 2]
    layers = ratios[0.0625]["layers"]
    assert len(layers) == 6 and ratios[0.0625]["seeds"] == [1, 2]
    for i, stats in enumerate(layers):
        assert stats["mean"] == pytest.approx(statistics.fmean(r["grad_ratios"][i] for r in runs))
    assert ratios[0.125]["layers"][0]["n"] == 1 and ratios[0.125]["layers"][0]["sd"] is None


def test_a_second_difference_or_a_non_training_setting_is_refused(ladder, tmp_path):
    narrow, _ = _summaries(ladder)
    other = sweep_summary.summarise(sw.loads(WIDE.replace("batch_size = 16", "batch_size = 8")),
                                    tmp_path)
    with pytest.raises(sw.SweepError, match=r"^sweeps narrow and wide differ in batch_size of std "
                                            r"\(16 vs 8\) besides width"):
        sweep_compare.compare([narrow, other], by="width")
    evaluated = sweep_summary.summarise(sw.loads(WIDE.replace("limit = 8", "limit = 7")), tmp_path)
    with pytest.raises(sw.SweepError, match=r"differ in evaluation limit \(8 vs 7\) besides width"):
        sweep_compare.compare([narrow, evaluated], by="width")
    same = sweep_summary.summarise(sw.loads(WIDE.replace("batch_size = 16", "batch_size = 16\nlr = 0.001"
                                                         "\neval_batch_size = 7")), tmp_path)
    assert [s["value"] for s in sweep_compare.compare([narrow, same])["sweeps"]] == [0.0625, 0.125]
    with pytest.raises(sw.SweepError, match="sweeps narrow and narrow both have width = 0.0625"):
        sweep_compare.compare([narrow, narrow])
    with pytest.raises(sw.SweepError, match="'seed': not a training setting"):
        sweep_compare.compare([narrow], by="seed")
    with pytest.raises(sw.SweepError, match="sweep narrow varies hah inside itself"):
        sweep_compare.compare([narrow], by="hah")


def test_sweeps_may_differ_in_how_evaluations_are_batched_only(ladder):
    """Batch sizes move an attack's random draws, not what is measured: comparable; any
    other evaluation setting, [adaptive]'s included, is not."""
    narrow, wide = _summaries(ladder)
    adaptive = {"settings": {"restarts": 3, "adaptive_batch_size": None}, "epochs": [2]}
    narrow = {**narrow, "settings": {**narrow["settings"], "adaptive": adaptive}}
    batched = {**wide, "settings": {**wide["settings"], "attack_batch_size": 7, "batch_size": 5,
                                    "adaptive": {**adaptive, "settings": {
                                        "restarts": 3, "adaptive_batch_size": 16}}}}
    assert [s["value"] for s in sweep_compare.compare([narrow, batched])["sweeps"]] == [0.0625, 0.125]
    restarted = {**batched, "settings": {**batched["settings"], "adaptive": {
        **adaptive, "settings": {"restarts": 1, "adaptive_batch_size": 16}}}}
    with pytest.raises(sw.SweepError, match=r"differ in evaluation adaptive .* besides width"):
        sweep_compare.compare([narrow, restarted])


def test_cli_refuses_with_one_line(ladder, tmp_path, capsys):
    (narrow, narrow_out), (wide, wide_out) = ladder
    changed = tmp_path / "wide.toml"
    changed.write_text(wide.read_text().replace("epochs = 2\n", "epochs = 2\nlr = 0.01\n"))
    (tmp_path / "empty").mkdir()
    assert cli.main(["sweep", "--compare", "width", f"{narrow}={narrow_out}",
                     f"{changed}={tmp_path / 'empty'}", "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in lr of std (0.001 vs 0.01) besides width" in err[0]
    assert not (tmp_path / "report").exists()
    assert cli.main(["sweep", "--compare", "widht", str(narrow), "--out", str(tmp_path / "r")]) == 2
    assert "not a training setting" in capsys.readouterr().err


def test_cli_report_has_one_row_per_width_and_the_plots(ladder, tmp_path, capsys):
    (narrow, narrow_out), (wide, wide_out) = ladder
    out = tmp_path / "report"
    assert cli.main(["sweep", "--compare", "width", f"{narrow}={narrow_out}", f"{wide}={wide_out}",
                     "--out", str(out)]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    comparison = json.loads((out / "results.json").read_text())
    assert comparison["by"] == "width" and len(comparison["gains"]) == 4
    report = (out / "report.md").read_text()
    for snapshot in comparison["snapshots"]:
        table = compare_report.gains_table(comparison, snapshot)
        assert table in report
        rows = table.splitlines()[2:]
        assert [r.split(" | ")[0] for r in rows] == ["| 0.0625", "| 0.125"]
        assert " | 1 | " in rows[1] and " ± " not in rows[1] and " ± " in rows[0]
    for plot in ("gains.png", "grad_ratios.png"):
        assert (out / plot).stat().st_size > 10_000


def test_a_sweep_still_running_shows_which_seeds_are_evaluated(ladder):
    """The sweep file asks for seeds the output does not have yet: the report's sweep table
    names the evaluated ones beside the planned ones, and only those enter the gains."""
    (narrow, narrow_out), (wide, wide_out) = ladder
    growing = sw.loads(narrow.read_text().replace("seeds = [1, 2]", "seeds = [1, 2, 3]"))
    comparison = sweep_compare.compare([sweep_summary.summarise(growing, narrow_out),
                                        *_summaries([(wide, wide_out)])], by="width")
    narrow_row, wide_row = comparison["sweeps"]
    assert narrow_row["seeds"] == [1, 2, 3] and narrow_row["evaluated_seeds"] == [1, 2]
    assert all(g["seeds"] == [1, 2] for g in comparison["gains"] if g["value"] == 0.0625)
    report = compare_report.render_markdown(comparison)
    assert "| 0.0625 | narrow | 1, 2 of 1, 2, 3 |" in report
    assert "| 0.125 | wide | 1 |" in report


def test_a_line_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """A metric measured at one snapshot only (the worst case, at the last epoch) is drawn
    in that snapshot's colour, not in the first colour of its panel."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    def row(snapshot, keys):
        return {"name": "hah", "snapshot": snapshot, "sweep": "s",
                "metrics": {k: {"mean": -0.1, "sd": None} for k in keys}}

    comparison = {"by": "width", "sweeps": [{"sweep": "s", "value": 0.25}],
                  "gains": [row("before the first lr drop", ["clean"]),
                            row("last evaluated", ["clean", "worst_linf"])]}
    drawn = Figure()
    monkeypatch.setattr(compare_report, "figure", lambda path, draw, size: draw(drawn))
    compare_report.plot_gains(comparison, tmp_path / "gains.png")
    colours = {ax.get_title(): [to_hex(line.get_color()) for line in ax.get_lines()
                                if line.get_marker() == "o"] for ax in drawn.axes}
    assert len(set(colours["clean"])) == 2
    assert colours["worst_linf"] == colours["clean"][1:]
