"""API keys: the caller's identity. A key is shown once as ``fspo-<key id>-<secret>``; only
sha256(secret) is stored, so the database alone cannot act as anyone."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from fspo.serve.store.database import Database
from fspo.serve.store.errors import InvalidRecord
from fspo.serve.store.events import log_event
from fspo.serve.store.records import SCOPES, KeyInfo, Principal, Scope, require_text, storable
from fspo.serve.store.tables import KeyRow, utc_now
from fspo.serve.store.users import ensure_user_row

KEY_PREFIX = "fspo"
_KEY_RE = re.compile(r"fspo-([0-9a-f]{16})-([A-Za-z0-9_-]{20,128})")


def _hash(secret: str) -> str:
    # A plain sha256 is enough (no salt, no slow KDF): secrets come from `secrets` with 256 bits of
    # entropy, so there is no dictionary to attack, and every request must check a key fast.
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row: KeyRow) -> KeyInfo:
    return KeyInfo.model_validate(row)


def new_key(s: Session, user_id: str, scope: Scope, name: str) -> tuple[KeyInfo, str]:
    """A new key of existing user `user_id`, written in session `s`: its info and the plaintext (never
    stored)."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = KeyRow(id=key_id, user_id=user_id, secret_sha256=_hash(secret), scope=scope, name=name)
    s.add(row)
    s.flush()
    log_event(s, "key.create", user_id, key_id=key_id, scope=scope, name=name)
    return _key(row), f"{KEY_PREFIX}-{key_id}-{secret}"


class Keys(Database):
    def create_key(self, user_id: str, scope: Scope = "user", name: str = "") -> tuple[KeyInfo, str]:
        """A new key for `user_id` (created if missing): its info and the plaintext, which is never stored."""
        if scope not in SCOPES:
            raise InvalidRecord(f"scope: must be one of {', '.join(SCOPES)}, not {scope!r}", field="scope")
        require_text("user_id", user_id)
        try:
            storable(name)
        except ValueError as e:
            raise InvalidRecord(f"name: {e}", field="name") from None

        def write(s: Session) -> tuple[KeyInfo, str]:
            ensure_user_row(s, user_id, None, None)
            return new_key(s, user_id, scope, name)

        return self._write_creating_user(write)

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for anything else: malformed, unknown, wrong secret, revoked."""
        if not isinstance(key, str):
            return None
        m = _KEY_RE.fullmatch(key.strip())
        if m is None:
            return None
        key_id, secret = m.groups()
        with self._session() as s:
            row = s.get(KeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(_hash(secret), row.secret_sha256):
                return None
            return Principal(user_id=row.user_id, scope=row.scope, key_id=row.id)  # type: ignore[arg-type]

    def keys(self, user_id: str | None = None) -> list[KeyInfo]:
        q = select(KeyRow).order_by(KeyRow.created_at, KeyRow.id)
        if user_id is not None:
            q = q.where(KeyRow.user_id == user_id)
        with self._session() as s:
            return [_key(r) for r in s.scalars(q)]

    def revoke_key(self, key_id: str) -> bool:
        """True when the key existed and was live; it fails `authenticate` from now on."""
        with self._session(write=True) as s:
            row = s.get(KeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utc_now()
            log_event(s, "key.revoke", row.user_id, key_id=key_id)
            return True
