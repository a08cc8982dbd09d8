from __future__ import annotations

import pytest

from layerwise.config import RunConfig, from_mapping, load_yaml
from layerwise.errors import LayerwiseError, UnknownNameError


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(LayerwiseError, match="'learning_rate'|'epoch' \\(did you mean 'epochs'\\?\\)"):
        from_mapping({"epoch": 3})


@pytest.mark.parametrize("values,err", [
    ({"lr": 0}, "lr must be > 0"),
    ({"lr": -1e-3}, "lr must be > 0"),
    ({"lr": "fast"}, "lr must be a number or 'auto'"),
    ({"epochs": 0}, "epochs must be"),
    # issue 13: each of these was accepted, then hung, crashed late or trained nonsense
    ({"t0": 0}, r"t0 must be in \[1,"),
    ({"t_mult": 0}, r"t_mult must be in \[1,"),
    ({"warmup_epochs": 4, "epochs": 4}, "warmup_epochs must be shorter than the run"),
    ({"probe_epochs": 4, "epochs": 4}, "probe_epochs must leave an epoch"),
    ({"label_smoothing": 2.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"ema": 2.0}, r"ema must be in \(0, 1\)"),
    ({"workers": -1}, r"workers must be in \[0, 256\]"),
    ({"wd_map": {"head": -5.0}}, "wd_map values must each be a weight decay >= 0"),
    ({"lr_map": {"head": -1.0}}, "lr_map values must each be an LR multiplier >= 0"),
    ({"mixup": -1.0}, "mixup must be"),
    ({"cutmix": -1.0}, "cutmix must be"),
    ({"clip_grad": -1.0}, "clip_grad must be > 0"),
    ({"patience": -1}, "patience must be >= 0"),
    ({"hidden": 0}, "hidden must be in"),
    ({"every": 0}, "every must be >= 1"),
    ({"img_size": 100_000}, r"img_size must be in \[16, 2048\]"),
    ({"batch_size": 10**9}, "batch_size must be in"),
    ({"schedule": {4: "head"}, "epochs": 4}, "schedule epochs must lie in the run"),
    ({"seed": -1}, "seed must be in"),
])
def test_bad_values(values, err):
    with pytest.raises(LayerwiseError, match=err):
        from_mapping(values)


def test_yaml_roundtrip(tmp_path):
    cfg = RunConfig(strategy="gradual", schedule={0: "head", 2: "layer4"}, lr_map={"head": 1.0})
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert from_mapping(load_yaml(tmp_path / "c.yaml")) == cfg


def test_yaml_is_parsed_safely(tmp_path):
    (tmp_path / "evil.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LayerwiseError, match="not valid YAML"):
        load_yaml(tmp_path / "evil.yaml")


def test_unknown_name_error_is_a_keyerror_and_valueerror():
    e = UnknownNameError("group", "x", ["a", "b"])
    assert isinstance(e, KeyError) and isinstance(e, ValueError) and str(e) == "unknown group 'x'; choose one of: a, b"


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerwise.config import KEYS  # noqa: E402

_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.floats(allow_nan=True), st.text(max_size=8),
                    st.lists(st.text(max_size=4), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS + ["bogus", "lr_rate"]), _values, max_size=6))
def test_fuzz_config_raises_only_documented_errors(values):
    try:
        from_mapping(values)
    except LayerwiseError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
@example("?")  # {None: None}: a non-string key once crashed the typo hint
@example("1: 2")
def test_fuzz_yaml_files(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_text(text)
    try:
        from_mapping(load_yaml(p))
    except LayerwiseError:
        pass


def test_latin1_yaml_is_a_user_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes("model: r\xe9snet\n".encode("latin-1"))
    with pytest.raises(LayerwiseError, match="is not UTF-8 text"):
        load_yaml(p)
