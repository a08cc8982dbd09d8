"""The names each choice field accepts, read from the registries that define them.

The schema (:mod:`layerwise.config`) knows types and ranges only; this module sits above it and
the registries, so a strategy registered from user code is a valid ``strategy`` at once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from layerwise.augment import PRESETS
from layerwise.cache import CACHE_MODES
from layerwise.config import CHECK_DATA, NAN_POLICIES, PRECISIONS, RunConfig, from_mapping
from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.features import FEATURE_CACHE_MODES
from layerwise.freeze import BN_MODES
from layerwise.strategies import STRATEGIES
from layerwise.tta import AUTO as TTA_AUTO
from layerwise.tta import VIEWS


def choices() -> dict[str, tuple[str, Collection[str]]]:
    """field -> (what it names, its valid names); read at call time, as registries may grow."""
    return {"strategy": ("strategy", STRATEGIES), "augment": ("augmentation preset", PRESETS),
            "check_data": ("check-data mode", CHECK_DATA), "cache": ("cache mode", CACHE_MODES),
            "feature_cache": ("feature-cache mode", FEATURE_CACHE_MODES), "nan": ("NaN policy", NAN_POLICIES),
            "bn": ("bn mode", BN_MODES), "precision": ("precision", PRECISIONS)}


def check_choices(cfg: RunConfig) -> None:
    """Every named choice of ``cfg`` is one its registry knows, else an error listing them."""
    for name, (kind, valid) in choices().items():
        value = getattr(cfg, name)
        if value is not None and value not in valid:
            raise UnknownNameError(kind, value, valid)
    if TTA_AUTO in cfg.tta and len(cfg.tta) > 1:
        raise LayerwiseError(f"--tta {','.join(cfg.tta)}: 'auto' chooses the views itself and stands alone; "
                             f"give either auto or views from: {', '.join(VIEWS)}")
    for v in cfg.tta:
        if v not in VIEWS and v != TTA_AUTO:
            raise UnknownNameError("TTA view", v, [*VIEWS, TTA_AUTO])
    if cfg.reg is not None:
        from layerwise.regularise import parse_reg

        parse_reg(cfg.reg)


def config_from(values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """:func:`~layerwise.config.from_mapping`, then the choices checked: a config a run can use."""
    cfg = from_mapping(values, base)
    check_choices(cfg)
    return cfg
