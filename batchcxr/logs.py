"""Log formatting: no file name or DICOM value can forge a log line."""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f\u2028\u2029]|\n|\r")


def escape_controls(text: str) -> str:
    """Control characters (newlines, ESC, NUL, line separators...) as visible escapes (\\n, \\x1b)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class SafeFormatter(logging.Formatter):
    """A plain-text formatter that escapes control characters in the message and its arguments, so
    one record is always one line (tracebacks, added below it by logging, keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message)
        return super().formatMessage(record)
