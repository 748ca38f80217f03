"""`rlhf annotate [serve] | export | add-user | users | stats`: the command line of the feedback app.

rlhf.cli registers the `annotate` command and hands its arguments here, so the app's options live
beside the app.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from rlhf.configlib import ConfigError, add_arguments, build_config
from rlhf.feedback.config import AnnotateConfig

SUBCOMMANDS = ("serve", "export", "add-user", "users", "stats")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file with the annotate settings (same keys as the flags)")
    add_arguments(p, AnnotateConfig)


def add_annotate_arguments(p: argparse.ArgumentParser) -> None:
    """`annotate` serves by default; the other actions are subcommands."""
    _serve_flags(p)
    sub = p.add_subparsers(dest="annotate_cmd", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    _serve_flags(sub.add_parser("serve", help="start the web app (the default)"))

    e = sub.add_parser("export", help="write labels as preference JSONL (for `rlhf rm`), SFT JSONL and/or a datasets folder")
    e.add_argument("--db", required=True, help="the database (SQLite path or SQLAlchemy URL)")
    e.add_argument("--out", help="preference pairs (prompt, chosen, rejected, margin, annotator) as JSONL")
    e.add_argument("--sft", help="demonstrations as SFT JSONL (prompt, completion)")
    e.add_argument("--dataset", help="preference pairs as a Hugging Face datasets folder (save_to_disk)")
    e.add_argument("--keep_ties", action="store_true", help="keep tie and both-bad labels as rows with margin 0 and 'outcome'")
    e.add_argument("--include_gold", action="store_true", help="also export the labels of gold (known-answer) items")
    e.add_argument("--overwrite", action="store_true", help="replace earlier exports at these paths (other files are "
                   "never replaced)")

    a = sub.add_parser("add-user", help="create an account, or reset its credentials (there are no default accounts)")
    a.add_argument("--db", required=True, help="the database (SQLite path or SQLAlchemy URL)")
    a.add_argument("name", help="user name: letters, digits, '_', '.', '-'")
    a.add_argument("--admin", action="store_true", help="may open the admin page")
    a.add_argument("--token", action="store_true", help="print a one-time login token instead of asking for a password")
    a.add_argument("--token_hours", type=float, default=24.0, help="how long the one-time token stays valid")
    a.add_argument("--password_stdin", action="store_true", help="read the password from the first line of stdin")
    a.add_argument("--url", default="http://127.0.0.1:8000", help="the app's address, for the login link printed with --token")

    for name, text in (("users", "list the accounts"), ("stats", "print the admin page's statistics as JSON")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--db", required=True, help="the database (SQLite path or SQLAlchemy URL)")


def _password(ns: argparse.Namespace) -> str:
    if ns.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {ns.name}: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ")
    return first


def _add_user(store, ns: argparse.Namespace) -> None:
    from rlhf.feedback.auth import add_user

    role = "admin" if ns.admin else "annotator"
    if ns.token:
        user, token = add_user(store, ns.name, role=role, token_hours=ns.token_hours)
        print(f"{role} {user.name}: one-time login token, valid {ns.token_hours:g} h and for one login:\n  {token}\n"
              f"or open {ns.url.rstrip('/')}/#name={user.name}&token={token}")
    else:
        user, _ = add_user(store, ns.name, role=role, password=_password(ns))
        print(f"{role} {user.name}: password set")


def run_annotate(ns: argparse.Namespace) -> None:
    from rlhf.feedback.auth import AuthError, list_users
    from rlhf.feedback.store import Store, StoreError

    cmd = ns.annotate_cmd or "serve"
    try:
        if cmd == "serve":
            from rlhf.feedback.server import serve

            serve(build_config(AnnotateConfig, ns))
            return
        store = Store(ns.db)
        if cmd == "add-user":
            _add_user(store, ns)
        elif cmd == "users":
            for user in list_users(store):
                print(f"{user.name}\t{user.role}")
        elif cmd == "stats":
            from rlhf.feedback.stats import admin_stats

            print(json.dumps(admin_stats(store), indent=2))
        else:
            from rlhf.feedback.export import export

            counts = export(store, out=ns.out, sft=ns.sft, dataset=ns.dataset, keep_ties=ns.keep_ties,
                            include_gold=ns.include_gold, overwrite=ns.overwrite)
            print(json.dumps(counts))
    except (AuthError, StoreError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
