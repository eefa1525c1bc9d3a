"""Secrets out of everything dino-ray writes: MLflow params/tags/artifacts, config files, logs.

``redact("s3://u:pw@host/b?X-Amz-Signature=abc&x=1")`` -> ``"s3://u:***@host/b?X-Amz-Signature=***&x=1"``

Two shapes are redacted, anywhere inside a string (a URI alone, a YAML document, a log line):

* the password of ``scheme://user:password@host`` (the user name is kept: it says which account),
  unencoded ``/`` and ``@`` in it included (the password runs to the last ``@`` before a ``?``,
  ``#``, quote or space: a path with an ``@`` after a password is masked too, never leaked);
* the value of a sensitive query parameter (``?``/``&``/``;`` then a name that
  ``is_secret_name`` accepts, case-insensitively): the keys of S3/GCS/Azure signed URLs, Azure
  connection strings' ``AccountKey``, and every name with secret, password, token, credential,
  signature or an ``_key`` ending in it (``credentials=``, ``sas_key=`` ...).

Redaction is idempotent (``***`` redacts to itself), so text may pass through it more than once.

``install_log_redaction`` (called first by ``dino-ray``, hence by every job in jobs/) applies it
to every ``dino_ray`` log record and to every line the process writes to stdout and stderr:
error lines, tracebacks, and the worker log lines Ray prints through the driver.
"""

from __future__ import annotations

import io
import logging
import re
import sys
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

# parts of a parameter or variable name that make its value a secret, wherever they stand
# (AZURE_CLIENT_SECRET, credentials, x-amz-security-token, AccountKey, WANDB_API_KEY ...)
_SECRET_PARTS = (
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "signature",
    "apikey",
    "api_key",
    "api-key",
    "accesskey",
    "access_key",
    "accountkey",
    "account_key",
    "privatekey",
    "private_key",
    "connection_string",
    "connectionstring",
)
# ...and name endings: STORAGE_KEY, sas-key, DB_PASS, MYSQL_PWD, x-ms-sig (but not "keyword")
_SECRET_ENDINGS = ("_key", "-key", ".key", "_pass", "_pwd", "_sas", "-sig", "_sig")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter or environment variable called ``name`` carries a secret (in
    any provider's spelling: AWS, GCS, Azure, Databricks, Hugging Face, W&B ...)."""
    low = name.strip().lower()
    return (
        low in SENSITIVE_QUERY_KEYS
        or any(part in low for part in _SECRET_PARTS)
        or low.endswith(_SECRET_ENDINGS)
    )


# scheme://user:password@  -- the password runs to the last '@' before a query, fragment, quote
# or space, so unencoded '/' and '@' inside it are still covered
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s'\"]*):[^?#\s'\"]*@")
_QUERY = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&;#\s'\"]*)")


def _mask_query(m: re.Match) -> str:
    return m["head"] + MASK if is_secret_name(m["name"]) else m[0]


def redact(value: Any) -> Any:
    """A string with its secrets masked; any other value is returned unchanged."""
    if not isinstance(value, str) or ("@" not in value and "=" not in value):
        return value
    out = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", value)
    return _QUERY.sub(_mask_query, out)


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


class RedactingStream(io.TextIOBase):
    """A text stream that writes ``redact(text)`` to the stream it wraps, line by line: a write
    without a newline is held until the line ends (or ``flush``), so a URI written in pieces
    (``print`` writes its arguments one by one) is still seen whole."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.wrapped = stream
        self._pending = ""

    def write(self, text: str) -> int:
        data = self._pending + text
        head, sep, self._pending = data.rpartition("\n")
        if sep:
            self.wrapped.write(redact(head + sep))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.wrapped.write(redact(self._pending))
            self._pending = ""
        self.wrapped.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.wrapped.isatty()

    def fileno(self) -> int:
        return self.wrapped.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.wrapped, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.wrapped, "errors", None)

    def __getattr__(self, name: str) -> Any:  # buffer, errors, reconfigure ...
        return getattr(self.wrapped, name)


def install_stream_redaction() -> None:
    """Every line this process writes to ``sys.stdout`` and ``sys.stderr`` is redacted: the
    one-line errors of the CLI and the jobs, uncaught tracebacks (``sys.excepthook`` writes to
    ``sys.stderr``), warnings, and the worker log lines Ray prints through a driver. Checked on
    every call (not once): a test harness may have swapped the streams since."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


def install_log_redaction(prefix: str = "dino_ray") -> RedactingFilter:
    """Redact every record of the ``prefix`` loggers in this process, and every line written to
    stdout and stderr (``install_stream_redaction``); idempotent.

    A filter on the ``dino_ray`` logger would not see records of its children
    (``dino_ray.tracking``: Python applies logger filters only on the logger a record is logged
    on), and handler filters miss handlers added later (each verb calls ``basicConfig`` itself);
    wrapping the record factory covers every record of those loggers, whatever the handlers."""
    global _installed
    install_stream_redaction()
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
