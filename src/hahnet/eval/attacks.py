"""Adversarial attacks through torchattacks: the paper's APGD-CE + APGD-T (as AutoAttack
runs them), a stronger PGD and the black-box Square attack, each re-checked here (budget,
pixel range, prediction) and sharded over processes with ``env``."""

from __future__ import annotations

import contextlib
import io
import time
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from hahnet.config import PAPER_EPS
from hahnet.training.device import rng_kept
from hahnet.eval.base import (BatchStore, EvalError, Progress, _batches, _check_data,
                              _eval_mode, _prepare, _to_unit, predict, tensor_digest)
from hahnet.eval.results import AttackComparison, AttackResult


StageRun = Callable[[Tensor, Tensor, int], Tensor]  # (x, y, seed) -> x_adv
Stage = tuple[str, StageRun]


def perturbation_norms(x: Tensor, x_adv: Tensor, norm: str) -> Tensor:
    """Per-image ||x_adv - x|| in the l_inf or l_2 norm (float64)."""
    delta = (x_adv.double() - x.double()).flatten(1)
    if norm == "Linf":
        return delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(len(delta))
    return torch.linalg.vector_norm(delta, dim=1)


def check_adversarial(x: Tensor, x_adv: Tensor, norm: str, eps: float,
                      rtol: float = 1e-5) -> float:
    """Raise EvalError unless every adversarial image lies in [0, 1] and within eps of
    its clean image (up to float rounding); returns the largest perturbation."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise EvalError(f"attack returned {tuple(x_adv.shape)} (or non-finite values) for "
                        f"inputs {tuple(x.shape)}")
    if len(x_adv) and (x_adv.min() < 0 or x_adv.max() > 1):
        raise EvalError("attack left the [0, 1] pixel range")
    largest = float(perturbation_norms(x, x_adv, norm).max()) if len(x) else 0.0
    if largest > eps * (1 + rtol) + 1e-7:
        raise EvalError(f"{norm} attack exceeded its budget: perturbation {largest:.6g} > "
                        f"eps {eps:.6g}")
    return largest


def _attacks_module() -> Any:
    try:
        import torchattacks
    except ImportError as error:
        raise EvalError("torchattacks is missing: pip install --no-deps 'torchattacks>=3.5' "
                        f"({error})") from None
    return torchattacks


def _make(cls: type, model: nn.Module, device: torch.device | str, **options: Any) -> Any:
    """Build a torchattacks attack silently (it prints when a model has no parameters)."""
    with contextlib.redirect_stdout(io.StringIO()):
        attack = cls(model, **options)
    attack.set_device(torch.device(device))
    return attack


def _norm_eps(norm: str, eps: float | None) -> float:
    if norm not in PAPER_EPS:
        raise EvalError(f"unknown norm {norm!r}; choose Linf or L2")
    eps = PAPER_EPS[norm] if eps is None else float(eps)
    if eps < 0:
        raise EvalError(f"eps must be >= 0, got {eps}")
    return eps


def _num_classes(model: nn.Module, images: Tensor, device: torch.device | str,
                 dtype: torch.dtype) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_classes"):
        return int(config.num_classes)
    with torch.no_grad(), _eval_mode(model):
        return int(model(_to_unit(images[:1], device, dtype)).shape[1])


# Per-image outcome codes in worst_case's shard sums (0 = another rank's image).
_ROBUST, _CLEAN_ERROR, _SKIPPED, _FIRST_STAGE = 1, 2, 3, 4


def worst_case(model: nn.Module, images: Tensor, labels: Tensor, norm: str, eps: float,
               stages: Sequence[Stage], name: str, params: dict[str, Any],
               batch_size: int = 128, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0,
               progress: Progress | None = None, env: Any = None,
               start: Sequence[bool] | None = None,
               batches: BatchStore | None = None) -> AttackResult:
    """Run attack stages in order, each only on images no earlier stage broke; an image
    counts robust only if the model still classifies every returned example correctly
    (re-checked here, with the eps and [0, 1] bounds verified). Batch i is attacked with
    seed ``seed + i``; with ``env`` (torchrun) each rank attacks its shard of whole
    batches and the outcomes are summed over ranks: the same result as one process.
    ``start``: per image, False = broken by an earlier attack, not attacked again (as
    AutoAttack's cascade); ``broken_by`` names the stage that broke each image.
    ``batches``: each finished batch's outcome is saved there and a saved one reused (a
    stopped row resumes at its first unfinished batch with the same result)."""
    _check_data(images, labels)
    model = _prepare(model, device, dtype)
    n, begin, width = len(labels), time.perf_counter(), len(stages)
    ranks, rank = (env.world_size, env.rank) if env is not None and env.active else (1, 0)
    if start is not None and len(start) != n:
        raise EvalError(f"start has {len(start)} entries for {n} images")
    todo_mask = None if start is None else torch.tensor(list(start), dtype=torch.bool)
    call = None if batches is None else {
        "name": name, "params": params, "norm": norm, "eps": eps, "seed": seed,
        "stages": [stage for stage, _ in stages], "batch_size": batch_size, "dtype": str(dtype),
        "images": tensor_digest(images, labels, *(() if todo_mask is None else (todo_mask,)))}
    reused = 0.0

    def attack(part: slice) -> Tensor:
        # [outcome code per image | images alive after each stage | largest perturbation per rank]
        nonlocal reused
        out = torch.zeros(n + width + ranks, dtype=torch.float64)
        with _eval_mode(model), rng_kept(device):  # torchattacks reseeds the global RNGs
            for index, sl in enumerate(_batches(n, batch_size)):
                if not part.start <= sl.start < part.stop:
                    continue
                mask = None if todo_mask is None else todo_mask[sl]
                compute = partial(_attack_batch, model, images[sl], labels[sl], mask, stages,
                                  norm, eps, seed + index, device, dtype)
                done, saved = ((compute(), False) if batches is None
                               else batches.recall(call, index, compute))
                reused += float(done["seconds"]) if saved else 0.0
                out[sl] = torch.tensor(done["codes"], dtype=torch.float64)
                out[n:n + width] += torch.tensor(done["survivors"], dtype=torch.float64)
                out[n + width + rank] = max(float(out[n + width + rank]), float(done["largest"]))
                if progress:
                    progress(sl.stop - sl.start)
        return out

    if ranks > 1:
        from hahnet.training.distributed import sum_over_shards

        total = sum_over_shards(env, n, batch_size, attack)
    else:
        total = attack(slice(0, n))
    robust, broken_by, survivors = _outcomes(total, n, [stage for stage, _ in stages])
    return AttackResult(name, norm, eps, n, sum(robust) / n if n else float("nan"), robust,
                        survivors, float(total[n + width:].max()),
                        time.perf_counter() - begin + reused, params, broken_by)


def _attack_batch(model: nn.Module, images: Tensor, labels: Tensor, todo_mask: Tensor | None,
                  stages: Sequence[Stage], norm: str, eps: float, seed: int,
                  device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """One batch of worst_case: per image its outcome code, the images alive after each
    stage, the largest perturbation and the seconds it took (a JSON object)."""
    tic = time.perf_counter()
    x, y = _to_unit(images, device, dtype), labels.to(device)
    correct = predict(model, x) == y
    code = torch.where(correct, _ROBUST, _CLEAN_ERROR).cpu()
    alive, survivors, largest = correct.clone(), [], 0.0
    if todo_mask is not None:
        skipped = todo_mask.to(device)
        code[(~skipped & correct).cpu()] = _SKIPPED
        alive &= skipped
    for k, (_, run) in enumerate(stages):
        todo = alive.nonzero().flatten()
        if len(todo):
            adv = run(x[todo], y[todo], seed).detach().to(dtype)
            largest = max(largest, check_adversarial(x[todo], adv, norm, eps))
            alive[todo] = predict(model, adv) == y[todo]
            code[todo[~alive[todo]].cpu()] = _FIRST_STAGE + k
        survivors.append(int(alive.sum()))
    return {"codes": code.tolist(), "survivors": survivors, "largest": largest,
            "seconds": time.perf_counter() - tic}


def _outcomes(total: Tensor, n: int, stages: list[str]
              ) -> tuple[list[bool], list[str | None], dict[str, float]]:
    """worst_case's summed outcome codes as (robust, broken_by, survivors per stage)."""
    codes = total[:n].round().long().tolist()
    names = [None, None, "clean", "earlier"] + stages
    survivors = {stage: float(total[n + k]) / max(n, 1) for k, stage in enumerate(stages)}
    return [c == _ROBUST for c in codes], [names[c] for c in codes], survivors


