"""The demo's instruction task data (Alpaca layout), generated in code and seeded.

The task: say what kind of thing a word names: "What kind of word is otter?" -> "animal" (one of
animal, food, object, place, color), asked in several phrasings. The test words never occur in the
fine-tuning data (the split is by *word*, stratified by category), so a right answer on the test set
cannot be memorised from the training set: the model has to use what pretraining taught it about the
word and what fine-tuning taught it about the question. The base model has never seen a question like
this, nor the Alpaca layout, and scores ~0%.

The words go inline in the instruction (no "input" field): a word at the start of a line is a different
token from the same word after a space, and the corpus mostly shows words after a space.
"""
from __future__ import annotations

import random

from litft.demo.words import CATEGORIES, TASK_WORDS

Record = dict[str, str]

QUESTIONS: tuple[str, ...] = (
    "What kind of word is {w}?",
    "Is {w} an animal, a food, an object, a place or a color?",
    "Name the category of the word {w}.",
    "Which category does {w} belong to?",
    "Classify the word {w}.",
    "Tell me the kind of {w}: animal, food, object, place or color?",
)


def split_words(seed: int = 0, test_fraction: float = 0.4) -> tuple[dict[str, str], dict[str, str]]:
    """{word: category} for train and test: per category, a seeded test_fraction of its words is held out."""
    r = random.Random(seed)
    train, test = {}, {}
    for category, words in CATEGORIES.items():
        words = list(words)
        r.shuffle(words)
        n_test = round(len(words) * test_fraction)
        test.update({w: category for w in words[:n_test]})
        train.update({w: category for w in words[n_test:]})
    return train, test


def make_task_data(seed: int = 0, test_fraction: float = 0.4, test_per_word: int = 2) -> tuple[list[Record], list[Record]]:
    """(train, test): every phrasing for each train word; `test_per_word` random phrasings per test word."""
    r = random.Random(seed)
    train_words, test_words = split_words(seed, test_fraction)

    def record(word: str, question: str, category: str) -> Record:
        return {"instruction": question.format(w=word), "input": "", "output": category}

    train = [record(w, q, c) for w, c in train_words.items() for q in QUESTIONS]
    test = [record(w, q, c) for w, c in test_words.items() for q in r.sample(QUESTIONS, test_per_word)]
    r.shuffle(train)
    r.shuffle(test)
    return train, test


def word_of(rec: Record) -> str:
    """The word a record asks about (inverse of the QUESTIONS templates)."""
    for q in QUESTIONS:
        head, tail = q.split("{w}")
        text = rec["instruction"]
        if text.startswith(head) and text.endswith(tail):
            return text[len(head) : len(text) - len(tail)]
    raise ValueError(f"not a demo task instruction: {rec['instruction']!r}")


# -- the harder task: tells methods apart ------------------------------------------------------------------
# On the task above every method reaches 100%, so a side-by-side table cannot rank them. This one composes the
# same knowledge in two ways and gives less data: pick the word of a named kind out of three ("Which of these
# is a food: rug, noodle, otter?" -> "noodle": the model must judge three words and copy the right one), and
# name the kinds of two words in order ("What kinds are otter and rug?" -> "animal and object": a multi-token
# answer). Held out by word as above: every word of a test question is a test word.
PICK_QUESTIONS: tuple[str, ...] = (
    "Which of these is {article} {kind}: {a}, {b}, {c}?",
    "Of {a}, {b} and {c}, which one is {article} {kind}?",
)
PAIR_QUESTIONS: tuple[str, ...] = (
    "What kinds are {a} and {b}?",
    "Classify {a} and {b}.",
)


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def make_hard_task_data(seed: int = 0, n_train: int = 400, n_test: int = 200,
                        test_fraction: float = 0.4) -> tuple[list[Record], list[Record]]:
    """(train, test) of the harder task, half pick-one-of-three, half name-two-kinds, seeded. Same word split as
    `make_task_data` for the same seed, so the test words are unseen in both tasks' training data."""
    train_words, test_words = split_words(seed, test_fraction)
    r = random.Random(seed + 1000)

    def records(words: dict[str, str], n: int) -> list[Record]:
        by_kind: dict[str, list[str]] = {}
        for w, c in words.items():
            by_kind.setdefault(c, []).append(w)
        kinds = sorted(by_kind)
        out, seen = [], set()
        while len(out) < n:
            if len(out) % 2 == 0:  # pick: three words of three different kinds, one of them asked for
                picked = r.sample(kinds, 3)
                ws = [r.choice(by_kind[k]) for k in picked]
                kind = picked[r.randrange(3)]
                q = r.choice(PICK_QUESTIONS).format(article=_article(kind), kind=kind, a=ws[0], b=ws[1], c=ws[2])
                answer = ws[picked.index(kind)]
            else:  # pair: two words, their kinds in order
                ka, kb = r.choice(kinds), r.choice(kinds)
                a, b = r.choice(by_kind[ka]), r.choice(by_kind[kb])
                if a == b:
                    continue
                q = r.choice(PAIR_QUESTIONS).format(a=a, b=b)
                answer = f"{ka} and {kb}"
            if q not in seen:
                seen.add(q)
                out.append({"instruction": q, "input": "", "output": answer})
        return out

    return records(train_words, n_train), records(test_words, n_test)


def words_of_hard(rec: Record) -> list[str]:
    """The task words a harder-task record mentions (for the held-out check)."""
    text = rec["instruction"].replace(",", " ").replace("?", " ").replace(".", " ").replace(":", " ")
    return [w for w in text.split() if w in TASK_WORDS]
