"""What several test files share: tiny data sets, configs and networks.

Test files take these as fixtures (``tiny_dataset``, ``tiny_config``, ``write_cifar``,
``tiny_net``, ``random_uint8``: each returns its factory function) instead of importing
each other. Worker processes that tests spawn, which run outside pytest, import the
plain functions from here (``from conftest import ...``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

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
