"""Clean and noisy accuracy, activation sparsity and per-layer SNR of a model.

Functions return the dataclasses of :mod:`hahnet.eval.results` and never print. With
``env`` (several processes, :mod:`hahnet.training.distributed`) the accuracies are sharded over
the processes and summed: the same numbers as one process.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from hahnet.config import PAPER_NOISE_SIGMA, PAPER_RATIO, winners
from hahnet.eval.base import (EvalError, Progress, _batches, _check_data, _eval_mode, _prepare,
                              _to_unit, predict)
from hahnet.eval.results import LayerSNR, LayerSparsity, NoiseResult, SNRResult
from hahnet.nn.layers import HaHBlock, VGGBlock

SNR_TINY = 1e-30  # keeps per-image dB finite when a layer's output does not change at all


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
    :class:`hahnet.training.distributed.DistEnv`) each rank classifies its shard of whole batches
    and the counts are summed over ranks: the same number as one process."""
    if env is not None and env.active:
        from hahnet.training.distributed import sum_over_shards

        def count(part: slice) -> Tensor:
            mask = correct_mask(model, images[part], labels[part], batch_size, device, dtype,
                                progress)
            return torch.tensor([float(mask.sum()), float(len(mask))], dtype=torch.float64)

        hits, total = sum_over_shards(env, len(labels), batch_size, count).tolist()
        return hits / total if total else float("nan")
    mask = correct_mask(model, images, labels, batch_size, device, dtype, progress)
    return mask.double().mean().item() if len(mask) else float("nan")


def noise_accuracy(model: nn.Module, images: Tensor, labels: Tensor,
                   sigmas: Sequence[float] = (PAPER_NOISE_SIGMA,), draws: int = 3, seed: int = 0,
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
        from hahnet.training.distributed import sum_over_shards

        correct = sum_over_shards(env, len(labels), batch_size, count)
    else:
        correct = count(slice(0, len(labels)))
    acc = correct.double() / max(len(labels), 1)
    return NoiseResult([float(s) for s in sigmas], acc.mean(1).tolist(),
                       acc.std(1, correction=0).tolist(), acc.tolist(), draws, seed)


Point = tuple[str, str, nn.Module]  # (name, kind, module whose output is measured)


def probe_points(model: nn.Module) -> list[Point]:
    """What is measured per layer. A VGG (blocks in ``model.features``): a HaH block's
    output, a VGG block's ReLU output (pre-BatchNorm, since BN output is dense by
    construction). Any other network (the residual ones): every HaH block's output and
    every other ReLU's output, in module order, named by module path."""
    features = getattr(model, "features", None)
    points: list[Point] = []
    if isinstance(features, nn.Sequential):
        for block in features:
            if isinstance(block, HaHBlock):
                points.append((f"conv{len(points) + 1}", "hah", block))
            elif isinstance(block, VGGBlock):
                points.append((f"conv{len(points) + 1}", "vgg", block.relu))
        return points
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, HaHBlock):
            points.append((name, "hah", module))
            inside.append(name + ".")
        elif isinstance(module, nn.ReLU):
            points.append((name, "relu", module))
    if not points:
        raise EvalError("sparsity/SNR need a model with HaH blocks or nn.ReLU modules "
                        "(or a `features` nn.Sequential of blocks)")
    return points


def measurable(model: nn.Module) -> bool:
    """Whether :func:`probe_points` finds layers to measure in ``model``."""
    try:
        return bool(probe_points(model))
    except EvalError:
        return False


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


def sparsity(model: nn.Module, images: Tensor, labels: Tensor | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, points: Sequence[Point] | None = None,
             ratio: float = PAPER_RATIO, progress: Progress | None = None) -> list[LayerSparsity]:
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
                part = sparsity_sums(act, winners(act.shape[1], ratio)).cpu()
                sums[name] = sums.get(name, 0) + part
            if progress:
                progress(sl.stop - sl.start)
    out = []
    for name, kind, _ in points:
        nz, total, share, active, mass = sums[name].tolist()
        out.append(LayerSparsity(name, kind, channels[name], winners(channels[name], ratio),
                                 nz / total, share / active if active else 0.0,
                                 mass / nz if nz else 0.0))
    return out


def snr_per_image(clean: Tensor, noisy: Tensor) -> Tensor:
    """10 log10(||clean||^2 / ||noisy - clean||^2) per image, in float64."""
    c, d = clean.double().flatten(1), (noisy.double() - clean.double()).flatten(1)
    return 10 * torch.log10((c.pow(2).sum(1) + SNR_TINY) / (d.pow(2).sum(1) + SNR_TINY))


def snr_db(model: nn.Module, images: Tensor, labels: Tensor | None = None, sigma: float = PAPER_NOISE_SIGMA,
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




def first_layer_filters(model: nn.Module) -> Tensor | None:
    """Weights (out, in, kh, kw) of the first convolution, for plotting; None if none."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.weight.detach().float().cpu()
