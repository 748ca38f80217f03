"""Handing out items and taking labels back: the part of the app that must be right under concurrency.

An *assignment* is one item served to one annotator, with the order in which its responses were shown
(shuffled here, on the server, so that a position bias in people cannot become a bias in the data, and
stored, so that the export can undo it). A label answers exactly one assignment (a unique key), which
makes a submission idempotent: a client that lost the answer to its POST (server killed, network gone)
sends it again and gets the same label back, never a second row.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from rlhf.feedback.auth import User
from rlhf.feedback.config import QueueConfig
from rlhf.feedback.store import Store, assignments, items, labels

FLAGS = ("harmful", "untruthful", "off_topic")
CHOICES = ("left", "right", "tie", "both_bad")
STRENGTHS = ("slightly", "much")
_shuffle = random.SystemRandom().shuffle  # the shown order must not be predictable from anything the annotator sees


class LabelError(ValueError):
    """A submission refused, with the HTTP status to answer and a message for the annotator."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _served(item, assignment) -> dict:
    """What the page needs to show an assignment: responses in the shown order, nothing about gold."""
    candidates, order = json.loads(item.candidates), json.loads(assignment.shown_order)
    return {"assignment_id": assignment.id, "kind": item.kind, "prompt": json.loads(item.prompt),
            "responses": [candidates[i] for i in order]}


def _active(cfg: QueueConfig, item_id):
    """How many annotators an item has: finished assignments, and open ones younger than the TTL (so that
    a closed tab does not block an item for ever)."""
    cutoff = time.time() - cfg.assignment_ttl_minutes * 60
    return (sa.select(sa.func.count()).select_from(assignments)
            .where(assignments.c.item_id == item_id, sa.or_(assignments.c.done, assignments.c.served_at > cutoff))
            .scalar_subquery())


def _pick_item(conn, user: User, cfg: QueueConfig, gold: bool, for_update: bool):
    """The first item this user has not had that still needs annotators (gold: any gold item they have not seen)."""
    mine = sa.select(assignments.c.item_id).where(assignments.c.user_id == user.id)
    query = sa.select(items).where(items.c.id.not_in(mine)).order_by(items.c.id).limit(1)
    if gold:
        query = query.where(items.c.gold.is_not(None))
    else:
        query = query.where(items.c.gold.is_(None), _active(cfg, items.c.id) < items.c.target)
    if not for_update:  # SQLite: one writer at a time, so the count cannot change under us
        return conn.execute(query).first()
    # PostgreSQL: concurrent requests skip an item another one is taking instead of waiting for it. The
    # count in the query is of the statement's snapshot, which may predate an assignment committed just
    # before the lock was taken; holding the lock, count again (a new statement sees every commit) and
    # move on when the item has filled up meanwhile.
    query, full = query.with_for_update(skip_locked=True, of=items), []
    while (item := conn.execute(query.where(items.c.id.not_in(full)) if full else query).first()) is not None:
        if gold or conn.execute(sa.select(_active(cfg, item.id))).scalar_one() < item.target:
            return item
        full.append(item.id)
    return None


def next_assignment(store: Store, user: User, cfg: QueueConfig) -> dict | None:
    """The user's unfinished assignment if any, else a new one (a gold item every ``gold_every``); None when done."""
    with store.tx() as conn:
        pending = conn.execute(sa.select(assignments).where(assignments.c.user_id == user.id, sa.not_(assignments.c.done))
                               .order_by(assignments.c.id).limit(1)).first()
        if pending is not None:
            item = conn.execute(sa.select(items).where(items.c.id == pending.item_id)).one()
            return _served(item, pending)
        done = conn.execute(sa.select(sa.func.count()).select_from(assignments)
                            .where(assignments.c.user_id == user.id)).scalar_one()
        item = None
        if cfg.gold_every and (done + 1) % cfg.gold_every == 0:
            item = _pick_item(conn, user, cfg, gold=True, for_update=not store.is_sqlite)
        if item is None:
            item = _pick_item(conn, user, cfg, gold=False, for_update=not store.is_sqlite)
        if item is None:
            return None
        order = list(range(len(json.loads(item.candidates))))
        _shuffle(order)
        result = conn.execute(assignments.insert().values(item_id=item.id, user_id=user.id, shown_order=json.dumps(order),
                                                          served_at=time.time(), done=False))
        row = conn.execute(sa.select(assignments).where(assignments.c.id == result.inserted_primary_key[0])).one()
        return _served(item, row)


def progress(store: Store, user: User, cfg: QueueConfig) -> dict:
    """The user's labels so far, and how many more non-gold items they could still be given."""
    with store.read() as conn:
        done = conn.execute(sa.select(sa.func.count()).select_from(labels).where(labels.c.user_id == user.id)).scalar_one()
        mine = sa.select(assignments.c.item_id).where(assignments.c.user_id == user.id)
        left = conn.execute(sa.select(sa.func.count()).select_from(items).where(
            items.c.gold.is_(None), items.c.id.not_in(mine), _active(cfg, items.c.id) < items.c.target)).scalar_one()
    return {"done": done, "remaining": left}


