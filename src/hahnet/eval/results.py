"""The evaluation's results as plain dataclasses, and their one JSON form: results.json
is written by :func:`results_json` and read back by :func:`read_results` (files of every
earlier version included)."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from hahnet.config import PAPER_EPS, VERSION, EvalSettings, same_json

FORMAT = "hahnet-eval-1"


@dataclass
class NoiseResult:
    """Accuracy under N(0, sigma^2) pixel noise: mean and std (ddof=0) over draws."""

    sigmas: list[float]
    mean: list[float]
    std: list[float]
    per_draw: list[list[float]]
    draws: int
    seed: int

    def at(self, sigma: float) -> float | None:
        """Mean accuracy at ``sigma``, or None when it was not measured."""
        for s, m in zip(self.sigmas, self.mean):
            if abs(s - sigma) < 1e-12:
                return m
        return None


@dataclass
class AttackResult:
    """Robustness of each image to an attack (worst case over its stages)."""

    attack: str
    norm: str
    eps: float
    n_images: int
    accuracy: float
    robust: list[bool]
    stages: dict[str, float]  # robust accuracy after each stage, in order
    max_perturbation: float   # largest ||x_adv - x|| in the attack's norm, checked <= eps
    seconds: float
    params: dict[str, Any]
    # per image: None = robust, "clean" = misclassified clean, "earlier" = broken before
    # this attack ran, else the stage that broke it (None for files of earlier versions)
    broken_by: list[str | None] | None = None


@dataclass
class AttackComparison:
    """APGD vs PGD vs Square on the same images (the first ``n_images`` of each)."""

    norm: str
    eps: float
    n_images: int
    apgd: float
    pgd: float | None
    square: float | None
    gradient: float      # worst case over the gradient attacks (APGD and PGD)
    all_attacks: float   # worst case over every attack
    square_only: int     # images only the black-box attack broke
    black_box_beats_gradient: bool  # Square < gradient attacks: a sign of gradient masking


@dataclass
class LayerSparsity:
    """Sparsity of one block: fraction of non-zeros, top-K share, mean non-zero value."""

    name: str
    kind: str
    channels: int
    top_k: int
    nonzero_fraction: float
    top_k_share: float
    mean_active: float


@dataclass
class LayerSNR:
    """Mean over images of the per-image SNR (dB) at one block's output."""

    name: str
    kind: str
    db: float


@dataclass
class SNRResult:
    """Per-layer SNR for clean vs noisy inputs, and the SNR of the input noise itself."""

    sigma: float
    seed: int
    input_db: float
    layers: list[LayerSNR]


@dataclass
class EpsSweep:
    """Robust accuracy of one attack at each eps, each eps attacked on its own."""

    norm: str
    attack: str
    n_images: int
    eps: list[float]
    accuracy: list[float]
    seconds: float
    params: dict[str, Any]


@dataclass
class AdaptiveResult:
    """The attacks beyond the paper's suite at one norm (``--attacks standard|adaptive|all``):
    each row an attack run on its own ("AutoAttack" continues the paper's cascade), the
    worst case per image over everything run (the headline), and the eps sweeps."""

    suite: str
    rows: dict[str, AttackResult]
    worst: AttackResult
    sweeps: list[EpsSweep]
    notes: list[str]


@dataclass
class AttackSuite:
    """All attacks at one norm: APGD (the paper's number), PGD, Square and their comparison."""

    norm: str
    eps: float
    indices: list[int]  # attacked images (into the evaluated ones); Square uses the first
    apgd: AttackResult
    pgd: AttackResult | None
    square: AttackResult | None
    comparison: AttackComparison
    adaptive: AdaptiveResult | None = None


@dataclass
class CorruptionResult:
    """Accuracy under the CIFAR-10-C corruptions (:mod:`hahnet.eval.corruptions.evaluate`).

    ``accuracy[name][i]`` is the accuracy at ``severities[i]``; ``clean_accuracy`` is on
    the same images.  ``ce`` / ``relative_ce`` (per corruption) and ``mce`` /
    ``relative_mce`` are relative to the ``baseline`` model (None until compared, or where
    the baseline's denominator is not positive); ``sparsity`` maps "clean" and each
    family to per-block sparsity at ``sparsity_severity``."""

    names: list[str]
    severities: list[int]
    seed: int
    n_images: int
    clean_accuracy: float
    accuracy: dict[str, list[float]]
    sparsity_severity: int | None = None
    sparsity_images: int = 0
    sparsity: dict[str, list[LayerSparsity]] = field(default_factory=dict)
    baseline: str | None = None
    ce: dict[str, float | None] = field(default_factory=dict)
    relative_ce: dict[str, float | None] = field(default_factory=dict)
    mce: float | None = None
    relative_mce: float | None = None
    cache_key: str = ""
    seconds: float = 0.0


