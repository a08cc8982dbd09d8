from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise.errors import UnknownNameError
from layerwise.tta import VIEWS, expand, predict_proba


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(VIEWS)), st.integers(8, 40), st.integers(1, 3))
def test_views_keep_shape_and_are_deterministic(name, size, batch):
    x = torch.rand(batch, 3, size, size)
    a, b = VIEWS[name](x), VIEWS[name](x)
    assert all(v.shape == x.shape for v in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_view_counts():
    x = torch.rand(1, 3, 16, 16)
    assert len(expand(x, [])) == 1
    assert len(expand(x, ["hflip"])) == 2
    assert len(expand(x, ["five-crop"])) == 6
    assert len(expand(x, ["ten-crop", "identity"])) == 11


def test_probability_average_over_views():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        manual = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    torch.testing.assert_close(predict_proba(model, x, ["hflip"]), manual)


def test_unknown_view():
    with pytest.raises(UnknownNameError, match="hflip"):
        expand(torch.rand(1, 3, 8, 8), ["vflip"])


def test_views_show_what_their_names_say():
    """The contents, not just the shapes: a corner crop of an image with one bright corner pixel
    keeps it in that corner's view only; hflip mirrors; multi-scale zooms in and out."""
    x = torch.zeros(1, 1, 16, 16)
    x[..., 0, 0] = 1.0  # top-left
    assert torch.equal(VIEWS["identity"](x)[0], x)
    assert torch.equal(VIEWS["hflip"](x)[0][..., 0, 15], x[..., 0, 0])
    tl, tr, bl, br, centre = VIEWS["five-crop"](x)
    assert tl[..., :2, :2].sum() > 0.5 and all(float(v.abs().sum()) < 1e-6 for v in (tr, bl, br, centre))
    ten = VIEWS["ten-crop"](x)
    assert torch.equal(ten[0], tl) and ten[6][..., :2, -2:].sum() > 0.5  # the mirrored top-left crop
    ramp = torch.linspace(0, 1, 16).expand(1, 1, 16, 16).contiguous()
    zoom_in, zoom_out = VIEWS["multi-scale"](ramp)
    span = (ramp[..., 8, -1] - ramp[..., 8, 0]).item()
    assert (zoom_in[..., 8, -1] - zoom_in[..., 8, 0]).item() < span  # a narrower window of the ramp
    assert torch.equal(zoom_out[..., 8, :1], zoom_out[..., 8, 1:2])  # replicate-padded edge


def test_auto_views_follow_the_training_augmentation():
    """--tta auto: a view only where the preset trains on such images (flips, rescaled crops)."""
    from torchvision.transforms import v2

    from layerwise.augment import PRESETS
    from layerwise.tta import views_for

    assert views_for("light") == ["hflip", "multi-scale"]
    assert views_for("none") == []  # the embedded digits: never flipped, never rescaled
    assert all(views_for(p) == ["hflip", "multi-scale"] for p in PRESETS if p != "none")
    PRESETS["flip-only"] = lambda size, mean, std: v2.Compose([v2.RandomApply([v2.RandomHorizontalFlip(p=1)], p=0.5)])
    try:  # a user's preset: the flip nested inside RandomApply is found
        assert views_for("flip-only") == ["hflip"]
    finally:
        del PRESETS["flip-only"]