def _stage(cls: type, model: nn.Module, device: torch.device | str,
           **options: Any) -> StageRun:
    """A torchattacks attack as a stage, built for each batch with the batch's seed."""
    def run(x: Tensor, y: Tensor, s: int) -> Tensor:
        return _make(cls, model, device, seed=s, **options)(x, y)
    return run


def apgd_stage(model: nn.Module, device: torch.device | str, norm: str, eps: float,
               steps: int, loss: str = "ce", restarts: int = 1) -> StageRun:
    """AutoAttack's APGD (untargeted) with the CE or DLR loss, as an attack stage."""
    return _stage(_attacks_module().APGD, model, device, norm=norm, eps=eps, steps=steps,
                  n_restarts=restarts, loss=loss)


def apgdt_stage(model: nn.Module, device: torch.device | str, norm: str, eps: float,
                steps: int, classes: int, restarts: int = 1) -> StageRun:
    """AutoAttack's APGD-T: targeted DLR loss, each of the ``classes - 1`` most likely
    other classes as target in turn (9 on CIFAR-10, AutoAttack's standard version)."""
    return _stage(_attacks_module().APGDT, model, device, norm=norm, eps=eps, steps=steps,
                  n_restarts=restarts, n_classes=classes)


def fab_t_stage(model: nn.Module, device: torch.device | str, norm: str, eps: float,
                steps: int, classes: int) -> StageRun:
    """AutoAttack's FAB-T: the minimal-norm FAB attack towards each of the ``classes - 1``
    most likely other classes, one restart; examples beyond eps count as failures."""
    return _stage(_attacks_module().FAB, model, device, norm=norm, eps=eps, steps=steps,
                  n_restarts=1, multi_targeted=True, n_classes=classes)


