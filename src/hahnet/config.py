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

VERSION = "0.1.0"  # the package's version (hahnet.__version__, pyproject.toml), in results

# ------------------------------------------------------------------ the paper's values

PAPER_ALPHAS: tuple[float, ...] = (0.0045, 0.0025, 0.0013, 0.001, 0.0008, 0.0005)
PAPER_RATIO = 0.1       # HaH winners K = ceil(ratio * C)
PAPER_DEMOTE = 1.0      # weight of the losers' mean in the HaH score
PAPER_SIGMA = 0.1       # divisive normalization: weight of the image-wide peak
PAPER_KEEP = 0.2        # top-fraction threshold: fraction of each map kept
PAPER_HAH_LAYERS = 6    # leading convolutions that are HaH blocks (VGG16)
PAPER_NOISE_SIGMA = 0.1
PAPER_EPS: dict[str, float] = {"Linf": 2 / 255, "L2": 0.25}  # attack budgets per norm
# Attack suites of `hahnet eval --attacks` (docs/evaluation.md) and their eps sweeps.
ATTACK_SUITES = ("paper", "standard", "adaptive", "all")
BPDA_VARIANTS = ("sigmoid", "identity", "identity+fixed-divisor", "sigmoid+fixed-divisor")
SWEEP_EPS: dict[str, tuple[float, ...]] = {
    "Linf": tuple(e / 255 for e in (0.5, 1, 2, 4, 8, 16)), "L2": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)}
# The paper's CIFAR-10 VGG16 numbers, in percent, at the settings above.
PAPER_TABLE: dict[str, dict[str, float]] = {
    "Standard": {"clean": 92.5, "noise": 26.6, "linf": 10.4, "l2": 13.9},
    "HaH": {"clean": 87.3, "noise": 64.0, "linf": 21.5, "l2": 27.6},
}


# ------------------------------------------------------- the registered architectures
# Plain facts, no torch: which model names exist, their family, and which leading
# convolutions hah=True may turn into HaH blocks (hahnet.nn builds them).

@dataclass(frozen=True)
class ResidualLayout:
    """A CIFAR residual network: a 3x3 stem, then stages of residual blocks.

    ``stem``: the stem's output channels; ``channels``/``blocks``: per stage, the output
    channels and the number of blocks (stages after the first halve the resolution with a
    stride-2 first block); ``preact``: pre-activation blocks (BN-ReLU-conv) instead of
    post-activation ones (conv-BN-ReLU). Channels are at width 1."""

    preact: bool
    stem: int
    channels: tuple[int, ...]
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """One registered name: its ``family`` ("vgg" or "residual"), how many leading
    convolutions can be HaH blocks at most (``max_hah_layers``) and, for residual
    networks, their layout."""

    name: str
    family: str
    max_hah_layers: int
    summary: str
    layout: ResidualLayout | None = None


def _residual(name: str, summary: str, layout: ResidualLayout) -> Architecture:
    """A residual architecture whose HaH part is the stem and the whole first stage
    (two convolutions per block)."""
    return Architecture(name, "residual", 1 + 2 * layout.blocks[0], summary, layout)


_RESNET18 = (64, 128, 256, 512), (2, 2, 2, 2)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("vgg11", "vgg", 8, "VGG11, 8 convolutions, 5 max-pools, one Linear"),
    Architecture("vgg13", "vgg", 10, "VGG13, 10 convolutions, 5 max-pools, one Linear"),
    Architecture("vgg16", "vgg", 13, "VGG16, 13 convolutions, 5 max-pools, one Linear "
                                     "(the paper's network)"),
    Architecture("vgg19", "vgg", 16, "VGG19, 16 convolutions, 5 max-pools, one Linear"),
    _residual("resnet18", "ResNet-18 (CIFAR form: 3x3 stem, no max-pool), 11.2M parameters",
              ResidualLayout(False, 64, *_RESNET18)),
    _residual("preact_resnet18", "pre-activation ResNet-18 (CIFAR form), 11.2M parameters",
              ResidualLayout(True, 64, *_RESNET18)),
    _residual("wrn_16_4", "WideResNet-16-4 (pre-activation, CIFAR form), 2.7M parameters",
              ResidualLayout(True, 16, (64, 128, 256), (2, 2, 2))),
    _residual("wrn_28_10", "WideResNet-28-10 (pre-activation, CIFAR form), 36.5M parameters",
              ResidualLayout(True, 16, (160, 320, 640), (4, 4, 4))),
)}


