"""The project's exception tree.

Every error llmsched raises on purpose derives from :class:`LlmschedError`,
so a caller can catch the family in one ``except``::

    LlmschedError
     +-- TraceError               a trace file cannot be read as asked
     |    +-- TraceFormatError    a row or column is malformed (path, line, field)
     +-- ConfigError              a scenario, profile or option is invalid

Errors name what was wrong and where: a trace error carries the file, the
line (1-based, as an editor shows it; the header is line 1 of a CSV) and the
field, and says what was expected.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "LlmschedError", "TraceError", "TraceFormatError"]


class LlmschedError(Exception):
    """Base class of every error llmsched raises on purpose."""


class ConfigError(LlmschedError, ValueError):
    """A scenario, profile or option is invalid."""


class TraceError(LlmschedError, ValueError):
    """A trace cannot be read as asked (unknown format, missing file, ...)."""


class TraceFormatError(TraceError):
    """A malformed row or a missing column in a trace file.

    Attributes:
        path: the file.
        line: 1-based line number in the file, or ``None`` for a whole-file
            problem such as a missing column.
        field: the column or JSON key at fault.
        expected: what a valid value looks like.
        got: the offending value (``None`` when absent).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        field: str,
        expected: str,
        line: int | None = None,
        got: object = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.expected = expected
        self.got = got
        where = f"{self.path}:{line}" if line is not None else self.path
        detail = f"; got {got!r}" if got is not None else ""
        super().__init__(f"{where}: field {field!r}: expected {expected}{detail}")
