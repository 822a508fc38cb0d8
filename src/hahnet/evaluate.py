"""Evaluation of a trained model, as the paper does it and a little more: clean accuracy,
Gaussian noise, adversarial attacks (APGD-CE + APGD-T as AutoAttack runs them, a
stronger PGD and the black-box Square attack), activation sparsity and per-layer SNR.

Functions return plain dataclasses and never print. Long loops take ``progress``, called
with the number of images just finished (an increment, so ``tqdm.update`` fits).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from hahnet.layers import HaHBlock, VGGBlock

Progress = Callable[[int], None]
DEFAULT_EPS = {"Linf": 2 / 255, "L2": 0.25}
TOP_K_RATIO = 0.1
SNR_TINY = 1e-30  # keeps per-image dB finite when a layer's output does not change at all


class EvalError(ValueError):
    """Unusable evaluation input or output: mismatched data, NaN logits, broken eps bounds."""


# ----------------------------------------------------------------------------- helpers

def parse_fraction(text: str) -> float:
    """A number written as ``0.25`` or ``2/255`` (how attack budgets are usually quoted)."""
    try:
        num, _, den = str(text).strip().partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise EvalError(f"not a number or fraction: {text!r} (write e.g. 0.25 or 2/255)") from None


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def _check_data(images: Tensor, labels: Tensor) -> None:
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise EvalError(f"expected images (N, C, H, W) and labels (N,), got "
                        f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if images.dtype != torch.uint8 and len(images) and (images.min() < 0 or images.max() > 1):
        raise EvalError("float images must lie in [0, 1]; pass uint8 or divide by 255")


def _to_unit(images: Tensor, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images as ``dtype`` in [0, 1] on ``device``."""
    if images.dtype == torch.uint8:
        return images.to(device=device, dtype=dtype) / 255
    return images.to(device=device, dtype=dtype)


