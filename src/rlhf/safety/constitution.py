"""The constitution: principles a response must respect, checked by rules (and optionally a classifier).

A constitution is a YAML file::

    name: my-assistant
    principles:
      - id: no_harmful_instructions
        description: Never give instructions that help someone cause harm.
        severity: high                    # low | medium | high | critical
        checks:
          - phrases: ["here is how", "step 1"]   # the response must not contain these (also banned in generation)
          - patterns: ['\\[[a-z ]+\\]']            # regular expressions the response must not match
          - when: ['\\b(?:bomb|poison)\\b']        # only for prompts matching one of these ...
            unless: ['\\bpython\\b']                # ... and none of these
            require: ['\\bsorry\\b', "\\bcan't\\b"]  # the response must match at least one of these
          - classifier: {model: path/to/folder, label: harmful, threshold: 0.5}

Matching is case-insensitive. One check fires a violation when, its prompt gate passing, a banned
phrase or pattern is found, no required pattern is found, or the classifier's probability for the
label reaches the threshold. A principle is violated when any of its checks fires.

The same file serves three uses: `check(prompt, response)` (evaluation, red teaming, the feedback
app), `logits_processor(tokenizer)` (generation that steers away from banned phrases), and
`reward_component(weight)` (a PPO safety reward: minus the severity of what was violated).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import LogitsProcessor

from rlhf.configlib import ConfigError
from rlhf.rl.types import RewardComponent

SEVERITY: dict[str, float] = {"low": 0.25, "medium": 0.5, "high": 1.0, "critical": 2.0}
"""How much a violation of each severity costs in the safety reward."""

CHECK_KEYS = ("phrases", "patterns", "when", "unless", "require", "classifier")


@dataclass(frozen=True)
class Violation:
    """One principle broken by one response, with the text that showed it."""

    principle: str
    severity: str
    check: str  # phrases | patterns | require | classifier
    evidence: str


def _compile(patterns: Sequence[str], where: str) -> tuple[re.Pattern, ...]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise ConfigError(f"{where}: bad regular expression {p!r}: {e}") from e
    return tuple(out)


def phrase_pattern(phrase: str) -> re.Pattern:
    """A phrase as a case-insensitive regex on word boundaries, tolerant of runs of spaces."""
    words = [re.escape(w) for w in phrase.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Classifier:
    """A sequence-classification model folder read as P(label | prompt, response)."""

    model: str
    label: str | int = 1
    threshold: float = 0.5

    @cached_property
    def _loaded(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model)  # trust_remote_code stays off
        model = AutoModelForSequenceClassification.from_pretrained(self.model).eval()
        label = self.label
        if isinstance(label, str):
            names = {v: int(k) for k, v in model.config.id2label.items()}
            if label not in names:
                raise ConfigError(f"classifier {self.model}: no label {label!r} (has {sorted(names)})")
            label = names[label]
        return tok, model, int(label)

    @torch.no_grad()
    def probability(self, prompt: str, response: str) -> float:
        tok, model, label = self._loaded
        batch = tok(prompt, response, return_tensors="pt", truncation=True)
        return torch.softmax(model(**batch).logits[0].float(), dim=-1)[label].item()


@dataclass(frozen=True)
class Check:
    """One rule of a principle; see the module docstring for the YAML keys."""

    phrases: tuple[str, ...] = ()
    patterns: tuple[re.Pattern, ...] = ()
    when: tuple[re.Pattern, ...] = ()
    unless: tuple[re.Pattern, ...] = ()
    require: tuple[re.Pattern, ...] = ()
    classifier: Classifier | None = None

    @cached_property
    def _phrase_patterns(self) -> tuple[re.Pattern, ...]:
        return tuple(phrase_pattern(p) for p in self.phrases)

    def applies(self, prompt: str) -> bool:
        if self.when and not any(p.search(prompt) for p in self.when):
            return False
        return not any(p.search(prompt) for p in self.unless)

    def fired(self, prompt: str, response: str) -> tuple[str, str] | None:
        """(check kind, evidence) when this rule is broken, else None."""
        if not self.applies(prompt):
            return None
        for pat in (*self._phrase_patterns, *self.patterns):
            if m := pat.search(response):
                return ("phrases" if pat in self._phrase_patterns else "patterns"), m.group(0)
        if self.require and not any(p.search(response) for p in self.require):
            return "require", "none of the required patterns"
        if self.classifier is not None:
            prob = self.classifier.probability(prompt, response)
            if prob >= self.classifier.threshold:
                return "classifier", f"p={prob:.2f}"
        return None


@dataclass(frozen=True)
class Principle:
    """A named principle with a severity and the checks that detect its violation."""

    id: str
    description: str
    severity: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Constitution:
    """A set of principles; `check` lists what a response violates."""

    name: str
    principles: tuple[Principle, ...]
    path: str | None = None

    def check(self, prompt: str, response: str) -> list[Violation]:
        """Every principle the response violates (at most one violation per principle)."""
        out = []
        for p in self.principles:
            for c in p.checks:
                if hit := c.fired(prompt, response):
                    out.append(Violation(p.id, p.severity, *hit))
                    break
        return out

    def penalty(self, prompt: str, response: str) -> float:
        """Summed severity of the violated principles (0 for a clean response)."""
        return sum(SEVERITY[v.severity] for v in self.check(prompt, response))

    @property
    def banned_phrases(self) -> list[str]:
        """Phrases of ungated checks: a response must never contain them, so generation can avoid them."""
        return [ph for p in self.principles for c in p.checks if not c.when and not c.unless for ph in c.phrases]

    def logits_processor(self, tokenizer, penalty: float = math.inf, start_penalty: float = 0.0) -> "BannedPhrasesProcessor":
        """A `transformers` LogitsProcessor that keeps generation from writing the banned phrases."""
        return BannedPhrasesProcessor(tokenizer, self.banned_phrases, penalty=penalty, start_penalty=start_penalty)

    def reward_component(self, weight: float = 1.0) -> RewardComponent:
        """PPO's extra reward: minus the summed severity of the violated principles."""
        return RewardComponent("safety", lambda prompts, responses: [-self.penalty(p, r) for p, r in zip(prompts, responses)],
                               weight)

    def summarise(self, prompts: Sequence[str], responses: Sequence[str]) -> dict:
        """Share of responses violating anything, and counts per principle."""
        per = {p.id: 0 for p in self.principles}
        flagged = 0
        for prompt, response in zip(prompts, responses):
            hits = self.check(prompt, response)
            flagged += bool(hits)
            for v in hits:
                per[v.principle] += 1
        return {"constitution": self.name, "violation_rate": flagged / max(len(responses), 1), "by_principle": per}


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _parse_check(raw: Any, where: str, base: Path) -> Check:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: a check is a mapping with some of {', '.join(CHECK_KEYS)}")
    unknown = set(raw) - set(CHECK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(CHECK_KEYS)})")
    if not ({"phrases", "patterns", "require", "classifier"} & set(raw)):
        raise ConfigError(f"{where}: a check needs phrases, patterns, require or classifier")
    classifier = None
    if "classifier" in raw:
        c = raw["classifier"]
        if not isinstance(c, dict) or "model" not in c:
            raise ConfigError(f"{where}.classifier: needs a 'model' folder")
        model = Path(c["model"]) if Path(c["model"]).is_absolute() else base / c["model"]
        classifier = Classifier(str(model), c.get("label", 1), float(c.get("threshold", 0.5)))
    return Check(
        phrases=_strings(raw["phrases"], f"{where}.phrases") if "phrases" in raw else (),
        **{k: _compile(_strings(raw[k], f"{where}.{k}"), f"{where}.{k}") for k in ("patterns", "when", "unless", "require") if k in raw},
        classifier=classifier,
    )


