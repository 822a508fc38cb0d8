"""Settings, and the one copy of the paper's constants.

``TrainConfig`` (what to train and how), ``ModelConfig`` (what rebuilds a model; stored
in checkpoints) and ``EvalSettings`` (what an evaluation measures) are validated frozen
dataclasses. The paper's values (docs/method.md) are named once here and used as the
defaults everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# ------------------------------------------------------------------ the paper's values

PAPER_ALPHAS: tuple[float, ...] = (0.0045, 0.0025, 0.0013, 0.001, 0.0008, 0.0005)
PAPER_RATIO = 0.1       # HaH winners K = ceil(ratio * C)
PAPER_DEMOTE = 1.0      # weight of the losers' mean in the HaH score
PAPER_SIGMA = 0.1       # divisive normalization: weight of the image-wide peak
PAPER_KEEP = 0.2        # top-fraction threshold: fraction of each map kept
PAPER_HAH_LAYERS = 6    # leading convolutions that are HaH blocks
PAPER_NOISE_SIGMA = 0.1
PAPER_EPS: dict[str, float] = {"Linf": 2 / 255, "L2": 0.25}  # attack budgets per norm
# The paper's CIFAR-10 VGG16 numbers, in percent, at the settings above.
PAPER_TABLE: dict[str, dict[str, float]] = {
    "Standard": {"clean": 92.5, "noise": 26.6, "linf": 10.4, "l2": 13.9},
    "HaH": {"clean": 87.3, "noise": 64.0, "linf": 21.5, "l2": 27.6},
}


def parse_numbers(text: str) -> tuple[float, ...]:
    """'0.1,0.2' or '2/255' -> floats (fractions allowed, as attack budgets are quoted);
    ValueError names the text."""
    values = []
    for part in str(text).split(","):
        num, _, den = part.strip().partition("/")
        if not num:
            continue
        try:
            values.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"not a number or list of numbers: {text!r} "
                             f"(write e.g. 0.25, 2/255 or 0.1,0.2)") from None
    return tuple(values)


def same_json(a: Any, b: Any) -> bool:
    """Equality of JSON-like values (tuples = lists), floats to 1e-12 (2/255 survives JSON)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool) \
            and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def _from_dict(cls: type, data: dict[str, Any], tuples: tuple[str, ...]) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in known}
    for key in tuples:
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return cls(**values)


def _raise(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"invalid {what}: " + "; ".join(problems))


# ---------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints)."""

    arch: str = "vgg16"
    hah: bool = False
    width: float = 1.0
    num_classes: int = 10
    in_channels: int = 3
    hah_layers: int = PAPER_HAH_LAYERS
    sigma: float = PAPER_SIGMA
    keep: float = PAPER_KEEP
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected a subset of "
                             f"{sorted(f.name for f in fields(cls))}")
        values = dict(data)
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


# ---------------------------------------------------------------------- training

