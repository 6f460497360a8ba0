"""A synthetic English-like pretraining corpus, generated in code (no download, fully seeded).

Each document is a short paragraph of simple sentences over the word lists in `words.py`: little stories,
plain facts ("A fox is an animal."), shopping lists, counting, repeated phrases, "word: word" tables.
Words are used the way their kind is used (animals run and sleep, food is eaten, objects are used, places
are visited), so the model learns what kind of thing each word is, in many phrasings. The corpus never
contains the Alpaca layout ("### Instruction:" ...) nor a question about a word's kind, so the base model
cannot do the demo task before fine-tuning; fine-tuning teaches it to answer with what it already knows.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from litft.demo.words import (
    ADJECTIVES, ANIMALS, CATEGORIES, COLORS, FOODS, NAMES, NUMBER_WORDS, PLACES, TASK_WORDS, THINGS,
)

NOUNS = ANIMALS + FOODS + THINGS
Sentence = Callable[[random.Random], str]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _name(r: random.Random) -> str:
    return r.choice(NAMES)


# -- sentences about one kind of word (the model's "knowledge" of the categories) -------------------------
def s_animal(r: random.Random) -> str:
    a = r.choice(ANIMALS)
    return _cap(r.choice([
        f"the {a} {r.choice(['runs', 'sleeps', 'eats', 'plays', 'hides', 'jumps', 'rests', 'swims'])} "
        f"{r.choice(['in the', 'near the', 'by the'])} {r.choice(PLACES)}.",
        f"{_name(r)} fed the {r.choice(ADJECTIVES)} {a}.",
        f"{_name(r)} saw a wild {a} at the {r.choice(PLACES)}.",
        f"the {a} is hungry and wants some {r.choice(FOODS)}.",
        f"{_a(a)} is an animal.",
        f"the {a} is an animal that lives near the {r.choice(PLACES)}.",
        f"animals like the {a} need food and water.",
        f"{_name(r)} has a pet {a}.",
        f"the baby {a} sleeps next to its mother.",
    ]))


def s_food(r: random.Random) -> str:
    f = r.choice(FOODS)
    return _cap(r.choice([
        f"{_name(r)} ate the {f}.",
        f"{_name(r)} cooked some {f} for {_name(r)}.",
        f"the {f} tastes {r.choice(['sweet', 'sour', 'fresh', 'good', 'salty'])}.",
        f"{f} is a food.",
        f"{_name(r)} likes to eat {f} for lunch.",
        f"there is {f} on the plate.",
        f"{_name(r)} bought some {f} to eat at the {r.choice(['market', 'shop'])}.",
        f"{f} is a kind of food.",
        f"for dinner they had {f} and {r.choice(FOODS)}.",
    ]))


def s_object(r: random.Random) -> str:
    t = r.choice(THINGS)
    return _cap(r.choice([
        f"{_name(r)} used the {t}.",
        f"the {t} is on the {r.choice(['desk', 'table', 'floor', 'shelf'])}.",
        f"{_a(t)} is an object.",
        f"{_name(r)} put the {r.choice(COLORS)} {t} in the bag.",
        f"the {t} is an object that people use every day.",
        f"{_name(r)} broke the old {t}.",
        f"{_name(r)} gave {_name(r)} a new {t}.",
        f"{_name(r)} lost the {t} and found it later.",
    ]))


def s_place(r: random.Random) -> str:
    p = r.choice(PLACES)
    return _cap(r.choice([
        f"{_name(r)} went to the {p} with {_name(r)}.",
        f"the {p} is a place.",
        f"{_name(r)} lives near the {p}.",
        f"they met at the {p} in the morning.",
        f"the {p} is a place where people go.",
        f"it is quiet at the {p} at night.",
        f"{_name(r)} walked from the {p} to the {r.choice(PLACES)}.",
    ]))


def s_color(r: random.Random) -> str:
    c = r.choice(COLORS)
    return _cap(r.choice([
        f"the {r.choice(NOUNS)} is {c}.",
        f"{c} is a color.",
        f"{_name(r)} likes the color {c}.",
        f"{_name(r)} painted the {r.choice(THINGS)} {c}.",
        f"the sky was {c} and {r.choice(COLORS)}.",
        f"{_name(r)} has a {c} {r.choice(THINGS)}.",
    ]))


# -- general sentences ---------------------------------------------------------------------------------
def s_is(r: random.Random) -> str:
    return f"The {r.choice(NOUNS)} is {r.choice(ADJECTIVES)}."


def s_has(r: random.Random) -> str:
    n = r.choice(NUMBER_WORDS[2:] + tuple(str(i) for i in range(2, 100)))
    return f"{_name(r)} has {n} {r.choice(COLORS)} {r.choice(THINGS)}s."


def s_list(r: random.Random) -> str:
    items = r.sample(NOUNS, r.randint(2, 5))
    return f"{_name(r)} {r.choice(['found', 'saw', 'packed', 'wanted', 'drew'])} {_join([_a(i) for i in items])}."


def s_general(r: random.Random) -> str:
    # everyday use of words that instruction templates also use: a real base model knows English
    name, other = r.sample(NAMES, 2)
    return r.choice([
        f"{name} wrote a short note for {other} below the {r.choice(THINGS)}.",
        f"The teacher gave {name} a task and a clear instruction.",
        f"{name} read the instructions above and wrote a response.",
        f"Please write a response to the request of {name}.",
        f"{name} completes the task appropriately and gives the answer.",
        f"The story describes {_a(r.choice(ADJECTIVES))} {r.choice(NOUNS)} and provides further context.",
        f"{name} paired the input with the answer to the question.",
        f"The letter from {name} describes the {r.choice(PLACES)} in a few words.",
        f"{name} put the words in a list and kept them in order.",
        f"These tasks are given to {name}, and those are given to {other}.",
        f"{other} asked a question, and {name} wrote an answer below it.",
        f"What kind of day was it? It was a {r.choice(ADJECTIVES)} day.",
    ])


KIND_SENTENCES: tuple[Sentence, ...] = (s_animal, s_food, s_object, s_place, s_color)
SENTENCES: tuple[Sentence, ...] = KIND_SENTENCES * 2 + (s_is, s_has, s_list, s_general)


# -- document makers -------------------------------------------------------------------------------------
def d_story(r: random.Random) -> str:
    return " ".join(r.choice(SENTENCES)(r) for _ in range(r.randint(2, 6)))


def d_facts(r: random.Random) -> str:
    """A few plain facts about words of one kind, in varied phrasings."""
    kind = r.choice(list(CATEGORIES))
    words = r.sample(CATEGORIES[kind], r.randint(2, 4))
    plural = {"animal": "animals", "food": "foods", "object": "objects", "place": "places", "color": "colors"}[kind]
    art = "an" if kind[0] in "aeiou" else "a"
    facts = [r.choice([f"{_cap(w)} is {art} {kind}.", f"The word {w} names {art} {kind}.",
                       f"We know that {w} is {art} {kind}."]) for w in words]
    intro = r.choice([f"Here are some {plural}.", f"{_join([_cap(words[0])] + words[1:])} are {plural}.",
                      f"{_name(r)} learned about {plural}.", ""])
    return " ".join(x for x in [intro, *facts] if x)


def d_repeat(r: random.Random) -> str:
    """Someone says a list of words, others repeat it: copying from context."""
    names = r.sample(NAMES, 3)
    words = r.sample(TASK_WORDS, r.randint(2, 6))
    phrase = r.choice([" ", ", "]).join(words)
    intro = r.choice([f"{names[0]} said: {phrase}.", f"{names[0]} wrote the words {phrase}.", f"The list was {phrase}."])
    again = r.choice([f"{names[1]} said it again: {phrase}.", f"Then {names[1]} wrote {phrase}.", f"Again: {phrase}."])
    return f"{intro} {again}"


def d_count(r: random.Random) -> str:
    if r.random() < 0.3:
        start = r.randint(0, 6)
        return _cap(", ".join(NUMBER_WORDS[start : start + r.randint(3, 7)]) + ".")
    start, step = r.randint(0, 120), r.choice([1, 1, 1, 2, 5, 10])
    nums = [str(start + step * i) for i in range(r.randint(4, 10))]
    return f"{_name(r)} counted: {' '.join(nums)}."


def d_table(r: random.Random) -> str:
    """'word: word' lines, for structure and newlines."""
    rows = [f"{r.choice(NOUNS)}: {r.choice(ADJECTIVES + COLORS)}" for _ in range(r.randint(2, 5))]
    return f"{_name(r)} made a list.\n" + "\n".join(rows)


DOCUMENTS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (d_story, 0.55), (d_facts, 0.2), (d_repeat, 0.1), (d_count, 0.08), (d_table, 0.07),
)


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """n_docs documents, the same for the same seed."""
    r = random.Random(seed)
    makers, weights = zip(*DOCUMENTS)
    return [r.choices(makers, weights)[0](r) for _ in range(n_docs)]


if __name__ == "__main__":
    for doc in make_corpus(12, seed=1):
        print(doc, end="\n\n")
