"""What several test files share: tiny data sets, configs and networks, launching
several processes, and a guard on process-wide settings.

Test files take these as fixtures (``tiny_dataset``, ``tiny_config``, ``write_cifar``,
``tiny_net``, ``random_uint8``, ``torchrun``: each returns its function) or import the
plain functions from here (``from conftest import ...``), never from each other; so do
worker processes that tests spawn, which run outside pytest.

Every test runs inside :func:`process_settings_guard`: a test that changes torch's
thread count, default dtype or backend flags and does not put them back is restored
and reported as an error, so no test runs with settings another test left behind.

``autocast_like_cuda`` makes CPU autocast follow CUDA's rules for one test.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from hahnet.config import TrainConfig
from hahnet.data.datasets import Dataset, ImageDataset
from hahnet.nn.layers import HaHBlock, VGGBlock

pytest_plugins = ["pytester"]  # test_process_guard runs a pytest session of its own

CLASSES = ("a", "b", "c", "d")
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def committed_files(*patterns: str) -> list[Path]:
    """The files git tracks in this checkout that match ``patterns`` (git pathspecs);
    skips the calling test outside a git checkout, where they are unknown."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: which files are committed is unknown")
    return [REPO / name for name in listed.split("\0") if name]


# ---------------------------------------------------------------- process-wide settings

def process_settings() -> dict[str, object]:
    """The process-wide torch settings a test could leave changed."""
    return {"threads": torch.get_num_threads(), "default dtype": torch.get_default_dtype(),
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
            "float32 matmul precision": torch.get_float32_matmul_precision(),
            "grad enabled": torch.is_grad_enabled()}


def restore_process_settings(saved: dict[str, object]) -> None:
    torch.set_num_threads(saved["threads"])
    torch.set_default_dtype(saved["default dtype"])
    torch.backends.cudnn.benchmark = saved["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = saved["cudnn.deterministic"]
    torch.use_deterministic_algorithms(saved["deterministic algorithms"])
    torch.set_float32_matmul_precision(saved["float32 matmul precision"])
    torch.set_grad_enabled(saved["grad enabled"])


@pytest.fixture(autouse=True)
def process_settings_guard(request):
    """Restore torch's process-wide settings after every test and fail the test that
    changed them: later tests then run as they would alone, on any thread count."""
    before = process_settings()
    yield
    after = process_settings()
    if after != before:
        restore_process_settings(before)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"{request.node.nodeid} left process-wide settings changed (before, "
                    f"after): {changed}; restore them in the test (restored now)",
                    pytrace=False)


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


# A tiny sweep file (standard vs HaH, 2 seeds, 2 epochs) and its evaluation section, for
# the tests of hahnet sweep and hahnet sweep --compare.
TINY_SWEEP = """
name = "tiny"
seeds = [1, 2]

[train]
width = 0.0625
epochs = 2
batch_size = 16
holdout = 0.25
snapshots = [1, 2]

[grid]
hah = [false, true]
"""
TINY_SWEEP_EVAL = """
[eval]
epochs = [1, 2]
limit = 8
noise_sigmas = [0.1]
noise_draws = 1
attack_limit = 3
apgd_steps = 2
"""


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


# ---------------------------------------------------------------- several processes

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RESTART_COUNT",
               "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS")
LAUNCH_TIMEOUT = 180  # seconds for one launch: a hang fails the test instead of blocking it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, with its own cache and
    tests/ on PYTHONPATH (worker scripts import from conftest)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HAHNET_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def start_torchrun(tmp: Path, args: list[str], script: Path | None = None, restarts: int = 0,
                   **extra: str) -> subprocess.Popen:
    """torchrun --nproc-per-node 2 on 127.0.0.1 running `hahnet` (or ``script``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--max-restarts", str(restarts), "--monitor-interval", "0.2"]
    cmd += [str(script)] if script else ["-m", "hahnet"]
    return subprocess.Popen(cmd + args, env=child_env(tmp, **extra), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(procs: list[subprocess.Popen],
           timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; all are killed if one hangs."""
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


def run_torchrun(tmp: Path, args: list[str], **options) -> subprocess.CompletedProcess:
    """`hahnet ARGS` (or a script) under torchrun with 2 processes, to the end."""
    proc = start_torchrun(tmp, args, **options)
    (rc, out, err), = finish([proc])
    return subprocess.CompletedProcess(proc.args, rc, out, err)


@pytest.fixture
def torchrun():
    return run_torchrun
