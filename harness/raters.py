"""Human raters and their personal voting links.

A person rates in the arena app through a personal link ``http://HOST:PORT/rate?token=TOKEN``
that ``harness raters add NAME`` prints once. The token is the only credential: whoever holds
the link votes as that rater, and without a valid token the app shows no voting buttons.

Design:

* **Tokens** are ``secrets.token_urlsafe(24)``: 192 random bits, unguessable, URL-safe.
* **Only a salted hash is stored** (``raters.token_hash``), never the token, so that a copy of
  the DuckDB file (it is shared, mailed, archived with results) does not let anyone vote. The
  hash is ``sha256$SALT$HEX`` with ``HEX = sha256(SALT || token)`` and a random 16-byte salt per
  rater. A slow password hash (scrypt, bcrypt) is what protects *low-entropy* secrets against
  guessing; a 192-bit random token cannot be guessed, so one SHA-256 is enough (the same choice
  as GitHub's and PyPI's API tokens) and verification stays microseconds.
* **Lookup** checks the presented token against every human rater's hash in constant time per
  hash (:func:`hmac.compare_digest`). Rater counts are small (people), so a scan is fine and
  keeps the stored value free of any token-derived index.
* **Rotation**: ``raters add NAME --new-token`` replaces the hash; the old link stops working.

Raters other than humans (MLLM judges, the domain judge) never have a token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from harness.store import RaterError, Store

TOKEN_BYTES = 24
SALT_BYTES = 16
_SCHEME = "sha256"
_ID_OK = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Rater:
    """A human rater who presented a valid token."""

    rater_id: str
    name: str | None


def new_token() -> str:
    """A fresh random voting token (URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str, salt: bytes | None = None) -> str:
    """The storable salted hash of ``token``: ``sha256$SALT_HEX$DIGEST_HEX``."""
    if not isinstance(token, str) or not token:
        raise ValueError("a voting token must be a non-empty string")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.sha256(salt + token.encode()).hexdigest()
    return f"{_SCHEME}${salt.hex()}${digest}"


def verify_token(token: str, stored: str | None) -> bool:
    """Whether ``token`` matches a stored :func:`hash_token` value (constant time)."""
    if not token or not stored:
        return False
    try:
        scheme, salt_hex, digest = stored.split("$")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    if scheme != _SCHEME:
        return False
    mine = hashlib.sha256(salt + token.encode()).hexdigest()
    return hmac.compare_digest(mine, digest)


def rater_id_for(name: str) -> str:
    """The rater id for a person's name: lower case, spaces to dashes ("Ana Lima" -> "ana-lima").
    Raises :class:`RaterError` naming what is wrong when nothing usable remains."""
    rid = re.sub(r"\s+", "-", name.strip().lower())
    if not _ID_OK.match(rid):
        raise RaterError(
            f"rater name {name!r} gives the id {rid!r}, which is not usable: use letters, digits, "
            "spaces, '.', '_' or '-' (at most 64 characters, starting with a letter or digit)"
        )
    return rid


def add_rater(store: Store, name: str, *, rotate: bool = False) -> tuple[str, str]:
    """Register the human rater ``name`` (or give an existing one a new token) and return
    ``(rater_id, token)``. The token is returned once and stored only as a salted hash.

    An existing human rater who already has a token is refused unless ``rotate`` (rotation:
    the old link stops working); an id taken by a judge or the domain judge is refused.
    """
    rid = rater_id_for(name)
    token = new_token()
    store.add_rater_token(rid, hash_token(token), name=name.strip(), rotate=rotate)
    return rid, token


def authenticate(store: Store, token: str | None) -> Rater | None:
    """The human rater whose token this is, or None (no token, unknown or revoked token)."""
    if not token or not isinstance(token, str) or len(token) > 256:
        return None
    rows = store.query(
        "SELECT rater_id, name, token_hash FROM raters "
        "WHERE kind = 'human' AND token_hash IS NOT NULL ORDER BY rater_id"
    )
    # Check every row (no early exit) so the time taken does not say which rater matched.
    found: dict[str, Any] | None = None
    for row in rows:
        if verify_token(token, row["token_hash"]) and found is None:
            found = row
    return None if found is None else Rater(found["rater_id"], found["name"])


def rating_link(token: str, host: str = "localhost", port: int = 8501) -> str:
    """The personal link that opens the app's rating page as the token's rater."""
    return f"http://{host}:{port}/rate?token={token}"
