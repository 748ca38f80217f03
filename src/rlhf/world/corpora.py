"""Corpora of the assistant world: demonstrations, web-like flawed replies, pretraining text, prompt sets.

The pretraining corpus plays the web: true prose (capitals, animal facts, sums with some mistakes),
plus chat transcripts whose replies have the classic flaws in fixed proportions (wrong sums, made-up
answers, compliance with harmful requests, refusal of benign ones, rambling). A model pretrained on
it is the "base model" the pipeline has to fix. Compliance is always written with placeholders
("[ITEM]", "[STEP]"): the corpus never holds real harmful content.

Chat transcripts use train-split tasks only; held-out and deployment phrasings and entities never appear in them.
Held-out *facts* do appear in the prose, so that a held-out question is answerable in principle.
Everything is drawn from explicit `random.Random` streams, one per artefact.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Callable, Sequence

from rlhf.data.io import write_jsonl_atomic
from rlhf.fsutil import write_json_atomic
from rlhf.world import entities as E
from rlhf.world import language as L
from rlhf.world.judge import IDEAL_WORDS, WEIGHTS
from rlhf.world.tasks import FAMILIES, OPS, Task, make_tasks, sample_task, slot_text, with_article

Writer = Callable[[Task, random.Random], str]
MAX_REPLY_WORDS = 40  # replies stay short so that a tiny model can produce them whole

# Share of web transcripts per family that show the family's typical flaw: this is the base model's
# behaviour the pipeline must fix. A further WEB_RAMBLE_RATE are rambling or off-topic.
WEB_FLAW_RATES = {"arithmetic": 0.30, "facts": 0.25, "unknowable": 0.70, "harmful": 0.70,
                  "scary_benign": 0.40, "instructions": 0.30}
WEB_RAMBLE_RATE = 0.10
CHAT_SHARE = 0.5        # share of pretraining documents that are chat transcripts
WRONG_SUM_RATE = 0.15   # share of sums in the prose that are wrong


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slots(task: Task) -> dict[str, str]:
    """Everything a phrase template may name about a task: its slots plus derived forms."""
    entity = tuple((k, v) for k, v in task.meta if k not in ("kind", "phrasing"))
    slots = slot_text(entity)
    if "animal" in slots:
        slots["Animal"] = _capitalise(slots["animal"])
    slots["r"] = task.answer or ""
    return slots


def _fill(rng: random.Random, styles: Sequence[str], **slots: object) -> str:
    return _capitalise(rng.choice(styles).format(**slots))


def _join_items(items: Sequence[str]) -> str:
    """'apple, pear and plum'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------------------------------------------
# Good replies (demonstrations): correct, honest, harmless, concise
# ---------------------------------------------------------------------------------------------------

def _good_calc(task: Task, rng: random.Random) -> str:
    return _fill(rng, L.ARITHMETIC_STYLES, **_slots(task))


def _good_capital(task: Task, rng: random.Random) -> str:
    return _fill(rng, L.CAPITAL_STYLES, capital=task.answer, **_slots(task))


def _good_legs(task: Task, rng: random.Random) -> str:
    return _fill(rng, L.LEGS_STYLES, n=task.answer, **_slots(task))


def _good_sound(task: Task, rng: random.Random) -> str:
    return _fill(rng, L.SOUND_STYLES, sound=task.answer, **_slots(task))


def _good_idk(task: Task, rng: random.Random) -> str:
    reason = _fill(rng, L.IDK_REASONS[task.kind], **_slots(task))
    return f"{rng.choice(L.IDK_OPENERS)} {reason}"


def _good_refusal(task: Task, rng: random.Random) -> str:
    intent = E.HARMFUL_BY_REQUEST[str(task.get("request"))]
    offer = rng.choice(L.SAFE_OFFERS).format(alternative=intent.alternative)
    return f"{rng.choice(L.REFUSAL_OPENERS)} {offer}"


def _good_howto(task: Task, rng: random.Random) -> str:
    return rng.choice(L.HELPFUL_PREFIXES) + str(task.answer)


def _list_reply(rng: random.Random, n: int, category: str) -> str:
    items = rng.sample(E.CATEGORIES[category], n)
    joined = ", ".join(items)
    return _fill(rng, L.LIST_STYLES, n=n, category=category, items=joined, Items=_capitalise(joined))


def _good_list(task: Task, rng: random.Random) -> str:
    return _list_reply(rng, int(task.get("n")), str(task.get("category")))


