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
    assert hardware.Amp("fp16", cpu).scaler is not None
    assert hardware.Amp("bf16", cpu).scaler is None and hardware.Amp("fp32", cpu).dtype is None
