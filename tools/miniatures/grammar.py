"""A seeded template grammar of short English sentences (about 400 words) for the miniature speech corpora.

Sentences are lower-case words separated by single spaces, with no punctuation or digits, so what espeak-ng
says is exactly what the transcript holds and WER needs no normaliser.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NAMES = _words(
    "anna ben clara david emma frank grace henry iris jack karen leo maria nick olivia paul rose sam tina victor "
    "walter zoe alice bruno carmen daniel helen oscar peter ruth"
)
NOUNS = _words(
    "apple bag ball basket bed bell bike bird boat book bottle box bread bridge brush bucket cake camera candle car "
    "card chair cheese clock coat cookie cup desk dog door dress egg fan fish flag flower fork glass guitar hat horse "
    "house jacket key kite ladder lamp letter map mirror nail orange painting pen pencil piano picture pillow plate "
    "radio ring rope scarf ship shirt shoe sofa spoon stone table teapot ticket towel toy train tree truck umbrella "
    "vase wagon wallet watch window"
)
ADJECTIVES = _words(
    "big small old new red blue green yellow black white brown heavy light soft hard warm cold clean dirty empty full "
    "bright dark quiet loud happy tired quick slow tall short round square shiny broken wooden golden silver strange "
    "lovely"
)
PLACES = _words(
    "kitchen garden office station market library school park beach river forest village city garage bakery hospital "
    "museum harbor farm hotel airport castle church bank shop theater"
)
PAST_VERBS = _words(
    "found lost bought sold painted moved carried dropped washed cleaned fixed broke opened closed hid borrowed "
    "brought checked covered filled lifted packed pulled pushed took wrapped"
)
BASE_VERBS = _words(
    "find bring buy sell paint move carry drop wash clean fix open close hide borrow check cover fill lift pack pull "
    "push take wrap"
)
MOTION = _words("walked ran drove went hurried rode travelled returned")
NUMBERS = _words("two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty")
PREPOSITIONS = _words("on under behind near beside inside above below")
ADVERBS = _words("quickly slowly carefully quietly happily suddenly finally again")
WEATHER = _words("raining snowing sunny windy cloudy foggy")
FEELINGS = _words("happy sad tired hungry busy ready late early")


TIME_PHRASES = (
    "today",
    "yesterday",
    "tonight",
    "this morning",
    "this evening",
    "last night",
    "last week",
    "next week",
    "on monday",
    "on tuesday",
    "on wednesday",
    "on thursday",
    "on friday",
    "on saturday",
    "on sunday",
    "in the afternoon",
    "at noon",
)


def _times(rng: random.Random) -> str:
    return rng.choice(TIME_PHRASES)


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _templates() -> list[Callable[[random.Random], str]]:
    c = random.Random.choice

    def np_(rng: random.Random) -> str:
        return f"the {c(rng, ADJECTIVES)} {c(rng, NOUNS)}" if rng.random() < 0.6 else f"the {c(rng, NOUNS)}"

    return [
        lambda r: f"{c(r, NAMES)} {c(r, PAST_VERBS)} {np_(r)} {_times(r)}",
        lambda r: f"{np_(r)} is {c(r, PREPOSITIONS)} {np_(r)}",
        lambda r: f"please {c(r, BASE_VERBS)} {np_(r)} in the {c(r, PLACES)}",
        lambda r: f"{c(r, NAMES)} {c(r, MOTION)} to the {c(r, PLACES)} {_times(r)}",
        lambda r: f"we need {c(r, NUMBERS)} {c(r, ADJECTIVES)} {_plural(c(r, NOUNS))} for the {c(r, PLACES)}",
        lambda r: f"can you {c(r, BASE_VERBS)} {np_(r)} {c(r, ADVERBS)}",
        lambda r: f"it was {c(r, WEATHER)} in the {c(r, PLACES)} {_times(r)}",
        lambda r: f"{c(r, NAMES)} and {c(r, NAMES)} were {c(r, FEELINGS)} {_times(r)}",
        lambda r: f"there are {c(r, NUMBERS)} {_plural(c(r, NOUNS))} {c(r, PREPOSITIONS)} {np_(r)}",
        lambda r: f"{c(r, NAMES)} {c(r, ADVERBS)} {c(r, PAST_VERBS)} {np_(r)} near the {c(r, PLACES)}",
        lambda r: f"my {c(r, NOUNS)} is {c(r, ADJECTIVES)} and {c(r, ADJECTIVES)}",
        lambda r: f"did {c(r, NAMES)} {c(r, BASE_VERBS)} {np_(r)} {_times(r)}",
        lambda r: f"{c(r, NAMES)} gave {c(r, NAMES)} {c(r, NUMBERS)} {_plural(c(r, NOUNS))}",
        lambda r: f"i think {np_(r)} is {c(r, ADJECTIVES)}",
    ]


def sentences(*, count: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct sentences drawn from the grammar with `seed`, none of them in `exclude`.

    The same (count, seed, exclude) always gives the same list in the same order.
    """
    rng = random.Random(seed)
    templates = _templates()
    seen: set[str] = set(exclude)
    out: list[str] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise RuntimeError(f"the grammar cannot give {count} distinct sentences")
        text = rng.choice(templates)(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def vocabulary() -> set[str]:
    """Every word the grammar can produce (for docs and tests)."""
    words: set[str] = set()
    fixed = _words("the is please in to we need for can you it was and were there are near my did gave i think of")
    for group in (NAMES, NOUNS, ADJECTIVES, PLACES, PAST_VERBS, BASE_VERBS, MOTION, NUMBERS, PREPOSITIONS, ADVERBS):
        words.update(group)
    words.update(WEATHER, FEELINGS, fixed, (_plural(n) for n in NOUNS))
    for phrase in TIME_PHRASES:
        words.update(phrase.split())
    return words
