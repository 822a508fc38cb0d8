"""The whole ``hahnet reproduce`` flow: train the standard and the HaH network of a preset
(reusing finished runs), evaluate both (reusing a saved evaluation only when it measured
the same checkpoint with the same settings) and write the paper's table with a preamble.
Nothing here prints: progress goes through :class:`Hooks`; the command line only parses
flags and shows progress."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from hahnet.training import checkpoint, run as runs
from hahnet.config import EvalSettings, TrainConfig
from hahnet.errors import UserError
from hahnet.eval.results import EvalResult, read_results, reusable, settings_record
from hahnet.eval.runner import data_record
from hahnet.experiments.presets import Preset
from hahnet.training.rundir import RunDir

RUNS = ("standard", "hah")  # the two networks the paper compares, in table order
EVAL_DIR = "eval"           # per-run evaluation (results.json, report.md) inside its run dir


def run_dirs(out: str | Path) -> dict[str, Path]:
    """The run directory of each network under the experiment directory ``out``."""
    return {name: Path(out) / name for name in RUNS}


def preamble(preset: Preset, train: dict[str, Any], command: str, data_label: str,
             plan: dict[str, Any] | None = None) -> str:
    """Markdown opening the reproduce report: what was run, on what, and how to rerun it
    (and, for a time-budgeted run, how its epochs were chosen)."""
    keys = sorted(train)
    settings = ", ".join(f"{k}={_show(train[k])}" for k in keys)
    lines = [
        f"Preset **{preset.name}**: {preset.description}", "",
        f"Dataset: {data_label}.  ",
        f"Training settings (both networks): {settings}.  ",
        f"Regenerate with: `{command}` (resumable; finished training and evaluations "
        f"are reused).",
    ]
    if plan:
        from hahnet.training.budget import describe

        evaluation = plan.get("evaluation_seconds", {})
        lines += ["", f"**Time budget.** {describe(plan)}; evaluation of both networks "
                      f"estimated at {sum(evaluation.values()):.0f} s, "
                      f"{plan.get('elapsed_seconds_before_training', 0):.0f} s spent before "
                      f"training (start-up, data, warm-up) on {plan.get('device', '?')}. "
                      f"The schedule's milestones are fractions of these epochs."]
    return "\n".join(lines)


# Attacks run on the images still standing after each stage (APGD-T only where APGD-CE
# failed...), while estimate_seconds assumes every image survives every stage: count this
# share of its attack estimate. Measured survivors at 2/255 are ~10-30% after APGD-CE.
ATTACK_SHARE = 0.5


def plan_time_budget(train: dict[str, Any], out: str | Path, dataset: Any, device: Any,
                     settings: EvalSettings, limit: int | None, most: int | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training settings with the epochs that fit ``train['time_budget']`` minutes
    for BOTH networks' training plus their evaluation (same epochs for both), counted from
    this process's start; ``time_budget`` itself is dropped (the networks train for the
    fixed count chosen here). The record is saved in ``out`` and in each run directory
    (model.json then carries it); an experiment that already chose keeps its epochs.
    ``most``: the most epochs to choose (an explicit --epochs), else the paper's 100, so
    that a long budget on a small preset trains longer than the preset's own count."""
    from hahnet.training import budget
    from hahnet.config import TrainConfig
    from hahnet.eval.runner import estimate_seconds
    from hahnet.nn.models import build_model
    from hahnet.training.trainer import model_config

    minutes = float(train["time_budget"])
    train = {k: v for k, v in train.items() if k != "time_budget"}
    saved = RunDir(out).read_time_budget()
    if saved is not None:
        return {**train, "epochs": int(saved["epochs"])}, saved
    configs = {name: TrainConfig.from_dict({**train, "hah": name == "hah"}) for name in RUNS}
    measured = {name: budget.measure(config, dataset, device) for name, config in configs.items()}
    test = dataset.test.limit(limit, 0) if limit else dataset.test
    evaluation = {}
    for name, config in configs.items():
        model = build_model(model_config(config, dataset)).to(device).eval()
        estimate = estimate_seconds(model, settings, len(test), tuple(test.images.shape[1:]),
                                    device=device)
        attacks = sum(v for k, v in estimate.items() if k.startswith("attacks_"))
        evaluation[name] = round(estimate["total"] - (1 - ATTACK_SHARE) * attacks, 1)
        del model
    elapsed = budget.process_age()
    reserved = sum(evaluation.values()) + budget.MARGIN * minutes * 60
    epochs = budget.epochs_within(minutes * 60 - elapsed,
                                  [t.epoch_seconds() for t in measured.values()],
                                  reserved, most or budget.MOST_EPOCHS)
    record = budget.plan_record(minutes, measured, epochs, reserved)
    record.update(evaluation_seconds=evaluation, attack_share=ATTACK_SHARE,
                  elapsed_seconds_before_training=round(elapsed, 1), device=str(device))
    for directory in (out, *run_dirs(out).values()):
        RunDir(directory).write_time_budget(record)
    return {**train, "epochs": epochs}, record


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)


def _evaluate_silently(path: str, info: dict[str, Any], model, test, settings, device,
                       sources=()):
    from hahnet.eval import runner as ev

    return ev.evaluate_model(model, test.images, test.labels, settings, device,
                             name=ev.checkpoint_name(path), checkpoint=path, info=info,
                             sources=sources)