def _prepare(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    return model.to(device=device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _rng_guard(device: torch.device | str) -> contextlib.AbstractContextManager:
    """torchattacks reseeds the global RNGs; fork them so callers' RNG state is untouched."""
    dev = torch.device(device)
    return torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [])


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted classes; raises EvalError on NaN/inf logits (diverged or corrupt weights)."""
    logits = model(x)
    if not torch.isfinite(logits).all():
        raise EvalError("the model produced NaN/inf logits: the checkpoint is corrupt or "
                        "training diverged")
    return logits.argmax(dim=1)


def correct_mask(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: Progress | None = None) -> Tensor:
    """Per image, whether the model classifies it correctly (bool, on CPU)."""
    _check_data(images, labels)
    model = _prepare(model, device, dtype)
    out = torch.zeros(len(labels), dtype=torch.bool)
    with _eval_mode(model):
        for sl in _batches(len(labels), batch_size):
            out[sl] = (predict(model, _to_unit(images[sl], device, dtype))
                       == labels[sl].to(device)).cpu()
            if progress:
                progress(sl.stop - sl.start)
    return out


def clean_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   progress: Progress | None = None, env: Any = None) -> float:
    """Fraction of images classified correctly. With ``env`` (a multi-process
    :class:`hahnet.distributed.DistEnv`) each rank classifies its shard of whole batches
    and the counts are summed over ranks: the same number as one process."""
    if env is not None and env.active:
        from hahnet.distributed import sum_over_shards

        def count(part: slice) -> Tensor:
            mask = correct_mask(model, images[part], labels[part], batch_size, device, dtype,
                                progress)
            return torch.tensor([float(mask.sum()), float(len(mask))], dtype=torch.float64)

        hits, total = sum_over_shards(env, len(labels), batch_size, count).tolist()
        return hits / total if total else float("nan")
    mask = correct_mask(model, images, labels, batch_size, device, dtype, progress)
    return mask.double().mean().item() if len(mask) else float("nan")


# ------------------------------------------------------------------------------- noise

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


def noise_accuracy(model: nn.Module, images: Tensor, labels: Tensor,
                   sigmas: Sequence[float] = (0.1,), draws: int = 3, seed: int = 0,
                   batch_size: int = 256, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32,
                   progress: Progress | None = None, env: Any = None) -> NoiseResult:
    """Accuracy on clamp(x + sigma * z, 0, 1) with z ~ N(0, 1) in [0, 1] pixel space.

    Draw d uses one noise tensor (seed + d, drawn on the CPU) for every sigma, so curves
    are smooth and device-independent; sigma = 0 is the clean accuracy exactly. With
    ``env`` (several processes) each rank evaluates its shard of whole batches, drawing
    and discarding the noise of the batches before it, and the counts are summed: the
    same numbers as one process."""
    _check_data(images, labels)
    if draws < 1 or any(s < 0 for s in sigmas):
        raise EvalError(f"need draws >= 1 and sigmas >= 0, got {draws} and {list(sigmas)}")
    model = _prepare(model, device, dtype)

    def count(part: slice) -> Tensor:
        generators = [torch.Generator().manual_seed(seed + d) for d in range(draws)]
        correct = torch.zeros(len(sigmas), draws, dtype=torch.long)
        with _eval_mode(model):
            for sl in _batches(len(labels), batch_size):
                if sl.start >= part.stop:
                    break
                if sl.start < part.start:  # another rank's batch: keep the noise in step
                    for gen in generators:
                        torch.randn(images[sl].shape, generator=gen)
                    continue
                x, y = _to_unit(images[sl], device, dtype), labels[sl].to(device)
                clean = int((predict(model, x) == y).sum())
                for d, gen in enumerate(generators):
                    z = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
                    for i, sigma in enumerate(sigmas):
                        noisy = (x + sigma * z).clamp_(0.0, 1.0) if sigma > 0 else None
                        correct[i, d] += clean if noisy is None else int(
                            (predict(model, noisy) == y).sum())
                if progress:
                    progress(sl.stop - sl.start)
        return correct

    if env is not None and env.active:
        from hahnet.distributed import sum_over_shards

        correct = sum_over_shards(env, len(labels), batch_size, count)
    else:
        correct = count(slice(0, len(labels)))
    acc = correct.double() / max(len(labels), 1)
    return NoiseResult([float(s) for s in sigmas], acc.mean(1).tolist(),
                       acc.std(1, correction=0).tolist(), acc.tolist(), draws, seed)


# ----------------------------------------------------------------------------- attacks

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


Stage = tuple[str, Callable[[Tensor, Tensor, int], Tensor]]  # name, (x, y, seed) -> x_adv


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
    if norm not in DEFAULT_EPS:
        raise EvalError(f"unknown norm {norm!r}; choose Linf or L2")
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
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


def worst_case(model: nn.Module, images: Tensor, labels: Tensor, norm: str, eps: float,
               stages: Sequence[Stage], name: str, params: dict[str, Any],
               batch_size: int = 128, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0,
               progress: Progress | None = None, env: Any = None) -> AttackResult:
    """Run attack stages in order, each only on images no earlier stage broke; an image
    counts robust only if the model still classifies every returned example correctly
    (re-checked here, with the eps and [0, 1] bounds verified). Batch i is attacked with
    seed ``seed + i``; with ``env`` (torchrun) each rank attacks its shard of whole
    batches and the outcomes are summed over ranks: the same result as one process."""
    _check_data(images, labels)
    model = _prepare(model, device, dtype)
    n, start, width = len(labels), time.perf_counter(), len(stages)
    ranks, rank = (env.world_size, env.rank) if env is not None and env.active else (1, 0)

    def attack(part: slice) -> Tensor:
        # [robust flag per image | images alive after each stage | largest perturbation per rank]
        out = torch.zeros(n + width + ranks, dtype=torch.float64)
        with _eval_mode(model), _rng_guard(device):
            for index, sl in enumerate(_batches(n, batch_size)):
                if not part.start <= sl.start < part.stop:
                    continue
                x, y = _to_unit(images[sl], device, dtype), labels[sl].to(device)
                alive = predict(model, x) == y
                for k, (_, run) in enumerate(stages):
                    todo = alive.nonzero().flatten()
                    if len(todo):
                        adv = run(x[todo], y[todo], seed + index).detach().to(dtype)
                        out[n + width + rank] = max(float(out[n + width + rank]),
                                                    check_adversarial(x[todo], adv, norm, eps))
                        alive[todo] = predict(model, adv) == y[todo]
                    out[n + k] += int(alive.sum())
                out[sl] = alive.cpu().double()
                if progress:
                    progress(sl.stop - sl.start)
        return out

    if ranks > 1:
        from hahnet.distributed import sum_over_shards

        total = sum_over_shards(env, n, batch_size, attack)
    else:
        total = attack(slice(0, n))
    robust = total[:n] > 0.5
    survivors = {stage: float(total[n + k]) / max(n, 1) for k, (stage, _) in enumerate(stages)}
    return AttackResult(name, norm, eps, n, robust.double().mean().item() if n else float("nan"),
                        robust.tolist(), survivors, float(total[n + width:].max()),
                        time.perf_counter() - start, params)


def adversarial_accuracy(model: nn.Module, images: Tensor, labels: Tensor,
                         norm: str = "Linf", eps: float | None = None, steps: int = 100,
                         seed: int = 0, num_classes: int | None = None,
                         batch_size: int = 128, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32,
                         progress: Progress | None = None, env: Any = None) -> AttackResult:
    """The paper's attack: AutoAttack's APGD-CE then APGD-T (targeted DLR, every other
    class as target), one restart each, worst case per image. APGD-T needs >= 4 classes."""
    ta, eps = _attacks_module(), _norm_eps(norm, eps)
    classes = num_classes or _num_classes(model, images, device, dtype)

    def apgd_ce(x: Tensor, y: Tensor, s: int) -> Tensor:
        return _make(ta.APGD, model, device, norm=norm, eps=eps, steps=steps, n_restarts=1,
                     loss="ce", seed=s)(x, y)

    def apgd_t(x: Tensor, y: Tensor, s: int) -> Tensor:
        return _make(ta.APGDT, model, device, norm=norm, eps=eps, steps=steps, n_restarts=1,
                     seed=s, n_classes=classes)(x, y)

    stages: list[Stage] = [("APGD-CE", apgd_ce)] + ([("APGD-T", apgd_t)] if classes >= 4 else [])
    params = {"steps": steps, "n_restarts": 1, "seed": seed, "n_classes": classes,
              "apgd_t": classes >= 4}
    return worst_case(model, images, labels, norm, eps, stages, "APGD-CE+APGD-T", params,
                      batch_size, device, dtype, seed, progress, env)


def pgd_accuracy(model: nn.Module, images: Tensor, labels: Tensor, norm: str = "Linf",
                 eps: float | None = None, steps: int = 50, restarts: int = 5, seed: int = 0,
                 batch_size: int = 128, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 progress: Progress | None = None, env: Any = None) -> AttackResult:
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
                      progress, env)


def square_accuracy(model: nn.Module, images: Tensor, labels: Tensor, norm: str = "Linf",
                    eps: float | None = None, queries: int = 1000, seed: int = 0,
                    batch_size: int = 128, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    progress: Progress | None = None, env: Any = None) -> AttackResult:
    """The black-box Square attack (margin loss, one restart): uses no gradients, so
    thresholding or divisive normalization cannot mask anything from it."""
    ta, eps = _attacks_module(), _norm_eps(norm, eps)
    if norm == "L2" and min(images.shape[-2:]) < 5:
        raise EvalError("the L2 Square attack needs images of at least 5x5 pixels")

    def square(x: Tensor, y: Tensor, s: int) -> Tensor:
        return _make(ta.Square, model, device, norm=norm, eps=eps, n_queries=queries,
                     n_restarts=1, loss="margin", seed=s)(x, y)

    return worst_case(model, images, labels, norm, eps, [("Square", square)],
                      f"Square-{queries}", {"queries": queries, "seed": seed}, batch_size,
                      device, dtype, seed, progress, env)


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


# ----------------------------------------------------------------- sparsity and SNR

Point = tuple[str, str, nn.Module]  # (name, kind, module whose output is measured)


def probe_points(model: nn.Module) -> list[Point]:
    """What is measured per block of ``model.features``: a HaH block's output; for a VGG
    block its ReLU output (pre-BatchNorm), since BN output is dense by construction."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise EvalError("sparsity/SNR need a model with a `features` nn.Sequential of blocks")
    points: list[Point] = []
    for block in features:
        if isinstance(block, HaHBlock):
            points.append((f"conv{len(points) + 1}", "hah", block))
        elif isinstance(block, VGGBlock):
            points.append((f"conv{len(points) + 1}", "vgg", block.relu))
    return points


@contextlib.contextmanager
def _capture(points: Sequence[Point]) -> Iterator[dict[str, Tensor]]:
    store: dict[str, Tensor] = {}
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: store.__setitem__(name, out.detach()))
        for name, _, module in points]
    try:
        yield store
    finally:
        for hook in hooks:
            hook.remove()


