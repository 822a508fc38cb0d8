"""Accuracy under the CIFAR-10-C common corruptions (:mod:`hahnet.eval.corruptions`).

* :func:`parse_names` / :func:`parse_severities`: ``all``, family names, ``extra``,
  corruption names; ``1-5``, ``1,3,5``;
* :class:`CorruptionCache`: the corrupted test set, generated once (seeded, uint8) and
  kept on disk, one ``.npy`` per (corruption, severity), in a folder keyed by the
  digest of the evaluated images (so by data set and ``--limit``), their number, the
  seed and the generation batch size;
* :func:`evaluate_corruptions`: accuracy per corruption and severity (sharded over
  torchrun processes like :func:`hahnet.eval.metrics.clean_accuracy`), plus per-block
  sparsity on corrupted images of each family at one severity;
* :func:`compare` / :func:`corruption_errors`: CE and relative CE against a baseline
  (Hendrycks & Dietterich 2019), with E = 1 - accuracy::

      CE_c          = sum_s E_{s,c} / sum_s E_{s,c}^base
      relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E_{s,c}^base - E_clean^base)
      mCE           = mean over the benchmark corruptions c of CE_c   (relative: same)

  A corruption whose baseline denominator is not positive has CE None and is left out
  of the mean. The means run over the evaluated corruptions of the 15-corruption
  benchmark (over all evaluated ones when none of those was evaluated).

Nothing here prints; loops take ``progress(phase, total)`` returning a per-batch callback
(see :mod:`hahnet.eval.runner`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hahnet.eval import corruptions as C
from hahnet.eval.base import EvalError, _check_data
from hahnet.eval.metrics import clean_accuracy, measurable, sparsity
from hahnet.eval.results import CorruptionResult

PhaseProgress = Callable[[str, int], Callable[[int], None]]
GENERATION_BATCH = 1000  # images per corruption batch: part of the cache key
SPARSITY_SEVERITY = 3
SPARSITY_IMAGES = 500     # per corruption (and clean), for the sparsity-under-corruption table


# ---------------------------------------------------------------- what to evaluate

def parse_names(spec: str) -> tuple[str, ...]:
    """``all`` (the 15 benchmark corruptions), ``extra`` (the 4 held-out), family names
    and corruption names, comma-separated, in any mix; returned in :data:`C.NAMES` order."""
    chosen: set[str] = set()
    for token in (t.strip().lower().replace("-", "_") for t in str(spec).split(",")):
        if not token:
            continue
        if token == "all":
            chosen.update(C.BENCHMARK)
        elif token in C.FAMILIES:
            chosen.update(C.FAMILIES[token])
        elif token in C.NAMES:
            chosen.add(token)
        else:
            raise EvalError(f"unknown corruption {token!r}; use all, a family "
                            f"({', '.join(C.FAMILIES)}) or names: {', '.join(C.NAMES)}")
    if not chosen:
        raise EvalError(f"no corruptions in {spec!r}")
    return tuple(n for n in C.NAMES if n in chosen)


def parse_severities(spec: str) -> tuple[int, ...]:
    """``1-5``, ``1,3,5`` or a mix (``1-2,5``): sorted, each in 1..5."""
    chosen: set[int] = set()
    try:
        for token in (t.strip() for t in str(spec).split(",")):
            if not token:
                continue
            lo, _, hi = token.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if lo_i > hi_i:
                raise ValueError
            chosen.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise EvalError(f"severities must be a range or list like 1-5 or 1,3,5, got "
                        f"{spec!r}") from None
    if not chosen or not chosen <= set(C.SEVERITIES):
        raise EvalError(f"severities must lie in 1..5, got {spec!r}")
    return tuple(sorted(chosen))


# ---------------------------------------------------------------- the cache

def data_digest(images: Tensor) -> str:
    """sha256 (first 16 hex digits) of the uint8 images, their shape included."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class CorruptionCache:
    """Corrupted uint8 copies of ``images``, one ``<name>-s<severity>.npy`` each, under
    ``cache_dir/corruptions/<digest>-n<N>-seed<S>-b<B>/``. ``generated`` counts the copies
    this instance made (the others were read from disk)."""

    def __init__(self, images: Tensor, cache_dir: str | Path, seed: int = 0,
                 batch_size: int = GENERATION_BATCH) -> None:
        if images.dtype != torch.uint8:
            raise EvalError(f"corruptions need uint8 images, got {images.dtype}")
        self.images, self.seed, self.batch_size = images, int(seed), int(batch_size)
        self.key = f"{data_digest(images)}-n{len(images)}-seed{self.seed}-b{self.batch_size}"
        self.folder = Path(cache_dir) / "corruptions" / self.key
        self.generated = 0

    def path(self, name: str, severity: int) -> Path:
        return self.folder / f"{name}-s{severity}.npy"

    def missing(self, names: Sequence[str], severities: Sequence[int]) -> list[tuple[str, int]]:
        return [(n, s) for n in names for s in severities if not self.path(n, s).exists()]

    def ensure(self, names: Sequence[str], severities: Sequence[int],
               progress: Callable[[int], None] | None = None) -> int:
        """Generate the missing copies (written atomically); returns how many."""
        todo = self.missing(names, severities)
        if todo:
            self.folder.mkdir(parents=True, exist_ok=True)
        for name, severity in todo:
            (_, _, out), = C.corrupt_dataset(self.images, [name], [severity], self.seed,
                                             self.batch_size)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.save(handle, out.numpy())
                os.replace(tmp, self.path(name, severity))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.generated += 1
            if progress:
                progress(len(self.images))
        return len(todo)

    def load(self, name: str, severity: int) -> Tensor:
        """One corrupted copy (generated first if missing or unreadable)."""
        path = self.path(name, severity)
        try:
            array = np.load(path)
            if array.shape != tuple(self.images.shape) or array.dtype != np.uint8:
                raise ValueError("wrong shape")
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            self.ensure([name], [severity])
            array = np.load(path)
        return torch.from_numpy(array)