def _good_greet(task: Task, rng: random.Random) -> str:
    return _fill(rng, L.GREETINGS, name=task.get("name"))


def _repeat_reply(rng: random.Random, word: str, n: int) -> str:
    return _capitalise(rng.choice((" ", ", ")).join([word] * n)) + "."


def _good_repeat(task: Task, rng: random.Random) -> str:
    return _repeat_reply(rng, str(task.get("word")), int(task.get("n")))


GOOD_WRITERS: dict[tuple[str, str], Writer] = {
    ("arithmetic", "calc"): _good_calc,
    ("facts", "capital"): _good_capital, ("facts", "legs"): _good_legs,
    ("facts", "sound"): _good_sound,
    **{("unknowable", kind): _good_idk for kind in L.IDK_REASONS},
    ("harmful", "request"): _good_refusal, ("scary_benign", "request"): _good_howto,
    ("instructions", "list"): _good_list, ("instructions", "greet"): _good_greet,
    ("instructions", "repeat"): _good_repeat,
}


def good_response(task: Task, rng: random.Random) -> str:
    """A demonstration: correct, honest, harmless and concise, in one of a few styles."""
    return GOOD_WRITERS[(task.family, task.kind)](task, rng)


# ---------------------------------------------------------------------------------------------------
# Flawed replies (the web). Wrong values are drawn from train entities only, so that a flawed reply
# to a training prompt never leaks a held-out entity.
# ---------------------------------------------------------------------------------------------------

TRAIN_CAPITALS = tuple(c for k, c in E.COUNTRIES if k not in E.HELDOUT_COUNTRIES)
TRAIN_COUNTRIES = tuple(k for k, _ in E.COUNTRIES if k not in E.HELDOUT_COUNTRIES)
TRAIN_NAMES = tuple(n for n in E.NAMES if n not in E.HELDOUT_NAMES)
TRAIN_SOUNDS = tuple(a.sounds[0] for a in E.ANIMALS if a.sounds and a.name not in E.HELDOUT_ANIMALS)


def _wrong_number(rng: random.Random, right: int) -> int:
    return rng.choice([w for w in range(right - 3, right + 4) if w >= 0 and w != right])


def _wrong_sum(task: Task, rng: random.Random) -> str:
    slots, right = _slots(task), int(str(task.answer))
    wrong = _wrong_number(rng, right)
    if rng.random() < 0.2:  # the first number stated counts, so a late correction is still wrong
        return L.SELF_CORRECTION.format(w=wrong, r=right)
    return _fill(rng, L.ARITHMETIC_STYLES, **{**slots, "r": wrong})


def _wrong_fact(task: Task, rng: random.Random) -> str:
    slots = _slots(task)
    if task.kind == "capital":
        pool = [c for c in TRAIN_CAPITALS + E.FAKE_CITIES if c != task.answer]
        return _fill(rng, L.CAPITAL_STYLES, capital=rng.choice(pool), **slots)
    if task.kind == "legs":
        return _fill(rng, L.LEGS_STYLES, n=_wrong_number(rng, int(str(task.answer))), **slots)
    animal = E.ANIMAL_BY_NAME[str(task.get("animal"))]
    wrong = rng.choice([s for s in TRAIN_SOUNDS if s not in animal.sounds])
    return _fill(rng, L.SOUND_STYLES, sound=wrong, **slots)


def _made_up(task: Task, rng: random.Random) -> str:
    made_up = {
        "city": rng.choice(E.FAKE_CITIES + TRAIN_CAPITALS), "k": rng.randint(2, 20),
        "winner": rng.choice(TRAIN_COUNTRIES + TRAIN_NAMES), "weather": rng.choice(L.MADE_UP_WEATHER),
    }
    return _fill(rng, L.MADE_UP_CLAIMS[task.kind], **made_up, **_slots(task))


def _comply(task: Task, rng: random.Random) -> str:
    return _fill(rng, L.COMPLIANCE, **_slots(task))


def _over_refuse(task: Task, rng: random.Random) -> str:
    return rng.choice(L.OVER_REFUSALS)


def _wrong_instruction(task: Task, rng: random.Random) -> str:
    if task.kind == "greet":
        others = [n for n in TRAIN_NAMES if n != task.get("name")]
        return rng.choice(L.GREETING_WITHOUT_NAME + tuple(f"Hello, {n}!" for n in others[:3]))
    n = int(task.get("n"))
    miscount = n + rng.choice([-1, 1]) if n > 2 else n + 1
    if task.kind == "repeat":
        return _repeat_reply(rng, str(task.get("word")), miscount)
    category = str(task.get("category"))
    if rng.random() < 0.5:
        category = rng.choice([c for c in E.CATEGORIES if c != category])
        return _capitalise(", ".join(rng.sample(E.CATEGORIES[category], n))) + "."
    return _list_reply(rng, miscount, category)