# TrainConfig fields that change speed, not the experiment: they may differ on resume.
RUNTIME_OPTIONS = frozenset({"precision", "channels_last", "compile", "eval_batch_size",
                             "snapshots", "time_budget"})


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how; the paper's recipe by default (docs/method.md)."""

    arch: str = "vgg16"
    hah: bool = False
    width: float = 1.0
    hah_layers: int = PAPER_HAH_LAYERS
    sigma: float = PAPER_SIGMA
    keep: float = PAPER_KEEP
    alphas: tuple[float, ...] = PAPER_ALPHAS
    ratio: float = PAPER_RATIO
    demote: float = PAPER_DEMOTE
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    milestones: tuple[float, ...] = (0.6, 0.8)
    gamma: float = 0.1
    seed: int = 2022
    augment: bool = True
    limit_train: int | None = None
    holdout: float = 0.0
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 elsewhere
    channels_last: bool | None = None  # None (auto): channels-last on CUDA only
    compile: bool = False              # off: not measured to pay on a GPU yet (docs/gpu.md)
    eval_batch_size: int = 500
    snapshots: tuple[int, ...] = ()
    time_budget: float | None = None   # minutes: choose the epochs that fit (hahnet.budget)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.lr <= 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision must be fp32 or bf16 (or auto) (got {self.precision!r})")
        if self.time_budget is not None and not self.time_budget > 0:
            problems.append(f"time_budget must be a positive number of minutes (got {self.time_budget})")
        if not 0.0 <= self.holdout < 1.0:
            problems.append(f"holdout must be in [0, 1) (got {self.holdout})")
        if any(not 0.0 < m <= 1.0 for m in self.milestones):
            problems.append(f"milestones are fractions of the epochs in (0, 1] (got {self.milestones})")
        if any(not 1 <= e <= self.epochs for e in self.snapshots):
            problems.append(f"snapshots are epochs in 1..{self.epochs} (got {self.snapshots})")
        if self.limit_train is not None and self.limit_train < 1:
            problems.append(f"limit_train must be >= 1 (got {self.limit_train})")
        _raise("training config", problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_device(self, device: Any) -> "TrainConfig":
        """The runtime options resolved for ``device``: precision 'auto' is bf16 autocast
        on CUDA (tensor cores; the paper's fp32 elsewhere), channels_last None is
        channels-last on CUDA only (cuDNN's fast layout; on CPU the fused layers choose
        their own). Explicit choices are kept."""
        from dataclasses import replace

        cuda = getattr(device, "type", str(device).split(":")[0]) == "cuda"
        precision = ("bf16" if cuda else "fp32") if self.precision == "auto" else self.precision
        channels_last = cuda if self.channels_last is None else bool(self.channels_last)
        return replace(self, precision=precision, channels_last=channels_last)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """From a dict; unknown keys are ignored (older or newer run directories)."""
        return _from_dict(cls, data, ("alphas", "milestones", "snapshots"))

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """The experiment settings (not RUNTIME_OPTIONS) that differ: name -> (self's,
        other's). The one comparison used to decide whether a run can be continued."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (v, theirs[k]) for k, v in mine.items()
                if k not in RUNTIME_OPTIONS and not same_json(v, theirs[k])}

    def model_config(self, dataset: Any) -> ModelConfig:
        """The model this config trains on ``dataset`` (a :class:`hahnet.data.Dataset`)."""
        from hahnet.data import channel_stats

        mean, std = channel_stats(dataset.train)
        shape = dataset.train.images.shape
        return ModelConfig(self.arch, self.hah, self.width, len(dataset.train.classes),
                           shape[1], self.hah_layers, self.sigma, self.keep,
                           tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std))


# ---------------------------------------------------------------------- evaluation

@dataclass
class EvalSettings:
    """Everything an evaluation measures and how (the paper's choices by default)."""

    noise_sigmas: tuple[float, ...] = (PAPER_NOISE_SIGMA,)
    noise_draws: int = 3
    noise_seed: int = 0
    attacks: bool = True
    norms: tuple[str, ...] = ("Linf", "L2")
    eps_linf: float = PAPER_EPS["Linf"]
    eps_l2: float = PAPER_EPS["L2"]
    attack_limit: int | None = 1000  # seeded random N of the evaluated images; None = all
    apgd_steps: int = 100
    pgd_steps: int = 50
    pgd_restarts: int = 5
    square_limit: int = 100          # the first N of the attacked images; 0 = no Square
    square_queries: int = 1000
    attack_seed: int = 0
    attack_batch_size: int = 128
    snr_sigma: float = PAPER_NOISE_SIGMA
    snr_seed: int = 0
    layer_stats: bool = True         # sparsity and SNR
    batch_size: int = 256

    def __post_init__(self) -> None:
        self.noise_sigmas, self.norms = tuple(self.noise_sigmas), tuple(self.norms)
        problems = [f"{name} must be >= 1 (got {getattr(self, name)})"
                    for name in ("noise_draws", "apgd_steps", "attack_batch_size", "batch_size")
                    if getattr(self, name) < 1]
        problems += [f"{name} must be >= 0 (got {getattr(self, name)})"
                     for name in ("eps_linf", "eps_l2", "pgd_steps", "pgd_restarts",
                                  "square_limit", "square_queries", "snr_sigma")
                     if getattr(self, name) < 0]
        if any(s < 0 for s in self.noise_sigmas):
            problems.append(f"noise sigmas must be >= 0 (got {self.noise_sigmas})")
        if self.attack_limit is not None and self.attack_limit < 1:
            problems.append(f"attack_limit must be >= 1 or None (got {self.attack_limit})")
        if any(n not in PAPER_EPS for n in self.norms):
            problems.append(f"norms are Linf and/or L2 (got {self.norms})")
        _raise("evaluation settings", problems)

    def eps(self, norm: str) -> float:
        """The budget for ``norm``."""
        return self.eps_linf if norm == "Linf" else self.eps_l2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