def square_stage(model: nn.Module, device: torch.device | str, norm: str, eps: float,
                 queries: int) -> StageRun:
    """The black-box Square attack (margin loss, one restart, p_init 0.8 as AutoAttack)."""
    return _stage(_attacks_module().Square, model, device, norm=norm, eps=eps,
                  n_queries=queries, n_restarts=1, p_init=0.8, loss="margin")


def adversarial_accuracy(model: nn.Module, images: Tensor, labels: Tensor,
                         norm: str = "Linf", eps: float | None = None, steps: int = 100,
                         seed: int = 0, num_classes: int | None = None,
                         batch_size: int = 128, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32,
                         progress: Progress | None = None, env: Any = None,
                         batches: BatchStore | None = None) -> AttackResult:
    """The paper's attack: AutoAttack's APGD-CE then APGD-T (targeted DLR, every other
    class as target), one restart each, worst case per image. APGD-T needs >= 4 classes.
    ``batches``: where finished batches are kept (see worst_case)."""
    eps = _norm_eps(norm, eps)
    classes = num_classes or _num_classes(model, images, device, dtype)
    stages: list[Stage] = [("APGD-CE", apgd_stage(model, device, norm, eps, steps))]
    if classes >= 4:
        stages.append(("APGD-T", apgdt_stage(model, device, norm, eps, steps, classes)))
    params = {"steps": steps, "n_restarts": 1, "seed": seed, "n_classes": classes,
              "apgd_t": classes >= 4}
    return worst_case(model, images, labels, norm, eps, stages, "APGD-CE+APGD-T", params,
                      batch_size, device, dtype, seed, progress, env, batches=batches)