def architecture(name: str) -> Architecture:
    """The architecture called ``name``; ValueError listing the known names if none is."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def allowed_hah_layers(name: str) -> list[int]:
    """How many leading convolutions of ``name`` can be HaH blocks: for VGG any count up to
    its convolutions; for a residual network none, the stem alone (1) or the stem and whole
    residual blocks of the first stage (1 + 2m)."""
    arch = architecture(name)
    if arch.family == "vgg":
        return list(range(arch.max_hah_layers + 1))
    return [0] + list(range(1, arch.max_hah_layers + 1, 2))


def describe_hah_layers(name: str) -> str:
    """The accepted hah_layers of ``name`` in words, for error messages."""
    allowed = allowed_hah_layers(name)
    if architecture(name).family == "vgg":
        return f"in [0, {allowed[-1]}] for {name}"
    return (f"one of {allowed} for {name} (the stem, then whole residual blocks of the "
            f"first stage, 2 convolutions each)")


def check_hah_layers(name: str, hah_layers: int) -> None:
    """ValueError (one line) unless ``hah_layers`` is allowed for ``name``."""
    if hah_layers not in allowed_hah_layers(name):
        raise ValueError(f"hah_layers must be {describe_hah_layers(name)}, got {hah_layers}")


def default_hah_layers(arch: str) -> int:
    """HaH blocks when none are asked for: the paper's 6 for VGG; for a residual network
    its stem and every convolution of its first stage (docs/method.md says why)."""
    spec = architecture(arch)
    return PAPER_HAH_LAYERS if spec.family == "vgg" else spec.max_hah_layers


def winners(channels: int, ratio: float) -> int:
    """K = ceil(ratio * C), clamped to [1, C - 1] (to 1 when C == 1)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"HaH ratio must be in (0, 1), got {ratio}")
    k = math.ceil(ratio * channels - 1e-9)
    return max(1, min(k, channels - 1)) if channels >= 2 else 1


def default_alphas(hah_layers: int) -> tuple[float, ...]:
    """One alpha per HaH layer when none are given: the paper's, in order; layers past the
    paper's sixth repeat its last (smallest) value."""
    extra = max(0, hah_layers - len(PAPER_ALPHAS))
    return PAPER_ALPHAS[:hah_layers] + (PAPER_ALPHAS[-1],) * extra


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


class SettingsError(ValueError):
    """One setting out of range: ``field`` (the dataclass field), its ``value`` and what is
    ``accepted``; the command line names the flag instead of the field."""

    def __init__(self, what: str, field: str, value: Any, accepted: str) -> None:
        self.field, self.value, self.accepted = field, value, accepted
        super().__init__(f"invalid {what}: {field} must be {accepted} (got {value!r})")


def _check(what: str, rules: list[tuple[str, Any, bool, str]]) -> None:
    """Raise a :class:`SettingsError` for the first rule (field, value, ok, accepted)
    that does not hold."""
    for field, value, ok, accepted in rules:
        if not ok:
            raise SettingsError(what, field, value, accepted)


def parse_count(text: str) -> int | None:
    """A number of images: a positive integer, or ``all`` (None). ``0`` also means all
    (kept for older command lines). ValueError names the accepted forms."""
    if str(text).strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"expected a positive number of images or 'all', got {text!r}")
    return value or None


# ---------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints). ``arch`` is the
    registered model name (:func:`hahnet.list_models`); ``hah_layers`` None means the
    model's default (:func:`default_hah_layers`), resolved on construction."""

    arch: str = "vgg16"
    hah: bool = False
    width: float = 1.0
    num_classes: int = 10
    in_channels: int = 3
    hah_layers: int | None = None
    sigma: float = PAPER_SIGMA
    keep: float = PAPER_KEEP
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.hah_layers is None and self.arch in ARCHITECTURES:
            object.__setattr__(self, "hah_layers", default_hah_layers(self.arch))

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
    hah_layers: int | None = None      # None: the model's default (default_hah_layers)
    sigma: float = PAPER_SIGMA
    keep: float = PAPER_KEEP
    alphas: tuple[float, ...] | None = None  # None: one per HaH layer (default_alphas)
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
    time_budget: float | None = None   # minutes: choose the epochs that fit (hahnet.training.budget)

    def __post_init__(self) -> None:
        _check("training config", [("arch", self.arch, self.arch in ARCHITECTURES,
                                    "one of " + ", ".join(ARCHITECTURES))])
        if self.hah_layers is None:
            object.__setattr__(self, "hah_layers", default_hah_layers(self.arch))
        if self.alphas is None:
            object.__setattr__(self, "alphas", default_alphas(self.hah_layers))
        _check("training config", [
            ("width", self.width, self.width > 0, "> 0"),
            ("hah_layers", self.hah_layers, self.hah_layers >= 1 and self.hah_layers
             in allowed_hah_layers(self.arch),
             ">= 1 and " + describe_hah_layers(self.arch)),
            ("sigma", self.sigma, self.sigma > 0, "> 0"),
            ("keep", self.keep, 0 < self.keep <= 1, "in (0, 1]"),
            ("alphas", self.alphas, all(a >= 0 for a in self.alphas), "numbers >= 0"),
            ("ratio", self.ratio, 0 < self.ratio < 1, "in (0, 1)"),
            ("demote", self.demote, self.demote >= 0, ">= 0"),
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("lr", self.lr, self.lr > 0, "positive"),
            ("milestones", self.milestones, all(0.0 < m <= 1.0 for m in self.milestones),
             "fractions of the epochs in (0, 1]"),
            ("gamma", self.gamma, 0 < self.gamma <= 1, "in (0, 1]"),
            ("limit_train", self.limit_train,
             self.limit_train is None or self.limit_train >= 1, ">= 1"),
            ("holdout", self.holdout, 0.0 <= self.holdout < 1.0, "in [0, 1)"),
            ("precision", self.precision, self.precision in ("auto", "fp32", "bf16"),
             "auto, fp32 or bf16"),
            ("time_budget", self.time_budget, self.time_budget is None or self.time_budget > 0,
             "a positive number of minutes"),
            ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1, ">= 1"),
            ("snapshots", self.snapshots, all(1 <= e <= self.epochs for e in self.snapshots),
             f"epochs in 1..{self.epochs}"),
        ])

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