@dataclass
class Hooks:
    """Where reproduce reports: ``say`` (one line), ``training`` (each run's hooks) and
    ``evaluate(path, info, model, test, settings, device, sources) -> EvalResult``."""

    say: Callable[[str], None] = lambda message: None
    training: runs.Hooks = field(default_factory=runs.Hooks)
    evaluate: Callable[..., EvalResult] = _evaluate_silently


@dataclass
class Experiment:
    """One reproduce: the preset, both networks' training settings, the evaluation."""

    preset: Preset
    train: dict[str, Any]
    settings: EvalSettings
    limit: int | None
    out: Path
    data: str
    download: bool = False
    cache_dir: str | None = None
    device: str = "auto"
    re_evaluate: bool = False
    most_epochs: int | None = None  # with train["time_budget"]: at most this many epochs


def to_train(experiment: Experiment, say: Callable[[str], None]) -> dict[Path, dict[str, Any]]:
    """The runs still to train (run dir -> settings); refuses a run dir with other settings.
    Reads only the run directories: called before any data is loaded."""
    wanted_runs = {}
    for name, run_dir in run_dirs(experiment.out).items():
        wanted = {**experiment.train, "hah": name == "hah"}
        try:
            mismatch = RunDir(run_dir).mismatch(TrainConfig.from_dict(wanted))
            history = RunDir(run_dir).history()
        except ValueError as error:
            raise UserError(str(error)) from None
        if mismatch:
            raise UserError(f"{run_dir} holds a run with other settings ({mismatch}); pass "
                            f"another --out or delete {run_dir}")
        epochs = experiment.train["epochs"]
        if history and history[-1]["epoch"] + 1 >= epochs \
                and (run_dir / checkpoint.MODEL_FILE).exists():
            say(f"{name}: trained ({epochs} epochs) in {run_dir}; reusing it")
        else:
            wanted_runs[run_dir] = wanted
    return wanted_runs


def _load(run_dir: Path, device) -> tuple[dict[str, Any], Any]:
    try:
        return checkpoint.read_info(run_dir), checkpoint.load(run_dir, device=device)
    except checkpoint.CheckpointError as error:
        raise UserError(str(error)) from None


def _evaluate(experiment: Experiment, name: str, run_dir: Path, dataset, test, device,
              hooks: Hooks) -> EvalResult:
    """One network's evaluation: the saved one when it matches, else a fresh one (with
    the adaptive attacks, the other network is the transfer source)."""
    from hahnet.reporting import evaluation as report

    info, model = _load(run_dir, device)
    saved = run_dir / EVAL_DIR / "results.json"
    if saved.exists() and not experiment.re_evaluate:
        try:
            cached = read_results(saved)[0][0]
        except (ValueError, IndexError) as error:
            raise UserError(f"{error}") from None
        if reusable(cached, info, experiment.settings, experiment.limit):
            hooks.say(f"{name}: reusing the evaluation in {saved}")
            return cached
    sources = [(other, _load(directory, device)[1]) for other, directory
               in run_dirs(experiment.out).items()
               if other != name and experiment.settings.runs("adaptive")]
    result = hooks.evaluate(str(run_dir), info, model, test, experiment.settings, device,
                            sources)
    result.settings = settings_record(experiment.settings, experiment.limit)
    report.write_report([result], run_dir / EVAL_DIR,
                        data_record(experiment.data, dataset, test, experiment.limit))
    return result


def reproduce(experiment: Experiment, command: str, hooks: Hooks | None = None):
    """Train what is missing, evaluate both networks, write the report; returns
    (results, paths of the written files)."""
    from hahnet.reporting import evaluation as report
    from hahnet.training.device import resolve_device

    hooks = hooks or Hooks()
    try:
        device = resolve_device(experiment.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    dataset = plan = None
    if experiment.train.get("time_budget"):  # the epochs must be known before the checks
        dataset = runs.load_data(experiment.data, experiment.cache_dir, experiment.download,
                                 hooks.say)
        try:
            train, plan = plan_time_budget(experiment.train, experiment.out, dataset, device,
                                           experiment.settings, experiment.limit,
                                           most=experiment.most_epochs)
        except ValueError as error:
            raise UserError(str(error)) from None
        from hahnet.training.budget import describe

        hooks.say(describe(plan))
        experiment = replace(experiment, train=train)
    pending = to_train(experiment, hooks.say)
    if dataset is None:  # once, for training and evaluation
        dataset = runs.load_data(experiment.data, experiment.cache_dir, experiment.download,
                                 hooks.say)
    for run_dir, wanted in pending.items():
        runs.run_training(wanted, experiment.data, str(run_dir), "auto", experiment.device,
                          experiment.cache_dir, experiment.download, dataset=dataset,
                          hooks=hooks.training)
    limit = experiment.limit
    test = dataset.test.limit(limit, 0) if limit else dataset.test
    dirs = run_dirs(experiment.out)
    results = [_evaluate(experiment, name, run_dir, dataset, test, device, hooks)
               for name, run_dir in dirs.items()]
    label = "CIFAR-10 (JPEG copy)" if "cifar10-jpeg" in str(experiment.data) \
        else dataset.describe()
    paths = report.write_report(
        results, experiment.out, data_record(experiment.data, dataset, test, limit),
        title=f"Reproducing the paper: preset {experiment.preset.name}",
        preamble=preamble(experiment.preset, experiment.train, command, label, plan),
        histories={name: RunDir(run_dir).history() for name, run_dir in dirs.items()},
        extra={"preset": experiment.preset.name, "train": experiment.train,
               "runs": {k: str(v) for k, v in dirs.items()}, "time_budget": plan})
    return results, paths
