"""Secrets out of everything dino-ray writes: MLflow params/tags/artifacts, config files, logs.

``redact("s3://u:pw@host/b?X-Amz-Signature=abc&x=1")`` -> ``"s3://u:***@host/b?X-Amz-Signature=***&x=1"``

Two shapes are redacted, anywhere inside a string (a URI alone, a YAML document, a log line):

* the password of ``scheme://user:password@host`` (the user name is kept: it says which account);
* the value of a sensitive query parameter (``?``/``&``/``;`` then a name in
  ``SENSITIVE_QUERY_KEYS``, compared case-insensitively): the keys of S3/GCS/Azure signed URLs
  and the usual token names.

Redaction is idempotent (``***`` redacts to itself), so text may pass through it more than once.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# signed-URL parameters (S3 v4, GCS v2/v4, Azure SAS) and generic credential names
SENSITIVE_QUERY_KEYS: frozenset[str] = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "signature",
        "sig",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "key",
        "api_key",
        "apikey",
        "secret",
        "client_secret",
        "password",
        "passwd",
        "pwd",
    }
)

# scheme://user:password@  -- the password runs to the last '@' before the path, so an
# unencoded '@' inside it is still covered
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*):[^/?#\s]*@")
_QUERY = re.compile(
    r"(?P<head>[?&;](?:" + "|".join(re.escape(k) for k in sorted(SENSITIVE_QUERY_KEYS)) + r")=)"
    r"[^&#\s'\"]*",
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """A string with its secrets masked; any other value is returned unchanged."""
    if not isinstance(value, str) or ("@" not in value and "=" not in value):
        return value
    out = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", value)
    return _QUERY.sub(lambda m: m["head"] + MASK, out)


def redact_obj(obj: Any) -> Any:
    """``redact`` applied to every string inside dicts (keys and values), lists, tuples and sets;
    returns a new object and leaves ``obj`` untouched."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and formatted traceback) with ``redact``; never drops one.

    ``prefix`` limits it to loggers under that name (``""`` = every record)."""

    def __init__(self, prefix: str = "dino_ray") -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefix and not (
            record.name == self.prefix or record.name.startswith(self.prefix + ".")
        ):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's own error to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            # formatters reuse a cached exc_text, so the traceback is printed redacted
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_installed: RedactingFilter | None = None


def install_log_redaction(prefix: str = "dino_ray") -> RedactingFilter:
    """Redact every record of the ``prefix`` loggers in this process; idempotent.

    A filter on the ``dino_ray`` logger would not see records of its children
    (``dino_ray.tracking``: Python applies logger filters only on the logger a record is logged
    on), and handler filters miss handlers added later (each verb calls ``basicConfig`` itself);
    wrapping the record factory covers every record of those loggers, whatever the handlers."""
    global _installed
    if _installed is not None:
        return _installed
    flt = RedactingFilter(prefix)
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = flt
    return flt