@dataclass
class EvalResult:
    """Every measurement of one model, plus what is needed to report it."""

    name: str
    checkpoint: str | None
    model: dict[str, Any]
    info: dict[str, Any]
    n_images: int
    clean_accuracy: float
    noise: NoiseResult | None
    attacks: dict[str, AttackSuite]
    sparsity: list[LayerSparsity]
    snr: SNRResult | None
    filters: list | None
    settings: dict[str, Any]
    seconds: dict[str, float]
    corruptions: CorruptionResult | None = None


def result_from_dict(data: dict[str, Any]) -> EvalResult:
    """Rebuild an :class:`EvalResult` from its JSON form (one entry of results.json's
    "models"), so saved evaluations can be reported again without re-running them."""
    def suite(d: dict[str, Any]) -> AttackSuite:
        return AttackSuite(d["norm"], d["eps"], list(d["indices"]), attack_from_dict(d["apgd"]),
                           attack_from_dict(d.get("pgd")), attack_from_dict(d.get("square")),
                           AttackComparison(**d["comparison"]), adaptive(d.get("adaptive")))

    def adaptive(d: dict[str, Any] | None) -> AdaptiveResult | None:
        if d is None:
            return None
        sweeps = [sweep_from_dict(e) for e in d["sweeps"]]
        return AdaptiveResult(d["suite"], {k: attack_from_dict(v) for k, v in d["rows"].items()},
                              attack_from_dict(d["worst"]), sweeps, list(d["notes"]))

    snr = data.get("snr")
    return EvalResult(
        name=data["name"], checkpoint=data.get("checkpoint"), model=data.get("model") or {},
        info=data.get("info") or {}, n_images=data["n_images"],
        clean_accuracy=_float(data["clean_accuracy"]),
        noise=NoiseResult(**data["noise"]) if data.get("noise") else None,
        attacks={norm: suite(d) for norm, d in (data.get("attacks") or {}).items()},
        sparsity=[LayerSparsity(**d) for d in data.get("sparsity") or []],
        snr=None if snr is None else SNRResult(snr["sigma"], snr["seed"], snr["input_db"],
                                               [LayerSNR(**d) for d in snr["layers"]]),
        filters=data.get("filters"), settings=data.get("settings") or {},
        seconds=data.get("seconds") or {},
        corruptions=corruptions_from_dict(data.get("corruptions")))


def attack_from_dict(d: dict[str, Any] | None) -> AttackResult | None:
    """An :class:`AttackResult` from its JSON form (None stays None)."""
    if d is None:
        return None
    return AttackResult(**{**d, "accuracy": _float(d["accuracy"])})


def sweep_from_dict(d: dict[str, Any]) -> EpsSweep:
    """An :class:`EpsSweep` from its JSON form (NaN accuracies come back from null)."""
    return EpsSweep(**{**d, "accuracy": [_float(a) for a in d["accuracy"]]})


def corruptions_from_dict(data: dict[str, Any] | None) -> CorruptionResult | None:
    """A :class:`CorruptionResult` from its JSON form (None stays None: older files)."""
    if data is None:
        return None
    def opt(value: Any) -> float | None:
        return None if value is None else float(value)

    return CorruptionResult(
        names=list(data["names"]), severities=[int(s) for s in data["severities"]],
        seed=int(data["seed"]), n_images=int(data["n_images"]),
        clean_accuracy=_float(data["clean_accuracy"]),
        accuracy={k: [_float(v) for v in vs] for k, vs in data["accuracy"].items()},
        sparsity_severity=data.get("sparsity_severity"),
        sparsity_images=int(data.get("sparsity_images") or 0),
        sparsity={k: [LayerSparsity(**d) for d in v]
                  for k, v in (data.get("sparsity") or {}).items()},
        baseline=data.get("baseline"),
        ce={k: opt(v) for k, v in (data.get("ce") or {}).items()},
        relative_ce={k: opt(v) for k, v in (data.get("relative_ce") or {}).items()},
        mce=opt(data.get("mce")), relative_mce=opt(data.get("relative_mce")),
        cache_key=data.get("cache_key") or "", seconds=float(data.get("seconds") or 0.0))


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


# ------------------------------------------------------------------ results.json

