from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from torch import nn

from layerwise.augment import eval_transform
from layerwise.errors import LayerwiseError, MissingPathError, UnknownNameError
from layerwise.groups import layer_groups
from layerwise.models import create_model, load_pretrained, resolve_name


def test_bare_names_prefer_torchvision_then_timm():
    assert resolve_name("resnet50") == ("torchvision", "resnet50")
    assert resolve_name("convnext_tiny") == ("torchvision", "convnext_tiny")
    assert resolve_name("efficientnet_lite0") == ("timm", "efficientnet_lite0")
    assert resolve_name("timm/resnet50") == ("timm", "resnet50")
    assert resolve_name("torchvision/resnet18") == ("torchvision", "resnet18")


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError, match="resnet50"):
        resolve_name("resnet5O")
    with pytest.raises(UnknownNameError, match="model source"):
        resolve_name("hub/resnet50")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_tiny", "vit_b_16", "timm/vit_tiny_patch16_224",
                                  "mobilenet_v3_small", "densenet121"])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_replaced_for_num_classes(name, head):
    loaded = create_model(name, 7, weights="none", head=head)
    loaded.model.eval()
    with torch.inference_mode():
        out = loaded.model(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 7)
    head_group = loaded.model.get_submodule(layer_groups(loaded.model)[-1].modules[0])
    if head == "mlp":
        mlp = next(m for m in head_group.modules() if isinstance(m, nn.Sequential) and len(m) == 5)
        assert [type(m) for m in mlp] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert (mlp[0].p, mlp[3].p, mlp[1].out_features) == (0.5, 0.3, 512)
    else:
        linears = [m for m in head_group.modules() if isinstance(m, nn.Linear)]
        assert linears[-1].out_features == 7  # the replaced classifier, a plain Linear


def _imagenet_top1(model: nn.Module, mean, std, name: str) -> tuple[int, float]:
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image(name))
    x = eval_transform(224, mean, std)(img).unsqueeze(0)
    model.eval()
    with torch.inference_mode():
        p = model(x).softmax(-1)[0]
    return int(p.argmax()), p


def test_lite0_offline_weights_in_their_right_configuration():
    model, meta, source, built = load_pretrained("efficientnet_lite0")
    assert (source, built) == ("timm", "tf_efficientnet_lite0")
    assert meta["mean"] == meta["std"] == (0.5, 0.5, 0.5)
    top_china, p_china = _imagenet_top1(model, meta["mean"], meta["std"], "china.jpg")
    top_flower, _ = _imagenet_top1(model, meta["mean"], meta["std"], "flower.jpg")
    assert (top_china, top_flower) == (698, 985)  # palace; daisy, the nearest class to a dahlia
    # The wrong configuration (efficientnet_lite0 padding, ImageNet statistics) is less sure.
    import timm

    from layerwise.models import IMAGENET_MEAN, IMAGENET_STD, lite0_state_dict

    wrong = timm.create_model("efficientnet_lite0")
    wrong.load_state_dict(lite0_state_dict(wrong))
    _, p_wrong = _imagenet_top1(wrong, IMAGENET_MEAN, IMAGENET_STD, "china.jpg")
    assert p_china[698] > p_wrong[698]


def test_lite0_default_weights_in_create_model():
    loaded = create_model("efficientnet_lite0", 10)
    assert loaded.arch == "tf_efficientnet_lite0" and loaded.notes
    assert loaded.model.get_classifier().out_features == 10


def test_torchvision_weights_name_is_checked_before_download():
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        create_model("resnet50", 3, weights="IMAGENET1K_V9")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_roundtrip(tmp_path, suffix):
    src = create_model("resnet18", 4, weights="none")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    again = create_model("resnet18", 4, weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    src.model.eval(), again.model.eval()
    torch.testing.assert_close(src.model(x), again.model(x))


def test_backbone_file_with_imagenet_head_loads_then_head_is_replaced(tmp_path):
    backbone = load_pretrained("resnet18", "none")[0]
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    loaded = create_model("resnet18", 3, weights=str(tmp_path / "backbone.pth"))
    torch.testing.assert_close(loaded.model.layer4[0].conv1.weight, backbone.layer4[0].conv1.weight)
    assert loaded.model.fc.out_features == 3


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "hook": os.system}, path)
    with pytest.raises(LayerwiseError, match="refusing to load"):
        create_model("resnet18", 3, weights=str(path))


def test_missing_weights_file():
    with pytest.raises(MissingPathError, match="does not exist"):
        create_model("resnet18", 3, weights="nope.safetensors")