def top_k_count(channels: int, ratio: float = TOP_K_RATIO) -> int:
    """K = ceil(ratio * C), at least 1."""
    return max(1, math.ceil(ratio * channels - 1e-9))


def sparsity_sums(act: Tensor, k: int) -> Tensor:
    """[non-zeros, elements, sum of top-K shares, active positions, sum of |non-zeros|]
    of an NCHW activation; the share at a position is topK sum / channel sum."""
    act = act.double()
    channel_sum = act.abs().sum(dim=1)
    top = act.abs().topk(min(k, act.shape[1]), dim=1).values.sum(dim=1)
    active = channel_sum > 0
    share = torch.where(active, top / channel_sum.clamp_min(1e-300), torch.zeros_like(top))
    return torch.stack([(act != 0).sum().double(), act.new_tensor(float(act.numel())),
                        share.sum(), active.sum().double(), act.abs().sum()])


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


def sparsity(model: nn.Module, images: Tensor, labels: Tensor | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, points: Sequence[Point] | None = None,
             ratio: float = TOP_K_RATIO, progress: Progress | None = None) -> list[LayerSparsity]:
    """Per block (see :func:`probe_points`): fraction of non-zero outputs and the share of
    each position's channel sum held by its top ceil(0.1 C) channels (active positions)."""
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    _check_data(images, labels)
    model = _prepare(model, device, dtype)
    points = probe_points(model) if points is None else list(points)
    sums: dict[str, Tensor] = {}
    channels: dict[str, int] = {}
    with _eval_mode(model), _capture(points) as store, torch.no_grad():
        for sl in _batches(len(images), batch_size):
            predict(model, _to_unit(images[sl], device, dtype))
            for name, _, _ in points:
                act = store[name]
                channels[name] = act.shape[1]
                part = sparsity_sums(act, top_k_count(act.shape[1], ratio)).cpu()
                sums[name] = sums.get(name, 0) + part
            if progress:
                progress(sl.stop - sl.start)
    out = []
    for name, kind, _ in points:
        nz, total, share, active, mass = sums[name].tolist()
        out.append(LayerSparsity(name, kind, channels[name], top_k_count(channels[name], ratio),
                                 nz / total, share / active if active else 0.0,
                                 mass / nz if nz else 0.0))
    return out


