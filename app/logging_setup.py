"""One JSON object per log line, with callers' phone numbers cut to their last four digits.

Log lines leave the process (log shippers, support tickets), phone numbers are personal data,
and the last four digits are what a person needs to tell two calls apart. Redaction happens
in the formatter, so no call site can forget it.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

from app.correlation import current_ids

# E.164 numbers as Twilio writes them (`+14155550123`), also URL-encoded (`%2B1415...`) as they
# appear in access-log query strings. The look-arounds keep SIDs and hex ids intact.
_PHONE = re.compile(r"(?<![\w+%])(\+|%2[bB])(\d{3,11})(\d{4})(?!\w)")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "color_message", "taskName"}
)


# Credentials never reach a log line, whoever logs them (a library's DEBUG dump of request
# headers, an exception quoting a URL): bearer tokens, basic auth, OpenAI-style keys, and every
# secret the app registered at start-up (TWILIO_AUTH_TOKEN, OPENAI_API_KEY).
_CREDENTIAL = re.compile(
    r"(?i)(authorization:\s*(?:basic\s+|bearer\s+)?|bearer\s+|\bsk-)[A-Za-z0-9._~+/=-]{6,}"
)
_secrets: set[str] = set()
REDACTED = "[redacted]"


def register_secret(value: str | None) -> None:
    """Scrub `value` from every log line from now on (too short a value would scrub noise)."""
    if value and len(value) >= 8:
        _secrets.add(value)


def redact_secrets(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _CREDENTIAL.sub(lambda m: m.group(1) + REDACTED, text)


def redact_numbers(text: str) -> str:
    """`+14155550123` -> `+*******0123` (same length, so columns and lengths stay telling)."""
    return _PHONE.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), text)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, msg, then any `extra=` fields."""

    def __init__(self, *, redact: bool = True) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self._clean(record.getMessage()),
        }
        line.update(current_ids())  # call_sid / message_sid of the call or message at hand
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = self._clean_value(value)
        if record.exc_info:
            line["exc"] = self._clean("".join(traceback.format_exception(*record.exc_info)))
        return redact_secrets(orjson.dumps(line, default=str).decode())

    def _clean(self, text: str) -> str:
        return redact_numbers(text) if self.redact else text

    def _clean_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._clean(value)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean_value(item) for item in value]
        if isinstance(value, dict):
            return {str(key): self._clean_value(item) for key, item in value.items()}
        return self._clean(str(value))


def configure_logging(level: str = "INFO", *, redact: bool = True) -> None:
    """Route every logger (ours, uvicorn's, libraries') through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact=redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own loggers carry handlers when it configures logging itself; ours run it with
    # log_config=None, and these make sure its lines reach the JSON handler either way.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Chatty at INFO: Alembic narrates every plugin and migration step on each start-up, and
    # websockets logs every connection of the in-process emulator, picows every connection and
    # disconnection of every call's sockets.
    for name in ("alembic", "websockets", "picows"):
        logging.getLogger(name).setLevel(logging.WARNING)
