"""User-facing errors: the CLI turns these into exit code 2 without a traceback."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


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


def quote_error(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, for quoting a library's exception in ours."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def read_user_text(path: Path, what: str) -> str:
    """A user's text file (CSV, YAML, JSON) as UTF-8; another encoding or a binary file is a
    user error that names the file, not a UnicodeDecodeError traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LayerwiseError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                             "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e


class MissingPathError(LayerwiseError, FileNotFoundError):
    """A path the user gave does not exist."""

    def __str__(self) -> str:
        return self.args[0]