def snr_per_image(clean: Tensor, noisy: Tensor) -> Tensor:
    """10 log10(||clean||^2 / ||noisy - clean||^2) per image, in float64."""
    c, d = clean.double().flatten(1), (noisy.double() - clean.double()).flatten(1)
    return 10 * torch.log10((c.pow(2).sum(1) + SNR_TINY) / (d.pow(2).sum(1) + SNR_TINY))


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


def snr_db(model: nn.Module, images: Tensor, labels: Tensor | None = None, sigma: float = 0.1,
           seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32, points: Sequence[Point] | None = None,
           progress: Progress | None = None) -> SNRResult:
    """SNR (dB) of each block's output for clamp(x + N(0, sigma^2)) vs x, averaged over
    images; the input SNR is the same quantity in pixel space."""
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    _check_data(images, labels)
    model = _prepare(model, device, dtype)
    points = probe_points(model) if points is None else list(points)
    gen = torch.Generator().manual_seed(seed)
    totals = {name: 0.0 for name in ["input"] + [p[0] for p in points]}
    with _eval_mode(model), _capture(points) as store, torch.no_grad():
        for sl in _batches(len(images), batch_size):
            x = _to_unit(images[sl], device, dtype)
            noise = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
            noisy = (x + sigma * noise).clamp_(0.0, 1.0)
            predict(model, x)
            clean_acts = dict(store)
            predict(model, noisy)
            totals["input"] += float(snr_per_image(x, noisy).sum())
            for name, _, _ in points:
                totals[name] += float(snr_per_image(clean_acts[name], store[name]).sum())
            if progress:
                progress(sl.stop - sl.start)
    n = max(len(images), 1)
    return SNRResult(sigma, seed, totals["input"] / n,
                     [LayerSNR(name, kind, totals[name] / n) for name, kind, _ in points])




