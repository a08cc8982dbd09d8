"""User-facing errors: the CLI turns these into exit code 2 without a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class LayerwiseError(ValueError):
    """A problem with the user's input; the message names the value and the fix."""


class UnknownNameError(LayerwiseError, KeyError):
    """A name (group, model, strategy, preset...) that is not one of the valid choices."""

    def __init__(self, kind: str, value: object, choices: Iterable[str]) -> None:
        self.kind, self.value, self.choices = kind, value, list(choices)
        super().__init__(f"unknown {kind} {value!r}; choose one of: {', '.join(self.choices)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class DataError(LayerwiseError):
    """A dataset that cannot be used as it is laid out."""


class MissingPathError(LayerwiseError, FileNotFoundError):
    """A path the user gave does not exist."""

    def __str__(self) -> str:
        return self.args[0]

