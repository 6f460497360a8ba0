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
# same knowledge into multi-token answers and gives far less data: name the kinds of two or three words, in
# order ("What kinds are otter, rug and red?" -> "animal, object and color"). Held out by word as above: every
# word of a test question is a test word. (A pick-one-of-three variant, "Which of these is a food: rug, noodle,
# otter?", was tried and dropped: at this model size no method learned to copy the word, 0% for all.)
KINDS_QUESTIONS: tuple[str, ...] = (
    "What kinds are {words}?",
    "Classify {words}.",
    "Name the kinds of {words}.",
)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_hard_task_data(seed: int = 0, n_train: int = 160, n_test: int = 200,
                        test_fraction: float = 0.4) -> tuple[list[Record], list[Record]]:
    """(train, test) of the harder task: questions about 2 or 3 distinct words (alternating), seeded. Same word
    split as `make_task_data` for the same seed, so the test words are unseen in both tasks' training data."""
    train_words, test_words = split_words(seed, test_fraction)
    r = random.Random(seed + 1000)

    def records(words: dict[str, str], n: int) -> list[Record]:
        pool = sorted(words)
        out, seen = [], set()
        while len(out) < n:
            ws = r.sample(pool, 2 + len(out) % 2)
            q = r.choice(KINDS_QUESTIONS).format(words=_join(ws))
            if q not in seen:
                seen.add(q)
                out.append({"instruction": q, "input": "", "output": _join([words[w] for w in ws])})
        return out

    return records(train_words, n_train), records(test_words, n_test)


def words_of_hard(rec: Record) -> list[str]:
    """The task words a harder-task record mentions, in order."""
    text = rec["instruction"].replace(",", " ").replace("?", " ").replace(".", " ")
    return [w for w in text.split() if w in TASK_WORDS]
