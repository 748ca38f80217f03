"""Human feedback: a web app in which people compare, rank and write responses, stored in a database
and exported in the formats `rlhf rm` and `rlhf sft` read.

- config.py   AnnotateConfig: sources, queue (tasks, overlap, gold items), limits
- store.py    the database schema (SQLite WAL or any SQLAlchemy URL), with an explicit version
- auth.py     accounts (scrypt or one-time token), sessions, rate limits
- sources.py  candidates generated live from a policy or read from a file; gold pairs
- queue.py    handing out items in a server-side random order and taking labels back, idempotently
- server.py   the FastAPI app: page, JSON API, admin page, security headers
- stats.py    progress, agreement (rlhf.evaluation.agreement), gold accuracy, position bias
- export.py   preference JSONL, SFT JSONL, a datasets folder
- cli.py      `rlhf annotate [serve] | export | add-user | users | stats`
"""
