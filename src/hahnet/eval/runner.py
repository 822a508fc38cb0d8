"""One evaluation run: every measurement an :class:`EvalSettings` asks for on a loaded
model and test set (``evaluate_model``), the checks that the data fit the model, the
images to evaluate (test split or a checkpoint's held-out images), and the ETA."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from hahnet.config import EvalSettings, same_json
from hahnet.eval.adaptive import Source, Target, run_adaptive
from hahnet.eval.adaptive import estimate_seconds as adaptive_seconds
from hahnet.eval.attacks import adversarial_accuracy, compare_attacks, pgd_accuracy, square_accuracy
from hahnet.eval.base import (EvalError, Progress, _check_data, _eval_mode, _prepare,
                              cudnn_autotuning_off)
from hahnet.eval.journal import Journal, Recall, model_digest, recaller, tensor_digest
from hahnet.eval.metrics import (clean_accuracy, first_layer_filters, measurable, noise_accuracy,
                                 snr_db, sparsity)
from hahnet.eval.results import AttackSuite, EvalResult, jsonable

PhaseProgress = Callable[[str, int], Progress]  # (phase, images) -> per-batch callback


def _phase(progress: PhaseProgress | None, name: str, total: int) -> Progress | None:
    return None if progress is None else progress(name, total)


@cudnn_autotuning_off()
def evaluate_model(model: nn.Module, images: Tensor, labels: Tensor, settings: EvalSettings,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   progress: PhaseProgress | None = None, name: str = "model",
                   checkpoint: str | None = None,
                   info: dict[str, Any] | None = None, env: Any = None,
                   sources: Sequence[Source] = (), journal: Journal | None = None) -> EvalResult:
    """Run every measurement ``settings`` asks for; ``progress(phase, total)`` returns the
    callback for that phase's loop (the CLI opens a tqdm bar per phase). With ``journal``
    each attack row is saved when it finishes and a saved one is reused (a stopped
    evaluation resumes, :mod:`hahnet.eval.journal`). With ``env``
    (torchrun, :func:`hahnet.training.distributed.setup`) clean and noise accuracy and the attacks
    are sharded over the processes (same numbers as one process); sparsity and SNR, which
    are cheap, run whole on every process. cuDNN autotuning is off meanwhile (attacks
    change batch sizes all the time). ``sources``: (name, model) of the checkpoints
    whose adversarial examples the transfer attack uses (``suite`` adaptive or all)."""
    _check_data(images, labels)
    s, seconds, bs = settings, {}, settings.batch_size
    model = _prepare(model, device, dtype)
    sources = [(source_name, _prepare(source, device, dtype)) for source_name, source in sources]

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        seconds[key] = time.perf_counter() - start
        return value

    n = len(labels)
    clean = timed("clean", lambda: clean_accuracy(model, images, labels, bs, device, dtype,
                                                  _phase(progress, "clean", n), env))
    noise = None
    if s.noise_sigmas:
        noise = timed("noise", lambda: noise_accuracy(
            model, images, labels, s.noise_sigmas, s.noise_draws, s.noise_seed, bs, device,
            dtype, _phase(progress, "noise", n), env))
    layers, snr = [], None
    if s.layer_stats and measurable(model):
        layers = timed("sparsity", lambda: sparsity(model, images, labels, bs, device, dtype,
                                                    progress=_phase(progress, "sparsity", n)))
        snr = timed("snr", lambda: snr_db(model, images, labels, s.snr_sigma, s.snr_seed, bs,
                                          device, dtype, progress=_phase(progress, "snr", n)))
    suites = {}
    if s.attacks:
        m = n if s.attack_limit is None else min(n, s.attack_limit)
        # A seeded random order, not the first m: image folders are sorted by class.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(s.attack_seed))[:m]
        key = {} if journal is None else {
            "model": model_digest(model), "dtype": str(dtype), "settings": asdict(s),
            "images": tensor_digest(images[order], labels[order])}
        for norm in s.norms:
            recall = recaller(journal, {**key, "norm": norm})
            suites[norm] = timed(f"attacks_{norm}", lambda norm=norm, recall=recall: _suite(
                model, images, labels, order, norm, s, device, dtype, progress, env, sources,
                recall))
    filters = first_layer_filters(model)
    return EvalResult(name, checkpoint, _config_dict(model), info or {}, n, clean, noise,
                      suites, layers, snr, None if filters is None else filters.tolist(),
                      asdict(s), seconds)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {"class": type(model).__name__}


# The rows whose journal key holds only the settings they depend on, so that evaluations
# with other settings can share them (the rest are keyed by every setting).
SHARED_ROWS = ("APGD",)


def apgd_settings(s: EvalSettings, norm: str) -> dict[str, Any]:
    """The settings the paper's APGD row depends on, its journal key's: evaluations that
    differ elsewhere (noise, suite, adaptive budgets) share the row, which every suite runs
    first on the same attacked images."""
    return {"eps": s.eps(norm), "apgd_steps": s.apgd_steps, "attack_seed": s.attack_seed,
            "attack_batch_size": s.attack_batch_size}


def makes_row(s: EvalSettings, key: dict[str, Any]) -> bool:
    """Whether an evaluation with settings ``s`` makes the journal row (or batch) saved
    under ``key``: which rows of a folder that several evaluations share are its own (the
    image set and model are the folder's)."""
    norm = key.get("norm")
    if norm not in s.norms:
        return False
    made = apgd_settings(s, norm) if key.get("row") in SHARED_ROWS else asdict(s)
    return same_json(key.get("settings"), jsonable(made))


def _suite(model: nn.Module, all_images: Tensor, all_labels: Tensor, order: Tensor, norm: str,
           s: EvalSettings, device: torch.device | str, dtype: torch.dtype,
           progress: PhaseProgress | None, env: Any = None,
           sources: Sequence[Source] = (), recall: Recall = recaller(None, {})) -> AttackSuite:
    images, labels = all_images[order], all_labels[order]
    eps, m, bs, seed = s.eps(norm), len(labels), s.attack_batch_size, s.attack_seed
    apgd = recall("APGD", lambda batches: adversarial_accuracy(
        model, images, labels, norm, eps, s.apgd_steps, seed, None, bs, device, dtype,
        _phase(progress, f"APGD {norm}", m), env, batches), settings=apgd_settings(s, norm))
    pgd = None
    if s.pgd_steps > 0 and s.pgd_restarts > 0:
        pgd = recall("PGD", lambda batches: pgd_accuracy(
            model, images, labels, norm, eps, s.pgd_steps, s.pgd_restarts, seed, bs, device,
            dtype, _phase(progress, f"PGD {norm}", m), env, batches))
    square = None
    k = min(m, s.square_limit)
    if k > 0 and s.square_queries > 0:
        square = recall("Square", lambda batches: square_accuracy(
            model, images[:k], labels[:k], norm, eps, s.square_queries, seed, bs, device,
            dtype, _phase(progress, f"Square {norm}", k), env, batches))
    adaptive = None
    if s.attacks and s.suite != "paper":
        target = Target(model, images, labels, s, apgd.params["n_classes"], device, dtype,
                        progress, env, recall)
        adaptive = run_adaptive(target, norm, eps, apgd, [r for r in (pgd, square) if r],
                                sources)
    return AttackSuite(norm, eps, order.tolist(), apgd, pgd, square,
                       compare_attacks(apgd, pgd, square), adaptive)


def check_compatible(model: nn.Module, images: Tensor, labels: Tensor,
                     classes: Sequence[str] | None = None,
                     trained_classes: Sequence[str] | None = None) -> None:
    """Raise EvalError (one line) when the data cannot be fed to this model."""
    config = getattr(model, "config", None)
    channels, num_classes = getattr(config, "in_channels", None), getattr(config, "num_classes", None)
    if channels is not None and images.shape[1] != channels:
        raise EvalError(f"data has {images.shape[1]} channels but the model expects {channels}")
    if num_classes is not None:
        if classes is not None and len(classes) != num_classes:
            raise EvalError(f"data has {len(classes)} classes but the model has {num_classes}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise EvalError(f"data has labels up to {int(labels.max())} but the model has "
                            f"{num_classes} classes")
    if classes is not None and trained_classes and list(classes) != list(trained_classes):
        raise EvalError(f"data classes {list(classes)[:4]}... differ from the checkpoint's "
                        f"{list(trained_classes)[:4]}...")
    pools = getattr(model, "num_pools", 0)
    if min(images.shape[-2:]) < 2 ** pools:
        raise EvalError(f"images are {images.shape[-2]}x{images.shape[-1]}, the model needs "
                        f"at least {2 ** pools}x{2 ** pools}")


def checkpoint_name(path: str) -> str:
    """A short model name: the run directory's name (also for its model.safetensors)."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return str(path)
    if parts[-1] == "model.safetensors" and len(parts) > 1:
        return parts[-2]
    return parts[-1].removesuffix(".safetensors")


def time_batch(model: nn.Module, image_shape: Sequence[int], batch_size: int,
               device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Seconds for one forward pass and one forward+backward (to the input) of a batch."""
    model = _prepare(model, device, dtype)
    x = torch.rand(batch_size, *image_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with _eval_mode(model):
        with torch.no_grad():
            model(x)  # warm-up: allocator and kernel selection for this shape
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        sync()
        forward = time.perf_counter() - start
        start = time.perf_counter()
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)
        sync()
    return forward, time.perf_counter() - start


@cudnn_autotuning_off()  # as evaluate_model runs
def estimate_seconds(model: nn.Module, settings: EvalSettings, n_images: int,
                     image_shape: Sequence[int] = (3, 32, 32), num_classes: int | None = None,
                     device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Rough seconds per phase and "total": one timed batch times the number of forward /
    backward calls, assuming every image survives every attack stage (so usually high)."""
    s = settings
    m = n_images if s.attack_limit is None else min(n_images, s.attack_limit)
    abs_ = max(1, min(s.attack_batch_size, m))
    f, _ = time_batch(model, image_shape, max(1, min(s.batch_size, n_images)), device, dtype)
    fa, ga = time_batch(model, image_shape, abs_, device, dtype) if s.attacks else (0.0, 0.0)
    batches = math.ceil(n_images / max(s.batch_size, 1))
    out = {"clean": batches * f,
           "noise": batches * f * s.noise_draws * sum(1 for x in s.noise_sigmas if x > 0)}
    if s.layer_stats:
        out["sparsity"], out["snr"] = batches * f, 2 * batches * f
    if s.attacks:
        classes = num_classes or getattr(getattr(model, "config", None), "num_classes", 10)
        targets = classes - 1 if classes >= 4 else 0
        k = min(m, s.square_limit) if s.square_queries > 0 else 0
        calls = (s.apgd_steps + 1) * (1 + targets) + s.pgd_steps * s.pgd_restarts
        per_norm = math.ceil(m / abs_) * (calls * ga + (3 + targets + s.pgd_restarts) * fa)
        per_norm += math.ceil(k / abs_) * s.square_queries * fa
        for norm in s.norms:
            out[f"attacks_{norm}"] = per_norm + adaptive_seconds(s, m, abs_, fa, ga, classes)
    out["total"] = sum(out.values())
    return out


def evaluation_split(dataset: Any, split: str, infos: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    """The test set, or the training images every checkpoint held out (the same seeded
    split ``train --holdout`` made); EvalError when there is none or they differ.
    ``infos``: (path, checkpoint info) per checkpoint."""
    from hahnet.data.datasets import split_holdout

    if split == "test":
        return dataset.test
    held = set()
    for path, info in infos:
        train = info.get("train") or {}
        if not train.get("holdout"):
            raise EvalError(f"{path} was trained without --holdout, so no training images are "
                            f"held out; evaluate it with --split test")
        held.add((float(train["holdout"]), int(train.get("seed", 0))))
    if len(held) > 1:
        raise EvalError(f"the checkpoints held out different images (holdout, seed: "
                        f"{sorted(held)}); evaluate them separately")
    fraction, seed = held.pop()
    return split_holdout(dataset.train, fraction, seed)[1]


def shown_path(path: str | Path) -> str:
    """The data path as a report shows it: as given when relative, only the folder's name
    when absolute (reports are shared; the layout of the machine that wrote them is not)."""
    return Path(path).name if Path(path).is_absolute() else str(path)


def data_record(path: str, dataset: Any, test: Any, limit: int | None, limit_seed: int = 0,
                split: str = "test") -> dict[str, Any]:
    """How the evaluated images were chosen, for results.json and the report."""
    return {"path": shown_path(path), "name": dataset.name, "split": split,
            "n_images": len(test), "limit": limit, "limit_seed": limit_seed,
            "classes": list(test.classes)}
