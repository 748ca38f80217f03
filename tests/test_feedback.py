"""The feedback app through its HTTP API (FastAPI's TestClient): auth, CSRF, limits, the shown order
undone in the export, rankings as pairs, agreement statistics on a hand-computed table, the CLI, and
labels from the app training a reward model with `rlhf rm`.

Helpers here are shared by test_feedback_browser.py and test_feedback_concurrency.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from rlhf.cli import main
from rlhf.data.io import DataError, load_preferences, load_sft
from rlhf.feedback import auth, queue
from rlhf.feedback.config import AnnotateConfig, LimitsConfig, QueueConfig
from rlhf.feedback.export import MUCH_BETTER, SLIGHTLY_BETTER, export, preference_rows, ranking_pairs
from rlhf.feedback.server import CSRF_HEADER, PUBLIC_PATHS, create_app
from rlhf.feedback.sources import load_items
from rlhf.feedback.stats import admin_stats, gold_accuracy, position_bias
from rlhf.feedback.store import ItemSpec, Store, StoreError, meta

PASSWORD = "correct horse battery"


def user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def pair_specs(n: int, target: int = 1) -> list[ItemSpec]:
    """n pairs whose first candidate is the good one ("yes ..."), so tests know the right answer."""
    return [ItemSpec("pair", user_prompt(f"What is {i} + {i % 5}?"), [f"yes {i} + {i % 5} = {i + i % 5}.",
                                                                      f"no {i} + {i % 5} = {i + i % 5 + 1}."], target=target)
            for i in range(n)]


def make_store(path: Path, specs: list[ItemSpec], users: tuple[str, ...] = ("alice", "bob"), admin: str | None = "root") -> Store:
    store = Store(str(path))
    store.add_items(specs)
    for name in users:
        auth.add_user(store, name, password=PASSWORD)
    if admin:
        auth.add_user(store, admin, password=PASSWORD, role="admin")
    return store


def config(db: Path, *, limits: dict | None = None, **queue_fields) -> AnnotateConfig:
    queue_fields.setdefault("gold_every", 0)
    return AnnotateConfig(db=str(db), queue=QueueConfig(**queue_fields), limits=LimitsConfig(**(limits or {})))


class Annotator:
    """A logged-in HTTP client: TestClient in-process, or httpx against a real server (same methods)."""

    def __init__(self, client, name: str, password: str = PASSWORD):
        self.client, self.name = client, name
        token = client.get("/api/login-csrf").json()["csrf"]
        r = client.post("/api/login", json={"name": name, "password": password}, headers={CSRF_HEADER: token})
        assert r.status_code == 200, r.text
        self.csrf = r.json()["csrf"]

    def post(self, path: str, body: dict | None = None):
        return self.client.post(path, json=body or {}, headers={CSRF_HEADER: self.csrf})

    def next(self) -> dict | None:
        r = self.post("/api/next")
        assert r.status_code == 200, r.text
        return r.json()["assignment"]

    def label(self, assignment: dict, **fields):
        return self.post("/api/labels", {"assignment_id": assignment["assignment_id"], **fields})

    def prefer(self, assignment: dict, text: str, strength: str = "much"):
        """Choose the shown response whose text is ``text``, wherever it was shown."""
        side = "left" if assignment["responses"][0] == text else "right"
        return self.label(assignment, choice=side, strength=strength)


@pytest.fixture()
def app_setup(tmp_path):
    """A store with 6 pairs, users alice and bob, admin root; returns (store, cfg, TestClient factory)."""
    db = tmp_path / "fb.db"
    store = make_store(db, pair_specs(6))
    cfg = config(db)
    app = create_app(cfg, store)
    yield store, cfg, lambda: TestClient(app)
    store.close()


# ----------------------------------------------------------------------------------------------------
# Security
# ----------------------------------------------------------------------------------------------------


def test_every_route_but_the_login_and_page_shell_needs_a_session(app_setup):
    _, _, new_client = app_setup
    client = new_client()
    answered = {}  # route -> status of an unauthenticated request
    for route in client.app.routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                answered[method, route.path] = client.request(method, route.path, json={}, follow_redirects=False)
    open_routes = {path for (_, path), r in answered.items() if r.status_code != 401}
    # A new route is behind auth unless it is added to the allowlist on purpose.
    assert open_routes == PUBLIC_PATHS | {"/static/{name}"}
    closed = [r for (_, path), r in answered.items() if path not in open_routes]
    assert len(closed) >= 5 and all(r.json()["error"] == "sign in first" for r in closed)
    assert answered["GET", "/admin"].status_code == 303  # the admin shell sends strangers to sign in
    assert answered["POST", "/api/login"].status_code == 403  # login itself needs the login CSRF token
    assert client.get("/static/../store.py").status_code == 404  # only the packaged page files are served
    r = client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"] and "unsafe-inline" not in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_logins_passwords_and_one_time_tokens(app_setup, tmp_path):
    store, cfg, new_client = app_setup
    assert not auth.list_users(Store(str(tmp_path / "empty.db")))  # no default accounts
    client = new_client()
    token = client.get("/api/login-csrf").json()["csrf"]
    r = client.post("/api/login", json={"name": "alice", "password": "wrong password"}, headers={CSRF_HEADER: token})
    assert r.status_code == 401 and "wrong" in r.json()["error"]
    r = client.post("/api/login", json={"name": "alice", "password": PASSWORD})  # login CSRF: no token
    assert r.status_code == 403
    with store.tx() as conn:
        stored = conn.execute(sa.text("select password_hash from users where name='alice'")).scalar_one()
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    with pytest.raises(auth.AuthError, match="at least"):
        auth.add_user(store, "carol", password="short")

    _, one_time = auth.add_user(store, "dave", token_hours=1)
    login = new_client()
    csrf = login.get("/api/login-csrf").json()["csrf"]
    assert login.post("/api/login", json={"name": "dave", "token": one_time}, headers={CSRF_HEADER: csrf}).status_code == 200
    assert login.get("/api/me").json()["name"] == "dave"
    again = new_client()
    csrf = again.get("/api/login-csrf").json()["csrf"]
    assert again.post("/api/login", json={"name": "dave", "token": one_time}, headers={CSRF_HEADER: csrf}).status_code == 401
    _, expired = auth.add_user(store, "erin", token_hours=-1)
    assert again.post("/api/login", json={"name": "erin", "token": expired}, headers={CSRF_HEADER: csrf}).status_code == 401


def test_csrf_less_and_cross_origin_posts_are_refused(app_setup):
    _, _, new_client = app_setup
    alice = Annotator(new_client(), "alice")
    client = alice.client
    assert client.post("/api/next", json={}).status_code == 403
    assert client.post("/api/next", json={}, headers={CSRF_HEADER: "forged"}).status_code == 403
    r = client.post("/api/next", json={}, headers={CSRF_HEADER: alice.csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    assert alice.next() is not None  # the same request with the token goes through


def test_cross_user_requests_are_refused(app_setup):
    store, _, new_client = app_setup
    alice, bob = Annotator(new_client(), "alice"), Annotator(new_client(), "bob")
    item = alice.next()
    r = bob.label(item, choice="left", strength="much")
    assert r.status_code == 403 and "another annotator" in r.json()["error"]
    assert queue.counts(store).labels == 0
    assert bob.client.get("/api/admin/stats").status_code == 403
    assert bob.client.get("/admin").status_code == 403
    root = Annotator(new_client(), "root")
    assert root.client.get("/api/admin/stats").status_code == 200 and root.client.get("/admin").status_code == 200


def test_oversized_input_is_refused_with_a_clear_message(tmp_path):
    db = tmp_path / "fb.db"
    store = make_store(db, [ItemSpec("demo", user_prompt("Greet Alice."), ["hi"])])
    cfg = config(db, tasks=["demo"], limits={"max_text_chars": 100, "max_body_bytes": 1500})
    alice = Annotator(TestClient(create_app(cfg, store)), "alice")
    item = alice.next()
    r = alice.label(item, text="x" * 101)
    assert r.status_code == 413
    assert r.json()["error"] == "text: the demonstration is 101 characters long; the limit is 100"
    r = alice.label(item, text="y" * 2000)
    assert r.status_code == 413 and "the limit is 1500 bytes" in r.json()["error"]
    assert alice.label(item, text="   ").status_code == 422
    assert alice.label(item, text="Hello, Alice!").status_code == 200
    assert queue.counts(store).labels == 1


def test_per_user_rate_limit(tmp_path):
    db = tmp_path / "fb.db"
    store = make_store(db, pair_specs(3))
    app = create_app(config(db, limits={"requests_per_minute": 5}), store)
    alice, bob = Annotator(TestClient(app), "alice"), Annotator(TestClient(app), "bob")
    codes = [alice.post("/api/next").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    assert bob.post("/api/next").status_code == 200  # per user: bob is not slowed down by alice


def test_labels_are_idempotent_and_cannot_be_changed(app_setup):
    store, _, new_client = app_setup
    alice = Annotator(new_client(), "alice")
    item = alice.next()
    first = alice.label(item, choice="left", strength="slightly").json()
    again = alice.label(item, choice="left", strength="slightly").json()
    assert again == {**first, "duplicate": True}
    r = alice.label(item, choice="right", strength="much")
    assert r.status_code == 409
    assert queue.counts(store).labels == 1
    assert alice.label(item, choice="sideways").status_code in (409, 422)


def test_schema_version_is_explicit_and_a_newer_one_is_refused(tmp_path):
    store = Store(str(tmp_path / "v.db"))
    assert store.schema_version() == 1
    with store.tx() as conn:
        conn.execute(meta.update().values(value="99"))
    store.close()
    with pytest.raises(StoreError, match="newer rlhf"):
        Store(str(tmp_path / "v.db"))
    with sa.create_engine(f"sqlite:///{tmp_path / 'v.db'}").connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"  # WAL is a property of the file


# ----------------------------------------------------------------------------------------------------
# Export: shown order undone, rankings as pairs, ties, gold
# ----------------------------------------------------------------------------------------------------


def test_randomised_order_is_undone_in_the_export(tmp_path):
    db = tmp_path / "fb.db"
    store = make_store(db, pair_specs(40))
    alice = Annotator(TestClient(create_app(config(db), store)), "alice")
    shown_left, expected = [], []
    for i in range(40):
        item = alice.next()
        side = ("left", "right", "tie", "both_bad")[i % 4]
        assert alice.label(item, choice=side, strength="much" if i % 8 == 0 else "slightly").status_code == 200
        shown_left.append(item["responses"][0].startswith("yes"))
        if side in ("left", "right"):
            expected.append((item["responses"][0 if side == "left" else 1], "much" if i % 8 == 0 else "slightly", side))
    assert 5 < sum(shown_left) < 35  # the server shuffles: the good answer was on the left about half the time
    rows = preference_rows(store)
    assert len(rows) == 20  # ties and both-bad are left out by default
    for row, (chosen, strength, side) in zip(rows, expected):
        assert row["chosen"] == chosen and row["chosen_shown"] == side
        assert row["rejected"] != chosen and row["margin"] == (MUCH_BETTER if strength == "much" else SLIGHTLY_BETTER)
        assert row["annotator"] == "alice" and row["prompt"].startswith("What is")
    kept = preference_rows(store, keep_ties=True)
    assert len(kept) == 40 and sorted({r["outcome"] for r in kept if "outcome" in r}) == ["both_bad", "tie"]
    assert all(r["margin"] == 0.0 for r in kept if "outcome" in r)


def test_rankings_expand_to_the_right_pairs(tmp_path):
    assert ranking_pairs([2, 0, 1]) == [(2, 0, SLIGHTLY_BETTER), (2, 1, MUCH_BETTER), (0, 1, SLIGHTLY_BETTER)]
    assert len(ranking_pairs(list(range(5)))) == 10
    db = tmp_path / "fb.db"
    store = make_store(db, [ItemSpec("rank", user_prompt("Name a fruit."), ["apple", "car", "pear", "rock"])])
    alice = Annotator(TestClient(create_app(config(db, tasks=["rank"]), store)), "alice")
    item = alice.next()
    best_first = ["pear", "apple", "car", "rock"]
    ranking = [item["responses"].index(text) for text in best_first]  # shown positions, best first
    assert alice.label(item, ranking=ranking[:3]).status_code == 422  # every response must be ranked
    assert alice.label(item, ranking=ranking, flags={str(ranking[3]): ["off_topic"]}).status_code == 200
    rows = preference_rows(store)
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in rows] == [
        ("pear", "apple", 0.5), ("pear", "car", 1.0), ("pear", "rock", 1.0),
        ("apple", "car", 0.5), ("apple", "rock", 1.0), ("car", "rock", 0.5)]
    assert all(r["flags_rejected"] == ["off_topic"] for r in rows if r["rejected"] == "rock")
    assert len({r["pair_id"] for r in rows}) == 6


def test_export_margins_match_rlhf_collect():
    from rlhf.stages import collect

    assert (MUCH_BETTER, SLIGHTLY_BETTER) == (collect.MUCH_BETTER, collect.SLIGHTLY_BETTER)


def test_export_cli_writes_files_the_loaders_read(tmp_path, capsys):
    db = tmp_path / "fb.db"
    specs = pair_specs(4) + [ItemSpec("demo", user_prompt("Greet Bob."), ["hey bob"]), ItemSpec("demo", user_prompt("Greet Al."), [])]
    store = make_store(db, specs)
    alice = Annotator(TestClient(create_app(config(db, tasks=["pair", "demo"]), store)), "alice")
    while (item := alice.next()) is not None:
        if item["kind"] == "pair":
            alice.prefer(item, next(t for t in item["responses"] if t.startswith("yes")))
        else:
            alice.label(item, text="Hello, Bob!" if item["responses"] else "Hello, Al!")
    out, sft, folder = tmp_path / "prefs.jsonl", tmp_path / "sft.jsonl", tmp_path / "prefs_ds"
    assert main(["annotate", "export", "--db", str(db), "--out", str(out), "--sft", str(sft), "--dataset", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"preferences": 4, "dataset": 4, "demonstrations": 2}
    prefs = load_preferences(out)
    assert len(prefs) == 4 and all(p.chosen.startswith("yes") and p.annotator == "alice" for p in prefs)
    from_folder = load_preferences(folder)
    assert [(p.chosen, p.rejected) for p in from_folder] == [(p.chosen, p.rejected) for p in prefs]
    demos = load_sft(sft)
    assert sorted(d.completion for d in demos) == ["Hello, Al!", "Hello, Bob!"]
    assert {d.extra["edited"] for d in demos} == {True, False}
    # An earlier export is replaced only with --overwrite; a file the export did not write, never.
    before = out.read_text()
    assert main(["annotate", "export", "--db", str(db), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == before
    (tmp_path / "notes.jsonl").write_text('{"note": "mine"}\n')
    assert main(["annotate", "export", "--db", str(db), "--out", str(tmp_path / "notes.jsonl"), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and "mine" in (tmp_path / "notes.jsonl").read_text()
    assert main(["annotate", "export", "--db", str(tmp_path / "none.db"), "--out", str(out), "--overwrite"]) == 2
    assert "no preference labels" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------

# Better candidate (0 or 1) chosen by each annotator on four overlap items. By hand:
#   kappa(a,b): p_o 3/4, p_e (2*1 + 2*3)/16 = 1/2 -> 0.5;  kappa(a,c): p_o 1/2, p_e 1/2 -> 0;
#   kappa(b,c): p_o 3/4, p_e 1/2 -> 0.5.  Majority of the others (ties skipped): a 2/3, b 2/2, c 2/3.
#   Krippendorff: o00 = 3, o11 = 5, o01 = o10 = 2; n0 = 5, n1 = 7, n = 12;
#   D_o = 4/12, D_e = 2*5*7/(12*11) = 70/132; alpha = 1 - (1/3)/(70/132) = 13/35.
TABLE = {"a": [0, 1, 0, 1], "b": [0, 1, 1, 1], "c": [0, 0, 1, 1]}
GOLD_RIGHT = {"a": True, "b": False, "c": True}


def test_agreement_statistics_on_a_hand_computed_table(tmp_path):
    db = tmp_path / "fb.db"
    specs = pair_specs(4, target=3) + [ItemSpec("pair", user_prompt("Capital of France?"), ["Paris.", "Lyon."], target=0, gold=0)]
    store = make_store(db, specs, users=tuple(TABLE))
    app = create_app(config(db, gold_every=5), store)
    for name, choices in TABLE.items():
        annotator = Annotator(TestClient(app), name)
        for better in choices:
            item = annotator.next()
            prompt_no = int(item["prompt"][0]["content"].split()[2])  # "What is i + ..." -> i, the item's order
            candidates = pair_specs(4)[prompt_no].candidates
            assert annotator.prefer(item, candidates[better]).status_code == 200
        gold = annotator.next()  # the fifth item is the gold one
        assert gold["prompt"][0]["content"] == "Capital of France?"
        annotator.prefer(gold, "Paris." if GOLD_RIGHT[name] else "Lyon.")
        assert annotator.next() is None
    stats = admin_stats(store)
    assert stats["kappa"]["a|b"]["kappa"] == pytest.approx(0.5) and stats["kappa"]["a|c"]["kappa"] == pytest.approx(0.0)
    assert stats["kappa"]["b|c"]["kappa"] == pytest.approx(0.5)
    assert stats["alpha"] == pytest.approx(13 / 35)
    majority = {n: a["agreement_with_majority"] for n, a in stats["annotators"].items()}
    assert majority == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 2 / 3})
    assert {n: a["gold_accuracy"] for n, a in stats["annotators"].items()} == {"a": 1.0, "b": 0.0, "c": 1.0}
    assert stats["annotators"]["a"]["mean_kappa"] == pytest.approx(0.25)
    assert stats["progress"]["pair"] == {"items": 4, "wanted": 12, "labels": 12}
    assert stats["progress"]["gold"]["labels"] == 3
    assert len(preference_rows(store)) == 12 and len(preference_rows(store, include_gold=True)) == 15


def test_position_bias_and_gold_accuracy_by_hand():
    def lab(who, choice, gold=None, better=None):
        return {"kind": "pair", "annotator": who, "choice": choice, "gold": gold, "better": better}

    labels = [lab("a", "left"), lab("a", "left"), lab("a", "right"), lab("b", "left"), lab("b", "tie"),
              lab("a", "left", gold=0, better=0), lab("a", "right", gold=0, better=1)]
    bias = position_bias(labels)
    assert bias["left_share"] == pytest.approx(4 / 6) and bias["n"] == 6  # ties decide nothing
    assert bias["per_annotator"] == pytest.approx({"a": 3 / 5, "b": 1.0})
    assert gold_accuracy(labels) == {"a": {"accuracy": 0.5, "n": 2}}


# ----------------------------------------------------------------------------------------------------
# Sources and the command line
# ----------------------------------------------------------------------------------------------------


def test_items_from_a_responses_file_load_once_and_bad_rows_name_the_line(tmp_path):
    rows = [{"prompt": "Name a fruit.", "responses": ["apple", "pear", "plum"]},
            {"prompt": [{"role": "user", "content": "Name a colour."}], "responses": ["red", "red", "blue"]}]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AnnotateConfig(db=str(tmp_path / "fb.db"), responses=str(path),
                         queue=QueueConfig(tasks=["pair", "rank", "demo"], k=3, overlap=0.0))
    store = Store(cfg.db)
    assert load_items(cfg, store) == {"items_added": 5, "gold_added": 0, "skipped": 1}  # "red, red, blue": no ranking
    assert load_items(cfg, store)["items_added"] == 0  # the same file again adds nothing
    path.write_text(path.read_text() + json.dumps({"prompt": "x", "responses": "not a list"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: field 'responses'"):
        load_items(cfg, store)


def test_live_candidates_from_a_policy_with_a_constitution(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(3)))
    constitution = Path(__file__).parents[1] / "src/rlhf/safety/constitutions/hhh.yaml"
    if not constitution.is_file():
        pytest.skip("the safety module's constitution is not there yet")
    cfg = AnnotateConfig(db=str(tmp_path / "fb.db"), prompts=str(prompts), policy=str(tiny_llama), constitution=str(constitution),
                         queue=QueueConfig(tasks=["demo"], k=2))
    cfg.generation.max_new_tokens = 6
    store = Store(cfg.db)
    assert load_items(cfg, store)["items_added"] == 3
    with store.tx() as conn:
        drafts = [json.loads(c) for c in conn.execute(sa.text("select candidates from items")).scalars()]
    assert all(len(d) <= 1 for d in drafts)
    assert load_items(cfg, store)["items_added"] == 0  # known prompts are not generated again


def test_add_user_cli_password_and_token(tmp_path, capsys, monkeypatch):
    db = tmp_path / "fb.db"
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["annotate", "add-user", "--db", str(db), "alice", "--password_stdin"]) == 0
    assert main(["annotate", "add-user", "--db", str(db), "root", "--admin", "--token"]) == 0
    out = capsys.readouterr().out
    token = out.split("#name=root&token=")[1].split()[0]
    store = Store(str(db))
    assert auth.authenticate(store, "root", token=token).is_admin
    assert auth.authenticate(store, "alice", password=PASSWORD).role == "annotator"
    assert main(["annotate", "users", "--db", str(db)]) == 0
    assert capsys.readouterr().out.split() == ["alice", "annotator", "root", "admin"]
    assert main(["annotate", "add-user", "--db", str(db), "bad name!", "--token"]) == 2


def test_serve_config_rejects_contradictions(tmp_path, capsys):
    assert main(["annotate", "--db", str(tmp_path / "x.db"), "--prompts", "p.jsonl"]) == 2
    assert "--prompts and --policy go together" in capsys.readouterr().err
    assert main(["annotate", "serve", "--responses", "r.jsonl", "--policy", "m"]) == 2


# ----------------------------------------------------------------------------------------------------
# The loop closes: labels from the app train a reward model
# ----------------------------------------------------------------------------------------------------


def test_exported_labels_train_a_reward_model(tiny_llama, tmp_path, capsys):
    db = tmp_path / "fb.db"
    store = make_store(db, pair_specs(24, target=2))
    app = create_app(config(db, overlap=1.0, overlap_annotators=2), store)
    for name in ("alice", "bob"):
        annotator = Annotator(TestClient(app), name)
        while (item := annotator.next()) is not None:
            good = next(t for t in item["responses"] if t.startswith("yes"))
            assert annotator.prefer(item, good, strength="much" if name == "alice" else "slightly").status_code == 200
    folder = tmp_path / "prefs_ds"
    assert export(store, dataset=str(folder), out=str(tmp_path / "prefs.jsonl")) == {"preferences": 48, "dataset": 48}
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(tiny_llama), "--data.path", str(folder), "--out", str(out), "--data.val_fraction", "0.25",
                 "--train.max_steps", "3", "--train.batch_size", "8", "--data.max_length", "64", "--loss.use_data_margin",
                 "--loss.margin_weight", "0.1"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "stage.json").read_text())
    assert summary["pairs"] + summary["val_pairs"] == 48
    assert (out / "config.json").is_file()


def test_a_rounds_agreement_gate_pools_kappa_and_refuses_below_the_bar(tmp_path):
    from rlhf.configlib import ConfigError
    from rlhf.stages.human import check_agreement, pooled_kappa

    report = {"kappa": {"a|b": {"kappa": 0.8, "n": 30}, "a|c": {"kappa": 0.2, "n": 10}, "b|c": {"kappa": None, "n": 0}},
              "flagged": ["c"]}
    assert pooled_kappa(report) == (pytest.approx(0.65), 40)  # (0.8 x 30 + 0.2 x 10) / 40
    assert check_agreement(report, tmp_path / "a.db", 0.6, ignore=False) == pytest.approx(0.65)
    with pytest.raises(ConfigError, match=r"kappa 0.65 over 40 shared labels, below --min_kappa 0.7.*\['c'\]"):
        check_agreement(report, tmp_path / "a.db", 0.7, ignore=False)
    assert check_agreement(report, tmp_path / "a.db", 0.7, ignore=True) == pytest.approx(0.65)
    assert pooled_kappa({"kappa": {}, "flagged": []}) == (None, 0)
