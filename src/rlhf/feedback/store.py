"""The feedback database: users, sessions, items, assignments and labels, through SQLAlchemy Core.

SQLite (a file path) is the default and runs in WAL mode with ``synchronous=FULL``: a label is on disk
before the server answers, so killing the server (or the machine) never loses an acknowledged label.
Every SQLite transaction starts with ``BEGIN IMMEDIATE``, which takes the write lock up front: the
check-then-insert of "give this user the next item" cannot interleave with another request's (the
default deferred BEGIN would let two readers race and then fail to upgrade their locks). Any other
SQLAlchemy URL works too (PostgreSQL: ``postgresql+psycopg://user@host/db``); there the item choice
locks the item row with ``SELECT ... FOR UPDATE SKIP LOCKED`` and counts its annotators again under the
lock (see ``queue._pick_item``).

Nothing lives only in memory: sessions are rows too, so a restarted server keeps everyone logged in.
The schema carries an explicit version in the ``meta`` table; :data:`MIGRATIONS` lists the steps from
each version to the next, and a database written by a newer version is refused rather than damaged.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

SCHEMA_VERSION = 1
READ_ONLY = "rlhf_read_only"  # execution option of the connections Store.read hands out

metadata = sa.MetaData()

meta = sa.Table("meta", metadata, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False))

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),  # annotator | admin
    sa.Column("password_hash", sa.Text),  # scrypt$..., or null for token-only accounts
    sa.Column("token_hash", sa.String(64)),  # sha256 of an unused one-time login token
    sa.Column("token_expires", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # sha256 of the cookie: a leaked database holds no live cookie
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

items = sa.Table(
    "items", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(64), nullable=False, unique=True),  # content hash: loading the same file twice adds nothing
    sa.Column("kind", sa.String(8), nullable=False),  # pair | rank | demo
    sa.Column("prompt", sa.Text, nullable=False),  # JSON list of messages
    sa.Column("prompt_key", sa.String(64), nullable=False, index=True),
    sa.Column("candidates", sa.Text, nullable=False),  # JSON list of response texts, in canonical order
    sa.Column("target", sa.Integer, nullable=False),  # annotators wanted
    sa.Column("gold", sa.Integer),  # index of the known better candidate (gold items only)
    sa.Column("created_at", sa.Float, nullable=False),
)

assignments = sa.Table(
    "assignments", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("shown_order", sa.Text, nullable=False),  # JSON: candidate index at each shown position
    sa.Column("served_at", sa.Float, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("item_id", "user_id"),
)

labels = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignments.id"), nullable=False, unique=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("shown_order", sa.Text, nullable=False),
    sa.Column("choice", sa.String(16)),  # pair: left | right | tie | both_bad (as shown)
    sa.Column("better", sa.Integer),  # pair: candidate index of the better response (null for tie / both_bad)
    sa.Column("strength", sa.String(8)),  # pair: slightly | much
    sa.Column("flags", sa.Text, nullable=False, default="{}"),  # JSON: candidate index -> [harmful, untruthful, off_topic]
    sa.Column("ranking", sa.Text),  # rank: JSON list of candidate indices, best first
    sa.Column("text", sa.Text),  # demo: the demonstration
    sa.Column("time_ms", sa.Integer, nullable=False),  # from serving the item to the label, measured by the server
    sa.Column("created_at", sa.Float, nullable=False),
)

# version -> function upgrading a database at that version to version + 1. Version 1 is the first
# schema, so there is nothing to upgrade yet; a change to the tables adds a step here and bumps SCHEMA_VERSION.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


class StoreError(RuntimeError):
    """The database cannot be used as it is (newer schema, unreachable, ...)."""


def database_url(db: str) -> str:
    """A SQLAlchemy URL for ``db``: a URL as it is, anything else is a SQLite file path."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"


def _sqlite_engine(url: str) -> Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=16, max_overflow=16)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # the driver's own BEGIN handling is off; we issue BEGIN IMMEDIATE below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and commits are appends
        cur.execute("PRAGMA synchronous=FULL")  # fsync each commit: an acknowledged label survives power loss
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Readers (Store.read) need no lock up front: in WAL mode they see a snapshot and never block the writer.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