def jsonable(value: Any) -> Any:
    """Dataclasses, tuples and non-finite floats as strict JSON (NaN/inf -> None)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def versions() -> dict[str, str]:
    """Versions of python, torch, torchattacks, hahnet and matplotlib."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "hahnet": VERSION}
    for name in ("torchattacks", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def results_json(results: Sequence[EvalResult], data: dict[str, Any] | None = None) -> dict:
    """Every number and setting of the evaluation as one JSON-able document."""
    return jsonable({"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(),
                      "versions": versions(), "data": data or {},
                      "checkpoints": [r.checkpoint for r in results],
                      "models": [asdict(r) for r in results]})


def results_document(results: Sequence[EvalResult], data: dict[str, Any] | None = None,
                     extra: dict[str, Any] | None = None) -> str:
    """results.json's text: :func:`results_json` plus ``extra`` keys, strict JSON."""
    document = results_json(results, data)
    if extra:
        document.update(jsonable(extra))
    return json.dumps(document, indent=1, allow_nan=False) + "\n"


def read_results(path: str | Path) -> tuple[list[EvalResult], dict[str, Any]]:
    """The results and data description saved in a results.json by :func:`hahnet.reporting.evaluation.write_report`.
    Raises ValueError (one line) for a missing, corrupt or foreign file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable results.json ({error}); delete it and "
                         f"re-run the evaluation") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a hahnet evaluation ({FORMAT!r} expected); delete it "
                         f"and re-run the evaluation")
    try:
        results = [result_from_dict(model) for model in document["models"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: incomplete results ({error}); delete it and re-run the "
                         f"evaluation") from None
    return results, document.get("data") or {}


def settings_record(settings: EvalSettings, limit: int | None) -> dict[str, Any]:
    """The evaluation settings as stored in results.json (JSON types), plus the subset."""
    return json.loads(json.dumps({**asdict(settings), "limit": limit}))


def reusable(cached: EvalResult, info: dict[str, Any], settings: EvalSettings,
             limit: int | None) -> bool:
    """Whether a saved evaluation measured this very checkpoint (same saved info: epoch,
    config, metrics) with these settings on the same test subset. Settings a saved file
    predates count at their defaults (e.g. suite "paper": what was run before it existed)."""
    record = settings_record(settings, limit)
    saved = {**settings_record(EvalSettings(), None), **cached.settings}
    return same_json(saved, record) and same_json(cached.info, json.loads(json.dumps(info)))


def noise_sigma(result: EvalResult, preferred: float = 0.1) -> float | None:
    """The noise level of the headline noise accuracy: ``preferred`` (the paper's) when
    measured, else the first non-zero one; None without a noise measurement."""
    if result.noise is None:
        return None
    sigmas = [s for s in result.noise.sigmas if s > 0]
    return preferred if result.noise.at(preferred) is not None else (sigmas[0] if sigmas else None)


def summary(result: EvalResult) -> dict[str, float | None]:
    """The paper's four numbers for one model: clean, noise, APGD l_inf, APGD l_2 (0..1)."""
    sigma = noise_sigma(result)
    return {"clean": result.clean_accuracy,
            "noise": None if sigma is None else result.noise.at(sigma),
            "linf": result.attacks["Linf"].apgd.accuracy if "Linf" in result.attacks else None,
            "l2": result.attacks["L2"].apgd.accuracy if "L2" in result.attacks else None}


def worst_cases(result: EvalResult) -> dict[str, Any]:
    """Per norm, the worst case per image over every attack run (``--attacks`` beyond
    paper), as an AttackResult; norms without one are left out."""
    return {norm: suite.adaptive.worst for norm, suite in result.attacks.items()
            if suite.adaptive is not None}


def join_parts(results: Sequence[EvalResult]) -> list[EvalResult]:
    """One result per checkpoint from evaluations made in parts, one threat model each
    (``hahnet eval --norms``): the attacks of all parts, the rest from the first. Parts
    must agree on everything but the norms (same images, settings, clean accuracy);
    ValueError (one line) names the first disagreement."""
    joined: dict[tuple[str, str | None], EvalResult] = {}
    for result in results:
        key = (result.name, result.checkpoint)
        if key not in joined:
            joined[key] = replace(result, attacks=dict(result.attacks),
                                  settings=dict(result.settings), seconds=dict(result.seconds))
            continue
        whole = joined[key]
        _check_part(whole, result)
        whole.attacks.update(result.attacks)
        whole.settings["norms"] = [n for n in PAPER_EPS if n in whole.attacks]
        for phase, seconds in result.seconds.items():
            if phase.startswith("attacks_"):
                whole.seconds[phase] = seconds
    return list(joined.values())


def _check_part(whole: EvalResult, part: EvalResult) -> None:
    label = f"{part.name} ({part.checkpoint})"
    overlap = sorted(set(whole.attacks) & set(part.attacks))
    if overlap:
        raise ValueError(f"{label}: {', '.join(overlap)} attacked in two parts; give each "
                         f"threat model once")
    mine = {k: v for k, v in whole.settings.items() if k != "norms"}
    theirs = {k: v for k, v in part.settings.items() if k != "norms"}
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"{label}: the parts were evaluated with different settings "
                         f"({', '.join(differ)}); evaluate them alike")
    if (whole.n_images, whole.clean_accuracy) != (part.n_images, part.clean_accuracy):
        raise ValueError(f"{label}: the parts saw different images ({whole.n_images} at "
                         f"{whole.clean_accuracy:.4f} vs {part.n_images} at "
                         f"{part.clean_accuracy:.4f} clean); evaluate them on the same subset")
