"""bf16 training as CUDA runs it, on the CPU: with CUDA's autocast rules emulated
(conftest.cuda_autocast_rules), a HaH run trains, probes its gradients, saves, resumes
and is evaluated (attacks included) under bf16 autocast; the rules are CUDA's and leave
nothing behind."""

from __future__ import annotations

import math

import pytest
import torch

from hahnet.training import checkpoint
from hahnet.nn import hah
from hahnet.config import EvalSettings
from hahnet.eval.runner import evaluate_model
from hahnet.training.trainer import Trainer

from conftest import (CUDA_FP32_OPS, CUDA_FP32_REDUCTIONS, CUDA_PROMOTE_OPS, cuda_autocast_rules,
                      make_tiny_config, make_tiny_dataset)

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def test_emulated_rules_are_cudas_where_cpu_has_none():
    cuda = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))
    cpu = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU"))
    emulated = {f"aten::{name}" for name in
                [*CUDA_FP32_REDUCTIONS, *CUDA_FP32_OPS, *CUDA_PROMOTE_OPS]}
    assert emulated <= cuda - cpu, sorted(emulated - (cuda - cpu))


def test_rules_apply_inside_the_block_and_are_gone_after():
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)).to(BF16)

    def dtypes() -> tuple[torch.dtype, ...]:
        with torch.autocast("cpu", dtype=BF16):
            return (x.sum(1).dtype, x.sum().dtype, x.sum(1, dtype=BF16).dtype,
                    torch.softmax(x, 1).dtype, x.exp().dtype, x.double().sum(1).dtype)

    with cuda_autocast_rules():
        assert dtypes() == (F32, F32, BF16, F32, F32, F64)
        with torch.autocast("cpu", dtype=BF16):
            torch.testing.assert_close(x.sum(1), x.float().sum(1))
            index = torch.zeros(3, 4, dtype=torch.long)
            assert x.scatter_add(1, index, x.float()).dtype == F32  # promoted
    assert dtypes() == (BF16, BF16, BF16, BF16, BF16, F64)


def _tiny_evaluation() -> EvalSettings:
    return EvalSettings(noise_sigmas=(), layer_stats=False, norms=("Linf",), attack_limit=2,
                        apgd_steps=2, pgd_steps=1, pgd_restarts=1, square_limit=0,
                        attack_batch_size=2, batch_size=8)


class Stop(Exception):
    pass


def test_bf16_hah_run_under_cudas_autocast_rules(tmp_path, monkeypatch, autocast_like_cuda):
    monkeypatch.setattr(hah, "FAST_WINNERS_MAX_K", 0)  # CUDA's path: no threshold search
    data = make_tiny_dataset()
    config = make_tiny_config(epochs=2, precision="bf16", channels_last=True)
    first = Trainer(config, data, tmp_path, torch.device("cpu"))

    def stop_in_second_epoch(images: int, loss: torch.Tensor) -> None:
        if first.optimizer.state and first.start_epoch == 0 and \
                checkpoint.MODEL_FILE in {p.name for p in tmp_path.iterdir()}:
            raise Stop

    with pytest.raises(Stop):  # epoch 0: steps, gradient probe, accuracy pass, save
        first.fit(on_step=stop_in_second_epoch)
    resumed = Trainer(config, data, tmp_path, torch.device("cpu"))
    assert resumed.resume() == 1
    history = resumed.fit()
    assert [m.epoch for m in history] == [1]
    lines = resumed.run_dir.history()
    assert [line["epoch"] for line in lines] == [0, 1]
    for line in lines:
        assert len(line["grad_ratios"]) == 6 and all(r > 0 for r in line["grad_ratios"])
        assert all(math.isfinite(s) for s in line["hah_scores"] + [line["train_loss"]])
    model = checkpoint.load(tmp_path)  # evaluated in fp32, as reproduce does
    result = evaluate_model(model, data.test.images, data.test.labels, _tiny_evaluation())
    assert 0.0 <= result.clean_accuracy <= 1.0 and "Linf" in result.attacks


@pytest.mark.parametrize("scoring", ["threshold", "topk"])
def test_hah_backward_inside_autocast_keeps_its_dtypes(monkeypatch, autocast_like_cuda,
                                                       scoring):
    """The custom backwards of the HaH layers and objective work when the backward itself
    runs inside CUDA-like autocast (where a sum comes back in fp32)."""
    from hahnet import vgg16

    if scoring == "topk":
        monkeypatch.setattr(hah, "FAST_WINNERS_MAX_K", 0)
    torch.manual_seed(0)
    model = vgg16(hah=True, width=0.0625).train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=BF16):
        _, loss = hah.HaHObjective(model)(x, y)
        grads = torch.autograd.grad(loss, params)
    assert all(g.dtype == F32 and bool(torch.isfinite(g).all()) for g in grads)