def _now() -> float:
    return time.time()


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (item and prompt identity)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class ItemSpec:
    """An item to load: what the annotator sees and how many annotators it needs."""

    kind: str
    prompt: list[dict]
    candidates: list[str]
    target: int = 1
    gold: int | None = None


class Store:
    """One database: open (creating or upgrading the schema), then read and write through short transactions."""

    def __init__(self, db: str):
        self.url = database_url(db)
        try:
            self.engine = _sqlite_engine(self.url) if self.url.startswith("sqlite") else sa.create_engine(self.url, pool_pre_ping=True)
            self._migrate()
        except sa.exc.OperationalError as e:
            raise StoreError(f"cannot open the database {db}: {e.orig}") from None
        self.is_sqlite = self.engine.dialect.name == "sqlite"

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction: a consistent snapshot that takes no write lock."""
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin():
            yield conn

    def _migrate(self) -> None:
        with self.tx() as conn:
            if not sa.inspect(conn).has_table("meta"):
                metadata.create_all(conn)
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.url}: schema version {version} was written by a newer rlhf (this one reads up "
                                 f"to {SCHEMA_VERSION}); upgrade rlhf instead of downgrading the database")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(version)))

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------------
    # Items

    def known_prompts(self) -> set[str]:
        """prompt_key of every prompt that already has items: those prompts need no new candidates."""
        with self.read() as conn:
            return set(conn.execute(sa.select(items.c.prompt_key).distinct()).scalars())

    def add_items(self, specs: Iterable[ItemSpec]) -> int:
        """Insert items, skipping those already present (same kind, prompt and candidates). Returns how many were new."""
        added = 0
        with self.tx() as conn:
            existing = set(conn.execute(sa.select(items.c.key)).scalars())
            for spec in specs:
                key = content_key(spec.kind, spec.prompt, spec.candidates, spec.gold)
                if key in existing:
                    continue
                existing.add(key)
                conn.execute(items.insert().values(
                    key=key, kind=spec.kind, prompt=json.dumps(spec.prompt, ensure_ascii=False),
                    prompt_key=content_key(spec.prompt), candidates=json.dumps(spec.candidates, ensure_ascii=False),
                    target=spec.target, gold=spec.gold, created_at=_now()))
                added += 1
        return added

    # ------------------------------------------------------------------------------------------------
    # Reading everything back (export and statistics)

    def label_rows(self, kinds: Sequence[str] = ("pair", "rank", "demo")) -> list[dict]:
        """Every label joined with its item and annotator name, oldest first, JSON columns decoded."""
        query = (sa.select(labels, items.c.prompt, items.c.candidates, items.c.gold, users.c.name.label("annotator"))
                 .join(items, labels.c.item_id == items.c.id).join(users, labels.c.user_id == users.c.id)
                 .where(labels.c.kind.in_(list(kinds))).order_by(labels.c.id))
        with self.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            for col in ("prompt", "candidates", "shown_order", "flags", "ranking"):
                if row[col] is not None:
                    row[col] = json.loads(row[col])
            row["flags"] = {int(k): v for k, v in row["flags"].items()}
        return rows

    def item_counts(self) -> dict[str, dict[str, int]]:
        """Per kind: items, labels wanted (sum of targets), labels given; gold items apart."""
        with self.read() as conn:
            item_rows = conn.execute(sa.select(items.c.kind, items.c.gold.is_not(None), sa.func.count(), sa.func.sum(items.c.target))
                                     .group_by(items.c.kind, items.c.gold.is_not(None))).all()
            label_rows = conn.execute(sa.select(items.c.kind, items.c.gold.is_not(None), sa.func.count())
                                      .join(labels, labels.c.item_id == items.c.id)
                                      .group_by(items.c.kind, items.c.gold.is_not(None))).all()
        out: dict[str, dict[str, int]] = {}
        for kind, is_gold, n, wanted in item_rows:
            entry = out.setdefault("gold" if is_gold else kind, {"items": 0, "wanted": 0, "labels": 0})
            entry["items"] += n
            entry["wanted"] += 0 if is_gold else int(wanted or 0)
        for kind, is_gold, n in label_rows:
            out.setdefault("gold" if is_gold else kind, {"items": 0, "wanted": 0, "labels": 0})["labels"] += n
        return out