def test_torchvision_weights_offline_is_a_clear_error(no_network, tmp_path, monkeypatch, capsys):
    from layerwise.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["plan", "--model", "resnet18", "--weights", "IMAGENET1K_V1"]) == 2
    err = capsys.readouterr().err
    assert "need a download from https://download.pytorch.org/models/resnet18-" in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in err and "--weights path/to/file.pth" in err
    assert "Traceback" not in err


def test_torchvision_weights_in_the_torch_cache_load_without_network(no_network, tmp_path, monkeypatch):
    from torchvision import models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    w = tvm.get_model_weights("resnet18")["IMAGENET1K_V1"]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / w.url.rpartition("/")[2]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    state = tvm.resnet18().state_dict()
    torch.save(state, cached)
    loaded = create_model("resnet18", 3, weights="IMAGENET1K_V1")
    assert torch.equal(loaded.model.conv1.weight, state["conv1.weight"])


def test_unknown_timm_tag_lists_the_tags():
    with pytest.raises(UnknownNameError, match="a1_in1k"):
        create_model("timm/resnet18", 3, weights="bogus")


@pytest.mark.parametrize("weights", ["x.pkl", "model.ckpt", "dir/weights"])
def test_weights_path_of_unsupported_type_is_an_error(weights):
    with pytest.raises(LayerwiseError, match="unsupported type"):
        create_model("resnet18", 3, weights=weights)


def test_torchvision_enum_style_weights_name_is_not_a_path():
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        create_model("resnet18", 3, weights="ResNet18_Weights.BOGUS")


@pytest.mark.parametrize("n", [0, 100_001])
def test_num_classes_bounded(n):
    with pytest.raises(LayerwiseError, match="num_classes must be an integer from 1 to 100000"):
        create_model("resnet18", n, weights="none")


@pytest.mark.parametrize("name,side", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_and_lite2_offline_weights_map_exactly_and_see_a_palace(name, side):
    """Every tensor of the packaged weights lands on timm's TF variant (checked by count and
    shape, loaded strictly), and at its own resolution the model names scikit-learn's temple
    photo a palace, as Lite0 does: a wrong mapping gives noise, not 0.3+ on one class."""
    from sklearn.datasets import load_sample_image

    model, meta, source, built = load_pretrained(name)
    assert (source, built) == ("timm", f"tf_{name}") and meta == {"mean": (0.5,) * 3, "std": (0.5,) * 3,
                                                                 "img_size": side}
    x = eval_transform(side, meta["mean"], meta["std"])(Image.fromarray(load_sample_image("china.jpg"))).unsqueeze(0)
    model.eval()
    with torch.inference_mode():
        p = model(x).softmax(-1)[0]
    top5 = p.topk(5).indices.tolist()
    assert top5[0] == 698 and p[698] > 0.3  # palace
    assert len({442, 663, 449, 975, 483} & set(top5)) >= 2  # bell cote, monastery...: Lite0's neighbours
    loaded = create_model(name, 5)
    assert loaded.img_size == side and loaded.model.get_classifier().out_features == 5


def test_hf_hub_names_are_timm_names_and_fail_offline_with_the_fix(tmp_path):
    """hf-hub:timm/ARCH.TAG is timm's ARCH with weights TAG: --weights none builds offline;
    the weights, offline, are a user error (exit 2) that names --weights none, no traceback."""
    import os
    import subprocess
    import sys

    from layerwise.models import create_model

    loaded = create_model("hf-hub:timm/resnet18.a1_in1k", 3, weights="none")
    assert (loaded.source, loaded.arch) == ("timm", "resnet18") and loaded.model.fc.out_features == 3
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "layerwise", "plan", "--model", "hf-hub:timm/resnet18.a1_in1k",
                          "--num-classes", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "resnet18.a1_in1k" in out.stderr and "--weights none" in out.stderr


def test_lite_weights_refuse_a_model_whose_tensor_does_not_fit():
    """Every renamed tensor's shape is checked against the model's own: a 10-class head is
    not the packaged 1000-class one, and the message names both."""
    import timm

    from layerwise.models import lite_state_dict

    with pytest.raises(LayerwiseError, match=r"does not fit classifier\.weight"):
        lite_state_dict(timm.create_model("tf_efficientnet_lite0", num_classes=10, pretrained=False), 0)
    ok = lite_state_dict(timm.create_model("tf_efficientnet_lite0", pretrained=False), 0)
    assert ok["classifier.weight"].shape == (1000, 1280)