def pgd_accuracy(model: nn.Module, images: Tensor, labels: Tensor, norm: str = "Linf",
                 eps: float | None = None, steps: int = 50, restarts: int = 5, seed: int = 0,
                 batch_size: int = 128, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 progress: Progress | None = None, env: Any = None,
                 batches: BatchStore | None = None) -> AttackResult:
    """PGD (l_inf) or PGD-L2 with CE loss, step 2.5 eps / steps, random starts; worst case
    over ``restarts`` runs: a check that more steps and restarts find little more."""
    ta, eps = _attacks_module(), _norm_eps(norm, eps)
    cls, alpha = (ta.PGD if norm == "Linf" else ta.PGDL2), 2.5 * eps / max(steps, 1)

    def restart(r: int) -> Stage:
        def run(x: Tensor, y: Tensor, s: int) -> Tensor:
            torch.manual_seed(s * 1009 + r)  # PGD draws its start from the global RNG
            return _make(cls, model, device, eps=eps, alpha=alpha, steps=steps,
                         random_start=True)(x, y)
        return f"PGD-{r + 1}", run

    params = {"steps": steps, "restarts": restarts, "alpha": alpha, "seed": seed}
    return worst_case(model, images, labels, norm, eps, [restart(r) for r in range(restarts)],
                      f"PGD-{steps}x{restarts}", params, batch_size, device, dtype, seed,
                      progress, env, batches=batches)


def square_accuracy(model: nn.Module, images: Tensor, labels: Tensor, norm: str = "Linf",
                    eps: float | None = None, queries: int = 1000, seed: int = 0,
                    batch_size: int = 128, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    progress: Progress | None = None, env: Any = None,
                    batches: BatchStore | None = None) -> AttackResult:
    """The black-box Square attack (margin loss, one restart): uses no gradients, so
    thresholding or divisive normalization cannot mask anything from it."""
    eps = _norm_eps(norm, eps)
    if norm == "L2" and min(images.shape[-2:]) < 5:
        raise EvalError("the L2 Square attack needs images of at least 5x5 pixels")
    square = square_stage(model, device, norm, eps, queries)
    return worst_case(model, images, labels, norm, eps, [("Square", square)],
                      f"Square-{queries}", {"queries": queries, "seed": seed}, batch_size,
                      device, dtype, seed, progress, env, batches=batches)


def compare_attacks(apgd: AttackResult, pgd: AttackResult | None = None,
                    square: AttackResult | None = None) -> AttackComparison:
    """Compare attacks on their common first images; flags gradient masking when the
    black-box attack finds a lower robust accuracy than the gradient attacks."""
    n = min(r.n_images for r in (apgd, pgd, square) if r is not None)

    def mask(r: AttackResult | None) -> Tensor | None:
        return None if r is None else torch.tensor(r.robust[:n], dtype=torch.bool)

    def acc(m: Tensor | None) -> float | None:
        return None if m is None else (m.double().mean().item() if n else float("nan"))

    a, p, s = mask(apgd), mask(pgd), mask(square)
    gradient = a if p is None else a & p
    every = gradient if s is None else gradient & s
    only = 0 if s is None else int((gradient & ~s).sum())
    beats = s is not None and n > 0 and acc(s) < acc(gradient)
    return AttackComparison(apgd.norm, apgd.eps, n, acc(a), acc(p), acc(s), acc(gradient),
                            acc(every), only, beats)
