from __future__ import annotations

import pytest

from layerwise.choices import check_choices, config_from
from layerwise.config import RunConfig, from_mapping
from layerwise.errors import UnknownNameError
from layerwise.strategies import STRATEGIES, full


@pytest.mark.parametrize("values,err", [
    ({"strategy": "freeze"}, "unknown strategy 'freeze'; choose one of: head, partial"),
    ({"augment": "heavy"}, "unknown augmentation preset"),
    ({"tta": ["spin"]}, "unknown TTA view"),
    ({"precision": "fp8"}, "unknown precision"),
    ({"bn": "sometimes"}, "unknown bn mode 'sometimes'; choose one of: frozen, adapt, eval, train"),
    ({"cache": "cloud"}, "unknown cache mode"),
    ({"feature_cache": "on"}, "unknown feature-cache mode"),
    ({"nan": "ignore"}, "unknown NaN policy"),
    ({"check_data": "yes"}, "unknown check-data mode"),
])
def test_bad_choices_name_the_value_and_the_choices(values, err):
    with pytest.raises(UnknownNameError, match=err):
        config_from(values)


def test_the_schema_alone_does_not_know_the_registries():
    assert from_mapping({"strategy": "freeze"}).strategy == "freeze"  # checked one layer up


def test_a_registered_strategy_is_a_valid_choice_at_once(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "mine", full)  # removed again after the test
    with pytest.raises(UnknownNameError):
        check_choices(RunConfig(strategy="yours"))
    check_choices(RunConfig(strategy="mine"))
