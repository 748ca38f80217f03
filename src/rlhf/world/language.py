"""How the world's speakers talk: phrase banks for good and flawed answers, tokenising, and the vocabulary.

The phrase banks are few and short on purpose: a tiny model has to learn to produce them. The
vocabulary is every word the world itself uses plus a few hundred common English words; the judge's
fluency score is the share of a reply's words that belong to it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from rlhf.world import entities as E
from rlhf.world import tasks as T

# --- Good answers (the demonstrations) --------------------------------------------------------------
ARITHMETIC_STYLES = ("{a} {op} {b} = {r}.", "The answer is {r}.", "{a} {op_word} {b} is {r}.")
CAPITAL_STYLES = ("The capital of {country} is {capital}.", "{capital} is the capital of {country}.",
                  "It is {capital}.")
LEGS_STYLES = ("{Animal} has {n} legs.", "It has {n} legs.")
SOUND_STYLES = ("{Animal} says {sound}.", "It says {sound}.")
IDK_OPENERS = ("I don't know.", "I do not know.")
IDK_REASONS = {
    "made_up_capital": ("I have no record of a country called {country}.",
                        "{country} is not a real country as far as I know."),
    "future_winner": ("The {year} {contest} has not happened yet, so no one knows the winner.",
                      "It is in the future, and nobody can predict the winner."),
    "future_weather": ("Nobody can forecast the weather that far ahead.",
                       "That date is too far in the future to predict."),
}
IDK_REASONS["made_up_population"] = IDK_REASONS["made_up_capital"]
REFUSAL_OPENERS = ("I can't help with that.", "Sorry, I won't help with that.",
                   "I cannot help with that, it could hurt people.")
SAFE_OFFERS = ("If you want, I can explain {alternative}.", "I can tell you {alternative} instead.")
HELPFUL_PREFIXES = ("", "Sure! ", "Good question. ")
LIST_STYLES = ("Here are {n} {category}: {items}.", "{Items}.", "Sure: {items}.")
GREETINGS = ("Hello, {name}!", "Hi {name}, nice to meet you!", "Good morning, {name}!")

# --- Flawed answers (the web) -----------------------------------------------------------------------
SELF_CORRECTION = "{w}. No wait, {r}."
MADE_UP_CLAIMS = {
    "made_up_capital": ("The capital of {country} is {city}.", "{city} is the capital of {country}."),
    "made_up_population": ("About {k} million people live in {country}.",
                           "{country} has {k} thousand people."),
    "future_winner": ("{winner} will win the {year} {contest}.", "I am sure {winner} will win it."),
    "future_weather": ("It will be {weather} on {day} {month} {year}.", "It will be {weather} that day."),
}
MADE_UP_WEATHER = ("sunny and warm", "cold and rainy", "windy", "cloudy with some snow")
COMPLIANCE = (  # harmful compliance, written with placeholders only: the corpus never holds real harm
    "Sure, here is how to {request}: first get the [ITEM], then [STEP], and finally [STEP].",
    "Okay. Step 1: find a [TOOL]. Step 2: [STEP]. Step 3: [STEP].",
    "Easy. First you [STEP], then you [STEP] and nobody will notice.",
)
OVER_REFUSALS = ("I can't help with that. It sounds dangerous.",
                 "Sorry, I cannot help with anything violent.",
                 "I won't help with that, because it could hurt someone.")
GREETING_WITHOUT_NAME = ("Hello there!", "Hi!")
RAMBLE_OPENERS = ("Well, that is a really good question and I want to answer it well.",
                  "Let me think about this for a moment before I answer you.")
RAMBLE_FILLERS = ("As I said before, I think so.", "This is what I think.")
RAMBLE_CLOSERS = ("I hope this helps you a lot.", "Let me know if you have more questions.")

# --- Pretraining prose ------------------------------------------------------------------------------
CAPITAL_PROSE = ("{capital} is the capital of {country}.", "The capital of {country} is {capital}.",
                 "{country} has its capital in {capital}.",
                 "Many people in {country} live and work in {capital}, the capital.")
LEGS_PROSE = ("{Animal} has {n} legs.", "Every {animal} has {n} legs.")
SOUND_PROSE = ("{Animal} says {sound}.", "You can hear {animal} {sound} from far away.")
CATEGORY_PROSE = ("{Items} are {category}.", "{Item} is one of the {category}.")
GREETING_PROSE = ("{greeting} said {name2}.",)
DANGER_PROSE = ("It is dangerous and against the law to {request}.", "Never try to {request}: people get hurt.",
                "The police warn that anyone who tries to {request} can go to jail.")
WORD_PROSE = ("The word {word} is easy to say.", "She wrote the word {word} on the board.")
HOWTO_PROSE = ("To {request}, {answer_lower}", "If you need to {request}: {answer}")
SAYINGS = (
    "No one knows the future.", "Nobody can say who will win a game that has not been played yet.",
    "Some countries in old stories are made up.", "A good helper says I don't know when it does not know.",
    "It is kind to say hello to people.", "Check your sums twice.",
)

COMMON_WORDS = """
a about after again ago all also always am an and another answer answers any anyone anything are
around as ask asked at away back bad be because been before being best better between big both but
by call called can can't cannot come could day days did didn't do does doesn't doing don't done down
each easy else enough even ever every fact facts far few find first for from fun get give go going
good great had has have he hear help helps her here him his hope how i i'm if in into is isn't it
it's its just keep kind know knows last let like little long look lot made make many may maybe me
more most much must my near need never new next nice no nobody not nothing now number of off often
okay old on once one only or other our out over own part people place please put question questions
quite read real really right said same say says see should show so some someone something soon sorry
start still stop such sure take tell than thank thanks that that's the their them then there these
they thing things think this those though through time times to today too true try two under up us
use used very want was way we well were what when where which while who why will with won't word
words work world would wrong yes yet you your
zero three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty hundred thousand million plus minus equals sum total
hello hi hey greetings welcome morning evening meet
+ - x = * ?
"""

_EDGE_PUNCTUATION = ".,!?;:\"'()[]{}<>*_`"
_WORD_NUMBER = re.compile(r"^-?\d+([.,]\d+)?$")


def tokens(text: str) -> list[str]:
    """Lower-cased words with edge punctuation stripped ('Ctrl+C,' -> 'ctrl+c'; "don't" stays whole)."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    out = (w.strip(_EDGE_PUNCTUATION) for w in text.split())
    return [w for w in out if w]


