"""Settings of `rlhf annotate`: where the items come from, how they are queued, and the server's limits.

The same typed-dataclass style as the stage configs (rlhf.config): one docstring per field, which is
also the ``--help`` text, and contradictions rejected at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import GenerationConfig, ModelLoadConfig
from rlhf.configlib import ConfigError

TaskKind = Literal["pair", "rank", "demo"]


@dataclass
class QueueConfig:
    """Which tasks are made from each prompt, and how they are shared out among annotators."""

    tasks: list[TaskKind] = field(default_factory=lambda: ["pair"])
    """Tasks per prompt: 'pair' (compare two responses), 'rank' (order all K), 'demo' (write or edit the ideal response)."""
    k: int = 2
    """Candidate responses per prompt (generated or read from --responses); 'rank' shows all of them."""
    overlap: float = 0.2
    """Share of items given to several annotators, so that agreement (kappa, alpha, majority) can be measured."""
    overlap_annotators: int = 3
    """How many annotators label an overlap item (3 or more lets the admin page compare each with the majority)."""
    gold: str | None = None
    """Preference file (prompt, chosen, rejected) of pairs with a known answer, mixed into the queue as gold items."""
    gold_every: int = 10
    """Serve one gold item (that the annotator has not seen) every N items; 0 turns gold items off."""
    demo_from_candidate: bool = True
    """Demonstration items start from the first candidate as a draft to edit (false: a blank page to write on)."""
    assignment_ttl_minutes: float = 30.0
    """An item served but not labelled within this time may be given to someone else as well."""
    seed: int = 0
    """Seed for sampling the candidates and choosing the overlap items."""

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("queue.tasks: name at least one of pair, rank, demo")
        if self.k < 1 or (self.k < 2 and ("pair" in self.tasks or "rank" in self.tasks)):
            raise ConfigError(f"queue.k: pair and rank tasks need at least 2 candidates per prompt, got {self.k}")
        if not 0 <= self.overlap <= 1:
            raise ConfigError(f"queue.overlap: must be in [0, 1], got {self.overlap}")
        if self.overlap_annotators < 2:
            raise ConfigError(f"queue.overlap_annotators: must be >= 2, got {self.overlap_annotators}")
        if self.gold_every < 0:
            raise ConfigError(f"queue.gold_every: must be >= 0, got {self.gold_every}")


@dataclass
class LimitsConfig:
    """Abuse limits: a stolen session or a stuck key cannot flood the database."""

    requests_per_minute: int = 240
    """Per-user limit on API requests (a careful annotator needs a handful per minute)."""
    logins_per_minute: int = 10
    """Login attempts per user name and per client address: slows password guessing."""
    max_text_chars: int = 8000
    """Longest demonstration an annotator may submit, in characters."""
    max_body_bytes: int = 64 * 1024
    """Largest request body the server reads, in bytes."""
    session_hours: float = 12.0
    """How long a login lasts."""

    def validate(self) -> None:
        if min(self.requests_per_minute, self.logins_per_minute, self.max_text_chars, self.max_body_bytes) < 1:
            raise ConfigError("limits: every limit must be >= 1")
        if self.max_body_bytes < 4 * self.max_text_chars + 1024:
            # JSON escapes can make a character take up to 6 bytes; the text limit must be the one users hit.
            raise ConfigError(f"limits.max_body_bytes ({self.max_body_bytes}) must be at least 4 * max_text_chars + 1024 "
                              f"= {4 * self.max_text_chars + 1024}, so that the text limit is the one that applies")


@dataclass
class AnnotateConfig:
    """`rlhf annotate`: a local web app in which people compare, rank and write responses."""

    db: str = "annotate.db"
    """The database: a SQLite file path (WAL mode) or any SQLAlchemy URL (postgresql://user@host/name)."""
    prompts: str | None = None
    """Prompt file (JSONL with 'prompt'); candidates are generated from --policy. Prompts already in the database are skipped."""
    policy: str | None = None
    """Policy folder that writes the candidate responses (batched sampling)."""
    responses: str | None = None
    """Instead of --prompts/--policy: a file of pre-generated responses, one row per prompt: 'prompt' and 'responses' (a list)."""
    constitution: str | None = None
    """Constitution YAML (or a packaged name: world, hhh) whose logits processor steers live generation away from banned phrases."""
    guidelines: str | None = None
    """A text file of labelling guidelines shown beside every item (default: the built-in guidelines)."""
    host: str = "127.0.0.1"
    """Address to listen on. Keep 127.0.0.1 unless a TLS proxy is in front."""
    port: int = 8000
    """Port to listen on."""
    secure_cookies: bool = False
    """Mark session cookies Secure (HTTPS only); turn on behind a TLS proxy."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=96, batch_size=32))
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        if self.responses and (self.prompts or self.policy):
            raise ConfigError("give either --responses (pre-generated) or --prompts with --policy (generated live), not both")
        if bool(self.prompts) != bool(self.policy):
            raise ConfigError("--prompts and --policy go together: the policy writes the candidates for the prompts")
        if self.constitution and not self.policy:
            raise ConfigError("--constitution steers live generation, so it needs --prompts and --policy")