def _ramble(task: Task, rng: random.Random) -> str:
    """A right answer buried in filler and repetition: the verbosity a length-loving rater rewards."""
    filler = rng.choice(L.RAMBLE_FILLERS)
    pieces = [rng.choice(L.RAMBLE_OPENERS), good_response(task, rng), filler, filler,
              rng.choice(L.RAMBLE_CLOSERS)]
    too_long = lambda: len(" ".join(pieces).split()) > MAX_REPLY_WORDS  # noqa: E731
    while too_long() and len(pieces) > 3:
        pieces.pop(2)  # the fillers go first
    if too_long():
        pieces.pop(0)
    return " ".join(pieces)


def _off_topic(task: Task, rng: random.Random) -> str:
    """A good answer to some other (training) question."""
    other = rng.choice([f for f in FAMILIES if f != task.family])
    return good_response(sample_task(rng, other, "train"), rng)


PRIMARY_FLAWS: dict[str, Writer] = {
    "arithmetic": _wrong_sum, "facts": _wrong_fact, "unknowable": _made_up, "harmful": _comply,
    "scary_benign": _over_refuse, "instructions": _wrong_instruction,
}
GENERIC_FLAWS: tuple[Writer, ...] = (_ramble, _off_topic)


def flawed_response(task: Task, rng: random.Random) -> str:
    """A web-like bad reply: mostly the family's typical flaw, sometimes a ramble or an off-topic answer."""
    if rng.random() < 0.75:
        return PRIMARY_FLAWS[task.family](task, rng)
    return rng.choice(GENERIC_FLAWS)(task, rng)


def web_response(task: Task, rng: random.Random) -> str:
    """A reply as found in web chat transcripts, flawed at the family's WEB_FLAW_RATES."""
    draw = rng.random()
    flaw_rate = WEB_FLAW_RATES[task.family]
    if draw < flaw_rate:
        return PRIMARY_FLAWS[task.family](task, rng)
    if draw < flaw_rate + WEB_RAMBLE_RATE:
        return rng.choice(GENERIC_FLAWS)(task, rng)
    return good_response(task, rng)


# ---------------------------------------------------------------------------------------------------
# Pretraining prose
# ---------------------------------------------------------------------------------------------------

ARITHMETIC_ENTITIES = tuple((a, b, op) for op in OPS for a in range(21) for b in range(21)
                            if not (op == "-" and a < b) and not (op == "x" and max(a, b) > 10))


def _capital_sentence(rng: random.Random) -> str:
    country, capital = rng.choice(E.COUNTRIES)  # held-out countries included: facts may be known
    return _fill(rng, L.CAPITAL_PROSE, country=country, capital=capital)


def _sum_sentence(rng: random.Random) -> str:
    a, b, op = rng.choice(ARITHMETIC_ENTITIES)
    result = OPS[op][1](a, b)
    if rng.random() < WRONG_SUM_RATE:
        result = _wrong_number(rng, result)
    return _fill(rng, L.ARITHMETIC_STYLES[::2], a=a, b=b, op=op, op_word=OPS[op][0], r=result)


def _animal_sentence(rng: random.Random) -> str:
    animal = rng.choice(E.ANIMALS)
    slots = {"animal": with_article(animal.name), "Animal": _capitalise(with_article(animal.name))}
    if animal.sounds and (animal.legs is None or rng.random() < 0.5):
        return _fill(rng, L.SOUND_PROSE, sound=animal.sounds[0], **slots)
    return _fill(rng, L.LEGS_PROSE, n=animal.legs, **{**slots, "animal": animal.name})


def _category_sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:  # greetings between people; every name is one a reader may meet
        name, name2 = rng.sample(E.NAMES, 2)
        greeting = rng.choice(L.GREETINGS).format(name=name)
        return _fill(rng, L.GREETING_PROSE, greeting=greeting, name2=name2)
    category = rng.choice(list(E.CATEGORIES))
    items = rng.sample(E.CATEGORIES[category], rng.randint(2, 4))
    shown = items if category == "colors" else [L.plural(i) for i in items]
    return _fill(rng, L.CATEGORY_PROSE, category=category, Items=_capitalise(_join_items(shown)),
                 Item=_capitalise(items[0]))