# ---------------------------------------------------------------- evaluation

def _phase(progress: PhaseProgress | None, name: str, total: int):
    return None if progress is None or total <= 0 else progress(name, total)


def evaluate_corruptions(model: nn.Module, images: Tensor, labels: Tensor,
                         names: Sequence[str] = C.BENCHMARK,
                         severities: Sequence[int] = C.SEVERITIES, seed: int = 0,
                         cache_dir: str | Path | None = None, batch_size: int = 256,
                         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         progress: PhaseProgress | None = None, env: Any = None,
                         sparsity_severity: int | None = SPARSITY_SEVERITY,
                         sparsity_images: int = SPARSITY_IMAGES,
                         cache: CorruptionCache | None = None) -> CorruptionResult:
    """Accuracy of ``model`` on every (corruption, severity) copy of the uint8 ``images``.

    Phases for ``progress``: "generate corruptions" (only for copies not yet cached) and
    "corruptions" (every copy). With ``env`` (torchrun) each rank classifies its shard of
    whole batches and the counts are summed: the same numbers as one process; ranks that
    find a copy missing generate it themselves (identical files, atomic writes). Per-block
    sparsity (:func:`hahnet.eval.metrics.sparsity`) is measured on the first
    ``sparsity_images`` images of each corruption of a family at ``sparsity_severity``
    (if evaluated) and on the same clean images; it runs whole on every rank."""
    _check_data(images, labels)
    names = tuple(names)
    severities = tuple(C._check_severity(s) for s in severities)
    for name in names:
        C.family_of(name)
    start = time.perf_counter()
    if cache is None:
        if cache_dir is None:
            from hahnet.data.datasets import default_cache_dir
            cache_dir = default_cache_dir()
        cache = CorruptionCache(images, cache_dir, seed)
    todo = cache.missing(names, severities)
    cache.ensure(names, severities, _phase(progress, "generate corruptions",
                                           len(todo) * len(images)))
    n = len(labels)
    bar = _phase(progress, "corruptions", n * (1 + len(names) * len(severities)))
    clean = clean_accuracy(model, images, labels, batch_size, device, dtype, bar, env)
    accuracy: dict[str, list[float]] = {}
    for name in names:
        accuracy[name] = [clean_accuracy(model, cache.load(name, s), labels, batch_size,
                                         device, dtype, bar, env) for s in severities]
    layers: dict[str, list] = {}
    sev = sparsity_severity if sparsity_severity in severities else None
    k = min(n, sparsity_images)
    if sev is not None and k > 0 and measurable(model):
        layers["clean"] = sparsity(model, images[:k], batch_size=batch_size, device=device,
                                   dtype=dtype)
        for family, members in C.FAMILIES.items():
            chosen = [m for m in members if m in names]
            if chosen:
                x = torch.cat([cache.load(m, sev)[:k] for m in chosen])
                layers[family] = sparsity(model, x, batch_size=batch_size, device=device,
                                          dtype=dtype)
    return CorruptionResult(list(names), list(severities), int(seed), n, clean, accuracy,
                            sev, k if layers else 0, layers, cache_key=cache.key,
                            seconds=time.perf_counter() - start)


