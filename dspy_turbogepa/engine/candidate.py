"""Candidates: the immutable identity of a program variant.

A candidate is only its component texts (predictor name -> instruction). Everything that changes
while a run goes on (scores, rung reached, round-robin counters) lives in separate records, so the
fingerprint can never drift from the content — the flaw that broke caching and trace lookup in the
earlier TurboGEPA.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

ProposalKind = Literal["seed", "reflection", "reflection_all", "merge"]


def fingerprint_texts(texts: Mapping[str, str]) -> str:
    """Content hash of a candidate: equal texts give equal fingerprints, whatever their origin."""
    payload = json.dumps(sorted(texts.items()), ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a lone surrogate (text decoded with surrogateescape, a JSON "\ud83d" cut in half)
    # is hashed instead of raising; every valid text encodes as before
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Candidate:
    """One program variant. `parents` hold fingerprints, so lineage survives re-numbering."""

    texts: Mapping[str, str]
    parents: tuple[str, ...] = ()
    kind: ProposalKind = "seed"
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        frozen = MappingProxyType(dict(self.texts))
        object.__setattr__(self, "texts", frozen)
        object.__setattr__(self, "fingerprint", fingerprint_texts(frozen))

    def __reduce__(self) -> tuple[type[Candidate], tuple[dict[str, str], tuple[str, ...], ProposalKind]]:
        """Copied and pickled as its plain texts (a mappingproxy cannot be): a user's callback may deepcopy
        or pickle the state it is given, as it could gepa's."""
        return (Candidate, (dict(self.texts), self.parents, self.kind))

    def with_updates(self, updates: Mapping[str, str], kind: ProposalKind) -> Candidate:
        """A child that differs from this candidate only in the updated components."""
        unknown = set(updates) - set(self.texts)
        if unknown:
            raise KeyError(f"proposal names unknown components: {sorted(unknown)}")
        return Candidate(texts={**self.texts, **updates}, parents=(self.fingerprint,), kind=kind)

    def changed_components(self, other: Candidate) -> set[str]:
        return {name for name, text in self.texts.items() if other.texts.get(name) != text}
