from __future__ import annotations

import pytest
import torch

from layerwise import hardware
from layerwise.errors import LayerwiseError


def test_auto_precision_follows_hardware_and_architecture(monkeypatch):
    from torchvision import models as tvm

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_precision("auto", cpu, tvm.resnet18()) == "bf16"
    assert hardware.resolve_precision("auto", cpu, tvm.mobilenet_v3_small()) == "fp32"  # depthwise
    assert hardware.resolve_precision("fp16", cpu, tvm.resnet18()) == "fp16"
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_precision("auto", cpu, tvm.resnet18()) == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_request_without_cuda_is_a_clear_error():
    with pytest.raises(LayerwiseError, match="no CUDA device"):
        hardware.pick_device("cuda")


def test_fp16_uses_a_grad_scaler_and_bf16_does_not():
    cpu = torch.device("cpu")
    assert hardware.Amp("bf16", cpu).scaler is None and hardware.Amp("fp32", cpu).dtype is None
    amp = hardware.Amp("fp16", cpu)
    assert amp.dtype is torch.float16 and isinstance(amp.scaler, torch.amp.GradScaler)
    # one real fp16 step: the loss is scaled for backward, the grads unscaled before the step
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    before = model.weight.detach().clone()
    with amp.autocast():
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaled, real_scale = [], amp.scaler.scale
    amp.scaler.scale = lambda t: scaled.append(t) or real_scale(t)  # type: ignore[method-assign]
    amp.step(loss, opt, clip=None)
    assert len(scaled) == 1  # the loss went through the scaler before backward
    step = (before - model.weight.detach()).abs().max()
    assert torch.isfinite(model.weight).all() and 1e-5 < float(step) < 1.0  # unscaled: a normal SGD step
