"""Credentials out of URLs before they are shown, logged or stored.

A judge server URL (``https://user:pass@host/v1``) or an Optuna storage URL
(``postgresql://user:pass@host/db``) may carry a password in its user info. Every message, log
line, repr, report and app page shows such a URL through :func:`redact_url` (one URL) or
:func:`redact_text` (any text that may quote URLs, e.g. an exception message).

Written by hand rather than with ``sqlalchemy.engine.make_url(...).render_as_string(
hide_password=True)``: that parser only knows database URLs (it rejects or mangles http URLs
and free text), and this module must stay importable without sqlalchemy.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"

# scheme://USERINFO@ inside any text: userinfo runs up to the last "@" before the host part
# ends (a password may itself contain "@", ":" or "/" when it was not percent-encoded).
_USERINFO_IN_TEXT = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@'\"<>]*(?:@[^\s/?#@'\"<>]*)*)@"
)


def _hide(userinfo: str) -> str:
    """``user:pass`` -> ``user:***``; a bare ``token`` (no colon) is a secret on its own."""
    user, sep, _password = userinfo.partition(":")
    return f"{user}:{HIDDEN}" if sep else HIDDEN


def redact_url(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***``
    (``postgresql://ana:s3cret@db/optuna`` -> ``postgresql://ana:***@db/optuna``); a user info
    without a colon (``https://TOKEN@host``) is hidden whole. A URL without user info is
    returned unchanged. The user name stays: it tells which account is meant."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """``text`` with the user info of every URL in it redacted as in :func:`redact_url`."""

    def sub(match: re.Match[str]) -> str:
        userinfo = match["userinfo"]
        # postgresql://ana@db names a user, not a secret (libpq reads the password elsewhere);
        # on http(s) and ws(s) a bare user info is a token.
        if ":" not in userinfo and not match["scheme"].lower().startswith(("http", "ws")):
            return match.group(0)
        return f"{match['scheme']}{_hide(userinfo)}@"

    return _USERINFO_IN_TEXT.sub(sub, text)


def strip_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user info, user, password)``; user and password are None when absent.
    For an HTTP client that must not turn the user info into Basic auth."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, parts.username, parts.password


def drop_password(url: str) -> str:
    """``url`` without the password of its user info (``postgresql://ana:s3cret@db/optuna`` ->
    ``postgresql://ana@db/optuna``): the form a URL is stored in. A database driver then reads
    the password from its usual places (``PGPASSWORD``, ``~/.pgpass``, ``MYSQL_PWD``)."""

    def sub(match: re.Match[str]) -> str:
        user, sep, _password = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}@" if sep else match.group(0)

    return _USERINFO_IN_TEXT.sub(sub, url)


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (or, for http, a token) in its user info."""
    return redact_text(url) != url
