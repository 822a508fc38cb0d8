"""What several test files share: tiny data sets, configs and networks.

Test files take these as fixtures (``tiny_dataset``, ``tiny_config``, ``write_cifar``,
``tiny_net``, ``random_uint8``: each returns its factory function) instead of importing
each other. ``autocast_like_cuda`` makes CPU autocast follow CUDA's rules for one test. Worker processes that tests spawn, which run outside pytest, import the
plain functions from here (``from conftest import ...``).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from hahnet.config import TrainConfig
from hahnet.data import Dataset, ImageDataset
from hahnet.nn.layers import HaHBlock, VGGBlock

CLASSES = ("a", "b", "c", "d")


def make_tiny_dataset(n_train: int = 48, n_test: int = 16, seed: int = 0) -> Dataset:
    """Random 32x32 images of four classes with a little signal per class."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % len(CLASSES)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        images[:, labels % 3] //= 2  # a little signal per class
        return ImageDataset(images, labels.long(), CLASSES)

    return Dataset("tiny", "synthetic", split(n_train), split(n_test), "memory")


def make_tiny_config(**overrides) -> TrainConfig:
    """A HaH VGG16 at width 1/16 for three short epochs."""
    base = dict(hah=True, width=0.0625, epochs=3, batch_size=16, seed=7, eval_batch_size=16)
    return TrainConfig(**{**base, **overrides})


def make_cifar(root: Path, n_train: int = 50, n_test: int = 16, seed: int = 0) -> Path:
    """A tiny data set in CIFAR-10's python format (4 classes, a little signal)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n: int) -> dict:
        labels = np.arange(n) % 4
        data = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        for i, label in enumerate(labels):
            data[i, label % 3] //= 2
        return {b"data": data.reshape(n, 3072), b"labels": labels.tolist()}

    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5)))
    (root / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c", b"d"]}))
    return root


def make_tiny_net(hah: bool = True, classes: int = 10) -> nn.Module:
    """A few blocks on 8x8 inputs: fast enough for the whole evaluation in a test."""
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            first = HaHBlock(3, 8) if hah else VGGBlock(3, 8)
            self.features = nn.Sequential(first, nn.MaxPool2d(2), VGGBlock(8, 8))
            self.classifier = nn.Linear(8, classes)

        def forward(self, x):
            return self.classifier(self.features(x - 0.5).amax(dim=(2, 3)))

    return Tiny().eval()


class Crash(Exception):
    """What :func:`crash_at` raises to stop a training run, as a kill would."""


def crash_at(trainer, step: int) -> None:
    """Run ``trainer.fit()`` and stop it with :class:`Crash` at its ``step``-th training
    step (1-based), leaving the run directory as a kill there would."""
    count = {"n": 0}

    def on_step(images, loss) -> None:
        count["n"] += 1
        if count["n"] == step:
            raise Crash

    with pytest.raises(Crash):
        trainer.fit(on_step=on_step)


def make_random_uint8(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 RGB images of ``size`` x ``size``."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and stay fast on a shared, busy CPU
    (modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dataset():
    return make_tiny_dataset


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture
def write_cifar():
    return make_cifar


@pytest.fixture
def tiny_net():
    return make_tiny_net


@pytest.fixture
def random_uint8():
    return make_random_uint8


# ---------------------------------------------------------- CUDA's autocast rules on a CPU
# Where CUDA's autocast has a rule and CPU's has none, bf16 code that passes on a CPU can
# fail on a GPU: CUDA runs ``x.sum(dim)`` of a bf16 tensor in fp32, say, and returns fp32.
# These tables restate CUDA's rules for such ops (tests/test_cuda_autocast.py checks that
# each has a CUDA rule and no CPU one in the installed torch).

# Reductions CUDA runs in fp32 unless the call names a dtype; the value says where that
# dtype argument goes: None for a keyword, else its position.
CUDA_FP32_REDUCTIONS: dict[str, int | None] = {
    "sum": None, "sum.dim_IntList": None, "cumsum": None, "cumprod": None,
    "linalg_vector_norm": None, "linalg_matrix_norm": None, "softmax.int": 2,
    "log_softmax.int": 2}
# Ops CUDA runs on fp32 inputs.
CUDA_FP32_OPS = ("exp", "expm1", "log", "log1p", "log2", "log10", "reciprocal", "rsqrt",
                 "pow.Tensor_Scalar", "pow.Tensor_Tensor", "logsumexp", "softplus")
# Ops CUDA runs in the widest floating dtype among their tensor arguments.
CUDA_PROMOTE_OPS = ("scatter_add", "index_put", "addcmul", "addcdiv")


def aten_op(name: str) -> Any:
    """``torch.ops.aten`` overload of "name.overload" (or "name": the default one)."""
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _castable(value: Any) -> bool:
    """What CUDA's autocast casts: floating tensors other than fp64."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() \
        and value.dtype != torch.float64


def _cast_all(values: Any, dtype: torch.dtype) -> Any:
    if isinstance(values, (list, tuple)):
        return type(values)(_cast_all(v, dtype) for v in values)
    return values.to(dtype) if _castable(values) else values


def _below_autocast(op: Any, args: tuple, kwargs: dict) -> Any:
    with torch.autocast("cpu", enabled=False):
        return op(*args, **kwargs)


def _reduction_in_fp32(op: Any, position: int | None) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if _castable(args[0]):
            if position is None and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
            elif position is not None and (len(args) <= position or args[position] is None):
                args = (*args[:position], torch.float32, *args[position + 1:])
        return _below_autocast(op, args, kwargs)
    return kernel


def _inputs_in_fp32(op: Any) -> Callable[..., Any]:
    return lambda *args, **kwargs: _below_autocast(op, _cast_all(args, torch.float32), kwargs)


def _inputs_promoted(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        dtypes = [a.dtype for a in args if _castable(a)]
        widest = dtypes[0] if dtypes else None
        for dtype in dtypes[1:]:
            widest = torch.promote_types(widest, dtype)
        return _below_autocast(op, _cast_all(args, widest) if widest else args, kwargs)
    return kernel


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """CPU autocast follows CUDA's rules (the tables above) inside this block. The kernels
    live in one ``torch.library.Library``; deleting it removes them, which is checked."""
    library = torch.library.Library("aten", "IMPL")
    try:
        for name, position in CUDA_FP32_REDUCTIONS.items():
            library.impl(name, _reduction_in_fp32(aten_op(name), position), "AutocastCPU")
        for name in CUDA_FP32_OPS:
            library.impl(name, _inputs_in_fp32(aten_op(name)), "AutocastCPU")
        for name in CUDA_PROMOTE_OPS:
            library.impl(name, _inputs_promoted(aten_op(name)), "AutocastCPU")
        yield
    finally:
        del library  # its finalizer deregisters every kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            left = torch.ones(2, dtype=torch.bfloat16).sum().dtype
        if left != torch.bfloat16:
            raise RuntimeError("CUDA's autocast rules outlived their test")


@pytest.fixture
def autocast_like_cuda():
    """CPU autocast with CUDA's rules (:func:`cuda_autocast_rules`) for one test."""
    with cuda_autocast_rules():
        yield