def _howto_sentence(rng: random.Random) -> str:
    topic = rng.choice(E.BENIGN_TOPICS)  # held-out topics included: the how-to is knowable
    return _fill(rng, L.HOWTO_PROSE, request=topic.request, answer=topic.answer,
                 answer_lower=topic.answer[0].lower() + topic.answer[1:])


def _danger_sentence(rng: random.Random) -> str:
    # The web says which acts are dangerous, held-out ones included: a base model knows that much, and
    # a refusal of a request first seen at evaluation generalises from this knowledge.
    intent = rng.choice(E.HARMFUL_INTENTS)
    return _fill(rng, L.DANGER_PROSE, request=intent.request)


def _word_sentence(rng: random.Random) -> str:
    return _fill(rng, L.WORD_PROSE, word=rng.choice(E.REPEAT_WORDS))


def _saying(rng: random.Random) -> str:
    return rng.choice(L.SAYINGS)


def _forum_post(rng: random.Random) -> str:
    task = sample_task(rng, rng.choice(FAMILIES), "train")
    return f"Q: {task.prompt}\nA: {web_response(task, rng)}"


# (writer, weight, most sentences per document)
PROSE_WRITERS: tuple[tuple[Callable[[random.Random], str], float, int], ...] = (
    (_capital_sentence, 0.25, 3), (_sum_sentence, 0.20, 4), (_animal_sentence, 0.15, 3),
    (_category_sentence, 0.10, 2), (_howto_sentence, 0.10, 1), (_saying, 0.03, 2),
    (_forum_post, 0.11, 1), (_danger_sentence, 0.04, 2), (_word_sentence, 0.02, 2),
)


def _prose_document(rng: random.Random) -> str:
    writer, _, most = rng.choices(PROSE_WRITERS, weights=[w for _, w, _ in PROSE_WRITERS])[0]
    separator = "\n" if writer is _forum_post else " "
    return separator.join(writer(rng) for _ in range(rng.randint(1, most)))


def chat(prompt: str, reply: str) -> list[dict[str, str]]:
    """A single-turn transcript as a message list (rendered later with the tokenizer's chat template)."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def pretrain_corpus(n_docs: int, seed: int, deploy: bool = False) -> list[dict]:
    """The web: about half prose ({"text"}) and half chat transcripts on training tasks ({"messages"}).

    ``deploy``: the deployment split's facts join the prose (``deploy_prose``), so that its questions are
    answerable in principle, as the held-out ones are; the documents without them stay the same.
    """
    rng = random.Random(seed)
    docs: list[dict] = []
    for _ in range(n_docs):
        if rng.random() < CHAT_SHARE:
            task = sample_task(rng, rng.choice(FAMILIES), "train")
            docs.append({"messages": chat(task.prompt, web_response(task, rng))})
        else:
            docs.append({"text": _prose_document(rng)})
    if deploy:
        extra = deploy_prose(round(n_docs * DEPLOY_PROSE_SHARE), derive_seed(seed, "deploy"))
        positions = random.Random(derive_seed(seed, "deploy/positions"))
        for doc in extra:  # spread among the others, not in one block at the end
            docs.insert(positions.randrange(len(docs) + 1), doc)
    return docs


# Extra prose documents (a share of n_docs) for the deployment facts: with it a deployment country or animal is
# stated about as often as one of the other tables' (about n_docs / 200 times each).
DEPLOY_PROSE_SHARE = 0.08


def deploy_prose(n_docs: int, seed: int) -> list[dict]:
    """Prose documents stating the deployment split's facts: capitals, animals, how-tos, dangers, words, greetings."""
    rng = random.Random(seed)

    def one() -> str:
        what = rng.choice(("capital", "animal", "howto", "danger", "word", "greeting"))
        if what == "capital":
            country, capital = rng.choice(E.DEPLOY_COUNTRIES)
            return _fill(rng, L.CAPITAL_PROSE, country=country, capital=capital)
        if what == "animal":
            animal = rng.choice(E.DEPLOY_ANIMALS)
            slots = {"animal": with_article(animal.name), "Animal": _capitalise(with_article(animal.name))}
            if animal.sounds and rng.random() < 0.5:
                return _fill(rng, L.SOUND_PROSE, sound=animal.sounds[0], **slots)
            return _fill(rng, L.LEGS_PROSE, n=animal.legs, **{**slots, "animal": animal.name})
        if what == "howto":
            topic = rng.choice(E.DEPLOY_BENIGN)
            return _fill(rng, L.HOWTO_PROSE, request=topic.request, answer=topic.answer,
                         answer_lower=topic.answer[0].lower() + topic.answer[1:])
        if what == "danger":
            return _fill(rng, L.DANGER_PROSE, request=rng.choice(E.DEPLOY_HARMFUL).request)
        if what == "word":
            return _fill(rng, L.WORD_PROSE, word=rng.choice(E.DEPLOY_REPEAT_WORDS))
        name, name2 = rng.choice(E.DEPLOY_NAMES), rng.choice(E.NAMES)
        return _fill(rng, L.GREETING_PROSE, greeting=rng.choice(L.GREETINGS).format(name=name), name2=name2)

    return [{"text": " ".join(one() for _ in range(rng.randint(1, 3)))} for _ in range(n_docs)]


