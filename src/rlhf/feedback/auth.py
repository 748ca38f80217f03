"""Accounts, logins and sessions for the feedback app.

- There are no default credentials: an admin creates every account with `rlhf annotate add-user`.
- Passwords are hashed with scrypt (``hashlib.scrypt``, RFC 7914; n=2^14, r=8, p=1, the interactive-login
  parameters of the scrypt paper, ~50 ms and 16 MiB per check) with a 16-byte random salt per user.
- A one-time token is an alternative to a password: 32 random bytes, stored only as its SHA-256, valid
  for a limited time and consumed by its first use.
- A session is a random cookie value (HttpOnly, SameSite=Strict), stored as its SHA-256 with its own
  CSRF token; the page sends that token in a header on every POST and the server compares it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import sqlalchemy as sa

from rlhf.feedback.store import Store, sessions, users

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
MIN_PASSWORD_CHARS = 10
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROLES = ("annotator", "admin")


class AuthError(ValueError):
    """A login or account operation that must be refused; the message is safe to show."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def digest(secret: str) -> str:
    """SHA-256 of a high-entropy secret (token, cookie): enough to store it, as it cannot be guessed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check of a password against a stored ``scrypt$n$r$p$salt$key`` string."""
    if not stored:
        # Still spend the scrypt time: a missing account must not answer faster than a wrong password.
        hashlib.scrypt(password.encode(), salt=b"0" * 16, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN)
        return False
    scheme, n, r, p, salt, key = stored.split("$")
    if scheme != "scrypt":
        return False
    expected = base64.b64decode(key)
    got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected))
    return hmac.compare_digest(got, expected)


def _user(row) -> User:
    return User(id=row.id, name=row.name, role=row.role)


def add_user(store: Store, name: str, *, role: str = "annotator", password: str | None = None,
             token_hours: float | None = None) -> tuple[User, str | None]:
    """Create (or, for an existing name, reset the credentials of) an account.

    Give a password, or ``token_hours`` to get a one-time login token back (returned once, stored hashed).
    """
    if not NAME_RE.match(name):
        raise AuthError(f"user name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if role not in ROLES:
        raise AuthError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    if password is None and token_hours is None:
        raise AuthError("give a password or ask for a one-time token")
    if password is not None and len(password) < MIN_PASSWORD_CHARS:
        raise AuthError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    token = secrets.token_urlsafe(32) if token_hours is not None else None
    values = {"role": role, "password_hash": hash_password(password) if password is not None else None,
              "token_hash": digest(token) if token else None,
              "token_expires": time.time() + token_hours * 3600 if token_hours is not None else None}
    with store.tx() as conn:
        row = conn.execute(sa.select(users).where(users.c.name == name)).first()
        if row is None:
            uid = conn.execute(users.insert().values(name=name, created_at=time.time(), **values)).inserted_primary_key[0]
        else:
            uid = row.id
            conn.execute(users.update().where(users.c.id == uid).values(**values))
            conn.execute(sessions.delete().where(sessions.c.user_id == uid))  # new credentials end old logins
    return User(uid, name, role), token


def list_users(store: Store) -> list[User]:
    with store.read() as conn:
        return [_user(r) for r in conn.execute(sa.select(users).order_by(users.c.name))]


def authenticate(store: Store, name: str, *, password: str | None = None, token: str | None = None) -> User:
    """The user for a name and password, or a name and unused, unexpired one-time token (which it consumes)."""
    with store.tx() as conn:
        row = conn.execute(sa.select(users).where(users.c.name == name)).first()
        if token is not None:
            ok = (row is not None and row.token_hash is not None and hmac.compare_digest(row.token_hash, digest(token))
                  and (row.token_expires or 0) > time.time())
            if ok:
                conn.execute(users.update().where(users.c.id == row.id).values(token_hash=None, token_expires=None))
        else:
            ok = verify_password(password or "", row.password_hash if row is not None else None)
    if not ok:
        raise AuthError("wrong user name, password or token")
    return _user(row)


def open_session(store: Store, user: User, hours: float) -> tuple[str, str]:
    """A new session for the user: (cookie value, CSRF token)."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    with store.tx() as conn:
        conn.execute(sessions.delete().where(sessions.c.expires_at < now))  # housekeeping on each login
        conn.execute(sessions.insert().values(id_hash=digest(cookie), user_id=user.id, csrf=csrf, created_at=now,
                                              expires_at=now + hours * 3600))
    return cookie, csrf


def find_session(store: Store, cookie: str | None) -> Session | None:
    if not cookie:
        return None
    query = (sa.select(sessions.c.csrf, sessions.c.expires_at, users.c.id, users.c.name, users.c.role)
             .join(users, users.c.id == sessions.c.user_id).where(sessions.c.id_hash == digest(cookie)))
    with store.read() as conn:
        row = conn.execute(query).first()
    if row is None or row.expires_at < time.time():
        return None
    return Session(User(row.id, row.name, row.role), row.csrf)


def close_session(store: Store, cookie: str) -> None:
    with store.tx() as conn:
        conn.execute(sessions.delete().where(sessions.c.id_hash == digest(cookie)))


class RateLimiter:
    """At most ``per_minute`` events per key in any sliding 60-second window (in memory: limits are not data)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            q = self._events.setdefault(key, deque())
            while q and q[0] <= now - 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return False
            q.append(now)
            return True