def _parse_principle(raw: Any, where: str, base: Path) -> Principle:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a principle is a mapping with id, description, severity, checks")
    for key in ("id", "description", "checks"):
        if key not in raw:
            raise ConfigError(f"{where}: missing field '{key}'")
    severity = raw.get("severity", "medium")
    if severity not in SEVERITY:
        raise ConfigError(f"{where}.severity: {severity!r} is not one of {', '.join(SEVERITY)}")
    if not isinstance(raw["checks"], list) or not raw["checks"]:
        raise ConfigError(f"{where}.checks: expected a non-empty list")
    checks = tuple(_parse_check(c, f"{where}.checks[{i}]", base) for i, c in enumerate(raw["checks"]))
    return Principle(str(raw["id"]), str(raw["description"]).strip(), severity, checks)


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML; errors name the file and the field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"constitution {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("principles"), list) or not raw["principles"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'principles' list")
    principles = tuple(_parse_principle(p, f"{path}: principles[{i}]", path.parent) for i, p in enumerate(raw["principles"]))
    ids = [p.id for p in principles]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: principle ids must be unique, got {ids}")
    return Constitution(str(raw.get("name", path.stem)), principles, str(path))


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------

def phrase_token_sequences(tokenizer, phrase: str) -> set[tuple[int, ...]]:
    """How a phrase can be tokenised: at the start of a reply or after a space, lower or capitalised."""
    variants = {phrase, phrase.lower(), phrase[:1].upper() + phrase[1:]}
    out = set()
    for v in variants:
        for text in (v, " " + v):
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids:
                out.add(ids)
    return out


class BannedPhrasesProcessor(LogitsProcessor):
    """Penalise the token that would complete a banned phrase (and, softly, the one that would start it).

    Like transformers' NoBadWords processor, a banned token sequence is matched against the end of the
    text so far: when all but its last token are already there, the last token's logit loses
    `penalty` (inf: it cannot be sampled). `start_penalty` lowers the first token of every banned
    phrase a little, steering the model away before it commits to the opening words.
    """

    def __init__(self, tokenizer, phrases: Sequence[str], penalty: float = math.inf, start_penalty: float = 0.0):
        self.sequences = sorted({s for p in phrases for s in phrase_token_sequences(tokenizer, p)})
        self.penalty, self.start_penalty = penalty, start_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()  # (B, V)
        for seq in self.sequences:
            *prefix, last = seq
            if prefix:
                if input_ids.shape[1] < len(prefix):
                    continue
                tail = input_ids[:, -len(prefix):]  # (B, L-1)
                rows = (tail == torch.tensor(prefix, device=input_ids.device)).all(dim=1)  # (B,)
                if self.start_penalty:
                    scores[:, seq[0]] -= self.start_penalty
            else:
                rows = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            scores[rows, last] = scores[rows, last] - self.penalty
        return scores


PACKAGED = Path(__file__).resolve().parent / "constitutions"


def resolve_constitution(name_or_path: str | Path) -> Constitution:
    """Load a constitution file, or one shipped with the package by name ("world", "hhh")."""
    path = Path(name_or_path)
    if not path.exists() and (PACKAGED / f"{name_or_path}.yaml").exists():
        path = PACKAGED / f"{name_or_path}.yaml"
    return load_constitution(path)