# ------------------------------------------------------------------------------ driver

def first_layer_filters(model: nn.Module) -> Tensor | None:
    """Weights (out, in, kh, kw) of the first convolution, for plotting; None if none."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.weight.detach().float().cpu()


@dataclass
class EvalSettings:
    """Everything :func:`evaluate_model` measures and how (the paper's choices by default)."""

    noise_sigmas: tuple[float, ...] = (0.1,)
    noise_draws: int = 3
    noise_seed: int = 0
    attacks: bool = True
    norms: tuple[str, ...] = ("Linf", "L2")
    eps_linf: float = 2 / 255
    eps_l2: float = 0.25
    attack_limit: int | None = 1000  # seeded random N of the evaluated images; None = all
    apgd_steps: int = 100
    pgd_steps: int = 50
    pgd_restarts: int = 5
    square_limit: int = 100          # the first N of the attacked images; 0 = no Square
    square_queries: int = 1000
    attack_seed: int = 0
    attack_batch_size: int = 128
    snr_sigma: float = 0.1
    snr_seed: int = 0
    layer_stats: bool = True         # sparsity and SNR
    batch_size: int = 256

    def eps(self, norm: str) -> float:
        """The budget for ``norm``."""
        return self.eps_linf if norm == "Linf" else self.eps_l2


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


PhaseProgress = Callable[[str, int], Progress]  # (phase, images) -> per-batch callback


def _phase(progress: PhaseProgress | None, name: str, total: int) -> Progress | None:
    return None if progress is None else progress(name, total)


def evaluate_model(model: nn.Module, images: Tensor, labels: Tensor, settings: EvalSettings,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   progress: PhaseProgress | None = None, name: str = "model",
                   checkpoint: str | None = None,
                   info: dict[str, Any] | None = None, env: Any = None) -> EvalResult:
    """Run every measurement ``settings`` asks for; ``progress(phase, total)`` returns the
    callback for that phase's loop (the CLI opens a tqdm bar per phase). With ``env``
    (torchrun, :func:`hahnet.distributed.setup`) clean and noise accuracy and the attacks
    are sharded over the processes (same numbers as one process); sparsity and SNR, which
    are cheap, run whole on every process."""
    _check_data(images, labels)
    s, seconds, bs = settings, {}, settings.batch_size
    model = _prepare(model, device, dtype)

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
    if s.layer_stats and getattr(model, "features", None) is not None:
        layers = timed("sparsity", lambda: sparsity(model, images, labels, bs, device, dtype,
                                                    progress=_phase(progress, "sparsity", n)))
        snr = timed("snr", lambda: snr_db(model, images, labels, s.snr_sigma, s.snr_seed, bs,
                                          device, dtype, progress=_phase(progress, "snr", n)))
    suites = {}
    if s.attacks:
        m = n if s.attack_limit is None else min(n, s.attack_limit)
        # A seeded random order, not the first m: image folders are sorted by class.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(s.attack_seed))[:m]
        for norm in s.norms:
            suites[norm] = timed(f"attacks_{norm}", lambda norm=norm: _suite(
                model, images, labels, order, norm, s, device, dtype, progress, env))
    filters = first_layer_filters(model)
    return EvalResult(name, checkpoint, _config_dict(model), info or {}, n, clean, noise,
                      suites, layers, snr, None if filters is None else filters.tolist(),
                      asdict(s), seconds)


def result_from_dict(data: dict[str, Any]) -> EvalResult:
    """Rebuild an :class:`EvalResult` from its JSON form (one entry of results.json's
    "models"), so saved evaluations can be reported again without re-running them."""
    def attack(d: dict[str, Any] | None) -> AttackResult | None:
        if d is None:
            return None
        return AttackResult(**{**d, "accuracy": _float(d["accuracy"])})

    def suite(d: dict[str, Any]) -> AttackSuite:
        return AttackSuite(d["norm"], d["eps"], list(d["indices"]), attack(d["apgd"]),
                           attack(d.get("pgd")), attack(d.get("square")),
                           AttackComparison(**d["comparison"]))

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
        seconds=data.get("seconds") or {})


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {"class": type(model).__name__}


