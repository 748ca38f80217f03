"""20 annotators x 50 labels at the same time through HTTP against a real `rlhf annotate` process, which is
killed with SIGKILL part-way and started again: exactly 1,000 labels at the end, none duplicated, and
every label acknowledged before the kill is in the database.

Clients behave as the page should: a POST that got no answer is sent again unchanged (labels are
idempotent per assignment), and asking for the next item returns the unfinished one first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from rlhf.feedback import auth
from rlhf.feedback.store import Store, assignments, labels, metadata
from test_feedback import PASSWORD, pair_specs

ANNOTATORS, LABELS_EACH, KILL_AFTER = 20, 50, 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhf.cli", "annotate", "--db", str(db), "--port", str(port),
           "--limits.requests_per_minute", "100000", "--limits.logins_per_minute", "1000", "--queue.gold_every", "0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/login-csrf", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def until_answered(send):
    """Send (again and again, unchanged) until the server answers: it may be down for a restart."""
    while True:
        try:
            return send()
        except httpx.TransportError:
            time.sleep(0.05)


class Worker(threading.Thread):
    def __init__(self, name: str, url: str, acked: list, lock: threading.Lock):
        super().__init__(daemon=True)
        self.name_, self.url, self.acked, self.lock = name, url, acked, lock
        self.problems: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            token = until_answered(lambda: client.get("/api/login-csrf")).json()["csrf"]
            r = until_answered(lambda: client.post("/api/login", json={"name": self.name_, "password": PASSWORD},
                                                   headers={"X-CSRF-Token": token}))
            headers = {"X-CSRF-Token": r.json()["csrf"]}
            done = 0
            while done < LABELS_EACH:
                item = until_answered(lambda: client.post("/api/next", json={}, headers=headers)).json()["assignment"]
                if item is None:
                    self.problems.append("ran out of items")
                    return
                body = {"assignment_id": item["assignment_id"], "choice": "left", "strength": "much"}
                r = until_answered(lambda: client.post("/api/labels", json=body, headers=headers))
                if r.status_code != 200:
                    self.problems.append(r.text)
                    continue
                with self.lock:
                    self.acked.append(r.json()["label_id"])
                done += 1


# PostgreSQL takes another code path (row locks with SKIP LOCKED); point this at an empty database to test it,
# e.g. RLHF_TEST_POSTGRES_URL=postgresql+psycopg://user:password@127.0.0.1/annotate_test (its tables are dropped).
POSTGRES_URL = os.environ.get("RLHF_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "fb.db"
    if not POSTGRES_URL:
        pytest.skip("set RLHF_TEST_POSTGRES_URL to an empty PostgreSQL database to run this against PostgreSQL")
    engine = sa.create_engine(POSTGRES_URL)
    metadata.drop_all(engine)
    engine.dispose()
    return POSTGRES_URL


def test_1000_concurrent_labels_survive_a_kill(db, tmp_path):
    store = Store(str(db))
    store.add_items(pair_specs(ANNOTATORS * LABELS_EACH))
    names = [f"annotator{i:02d}" for i in range(ANNOTATORS)]
    for name in names:
        auth.add_user(store, name, password=PASSWORD)
    store.close()
    port, log = free_port(), open(tmp_path / "server.log", "w")
    url = f"http://127.0.0.1:{port}"
    server = start_server(db, port, log)
    acked, lock = [], threading.Lock()
    workers = [Worker(name, url, acked, lock) for name in names]
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 120
        while len(acked) < KILL_AFTER:
            assert time.monotonic() < deadline and any(w.is_alive() for w in workers), "labelling stalled"
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        with lock:
            acknowledged_before_kill = set(acked)

        # Nothing acknowledged is lost: the database as the killed process left it has every one.
        store = Store(str(db))
        with store.tx() as conn:
            stored = set(conn.execute(sa.select(labels.c.id)).scalars())
        store.close()
        assert KILL_AFTER <= len(acknowledged_before_kill) < ANNOTATORS * LABELS_EACH
        assert acknowledged_before_kill <= stored

        server = start_server(db, port, log)
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
    finally:
        server.kill()
        server.wait()
        log.close()
    assert [p for w in workers for p in w.problems] == []

    store = Store(str(db))
    with store.tx() as conn:
        rows = conn.execute(sa.select(labels.c.id, labels.c.assignment_id, labels.c.item_id, labels.c.user_id)).all()
        open_assignments = conn.execute(sa.select(sa.func.count()).select_from(assignments)
                                        .where(sa.not_(assignments.c.done))).scalar_one()
    assert len(rows) == ANNOTATORS * LABELS_EACH == len(acked) == len(set(acked))
    assert len({r.assignment_id for r in rows}) == len(rows)  # one label per assignment
    assert len({r.item_id for r in rows}) == len(rows)  # every item (wanted once) labelled once
    per_user = {}
    for r in rows:
        per_user[r.user_id] = per_user.get(r.user_id, 0) + 1
    assert sorted(per_user.values()) == [LABELS_EACH] * ANNOTATORS
    assert open_assignments == 0
    assert set(acked) == {r.id for r in rows}
