"""A program, data and metric whose run key is pinned in test_run_key_format.py. Editing anything here
changes that key on purpose: update the pinned values there (not RUN_KEY_FORMAT) when you do."""

from __future__ import annotations

import functools

import dspy

PASS_MARK = 0.5  # a literal module constant the metric reads (keyed by its literal since key format 9)


def summarize(text: str) -> str:  # a module-level function sharing a method's name
    return text[:40]


def make_normalizer(prefix: str):
    def normalize(text: str) -> str:
        return prefix + text.strip()

    return normalize


def lookup(term: str) -> str:
    """Look a term up."""
    return term.upper()


def traced(fn):  # a user's decorator written with functools.wraps: the code under it is keyed too
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)

    return inner


@traced
def exact(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


class Pipeline(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = 3
        self.search_api_key = "sk-fixture0000000000000000000000"  # keyed as a marker since key format 10
        self.normalize = make_normalizer("")
        self.tools = [dspy.Tool(lookup)]
        self.draft = dspy.ChainOfThought("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer, confidence: float")  # a typed field

    def summarize(self, text: str) -> str:
        return text.strip()

    def forward(self, question: str) -> dspy.Prediction:
        question = self.summarize(self.normalize(question))
        draft = self.draft(question=question).draft
        return self.answer(question=question, draft=draft)


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return float(exact(gold.answer, pred.answer)) >= PASS_MARK


def data(n: int, offset: int = 0) -> list[dspy.Example]:
    import numpy as np  # an array field: keyed with its dtype since key format 10

    return [dspy.Example(question=f"q{i}", answer=f"a{i}", ids=np.arange(i, i + 3, dtype=np.int16),
                         by_rank={1: f"a{i}"})  # a key that is not a string: keyed with its type since format 11
            .with_inputs("question") for i in range(offset, offset + n)]