# ----------------------------------------------------------------------------------------------------
# Labels


def _position(value: Any, n: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise LabelError(422, f"{what}: must be a shown position from 0 to {n - 1} (got {value!r})")
    return value


def _flags(payload: dict, order: list[int]) -> dict[int, list[str]]:
    """{shown position: [flags]} -> {candidate index: sorted flags}."""
    raw = payload.get("flags") or {}
    if not isinstance(raw, dict):
        raise LabelError(422, "flags: must map a shown position to a list of flags")
    out: dict[int, list[str]] = {}
    for pos, names in raw.items():
        index = order[_position(int(pos) if str(pos).isdigit() else pos, len(order), "flags")]
        if not isinstance(names, list) or any(f not in FLAGS for f in names):
            raise LabelError(422, f"flags: each entry must be a list of {', '.join(FLAGS)} (got {names!r})")
        if names:
            out[index] = sorted(set(names))
    return out


def _pair_fields(payload: dict, order: list[int]) -> dict:
    choice, strength = payload.get("choice"), payload.get("strength")
    if choice not in CHOICES:
        raise LabelError(422, f"choice: must be one of {', '.join(CHOICES)} (got {choice!r})")
    better = {"left": order[0], "right": order[1]}.get(choice)
    if better is not None and strength not in STRENGTHS:
        raise LabelError(422, f"strength: must be one of {', '.join(STRENGTHS)} when one response is better (got {strength!r})")
    return {"choice": choice, "better": better, "strength": strength if better is not None else None}


def _rank_fields(payload: dict, order: list[int]) -> dict:
    ranking = payload.get("ranking")
    if not isinstance(ranking, list) or sorted(_position(p, len(order), "ranking") for p in ranking) != list(range(len(order))):
        raise LabelError(422, f"ranking: must list every shown position 0..{len(order) - 1} once, best first (got {ranking!r})")
    return {"ranking": json.dumps([order[p] for p in ranking])}


def _demo_fields(payload: dict, max_chars: int) -> dict:
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        raise LabelError(422, "text: the demonstration must not be empty")
    if len(text) > max_chars:
        raise LabelError(413, f"text: the demonstration is {len(text)} characters long; the limit is {max_chars}")
    return {"text": text.strip()}


def _fields(kind: str, payload: dict, order: list[int], max_chars: int) -> dict:
    if kind == "pair":
        fields = _pair_fields(payload, order)
    elif kind == "rank":
        fields = _rank_fields(payload, order)
    else:
        fields = _demo_fields(payload, max_chars)
    fields["flags"] = json.dumps({str(k): v for k, v in sorted(_flags(payload, order).items())}) if kind != "demo" else "{}"
    return fields


_COMPARED = ("choice", "better", "strength", "ranking", "text", "flags")


def submit_label(store: Store, user: User, payload: dict, max_chars: int) -> dict:
    """Store the label of one of the user's assignments; a repeat of the same label returns the stored one."""
    aid = payload.get("assignment_id")
    if isinstance(aid, bool) or not isinstance(aid, int):
        raise LabelError(422, f"assignment_id: must be an integer (got {aid!r})")
    with store.tx() as conn:
        assignment = conn.execute(sa.select(assignments).where(assignments.c.id == aid)).first()
        if assignment is None:
            raise LabelError(404, f"assignment {aid} does not exist")
        if assignment.user_id != user.id:
            raise LabelError(403, f"assignment {aid} belongs to another annotator")
        item = conn.execute(sa.select(items.c.kind).where(items.c.id == assignment.item_id)).one()
        order = json.loads(assignment.shown_order)
        fields = _fields(item.kind, payload, order, max_chars)
        existing = conn.execute(sa.select(labels).where(labels.c.assignment_id == aid)).first()
        if existing is not None:
            if any(getattr(existing, k) != fields.get(k) for k in _COMPARED):
                raise LabelError(409, f"assignment {aid} is already labelled differently; labels cannot be changed")
            return {"ok": True, "label_id": existing.id, "duplicate": True}
        now = time.time()
        result = conn.execute(labels.insert().values(
            assignment_id=aid, item_id=assignment.item_id, user_id=user.id, kind=item.kind,
            shown_order=assignment.shown_order, time_ms=int((now - assignment.served_at) * 1000), created_at=now,
            **{k: fields.get(k) for k in _COMPARED}))
        conn.execute(assignments.update().where(assignments.c.id == aid).values(done=True))
        return {"ok": True, "label_id": result.inserted_primary_key[0], "duplicate": False}


@dataclass(frozen=True)
class QueueState:
    """For tests and the admin command line: the number of rows in each table."""

    items: int
    assignments: int
    labels: int


def counts(store: Store) -> QueueState:
    with store.read() as conn:
        n = [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in (items, assignments, labels)]
    return QueueState(*n)
