"""--reg (regularise.py): L2-SP, LwF and Co-Tuning: their values, their parsing, and their effect in a real fit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TINY
from layerwise.cli import main
from layerwise.errors import LayerwiseError
from layerwise.groups import LayerGroup
from layerwise.regularise import Start, class_relationship, cotune, l2sp, make_penalty, parse_reg


def _model_and_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return model, (LayerGroup("body", ("0.weight", "0.bias"), ()), LayerGroup("head", ("1.weight", "1.bias"), ()))


def test_l2sp_is_half_the_squared_distance_of_the_body_from_its_start():
    model, groups = _model_and_groups()
    penalty = l2sp(model, groups, 0.5)
    assert penalty().item() == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)  # 12 entries, each 1 away
        model[1].weight.add_(5.0)  # the head: not pulled back
    assert penalty().item() == pytest.approx(0.5 / 2 * 12)
    model[0].weight.requires_grad_(False)  # frozen: sits where it is, no term
    assert penalty().item() == 0.0


@given(st.sampled_from(["l2sp", "l2sp:", "l2sp:x", "l2sp:-1", "nope:1", "l2sp:nan"]))
def test_bad_specs_are_user_errors_naming_the_fix(spec):
    with pytest.raises(LayerwiseError, match="l2sp"):
        parse_reg(spec)


def test_a_good_spec_parses():
    assert parse_reg("l2sp:0.01") == ("l2sp", 0.01) and make_penalty(None, *_model_and_groups()) is None


def _fit(data, run, *extra):
    return main(["fit", str(data), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run), *extra])


def test_strength_zero_is_no_regulariser_bit_for_bit(data, tmp_path):
    assert _fit(data, tmp_path / "a") == 0 and _fit(data, tmp_path / "b", "--reg", "l2sp:0") == 0
    wa, wb = (torch.load(tmp_path / r / "last" / "state.pt", weights_only=False)["model"] for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_strength_keeps_the_body_nearer_its_start_at_equal_steps(data, tmp_path):
    from layerwise.config import RunConfig
    from layerwise.setup import set_up_model

    assert _fit(data, tmp_path / "free") == 0 and _fit(data, tmp_path / "held", "--reg", "l2sp:100") == 0
    cfg = RunConfig(model="timm/test_efficientnet", weights="none", seed=0)
    ms = set_up_model(cfg, 3, n_train=None, images_per_class=None)  # the weights every run starts from
    model = ms.loaded.model
    start = model.state_dict()
    head = {id(p) for p in ms.groups[-1].parameters(model)}
    body = [n for n, p in model.named_parameters() if id(p) not in head]

    def distance(run):
        w = torch.load(tmp_path / run / "last" / "state.pt", weights_only=False)["model"]
        return sum(((w[k].float() - start[k].float()) ** 2).sum().item() for k in body if k in w)

    assert distance("held") < 0.5 * distance("free")


def test_lwf_is_zero_at_the_start_and_grows_as_the_old_outputs_drift():
    """The teacher is the model as built with its original classifier: before any step the
    student's old-task outputs are the teacher's (KL 0); moving the body moves them."""
    from layerwise.regularise import lwf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    groups = (LayerGroup("body", ("0.weight", "0.bias"), (), ("0",)), LayerGroup("head", ("2.weight", "2.bias"), (), ("2",)))
    imagenet = torch.nn.Linear(5, 7)  # the classifier the weights came with
    penalty = lwf(model, groups, 3.0, Start(imagenet))
    x = torch.randn(16, 3)
    model(x)  # the step's forward pass, which the penalty reads
    assert penalty(x).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    model(x)
    drift = penalty(x)
    assert drift.item() > 0 and drift.requires_grad  # it trains the body
    drift.backward()
    assert model[0].weight.grad is not None and imagenet.weight.grad is None  # the old classifier stays as it was


def test_lwf_without_an_original_classifier_is_a_user_error_naming_the_alternative():
    model, groups = _model_and_groups()
    with pytest.raises(LayerwiseError, match="l2sp"):
        make_penalty("lwf:1", model, groups)


def test_lwf_strength_zero_is_no_regulariser_bit_for_bit_and_a_strength_holds_the_old_outputs(data, tmp_path):
    from layerwise.config import RunConfig
    from layerwise.setup import set_up_model

    assert _fit(data, tmp_path / "a") == 0 and _fit(data, tmp_path / "b", "--reg", "lwf:0") == 0
    wa, wb = (torch.load(tmp_path / r / "last" / "state.pt", weights_only=False)["model"] for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # --bn eval: the student's BatchNorm reads the statistics the (eval-mode) teacher reads, so
    # the penalty measures drift, not batch-statistics noise on a random-init model
    assert _fit(data, tmp_path / "free", "--bn", "eval") == 0
    assert _fit(data, tmp_path / "held", "--bn", "eval", "--reg", "lwf:100000") == 0
    cfg = RunConfig(model="timm/test_efficientnet", weights="none", seed=0)
    built = set_up_model(cfg, 3, n_train=None, images_per_class=None).loaded  # every run's start
    old, teacher = built.pretrained_head, built.model.eval()
    assert old is not None
    head_path = set_up_model(cfg, 3, n_train=None, images_per_class=None).groups[-1].modules[0]
    from layerwise.augment import eval_transform
    from layerwise.data import load_splits, open_image

    tf = eval_transform(32, built.mean, built.std)
    x = torch.stack([tf(open_image(src)) for src, _ in load_splits(str(data)).train])  # the images LwF saw

    def old_outputs(model):
        seen = {}
        handle = model.get_submodule(head_path).register_forward_pre_hook(lambda m, a: seen.__setitem__("f", a[0]))
        with torch.no_grad():
            model(x)
        handle.remove()
        return torch.log_softmax(old(seen["f"]) / 2, -1)

    want = old_outputs(teacher)

    def drift(run):
        m = set_up_model(cfg, 3, n_train=None, images_per_class=None).loaded.model.eval()
        m.load_state_dict(torch.load(tmp_path / run / "last" / "state.pt", weights_only=False)["model"])
        return torch.nn.functional.kl_div(old_outputs(m), want, log_target=True, reduction="batchmean").item()

    assert drift("held") < 0.5 * drift("free")


def test_the_class_relationship_is_each_new_classs_mean_old_class_softmax():
    teacher = torch.nn.Identity()  # logits = the inputs
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    rel = class_relationship(teacher, [(x[:2], y[:2]), (x[2:], y[2:])], num_classes=3)
    soft = torch.softmax(x, -1)
    assert torch.allclose(rel[0], soft[:2].mean(0)) and torch.allclose(rel[1], soft[2])
    assert torch.allclose(rel[2], torch.full((3,), 1 / 3))  # no image of class 2: uniform
    assert torch.allclose(rel.sum(1), torch.ones(3))


def _with_imagenet():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    groups = (LayerGroup("body", ("0.weight", "0.bias"), (), ("0",)), LayerGroup("head", ("2.weight", "2.bias"), (), ("2",)))
    return model, groups, torch.nn.Linear(5, 7)


def test_cotune_is_the_cross_entropy_of_the_old_outputs_against_the_relationship_of_the_label():
    model, groups, imagenet = _with_imagenet()
    x, y = torch.randn(12, 3), torch.tensor([0, 1] * 6)
    penalty = cotune(model, groups, 2.0, Start(imagenet, lambda n: [(x, y)]))
    with torch.no_grad():
        old = imagenet(torch.relu(model[0](x)))  # the model as built: the relationship's teacher
    soft = torch.softmax(old, -1)
    rel = torch.stack([soft[y == c].mean(0) for c in (0, 1)])
    model(x)  # the step's forward pass, which the penalty reads
    expected = -(rel[y] * torch.log_softmax(old, -1)).sum(-1).mean() * 2.0
    assert penalty(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    mixed = torch.nn.functional.one_hot(y, 2).float() * 0.7 + 0.3 * torch.nn.functional.one_hot(1 - y, 2).float()
    soft_target = 0.7 * rel[y] + 0.3 * rel[1 - y]  # mixup: the relationship of the mixed labels
    expected_mix = -(soft_target * torch.log_softmax(old, -1)).sum(-1).mean() * 2.0
    value = penalty(x, mixed)
    assert value.item() == pytest.approx(expected_mix.item(), rel=1e-5)
    value.backward()
    assert model[0].weight.grad is not None and imagenet.weight.grad is None  # it pulls the body; the old head stays


def test_cotune_without_training_images_or_an_original_classifier_is_a_user_error():
    model, groups, imagenet = _with_imagenet()
    with pytest.raises(LayerwiseError, match="training images"):
        cotune(model, groups, 1.0, Start(imagenet))
    with pytest.raises(LayerwiseError, match="l2sp"):
        make_penalty("cotune:1", model, groups, Start(None, lambda n: []))


def test_cotune_strength_zero_is_no_regulariser_bit_for_bit_and_a_strength_moves_the_run(data, tmp_path):
    assert _fit(data, tmp_path / "a") == 0 and _fit(data, tmp_path / "b", "--reg", "cotune:0") == 0
    assert _fit(data, tmp_path / "c", "--reg", "cotune:5") == 0
    wa, wb, wc = (torch.load(tmp_path / r / "last" / "state.pt", weights_only=False)["model"] for r in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