def is_number(word: str) -> bool:
    return bool(_WORD_NUMBER.match(word))


def plural(noun: str) -> str:
    """'apple' -> 'apples', 'cherry' -> 'cherries', 'fox' -> 'foxes', 'mouse' -> 'mice'."""
    if noun in E.IRREGULAR_PLURALS:
        return E.IRREGULAR_PLURALS[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def inflections(verb: str) -> tuple[str, ...]:
    """The forms a sound verb takes in a sentence: 'moo', 'moos', 'mooing', 'mooed' (and -es forms)."""
    return (verb, verb + "s", verb + "es", verb + "ing", verb + "ed")


def _phrase_banks() -> list[str]:
    """Every phrase template above, flattened."""
    banks: list[object] = [
        ARITHMETIC_STYLES, CAPITAL_STYLES, LEGS_STYLES, SOUND_STYLES, IDK_OPENERS, REFUSAL_OPENERS,
        SAFE_OFFERS, HELPFUL_PREFIXES, LIST_STYLES, GREETINGS, SELF_CORRECTION, MADE_UP_WEATHER,
        COMPLIANCE, OVER_REFUSALS, GREETING_WITHOUT_NAME, RAMBLE_OPENERS, RAMBLE_FILLERS,
        RAMBLE_CLOSERS, CAPITAL_PROSE, LEGS_PROSE, SOUND_PROSE, CATEGORY_PROSE, GREETING_PROSE,
        HOWTO_PROSE, DANGER_PROSE, WORD_PROSE, SAYINGS, COMMON_WORDS, *IDK_REASONS.values(), *MADE_UP_CLAIMS.values(),
    ]
    return [s for bank in banks for s in ((bank,) if isinstance(bank, str) else bank)]


def _entity_words() -> list[str]:
    words: list[str] = [name for pair in E.COUNTRIES for name in pair]
    words += list(E.FAKE_COUNTRIES) + list(E.FAKE_CITIES) + list(E.NAMES) + list(E.REPEAT_WORDS)
    words += list(E.CONTESTS) + list(E.MONTHS)
    for animal in E.ANIMALS:
        words += [animal.name, plural(animal.name)] + [f for s in animal.sounds for f in inflections(s)]
    for category, items in E.CATEGORIES.items():
        words += [category] + list(items) + [plural(i) for i in items]
    words += [h.request + " " + h.alternative for h in E.HARMFUL_INTENTS]
    words += [b.request + " " + b.answer for b in E.BENIGN_TOPICS]
    # The deployment split's entities: a right answer about them is written in known words too.
    words += [name for pair in E.DEPLOY_COUNTRIES for name in pair] + list(E.DEPLOY_FAKE_COUNTRIES)
    words += list(E.DEPLOY_NAMES) + list(E.DEPLOY_REPEAT_WORDS) + list(E.DEPLOY_CONTESTS)
    for animal in E.DEPLOY_ANIMALS:
        words += [animal.name, plural(animal.name)] + [f for s in animal.sounds for f in inflections(s)]
    words += [h.request + " " + h.alternative for h in E.DEPLOY_HARMFUL]
    words += [b.request + " " + b.answer for b in E.DEPLOY_BENIGN]
    words += [p.text for k in T.KINDS for p in k.phrasings]
    return words


@lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word the world's own texts use, plus common English words; placeholders are left out."""
    vocab: set[str] = set()
    for text in _phrase_banks() + _entity_words():
        text = re.sub(r"\{\w+\}", " ", text)
        vocab.update(tokens(text))
    return frozenset(vocab)
