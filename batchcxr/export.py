"""CSV and JSON exports, shared by `batchcxr export` and the review app's CSV downloads.

Every CSV cell a spreadsheet could take as a formula is neutralised: text starting (after any
leading spaces) with = + - @ tab or CR gets a leading apostrophe, and every cell is quoted, so a
delimiter inside a value (say ``;`` when the file is opened with ``;`` as the separator) never
starts a new cell that could begin with a formula.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_AFTER_DELIMITER = re.compile(r"([,;\t|])(\s*)(?=[=+\-@\r])")


def neutralise(value: Any) -> Any:
    """A text value safe to open in a spreadsheet, whatever delimiter it is opened with: a leading
    formula trigger gets an apostrophe, and so does one right after a character a spreadsheet may
    take as the delimiter (``a;=1+1`` opened with ``;`` would start a cell ``=1+1``). Other values
    unchanged."""
    if not isinstance(value, str):
        return value
    value = _AFTER_DELIMITER.sub(r"\1\2'", value)
    if value[:1] in FORMULA_TRIGGERS or value.lstrip(" ")[:1] in FORMULA_TRIGGERS:
        return "'" + value
    return value


def plain(value: Any) -> Any:
    """Datetimes as ISO 8601 text; everything else as it is."""
    return value.isoformat() if isinstance(value, (dt.datetime, dt.date)) else value


def _writer(out: TextIO):
    return csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")


def csv_row(row: Mapping[str, Any], fields: Sequence[str], out: TextIO) -> None:
    """Write one row (only ``fields``, in that order), neutralised."""
    _writer(out).writerow([neutralise(plain(row.get(f, ""))) for f in fields])


def write_csv(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    """Write a header and the rows (only ``fields``, in that order); return the number of rows."""
    _writer(out).writerow([neutralise(f) for f in fields])
    n = 0
    for row in rows:
        csv_row(row, fields, out)
        n += 1
    return n


def write_json(rows: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """Write the rows as one JSON array, streamed row by row; return the number of rows."""
    n = 0
    out.write("[")
    for row in rows:
        out.write(",\n  " if n else "\n  ")
        out.write(json.dumps({k: plain(v) for k, v in row.items()}, ensure_ascii=False))
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n
