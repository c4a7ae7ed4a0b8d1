"""Nothing identifying leaves a site in an error.

Flower sends a ClientApp's exception text to the coordinator, and hemex's errors name files
(case ids in paths) while DICOM messages can carry a PatientID or a study date. The `site_errors`
mod wraps every handler: an exception becomes an error reply holding only the error class, a
short code (the handler and the hemex source line that raised it) and a digest (the first 12 hex
of SHA-256 of the full text with a per-run salt kept on the site, so the coordinator cannot test
guesses against it). The full text and traceback go to the site's own log under that digest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sys
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

APP_ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("client", "common", "server")
SALT_KEY = "site-error-salt"  # in the node's context state, which stays on the site
DIGEST_HEX = 12
MARKER = "site error"
SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

log = logging.getLogger("hemex.site")


def _site_log() -> logging.Logger:
    """The site's log: the ClientApp's stderr, which the SuperNode keeps (it never goes to the
    coordinator)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s hemex site %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def run_salt(context: Context) -> str:
    """A random salt per run and site, created on the first error and kept in the context state."""
    if SALT_KEY not in context.state:
        context.state[SALT_KEY] = ConfigRecord({"salt": secrets.token_hex(16)})
    return str(context.state[SALT_KEY]["salt"])


def digest(text: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}\n{text}".encode("utf-8", "replace")).hexdigest()[:DIGEST_HEX]


def raised_at(error: BaseException) -> str:
    """`file.py:line` of the innermost hemex frame that raised `error` (code, not data), or '-'."""
    where = "-"
    for frame in traceback.extract_tb(error.__traceback__):
        try:
            relative = Path(frame.filename).resolve().relative_to(APP_ROOT)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] in APP_PACKAGES:
            where = f"{relative.name}:{frame.lineno}"
    return where


def public_reason(error: BaseException, handler: str, salt: str) -> tuple[str, str]:
    """(the one line that may leave the site, the digest that names the full text in its log)."""
    name = type(error).__name__
    name = name if SAFE_NAME.fullmatch(name) else "Exception"
    code = digest(f"{type(error).__name__}: {error}", salt)
    handler = handler if re.fullmatch(r"[a-z]+(\.[A-Za-z_]\w*)?", handler) else "-"
    return (f"{name}: {MARKER} in {handler} at {raised_at(error)}, digest {code} "
            "(the full text stays in the site's log)"), code


def site_errors(message: Message, context: Context, call_next) -> Message:
    """Flower mod: a handler's exception becomes a sanitized error reply; the site logs the rest."""
    try:
        return call_next(message, context)
    except Exception as error:  # noqa: BLE001 - every handler error is reported, sanitized
        handler = message.metadata.message_type
        reason, code = public_reason(error, handler, run_salt(context))
        full = "".join(traceback.format_exception(error)).rstrip()
        _site_log().error("%s failed [digest %s]:\n%s", handler, code, full)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
