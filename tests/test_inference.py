from __future__ import annotations

import json

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
    e = export_run(out, fmt, tmp_path / f"m.{fmt}")
    path = e.path
    assert e.max_abs_diff is not None and e.max_abs_diff < 1e-3
    if fmt == "onnx":
        assert e.exporter == "torch.export (dynamo)"
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
    r = evaluate_run(out, str(data), views=["hflip"])
    text = capsys.readouterr().out
    assert f"accuracy {r['accuracy']:.4f} · loss {r['loss']:.4f}" in text and f"{r['images']} images" in text
    img = str(sorted((data / "val" / "class_2").iterdir())[0])
    assert main(["predict", str(out), img, "--json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)
    assert got["image"] == img and got == predict(out, [img])[0]
    assert sum(t["probability"] for t in got["top"]) <= 1 + 1e-6 and len(got["top"]) == 3
    assert main(["evaluate", str(out), str(data), "--tta", "spin"]) == 2
    assert "spin" in capsys.readouterr().err


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_evaluate_skips_and_lists_an_unreadable_image(run, tmp_path, capsys):
    import shutil

    out, data = run
    folder = tmp_path / "eval"
    shutil.copytree(data / "val", folder)
    good = sorted((folder / "class_0").iterdir())[0]
    (folder / "class_0" / "broken.jpg").write_bytes(good.read_bytes()[:40])  # a truncated file
    assert main(["evaluate", str(out), str(folder)]) == 0
    text = capsys.readouterr().out
    assert f"scored {folder}: 9 images" in text
    assert "skipped 1 unreadable image(s)" in text and "broken.jpg" in text
    r = evaluate_run(out, str(folder))
    assert r["images"] == 9 and [s["path"] for s in r["skipped"]] == [str(folder / "class_0" / "broken.jpg")]


def test_evaluate_says_which_split_it_scored(run, capsys):
    out, data = run
    assert main(["evaluate", str(out), str(data)]) == 0
    assert f"scored {data / 'val'}:" in capsys.readouterr().out


def test_predict_names_a_decompression_bomb(run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    out, data = run
    img = str(sorted((data / "val" / "class_0").iterdir())[0])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # every image is now over the limit
    assert main(["predict", str(out), img]) == 2
    err = capsys.readouterr().err
    assert f"skipped {img}: DecompressionBomb" in err and "no image could be read" in err and "Traceback" not in err


def test_predict_prints_every_readable_image_and_lists_the_unreadable_one(run, tmp_path, capsys):
    out, data = run
    good = sorted((data / "val" / "class_1").iterdir())[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:40])  # truncated
    assert main(["predict", str(out), str(good[0]), str(broken), str(good[1]), str(tmp_path / "gone.png"),
                 str(good[2])]) == 0
    io = capsys.readouterr()
    assert [line.split(":")[0] for line in io.out.splitlines()] == [str(g) for g in good]
    assert f"skipped {broken}:" in io.err and f"skipped {tmp_path / 'gone.png'}: not found" in io.err


@pytest.mark.parametrize("where,message", [
    ("folder", "is a folder; give a file path"),
    ("no-parent", "does not exist; create it first"),
])
def test_export_refuses_an_output_it_cannot_write_before_any_work(run, tmp_path, capsys, where, message):
    out, _ = run
    target = tmp_path if where == "folder" else tmp_path / "nowhere" / "m.onnx"
    assert main(["export", str(out), "--format", "torchscript", "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_failed_export_write_leaves_no_file_under_the_final_name(run, tmp_path, monkeypatch, capsys):
    import os

    out, _ = run
    target = tmp_path / "m.pt"

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert main(["export", str(out), "--format", "torchscript", "--output", str(target)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


@pytest.mark.parametrize("args,msg", [
    (["evaluate", "RUN", "DATA", "--batch-size", "0"], "--batch-size: must be an integer from 1"),
    (["predict", "RUN", "IMG", "--topk", "-3"], "--topk: must be an integer from 1"),
    (["predict", "RUN", "IMG", "--topk", "0"], "--topk: must be an integer from 1"),
])
def test_inference_flags_out_of_range_exit_2(run, capsys, args, msg):
    out, data = run
    img = str(sorted((data / "val" / "class_0").iterdir())[0])
    argv = [{"RUN": str(out), "DATA": str(data), "IMG": img}.get(a, a) for a in args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t[: len(t) // 2], "is not valid JSON"),
    (lambda t: "[1, 2]", "must hold a JSON object"),
    (lambda t: t.replace('"img_size"', '"img_sz"'), "'img_size' must be"),
    (lambda t: __import__("re").sub(r'"img_size": \d+', '"img_size": 1000000', t), "'img_size' must be"),
    (lambda t: __import__("re").sub(r'"num_classes": \d+', '"num_classes": 100000000', t), "'num_classes' must be"),
    (lambda t: __import__("re").sub(r'"num_classes": \d+', '"num_classes": 5', t), "'classes' must be"),
    (lambda t: t.replace('"head": "linear"', '"head": "transformer"'), "'head' must be"),
    (lambda t: t.replace('"source": "timm"', '"source": "os.system"'), "'source' must be"),
])
def test_crafted_model_json_is_a_user_error(run, tmp_path, capsys, edit, msg):
    out, data = run
    bad = _copy_run(out, tmp_path / "run")
    p = bad / "model.json"
    p.write_text(edit(p.read_text()))
    img = str(sorted((data / "val" / "class_0").iterdir())[0])
    assert main(["predict", str(bad), img]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate", "other-model"])
def test_damaged_best_weights_are_a_user_error(run, tmp_path, capsys, damage):
    from layerwise.checkpoint import save_weights

    out, data = run
    bad = _copy_run(out, tmp_path / "run")
    w = bad / "best.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:1000])
    else:
        save_weights(w, torch.nn.Linear(3, 3))
    assert main(["evaluate", str(bad), str(data)]) == 2
    assert "cannot load weights" in capsys.readouterr().err


def test_cli_export_prints_the_parity_check(run, tmp_path, capsys):
    out, _ = run
    assert main(["export", str(out), "--output", str(tmp_path / "m.onnx")]) == 0
    text = capsys.readouterr().out
    assert "torch.export (dynamo)" in text and "parity: max |logit difference| against PyTorch" in text


@pytest.mark.parametrize("edit", [
    {"source": "timm", "arch": "vit_giant_patch14_224"},  # 1.0 G parameters, 4 GB, if it were built
    {"head": "mlp", "hidden": 65536},  # an MLP head far wider than the weights hold
])
def test_a_model_json_that_does_not_match_its_weights_is_refused_before_building(run, tmp_path, capsys, edit):
    import json
    import resource

    out, data = _copy_run(run[0], tmp_path / "r"), run[1]
    info = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps(info | edit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["evaluate", str(out), str(data)]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "Traceback" not in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: nothing like 4 GB


def test_the_evaluation_batch_shrinks_with_the_image_side():
    from layerwise.inference import eval_batch_size

    assert eval_batch_size(224, ram=24 << 30) == 64
    small = eval_batch_size(2048, ram=24 << 30)
    assert 1 <= small < 8  # 64 images at 2048 px asked for about 17 GB
    assert eval_batch_size(4096, ram=1 << 30) == 1
