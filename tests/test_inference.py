from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from layerwise.cli import main
from layerwise.inference import evaluate_run, export_run, load_run, predict


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inf")
    data = make_image_folder(root / "data", classes=3, per_class=6)
    out = root / "run"
    assert main(["fit", str(data), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--batch-size", "8", "--workers", "0", "--epochs", "1", "--strategy", "full", "--quiet",
                 "--out", str(out)]) == 0
    return out, data


def test_evaluate_reports_accuracy_per_class_and_confusion(run):
    out, data = run
    r = evaluate_run(out, str(data))
    assert r["images"] == 9 and len(r["confusion"]) == 3
    assert sum(map(sum, r["confusion"])) == 9
    correct = sum(r["confusion"][i][i] for i in range(3))
    assert r["accuracy"] == pytest.approx(correct / 9)
    # A folder of class folders is evaluated as it is.
    assert evaluate_run(out, str(data / "train"))["images"] == 18


def test_tta_hflip_equals_manual_average(run):
    out, data = run
    rm = load_run(out)
    img = sorted((data / "val" / "class_0").iterdir())[0]
    from layerwise.data import open_image

    x = rm.transform()(open_image(str(img))).unsqueeze(0)
    with torch.inference_mode():
        manual = (rm.model(x).softmax(-1) + rm.model(x.flip(-1)).softmax(-1)) / 2
    got = predict(out, [str(img)], views=["hflip"], topk=3)[0]["top"]
    for t in got:
        assert t["probability"] == pytest.approx(manual[0, rm.classes.index(t["class"])].item(), rel=1e-5)


def test_predict_is_deterministic_with_tta(run):
    out, data = run
    img = str(sorted((data / "val" / "class_1").iterdir())[0])
    views = ["hflip", "five-crop", "multi-scale"]
    assert predict(out, [img], views=views) == predict(out, [img], views=views)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(run, tmp_path, fmt):
    out, _ = run
    path = export_run(out, fmt, tmp_path / f"m.{fmt}")
    rm = load_run(out)
    x = torch.randn(4, 3, rm.img_size, rm.img_size)
    with torch.inference_mode():
        ref = rm.model(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        got = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    else:
        got = torch.jit.load(str(path))(x).detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_cli_evaluate_and_predict(run, capsys):
    out, data = run
    assert main(["evaluate", str(out), str(data), "--tta", "hflip"]) == 0
    assert "accuracy" in capsys.readouterr().out
    img = str(sorted((data / "val" / "class_2").iterdir())[0])
    assert main(["predict", str(out), img, "--json"]) == 0
    assert "probability" in capsys.readouterr().out
    assert main(["evaluate", str(out), str(data), "--tta", "spin"]) == 2
    assert "spin" in capsys.readouterr().err
