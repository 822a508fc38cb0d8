"""The attacks a careful reviewer runs on a defense with thresholds, beyond the paper's
APGD-CE + APGD-T (docs/evaluation.md):

* **AutoAttack** (standard version): the paper's cascade continued by FAB-T and Square on
  the images still standing, with AutoAttack's step and query counts;
* **margin**: APGD with the DLR (logit-margin) loss, untargeted and targeted, restarts;
* **BPDA**: APGD-CE and APGD-DLR through the surrogate gradients of :mod:`hahnet.eval.bpda`;
* **transfer**: PGD examples crafted on other checkpoints (plain, and with BPDA when the
  source has HaH operations), classified by this model;
* **eps sweeps** of APGD (and of BPDA);
* the **worst case per image** over everything run: the headline robust accuracy.

With ``cascade`` each of margin, BPDA and transfer attacks only the images that the paper
suite and the rows before it left standing (as AutoAttack chains its attacks): the worst
case is the same measurement at a fraction of the cost, and each row reads as the worst
case so far rather than as that attack alone.

Every attack goes through :func:`hahnet.eval.attacks.worst_case`, so budgets and pixel
range are checked and the work is sharded under torchrun like the paper's attacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from hahnet.config import EvalSettings
from hahnet.eval.attacks import (Stage, StageRun, _attacks_module, _make, apgd_stage,
                                 apgdt_stage, fab_t_stage, square_stage, worst_case)
from hahnet.eval.base import BatchStore, Progress
from hahnet.eval.bpda import Surrogate, bpda, has_hah_ops, parse_surrogate
from hahnet.eval.journal import Recall, model_digest, recaller, tensor_digest
from hahnet.eval.results import AdaptiveResult, AttackResult, EpsSweep

Source = tuple[str, nn.Module]  # a transfer source: (name, model on the same device)
# The share of images that reach a cascade's later stages, for time estimates only
# (measured at the paper's budgets: 10-30% survive APGD-CE).
SURVIVING = 0.3


@dataclass(frozen=True)
class Target:
    """The model under attack, its attacked images (in the seeded attack order) and how
    to attack them; ``progress(phase, total)`` opens a progress callback per phase;
    ``recall`` reuses rows a stopped evaluation saved and ``batches`` the finished batches
    of the row being computed (:mod:`hahnet.eval.journal`)."""

    model: nn.Module
    images: Tensor
    labels: Tensor
    settings: EvalSettings
    classes: int
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    progress: Callable[[str, int], Progress] | None = None
    env: Any = None
    recall: Recall = recaller(None, {})
    batches: BatchStore | None = None

    def run(self, norm: str, eps: float, stages: Sequence[Stage], name: str,
            params: dict[str, Any], n: int, start: Sequence[bool] | None = None) -> AttackResult:
        """The worst case over ``stages`` on the first ``n`` attacked images (``start``:
        only those marked True; with ``cascade`` gathered into full batches first)."""
        s = self.settings
        if start is not None and s.cascade:
            return self._gathered(norm, eps, stages, name, params, n, start)
        progress = None if self.progress is None else self.progress(f"{name} {norm}", n)
        return worst_case(self.model, self.images[:n], self.labels[:n], norm, eps, stages,
                          name, params, self.batch_size, self.device, self.dtype,
                          s.attack_seed, progress, self.env, start, self.batches)

    @property
    def batch_size(self) -> int:
        """The attack batch size of the rows run here (beyond the paper suite)."""
        return self.settings.adaptive_batch_size or self.settings.attack_batch_size

    @property
    def adaptive_n(self) -> int:
        return min(len(self.labels), self.settings.adaptive_limit)

    def _gathered(self, norm: str, eps: float, stages: Sequence[Stage], name: str,
                  params: dict[str, Any], n: int, start: Sequence[bool]) -> AttackResult:
        """``run`` on only the images ``start`` marks, batched together: a few survivors
        per batch would cost almost as many (overhead-bound) steps as full batches. The
        rest count as broken "earlier"; stage shares stay fractions of all ``n``."""
        keep = [i for i in range(n) if start[i]]
        robust, broken_by = [False] * n, ["earlier"] * n
        if not keep:
            return AttackResult(name, norm, eps, n, 0.0 if n else float("nan"), robust,
                                {stage: 0.0 for stage, _ in stages}, 0.0, 0.0, params, broken_by)
        index = torch.tensor(keep)
        sub = worst_case(
            self.model, self.images[index], self.labels[index], norm, eps, stages, name, params,
            self.batch_size, self.device, self.dtype, self.settings.attack_seed,
            None if self.progress is None else self.progress(f"{name} {norm}", len(keep)),
            self.env, batches=self.batches)
        for j, i in enumerate(keep):
            robust[i], broken_by[i] = sub.robust[j], sub.broken_by[j]
        share = len(keep) / n
        return AttackResult(name, norm, eps, n, sum(robust) / n, robust,
                            {stage: alive * share for stage, alive in sub.stages.items()},
                            sub.max_perturbation, sub.seconds, params, broken_by)


def under_bpda(model: nn.Module, surrogate: Surrogate, run: StageRun) -> StageRun:
    """An attack stage whose gradients flow through ``surrogate`` (forward exact)."""
    def wrapped(x: Tensor, y: Tensor, s: int) -> Tensor:
        with bpda(model, surrogate):
            return run(x, y, s)
    return wrapped


def transfer_stage(source: nn.Module, device: torch.device | str, norm: str, eps: float,
                   steps: int, surrogate: Surrogate | None = None) -> StageRun:
    """PGD with CE loss on ``source`` (through ``surrogate`` if given): random start,
    step 2.5 eps / steps, the final iterate returned whether or not it fools the source."""
    ta = _attacks_module()
    cls = ta.PGD if norm == "Linf" else ta.PGDL2

    def run(x: Tensor, y: Tensor, s: int) -> Tensor:
        torch.manual_seed(s)  # PGD draws its start from the global RNG (forked by worst_case)
        attack = _make(cls, source, device, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                       random_start=True)
        return attack(x, y)
    return run if surrogate is None else under_bpda(source, surrogate, run)


def _merge(first: AttackResult, rest: AttackResult, name: str,
           params: dict[str, Any]) -> AttackResult:
    """One cascade from ``first`` and ``rest`` (which attacked only first's survivors)."""
    broken_by = [b if b != "earlier" else a for a, b in zip(first.broken_by, rest.broken_by)]
    return AttackResult(name, rest.norm, rest.eps, rest.n_images, rest.accuracy, rest.robust,
                        {**first.stages, **rest.stages},
                        max(first.max_perturbation, rest.max_perturbation),
                        first.seconds + rest.seconds, params, broken_by)


def autoattack(t: Target, norm: str, eps: float, paper: AttackResult) -> AttackResult:
    """AutoAttack's standard version: the paper's APGD-CE and APGD-T (``paper``, on the same
    images), then FAB-T and Square (``autoattack_queries``) on the images still robust."""
    s = t.settings
    params = {"version": "standard", "apgd_ce": {"steps": s.apgd_steps, "n_restarts": 1},
              "apgd_t": {"steps": s.apgd_steps, "n_restarts": 1, "n_target_classes": t.classes - 1},
              "fab_t": {"steps": s.fab_steps, "n_restarts": 1, "n_target_classes": t.classes - 1,
                        "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
              "square": {"n_queries": s.autoattack_queries, "n_restarts": 1, "p_init": 0.8},
              "seed": s.attack_seed}
    stages: list[Stage] = []
    if t.classes >= 4:
        stages.append(("FAB-T", fab_t_stage(t.model, t.device, norm, eps, s.fab_steps, t.classes)))
    stages.append(("Square", square_stage(t.model, t.device, norm, eps, s.autoattack_queries)))
    rest = t.run(norm, eps, stages, "FAB-T+Square", params, paper.n_images, paper.robust)
    return _merge(paper, rest, "AutoAttack", params)


def margin(t: Target, norm: str, eps: float, start: Sequence[bool] | None = None
           ) -> AttackResult:
    """APGD with the DLR (logit-margin) loss, untargeted, then targeted (APGD-T), each with
    ``restarts`` restarts (``start``: only on the images marked True, as in worst_case)."""
    s, r = t.settings, t.settings.restarts
    stages: list[Stage] = [("APGD-DLR", apgd_stage(t.model, t.device, norm, eps, s.apgd_steps,
                                                   "dlr", r))]
    if t.classes >= 4:
        stages.append(("APGD-T-DLR", apgdt_stage(t.model, t.device, norm, eps, s.apgd_steps,
                                                 t.classes, r)))
    params = {"steps": s.apgd_steps, "n_restarts": r, "loss": "dlr",
              "n_target_classes": t.classes - 1 if t.classes >= 4 else 0, "seed": s.attack_seed}
    return t.run(norm, eps, stages, "margin", params, t.adaptive_n, start)


def surrogates(s: EvalSettings) -> list[Surrogate]:
    """The BPDA variants the settings ask for."""
    return [parse_surrogate(name, s.bpda_temperature) for name in s.bpda]


def bpda_attack(t: Target, norm: str, eps: float, start: Sequence[bool] | None = None
                ) -> AttackResult:
    """For each BPDA variant, APGD-CE then APGD-DLR (``restarts`` each) through its
    surrogate gradients; worst case per image over all of them."""
    s, r = t.settings, t.settings.restarts
    stages: list[Stage] = []
    for surrogate in surrogates(s):
        for loss in ("ce", "dlr"):
            run = apgd_stage(t.model, t.device, norm, eps, s.apgd_steps, loss, r)
            stages.append((f"BPDA[{surrogate.name}] APGD-{loss.upper()}",
                           under_bpda(t.model, surrogate, run)))
    params = {"steps": s.apgd_steps, "n_restarts": r, "variants": list(s.bpda),
              "temperature": s.bpda_temperature, "seed": s.attack_seed}
    return t.run(norm, eps, stages, "BPDA", params, t.adaptive_n, start)


def transfer(t: Target, norm: str, eps: float, sources: Sequence[Source],
             start: Sequence[bool] | None = None) -> AttackResult:
    """Examples crafted on each source (PGD-CE, ``transfer_steps``; also through the first
    BPDA variant when the source has HaH operations), classified by the target."""
    s = t.settings
    stages: list[Stage] = []
    first = surrogates(s)[0] if s.bpda else Surrogate()
    for name, source in sources:
        stages.append((f"from {name}", transfer_stage(source, t.device, norm, eps,
                                                      s.transfer_steps)))
        if has_hah_ops(source):
            stages.append((f"from {name} (BPDA {first.name})", transfer_stage(
                source, t.device, norm, eps, s.transfer_steps, first)))
    params = {"attack": "PGD-CE", "steps": s.transfer_steps, "random_start": True,
              "sources": [name for name, _ in sources], "bpda": first.name,
              "seed": s.attack_seed}
    return t.run(norm, eps, stages, "transfer", params, t.adaptive_n, start)


def eps_sweep(t: Target, norm: str, surrogate: Surrogate | None = None) -> EpsSweep:
    """APGD-CE then APGD-DLR (100 steps as set, one restart) at each eps of the sweep,
    each eps attacked on its own, on the first ``sweep_limit`` attacked images."""
    s, start = t.settings, time.perf_counter()
    n = min(len(t.labels), s.sweep_limit)
    losses = ("ce", "dlr") if t.classes >= 3 else ("ce",)
    name = ("APGD" if surrogate is None else f"BPDA[{surrogate.name}] APGD")
    accuracy = []
    for eps in s.sweep_eps(norm):
        stages = []
        for loss in losses:
            run = apgd_stage(t.model, t.device, norm, eps, s.apgd_steps, loss)
            stages.append((f"APGD-{loss.upper()}",
                           run if surrogate is None else under_bpda(t.model, surrogate, run)))
        accuracy.append(t.run(norm, eps, stages, f"{name} eps {eps:.4g}", {}, n).accuracy)
    params = {"stages": [f"APGD-{loss.upper()}" for loss in losses], "steps": s.apgd_steps,
              "n_restarts": 1, "seed": s.attack_seed}
    return EpsSweep(norm, name, n, list(s.sweep_eps(norm)), accuracy,
                    time.perf_counter() - start, params)


def worst_over(results: dict[str, AttackResult], n: int) -> AttackResult:
    """Per image, robust only if no attack that ran on it broke it; ``broken_by`` names the
    first row (in ``results``' order) that did. Each row covers its first images."""
    robust, broken_by = [True] * n, [None] * n
    for row, result in results.items():
        for i in range(min(n, result.n_images)):
            if robust[i] and not result.robust[i]:
                robust[i] = False
                clean = result.broken_by is not None and result.broken_by[i] == "clean"
                broken_by[i] = "clean" if clean else row
    first = next(iter(results.values()))
    per_row = {row: sum(r.robust[:n]) / min(n, r.n_images) for row, r in results.items()
               if min(n, r.n_images)}
    return AttackResult("worst case", first.norm, first.eps, n,
                        sum(robust) / n if n else float("nan"), robust, per_row,
                        max(r.max_perturbation for r in results.values()),
                        sum(r.seconds for r in results.values()),
                        {"rows": list(results), "images_per_row": {
                            row: min(n, r.n_images) for row, r in results.items()}}, broken_by)


def run_adaptive(t: Target, norm: str, eps: float, paper: AttackResult,
                 checks: Sequence[AttackResult] = (),
                 sources: Sequence[Source] = ()) -> AdaptiveResult:
    """Every attack of the chosen suite beyond ``paper`` (the paper's result on the same
    attacked images) at one norm, and the worst case per image over all of them and the
    ``checks`` (PGD, Square) that ran. With ``cascade`` margin, BPDA and transfer attack
    only what the rows before them left standing."""
    s, rows, notes, sweeps = t.settings, {}, [], []
    n = t.adaptive_n if s.runs("adaptive") else paper.n_images
    standing = None
    if s.cascade and s.runs("adaptive"):
        standing = worst_over({"paper": paper, **{c.attack: c for c in checks}}, n).robust
        notes.append("cascade: margin, BPDA and transfer each attacked only the images the "
                     "attacks above them left standing, so each row is the worst case so far")

    def recall(row: str, compute: Callable[[Target, Sequence[bool] | None], AttackResult],
               **extra: Any) -> AttackResult:
        nonlocal standing
        if standing is None:
            return t.recall(row, lambda b: compute(replace(t, batches=b), None), **extra)
        start = list(standing)  # the images this row attacks are part of its key
        result = t.recall(row, lambda b: compute(replace(t, batches=b), start), **extra,
                          standing=tensor_digest(torch.tensor(start)))
        standing = [a and b for a, b in zip(standing, result.robust)]
        return result

    if s.runs("standard"):
        rows["AutoAttack"] = recall("AutoAttack", lambda rt, _: autoattack(rt, norm, eps, paper))
    if s.runs("adaptive"):
        rows["margin"] = recall("margin", lambda rt, start: margin(rt, norm, eps, start))
        hah = has_hah_ops(t.model)
        if hah and s.bpda:
            rows["BPDA"] = recall("BPDA", lambda rt, start: bpda_attack(rt, norm, eps, start))
        else:
            notes.append("BPDA not run: " + ("the model has no HaH operations (threshold, "
                         "divisive normalization), so BPDA would be plain APGD" if not hah
                         else "no BPDA variant chosen"))
        if sources:
            rows["transfer"] = recall(
                "transfer", lambda rt, start: transfer(rt, norm, eps, sources, start),
                sources=[(name, model_digest(m)) for name, m in sources])
        else:
            notes.append("transfer not run: no source checkpoint (--transfer-from)")
        if s.sweep_limit > 0:
            sweeps.append(t.recall("sweep APGD", lambda b: eps_sweep(replace(t, batches=b), norm)))
            if hah and s.bpda:
                sweeps.append(t.recall("sweep BPDA", lambda b: eps_sweep(
                    replace(t, batches=b), norm, surrogates(s)[0])))
    everything = {"paper": paper, **rows, **{check.attack: check for check in checks}}
    return AdaptiveResult(s.suite, rows, worst_over(everything, n), sweeps, notes)


def estimate_seconds(s: EvalSettings, m: int, batch: int, forward: float, backward: float,
                     classes: int) -> float:
    """Rough seconds of the attacks beyond the paper's at one norm, from the seconds of
    one batch's ``forward`` and forward+backward (``backward``) on ``m`` attacked images:
    the first stage of a cascade on every image, later stages on SURVIVING of them, one
    transfer source with BPDA; with ``cascade`` margin, BPDA and transfer on SURVIVING."""
    def batches(n: int) -> int:
        return -(-n // batch)

    targets = classes - 1 if classes >= 4 else 0
    apgd = (s.apgd_steps + 1) * backward * s.restarts
    total = 0.0
    if s.runs("standard"):
        total += batches(m) * SURVIVING * (2 * s.fab_steps * targets * backward
                                           + s.autoattack_queries * forward)
    if s.runs("adaptive"):
        k, variants = batches(min(m, s.adaptive_limit)), len(s.bpda)
        rows = k * apgd * (1 + SURVIVING * targets)                      # margin
        rows += k * apgd * (1 + SURVIVING * (2 * variants - 1))          # BPDA
        rows += k * 2 * (s.transfer_steps * backward + forward)          # transfer
        total += rows * (SURVIVING if s.cascade else 1.0)
        sweeps = max(len(s.sweep_eps_linf), len(s.sweep_eps_l2))
        total += batches(min(m, s.sweep_limit)) * sweeps * 2 * (s.apgd_steps + 1) \
            * backward * (1 + SURVIVING)                                 # APGD and BPDA
    return total