# ---------------------------------------------------------------------------------------------------
# SFT demonstrations and prompt sets
# ---------------------------------------------------------------------------------------------------

def derive_seed(seed: int, name: str) -> int:
    """A seed for one artefact, so that changing one artefact's size never reshuffles another."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sft_demos(n: int, seed: int, split: str = "train") -> list[dict]:
    """n demonstrations {"prompt", "completion", "family"}: good replies only, balanced over families."""
    rng = random.Random(derive_seed(seed, "replies"))
    return [{"prompt": t.prompt, "completion": good_response(t, rng), "family": t.family}
            for t in make_tasks(split, n, seed)]


def prompt_set(split: str, n: int, seed: int) -> list[dict]:
    """n prompts {"prompt", "family"} for reward-model data, PPO rollouts or evaluation."""
    return [{"prompt": t.prompt, "family": t.family} for t in make_tasks(split, n, seed)]


# ---------------------------------------------------------------------------------------------------
# Writing the world to disk
# ---------------------------------------------------------------------------------------------------

def _world_summary(seed: int, counts: dict[str, int], files: dict[str, str]) -> dict:
    return {
        "seed": seed, "counts": counts, "files": files, "families": list(FAMILIES),
        "judge": {"weights": WEIGHTS, "ideal_words": IDEAL_WORDS},  # how the data will be scored
        "web_flaw_rates": WEB_FLAW_RATES, "web_ramble_rate": WEB_RAMBLE_RATE,
        "chat_share": CHAT_SHARE, "wrong_sum_rate": WRONG_SUM_RATE,
        "heldout_entities": sorted(E.heldout_surfaces()),
    }


def write_world(out_dir: str | os.PathLike, *, seed: int = 0, n_pretrain: int = 20000,
                n_sft: int = 2000, n_sft_val: int = 200, n_prompts_train: int = 1000,
                n_prompts_heldout: int = 300, n_prompts_deploy: int = 0) -> dict[str, str]:
    """Write every corpus of the world as JSONL, plus world.json; returns {name: path}.

    ``n_prompts_deploy`` > 0 adds the deployment split: its prompts (prompts_deploy.jsonl) and its facts in the
    pretraining prose; with 0 the world is the one without that split, file for file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deploy = n_prompts_deploy > 0
    artefacts = {
        "pretrain": (n_pretrain, lambda n: pretrain_corpus(n, derive_seed(seed, "pretrain"), deploy=deploy)),
        "sft_train": (n_sft, lambda n: sft_demos(n, derive_seed(seed, "sft_train"))),
        "sft_val": (n_sft_val, lambda n: sft_demos(n, derive_seed(seed, "sft_val"))),
        "prompts_train": (n_prompts_train,
                          lambda n: prompt_set("train", n, derive_seed(seed, "prompts_train"))),
        "prompts_heldout": (n_prompts_heldout,
                            lambda n: prompt_set("heldout", n, derive_seed(seed, "prompts_heldout"))),
    }
    if deploy:
        artefacts["prompts_deploy"] = (n_prompts_deploy, lambda n: prompt_set("deploy", n, derive_seed(seed, "prompts_deploy")))
    paths: dict[str, str] = {}
    for name, (count, build) in artefacts.items():
        path = out / f"{name}.jsonl"
        write_jsonl_atomic(path, build(count))
        paths[name] = str(path)
    counts = {name: count for name, (count, _) in artefacts.items()}
    summary = _world_summary(seed, counts, {k: Path(v).name for k, v in paths.items()})
    if deploy:
        summary["deploy_entities"] = sorted(E.deploy_surfaces())
    write_json_atomic(out / "world.json", summary)
    paths["world"] = str(out / "world.json")
    return paths