# ---------------------------------------------------------------- summaries and mCE

def mean_names(result: CorruptionResult) -> list[str]:
    """The corruptions the means run over: the evaluated benchmark ones, else all."""
    bench = [n for n in result.names if n in C.BENCHMARK]
    return bench or list(result.names)


def family_accuracy(result: CorruptionResult) -> dict[str, list[float]]:
    """Mean accuracy over each family's evaluated corruptions, per severity."""
    out = {}
    for family, members in C.FAMILIES.items():
        rows = [result.accuracy[m] for m in members if m in result.accuracy]
        if rows:
            out[family] = [float(np.mean(col)) for col in zip(*rows)]
    return out


def mean_accuracy(result: CorruptionResult, names: Sequence[str] | None = None) -> float:
    """Mean corruption accuracy over ``names`` (default :func:`mean_names`) and severities."""
    names = mean_names(result) if names is None else names
    return float(np.mean([a for n in names for a in result.accuracy[n]]))


def corruption_errors(result: CorruptionResult, baseline: CorruptionResult
                      ) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(CE_c, relative CE_c) per corruption of ``result`` against ``baseline`` (module
    docstring); None where the baseline's denominator is not positive."""
    if list(result.severities) != list(baseline.severities) \
            or not set(result.names) <= set(baseline.names):
        raise EvalError("corruption errors need the same corruptions and severities as the "
                        "baseline")
    e0, e0b = 1 - result.clean_accuracy, 1 - baseline.clean_accuracy
    ce, rel = {}, {}
    for name in result.names:
        err = [1 - a for a in result.accuracy[name]]
        base = [1 - a for a in baseline.accuracy[name]]
        ce[name] = sum(err) / sum(base) if sum(base) > 0 else None
        denom = sum(b - e0b for b in base)
        rel[name] = sum(e - e0 for e in err) / denom if denom > 0 else None
    return ce, rel


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def compare(results: Sequence[CorruptionResult], baseline_name: str) -> None:
    """Fill CE, relative CE, mCE and relative mCE of every result, in place, against the
    first (the baseline, whose mCE is 1 by definition)."""
    if not results:
        return
    base = results[0]
    for result in results:
        result.ce, result.relative_ce = corruption_errors(result, base)
        names = mean_names(result)
        result.mce = _mean([result.ce[n] for n in names])
        result.relative_mce = _mean([result.relative_ce[n] for n in names])
        result.baseline = baseline_name
