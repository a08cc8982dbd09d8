from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from layerwise.augment import PRESETS, eval_transform, mix_batch


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_give_normalised_tensors_of_the_size(name):
    img = Image.new("RGB", (50, 40), (120, 30, 200))
    x = PRESETS[name](32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.01 and x.max() <= 1.01 or name == "aggressive"  # erasing writes noise


def test_aggressive_is_the_tutorials_list():
    t = PRESETS["aggressive"](224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    kinds = [type(m) for m in t.transforms]
    assert kinds[:5] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomRotation, v2.ColorJitter,
                         v2.RandomAffine]
    assert t.transforms[0].scale == (0.7, 1.0) and t.transforms[-1].p == 0.2
    assert isinstance(t.transforms[-1], v2.RandomErasing)


def test_eval_transform_is_deterministic():
    img = Image.effect_noise((60, 45), 40).convert("RGB")
    t = eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(t(img), t(img))


def test_mixup_gives_soft_targets():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    mixed, t = mix_batch(x, y, 3, mixup=0.4, cutmix=0.0)
    assert t.shape == (4, 3) and torch.allclose(t.sum(-1), torch.ones(4))
    # soft: a one-hot target would pass the lines above; MixUp blends each sample with another's
    # (samples whose partner has the same class keep a one-hot target; the others cannot)
    assert bool((t.max(-1).values < 1).any()) and not torch.equal(mixed, x)
    assert mix_batch(x, y, 3, mixup=0, cutmix=0)[1] is y
