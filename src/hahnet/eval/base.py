"""What every measurement shares: input checks, batching, pixel scaling, eval mode and
prediction. Long loops take ``progress``, called with the number of images just
finished (an increment, so ``tqdm.update`` fits)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

Progress = Callable[[int], None]


class BatchStore(Protocol):
    """Where an attack keeps its finished batches so that a stopped one resumes
    (:class:`hahnet.eval.journal.BatchJournal`): batch ``index`` of the attack ``call``
    and whether it was saved before, else ``compute()``d (and saved) and False."""

    def recall(self, call: dict[str, Any], index: int,
               compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]: ...


def tensor_digest(*tensors: Tensor) -> str:
    """A hex digest of the tensors' shapes, dtypes and exact bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EvalError(ValueError):
    """Unusable evaluation input or output: mismatched data, NaN logits, broken eps bounds."""


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


@contextlib.contextmanager
def cudnn_autotuning_off() -> Iterator[None]:
    """cuDNN autotuning (``torch.backends.cudnn.benchmark``) off inside, as it was after
    (also a function decorator). Training turns it on for its fixed batch shapes; attacks
    call the model on ever new batch sizes (the images still standing after each stage,
    target and restart), and each new shape would re-tune every convolution."""
    was_on = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was_on


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted classes; raises EvalError on NaN/inf logits (diverged or corrupt weights)."""
    logits = model(x)
    if not torch.isfinite(logits).all():
        raise EvalError("the model produced NaN/inf logits: the checkpoint is corrupt or "
                        "training diverged")
    return logits.argmax(dim=1)
