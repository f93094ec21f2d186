"""Merge: component-wise recombination of two frontier candidates through a common ancestor.

GEPA's rule, kept: pick two non-dominated candidates that are not ancestors of one another, find a
common ancestor no better than either, and build a child that takes, for each component, the side
that changed it since the ancestor (the better parent's text where both changed it). The child is
screened on a few validation instances, drawn evenly from where each parent wins and where they tie,
reusing the parents' stored scores, and must match the better parent there before it climbs the
validation rungs.

Fixed here: a merge never produces a program that already exists or is one of its parents (dspy.GEPA
re-evaluates such duplicates, 5-15% of its budget on three-predictor programs).

This is pure candidate algebra (no DSPy), which is why it lives in the engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass

from dspy_turbogepa.engine.records import CandidateRecord

MAX_PAIR_ATTEMPTS = 10


@dataclass(frozen=True)
class MergeProposal:
    first: int
    second: int
    ancestor: int
    texts: dict[str, str]
    screen_ids: tuple[int, ...]
    fingerprint: str


def ancestors(index: int, records: Sequence[CandidateRecord]) -> set[int]:
    seen: set[int] = set()
    stack = [p for p in records[index].parent_indices if p is not None]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack.extend(q for q in records[p].parent_indices if q is not None)
    return seen


def merge_texts(
    ancestor: Mapping[str, str], first: Mapping[str, str], second: Mapping[str, str],
    first_score: float, second_score: float, rng: random.Random,
) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, base in ancestor.items():
        a, b = first[name], second[name]
        if a == b:
            out[name] = a
        elif base == a:
            out[name] = b
        elif base == b:
            out[name] = a
        elif first_score != second_score:
            out[name] = a if first_score > second_score else b
        else:
            out[name] = rng.choice((a, b))
    return out


def stratified_subsample(
    first: Mapping[int, float], second: Mapping[int, float], size: int, rng: random.Random
) -> tuple[int, ...]:
    """Up to ``size`` validation ids, balanced between where each parent wins and where they tie."""
    ids = sorted(set(first) & set(second))
    wins_a = [i for i in ids if first[i] > second[i]]
    wins_b = [i for i in ids if second[i] > first[i]]
    ties = [i for i in ids if first[i] == second[i]]
    per = -(-size // 3)
    chosen: list[int] = []
    for bucket in (wins_a, wins_b, ties):
        chosen.extend(rng.sample(bucket, min(per, len(bucket))))
    rest = [i for i in ids if i not in chosen]
    while len(chosen) < size and rest:
        chosen.append(rest.pop(rng.randrange(len(rest))))
    return tuple(sorted(chosen[:size]))


def find_merge(
    records: Sequence[CandidateRecord],
    candidates: Sequence[int],
    existing_fingerprints: Container[str],
    tried: set[tuple[int, int, int]],
    rng: random.Random,
    subsample_size: int,
    fingerprint: Callable[[Mapping[str, str]], str],
    planned: Container[str] = (),
) -> MergeProposal | None:
    """A merge of two of ``candidates`` (the non-dominated frontier), or None when none is worth trying.

    ``fingerprint`` maps texts to a fingerprint (passed in so this module stays free of hashing policy).
    ``planned`` holds the children's fingerprints of the merges already launched: through another common
    ancestor, or from another pair, a merge can rebuild a child that one in flight is still evaluating,
    where ``existing_fingerprints`` cannot see it yet. (gepa refuses a repeat of the same pair and child;
    a child already rejected is not retried from another pair either.)
    """
    pool = sorted(set(candidates))
    if len(pool) < 2 or len(records) < 3:
        return None
    for _ in range(MAX_PAIR_ATTEMPTS):
        i, j = sorted(rng.sample(pool, 2))
        anc_i, anc_j = ancestors(i, records), ancestors(j, records)
        if i in anc_j or j in anc_i:
            continue
        ti, tj = records[i].candidate.texts, records[j].candidate.texts
        si, sj = records[i].aggregate, records[j].aggregate
        # the text test first: on a one-component program it never passes (the two parents' only texts
        # differ from each other and from any ancestor they share), and it is the cheap one
        common = sorted(
            a for a in anc_i & anc_j
            if (i, j, a) not in tried
            and any((records[a].candidate.texts[c] in (ti[c], tj[c])) and ti[c] != tj[c] for c in ti)
            and records[a].aggregate <= si and records[a].aggregate <= sj
        )
        if not common:
            continue
        weights = [max(records[a].aggregate, 0.0) for a in common]
        a = rng.choices(common, weights=weights)[0] if sum(weights) > 0 else rng.choice(common)
        tried.add((i, j, a))
        texts = merge_texts(records[a].candidate.texts, ti, tj, si, sj, rng)
        fp = fingerprint(texts)
        if fp in existing_fingerprints or fp in planned:
            continue  # the merge would rebuild an existing program (often one of the parents) or a launched one
        screen = stratified_subsample(records[i].val_scores, records[j].val_scores, subsample_size, rng)
        if not screen:
            continue
        return MergeProposal(first=i, second=j, ancestor=a, texts=texts, screen_ids=screen, fingerprint=fp)
    return None