def _suite(model: nn.Module, all_images: Tensor, all_labels: Tensor, order: Tensor, norm: str,
           s: EvalSettings, device: torch.device | str, dtype: torch.dtype,
           progress: PhaseProgress | None, env: Any = None) -> AttackSuite:
    images, labels = all_images[order], all_labels[order]
    eps, m, bs, seed = s.eps(norm), len(labels), s.attack_batch_size, s.attack_seed
    apgd = adversarial_accuracy(model, images, labels, norm, eps, s.apgd_steps, seed, None, bs,
                                device, dtype, _phase(progress, f"APGD {norm}", m), env)
    pgd = None
    if s.pgd_steps > 0 and s.pgd_restarts > 0:
        pgd = pgd_accuracy(model, images, labels, norm, eps, s.pgd_steps, s.pgd_restarts, seed,
                           bs, device, dtype, _phase(progress, f"PGD {norm}", m), env)
    square = None
    k = min(m, s.square_limit)
    if k > 0 and s.square_queries > 0:
        square = square_accuracy(model, images[:k], labels[:k], norm, eps, s.square_queries,
                                 seed, bs, device, dtype, _phase(progress, f"Square {norm}", k),
                                 env)
    return AttackSuite(norm, eps, order.tolist(), apgd, pgd, square,
                       compare_attacks(apgd, pgd, square))


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


def evaluate_checkpoint(path: str, images: Tensor, labels: Tensor, settings: EvalSettings,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        classes: Sequence[str] | None = None,
                        progress: PhaseProgress | None = None) -> EvalResult:
    """Load a checkpoint (run dir or .safetensors), check the data fit it, evaluate it."""
    from hahnet import checkpoint

    info = checkpoint.read_info(path)
    model = checkpoint.load(path, device=device)
    check_compatible(model, images, labels, classes, (info.get("dataset") or {}).get("classes"))
    return evaluate_model(model, images, labels, settings, device, dtype, progress,
                          checkpoint_name(path), str(path), info)


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
            out[f"attacks_{norm}"] = per_norm
    out["total"] = sum(out.values())
    return out