# ---------------------------------------------------------------------- evaluation

# EvalSettings fields that split the images into batches: they move the random draws
# inside an attack (each batch has its own seed), not what is measured. A saved
# evaluation is reused only with the same ones; sweeps differing only in them compare.
EVAL_BATCHING = ("batch_size", "attack_batch_size", "adaptive_batch_size")


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
    # Batch size of the rows beyond the paper suite (AutoAttack's extra stages, margin,
    # BPDA, transfer, eps sweeps); None = attack_batch_size. Each batch is saved as it
    # finishes, so smaller ones bound what a stopped evaluation of a wide network loses.
    adaptive_batch_size: int | None = None
    snr_sigma: float = PAPER_NOISE_SIGMA
    snr_seed: int = 0
    layer_stats: bool = True         # sparsity and SNR
    batch_size: int = 256
    # Which attacks (docs/evaluation.md): paper = APGD-CE + APGD-T only; standard adds
    # AutoAttack's FAB-T and Square; adaptive adds margin, BPDA, transfer and eps sweeps.
    suite: str = "paper"
    restarts: int = 3                # restarts of the margin and BPDA attacks
    fab_steps: int = 100             # AutoAttack's FAB-T steps
    autoattack_queries: int = 5000   # AutoAttack's Square queries
    adaptive_limit: int = 500        # margin, BPDA, transfer: the first N attacked images
    transfer_steps: int = 100        # PGD steps on the transfer source
    bpda: tuple[str, ...] = BPDA_VARIANTS[:3]
    bpda_temperature: float = 0.1    # sigmoid surrogate width, in map standard deviations
    sweep_limit: int = 200           # eps sweeps on the first N attacked images; 0 = none
    sweep_eps_linf: tuple[float, ...] = SWEEP_EPS["Linf"]
    sweep_eps_l2: tuple[float, ...] = SWEEP_EPS["L2"]
    # Adaptive suite: each attack only on the images the ones before it left standing
    # (AutoAttack's way): the same worst case for a fraction of the cost, but a row no
    # longer says what that attack alone reaches.
    cascade: bool = False

    def __post_init__(self) -> None:
        self.noise_sigmas, self.norms = tuple(self.noise_sigmas), tuple(self.norms)
        self.bpda = tuple(self.bpda)
        self.sweep_eps_linf, self.sweep_eps_l2 = tuple(self.sweep_eps_linf), tuple(self.sweep_eps_l2)
        sweeps = self.sweep_eps_linf + self.sweep_eps_l2
        _check("evaluation settings", [
            *[(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
              for name in ("noise_draws", "apgd_steps", "attack_batch_size", "batch_size",
                           "restarts", "fab_steps", "autoattack_queries", "adaptive_limit",
                           "transfer_steps")],
            *[(name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
              for name in ("eps_linf", "eps_l2", "pgd_steps", "pgd_restarts", "square_limit",
                           "square_queries", "snr_sigma", "sweep_limit")],
            ("suite", self.suite, self.suite in ATTACK_SUITES, "one of " + "|".join(ATTACK_SUITES)),
            ("bpda", self.bpda, all(v in BPDA_VARIANTS for v in self.bpda),
             "a list of " + ", ".join(BPDA_VARIANTS)),
            ("bpda_temperature", self.bpda_temperature, self.bpda_temperature > 0, "> 0"),
            ("sweep_eps", sweeps, all(e > 0 for e in sweeps), "numbers > 0"),
            ("noise_sigmas", self.noise_sigmas, all(s >= 0 for s in self.noise_sigmas),
             "numbers >= 0"),
            ("attack_limit", self.attack_limit,
             self.attack_limit is None or self.attack_limit >= 1, ">= 1 or all"),
            ("adaptive_batch_size", self.adaptive_batch_size,
             self.adaptive_batch_size is None or self.adaptive_batch_size >= 1,
             ">= 1 or unset (attack_batch_size)"),
            ("norms", self.norms, all(n in PAPER_EPS for n in self.norms), "Linf and/or L2"),
        ])

    def eps(self, norm: str) -> float:
        """The budget for ``norm``."""
        return self.eps_linf if norm == "Linf" else self.eps_l2

    def sweep_eps(self, norm: str) -> tuple[float, ...]:
        """The eps sweep for ``norm``, ascending."""
        return tuple(sorted(self.sweep_eps_linf if norm == "Linf" else self.sweep_eps_l2))

    def runs(self, part: str) -> bool:
        """Whether the chosen suite includes ``part``: "standard" (AutoAttack) or
        "adaptive" (margin, BPDA, transfer, sweeps)."""
        return self.attacks and self.suite in (part, "all")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
