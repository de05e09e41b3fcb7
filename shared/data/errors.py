"""The one exception type for bad data: it says what is wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data.

    ``str(err)`` reads ``FILE:LINE: column 'COL': PROBLEM. FIX`` with the parts that are known.
    ``line`` is 1-based and counts the header as line 1, as an editor does.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.line = line
        self.column = column
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        col = f"column '{self.column}': " if self.column is not None else ""
        fix = f" {self.fix}" if self.fix else ""
        return f"{where}{col}{self.problem}.{fix}"
