"""Pure-Python fakes for the engine: a keyword task, an evaluator and a reflector (no dspy, no LM).

The task: every example "needs" one keyword in one component's text. An example scores 1.0 when the
keyword is a whitespace-separated token of that component's text, 0.0 otherwise. The evaluator hands
the reflector what it needs through ``EvalOutcome.trajectory`` (component, keyword, score); "hidden"
examples never reveal their keyword, so they can never be solved and the search can never become
perfect (the engine does not stop by itself once every selectable parent is perfect, see
``test_orchestrator_control.py``).

Timing noise: by default the fakes yield to the event loop a pseudo-random number of times
(``asyncio.sleep(0)``), derived from a *sleep seed* and the call's identity. That reorders
completions deterministically and costs no wall time; ``real_sleep`` adds short real sleeps.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dspy_turbogepa.engine import (
    Candidate,
    EngineConfig,
    EngineObserver,
    EngineResult,
    EvalOutcome,
    Orchestrator,
    ProposalOutcome,
    fingerprint_texts,
)

# ---------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Trajectory:
    component: str
    keyword: str | None  # None: the example does not reveal what it needs
    score: float
    split: str
    example_id: int


@dataclass(frozen=True)
class KeywordTask:
    components: tuple[str, ...] = ("instr",)
    num_keywords: int = 6
    #: example ids (per split) whose keyword is never revealed to the reflector
    hidden: frozenset[tuple[str, int]] = frozenset()

    def needs(self, split: str, example_id: int) -> tuple[str, str]:
        k = len(self.components)
        comp = self.components[example_id % k]
        offset = 0 if split == "val" else 1  # train and val need the same keywords, in a different order
        kw = f"kw{(example_id // k + offset) % self.num_keywords}"
        return comp, kw

    def score(self, texts: Mapping[str, str], split: str, example_id: int) -> float:
        comp, kw = self.needs(split, example_id)
        if (split, example_id) in self.hidden:
            return 0.0
        return 1.0 if kw in texts[comp].split() else 0.0

    def trajectory(self, texts: Mapping[str, str], split: str, example_id: int) -> Trajectory:
        comp, kw = self.needs(split, example_id)
        shown = None if (split, example_id) in self.hidden else kw
        return Trajectory(comp, shown, self.score(texts, split, example_id), split, example_id)

    def seed_texts(self, first_keyword: bool = True) -> dict[str, str]:
        return {c: "base" + (" kw0" if first_keyword and i == 0 else "") for i, c in enumerate(self.components)}


def with_hidden(task: KeywordTask, train_ids: Sequence[int], every: int = 4) -> KeywordTask:
    """Hide every ``every``-th training example so the task can never be solved completely."""
    return replace(task, hidden=frozenset(("train", i) for i in train_ids if i % every == every - 1))


# ---------------------------------------------------------------------------------------------- timing


async def jitter(sleep_seed: int | None, key: Any, max_yields: int = 6, real_sleep: float = 0.0) -> None:
    await asyncio.sleep(0)  # like any real evaluator or LM call, always suspend at least once
    if sleep_seed is None:
        return
    rng = random.Random(f"{sleep_seed}:{key!r}")
    if real_sleep > 0:
        await asyncio.sleep(rng.random() * real_sleep)
    for _ in range(rng.randrange(max_yields + 1)):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------- evaluator

FailFn = Callable[[Mapping[str, str], str, int], "tuple[str, str | None] | None"]


class FakeEvaluator:
    """Deterministic scores, call counting per (fingerprint, split, example_id), optional failures."""

    def __init__(
        self,
        task: KeywordTask,
        sleep_seed: int | None = None,
        *,
        real_sleep: float = 0.0,
        fail: FailFn | None = None,
        gate: Callable[[str, str, int], Any] | None = None,
        on_call: Callable[[FakeEvaluator, tuple[str, str, int]], None] | None = None,
        max_yields: int = 6,
    ) -> None:
        self.task = task
        self.max_yields = max_yields
        self.sleep_seed = sleep_seed
        self.real_sleep = real_sleep
        self.fail = fail
        self.gate = gate
        self.on_call = on_call
        self.calls: Counter[tuple[str, str, int]] = Counter()
        self.order: list[tuple[str, str, int]] = []
        self.texts_by_fp: dict[str, dict[str, str]] = {}
        self.capture: dict[tuple[str, str, int], bool] = {}
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()

    @property
    def unique_pairs(self) -> int:
        return len(self.calls)

    async def evaluate(
        self, texts: Mapping[str, str], fingerprint: str, split: str, example_id: int, capture_traces: bool
    ) -> EvalOutcome:
        assert fingerprint == fingerprint_texts(texts), "the engine passed a fingerprint that does not match"
        key = (fingerprint, split, example_id)
        with self._lock:
            self.calls[key] += 1
            self.order.append(key)
            self.texts_by_fp[fingerprint] = dict(texts)
            self.capture[key] = capture_traces
        if self.on_call is not None:
            self.on_call(self, key)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate(fingerprint, split, example_id)
            await jitter(self.sleep_seed, ("eval", key), self.max_yields, self.real_sleep)
        finally:
            self.in_flight -= 1
        traj = self.task.trajectory(texts, split, example_id) if capture_traces else None
        failed = self.fail(texts, split, example_id) if self.fail is not None else None
        if failed is not None:
            failure, error_type, *fatal = failed  # (kind, error type[, fatal])
            return EvalOutcome(
                example_id, 0.0, failure=failure, error_type=error_type, fatal=bool(fatal and fatal[0]),  # type: ignore[arg-type]
                message=f"injected {failure}", trajectory=traj,
            )
        return EvalOutcome(
            example_id,
            self.task.score(texts, split, example_id),
            objective_scores={"acc": self.task.score(texts, split, example_id)},
            trajectory=traj,
            output=f"out:{fingerprint[:6]}:{example_id}" if split == "val" else None,
        )


# ---------------------------------------------------------------------------------------------- reflector


@dataclass
class ReflectCall:
    parent_texts: dict[str, str]
    components: tuple[str, ...]
    outcomes: tuple[EvalOutcome, ...]
    seed: int


class FakeReflector:
    """Adds (or, in ``mode="replace"``, sets) a keyword learnt from the failing outcomes' trajectories.

    With no keyword to learn (or in ``mode="noise"``) it adds a random noise token, which changes no
    score. ``skip`` and
    ``raise_on`` take the call number (0-based, in call order) and decide whether to return a
    skipped proposal or raise. ``fixed`` makes every call return the same texts (dedupe tests).
    """

    def __init__(
        self,
        sleep_seed: int | None = None,
        *,
        mode: str = "add",
        real_sleep: float = 0.0,
        skip: Callable[[int], str | None] | None = None,
        raise_on: Callable[[int], bool] | None = None,
        fixed: Mapping[str, str] | None = None,
        before: Callable[[int], Any] | None = None,
        max_yields: int = 6,
    ) -> None:
        self.sleep_seed = sleep_seed
        self.max_yields = max_yields
        self.mode = mode
        self.real_sleep = real_sleep
        self.skip = skip
        self.raise_on = raise_on
        self.fixed = dict(fixed) if fixed is not None else None
        self.before = before
        self.calls: list[ReflectCall] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def reflect(
        self, parent_texts: Mapping[str, str], components: Sequence[str], outcomes: Sequence[EvalOutcome], seed: int
    ) -> ProposalOutcome:
        n = len(self.calls)
        self.calls.append(ReflectCall(dict(parent_texts), tuple(components), tuple(outcomes), seed))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.before is not None:
                await self.before(n)
            await jitter(self.sleep_seed, ("reflect", seed), self.max_yields, self.real_sleep)
        finally:
            self.in_flight -= 1
        if self.raise_on is not None and self.raise_on(n):
            raise RuntimeError(f"injected proposer failure on call {n}")
        if self.skip is not None:
            reason = self.skip(n)
            if reason == "fatal":  # the reflection LM's key was refused
                return ProposalOutcome(skipped="proposer_error", message="AuthenticationError: bad key", fatal=True,
                                       error_type="AuthenticationError", reflection_calls=1)
            if reason is not None:  # nothing to reflect on is decided before any reflection LM call
                return ProposalOutcome(skipped=reason, message="injected skip",
                                       reflection_calls=0 if reason == "no_reflective_data" else 1)
        if self.fixed is not None:
            return ProposalOutcome(texts={c: self.fixed[c] for c in components if c in self.fixed}, reflection_calls=1)
        return ProposalOutcome(texts=propose(parent_texts, components, outcomes, seed, self.mode), reflection_calls=1)


def propose(
    parent_texts: Mapping[str, str], components: Sequence[str], outcomes: Sequence[EvalOutcome], seed: int, mode: str
) -> dict[str, str]:
    rng = random.Random(seed)
    out: dict[str, str] = {}
    for comp in components:
        learnable = sorted(
            {
                o.trajectory.keyword
                for o in outcomes
                if o.score < 1.0 and o.trajectory is not None and o.trajectory.component == comp
                and o.trajectory.keyword is not None
            }
        )
        if mode == "noise":  # never learns anything: the child scores exactly like its parent
            learnable = []
        kw = rng.choice(learnable) if learnable else f"noise{rng.randrange(10**9)}"
        if mode == "replace":  # forget everything else; the noise token keeps proposals distinct
            out[comp] = f"{kw} n{rng.randrange(10**9)}"
        else:
            out[comp] = f"{parent_texts[comp]} {kw}"
    return out


# ---------------------------------------------------------------------------------------------- running


class StopAfter(EngineObserver):
    """Calls ``request_stop`` once ``n`` mutations have been committed (bounds runs that cannot end)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0
        self.orchestrator: Orchestrator | None = None

    def on_mutation(self, result: Any, status: str) -> None:
        self.seen += 1
        if self.seen >= self.n and self.orchestrator is not None:
            self.orchestrator.request_stop()


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.evaluations: list[tuple[str, str, int]] = []
        self.candidates: list[int] = []
        self.mutations: list[tuple[int, str]] = []
        self.results: list[Any] = []

    def on_evaluation(self, candidate: Candidate, split: str, outcome: EvalOutcome) -> None:
        self.evaluations.append((candidate.fingerprint, split, outcome.example_id))

    def on_candidate(self, record: Any) -> None:
        self.candidates.append(record.index)

    def on_mutation(self, result: Any, status: str) -> None:
        self.mutations.append((result.plan.seq, status))
        self.results.append(result)


#: Whether this engine adapts the number of mutations in flight (EngineConfig.adaptive_width).
HAS_ADAPTIVE_WIDTH = "adaptive_width" in EngineConfig.__dataclass_fields__


def fixed_width() -> dict[str, Any]:
    """Config overrides that make ``max_mutations_in_flight`` the actual width (no adaptation)."""
    return {"adaptive_width": False} if HAS_ADAPTIVE_WIDTH else {}


def make_config(**overrides: Any) -> EngineConfig:
    base: dict[str, Any] = {
        "max_metric_calls": 200,
        "max_evals_in_flight": 8,
        "max_mutations_in_flight": 4,
        "max_reflections_in_flight": 2,
        "reflection_minibatch_size": 3,
        "rung_fractions": (1.0,),
        "seed": 0,
    }
    base.update(overrides)
    return EngineConfig(**base)


@dataclass
class Setup:
    task: KeywordTask = field(default_factory=KeywordTask)
    train_ids: tuple[int, ...] = tuple(range(12))
    val_ids: tuple[int, ...] = tuple(range(8))
    seed_texts: dict[str, str] | None = None

    def seed(self) -> Candidate:
        return Candidate(self.seed_texts if self.seed_texts is not None else self.task.seed_texts())


def build(
    config: EngineConfig,
    evaluator: FakeEvaluator,
    reflector: Any,
    setup: Setup,
    observers: Sequence[EngineObserver] = (),
    **orchestrator_kw: Any,
) -> Orchestrator:
    orch = Orchestrator(config, evaluator, reflector, setup.seed(), setup.train_ids, setup.val_ids, observers=observers,
                        **orchestrator_kw)
    for obs in observers:
        if isinstance(obs, StopAfter):
            obs.orchestrator = orch
    return orch


class RunTimeout(AssertionError):
    """The run did not finish on its own within the test's time limit."""


def run(orch: Orchestrator, timeout: float = 10.0) -> EngineResult:
    """Run to completion, or stop the run and raise RunTimeout after ``timeout`` seconds.

    Not ``asyncio.wait_for``: the engine can swallow the cancellation of ``run()`` (see
    ``test_cancelling_run_is_not_swallowed``), so a hung run is ended with request_stop +
    cancel_in_flight + repeated cancels instead.
    """

    async def main() -> EngineResult:
        task = asyncio.ensure_future(orch.run())
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return task.result()
        orch.request_stop()
        orch.cancel_in_flight()
        for _ in range(100):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.02)
            if done:
                break
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the timeout is what we report
        raise RunTimeout(f"the run did not finish within {timeout}s")

    return asyncio.run(main())


def run_fakes(
    config: EngineConfig,
    setup: Setup | None = None,
    *,
    sleep_seed: int | None = None,
    evaluator: FakeEvaluator | None = None,
    reflector: Any = None,
    observers: Sequence[EngineObserver] = (),
    timeout: float = 10.0,
    **orchestrator_kw: Any,
) -> tuple[EngineResult, Orchestrator, FakeEvaluator, Any]:
    setup = setup or Setup()
    evaluator = evaluator or FakeEvaluator(setup.task, sleep_seed)
    reflector = reflector if reflector is not None else FakeReflector(sleep_seed)
    orch = build(config, evaluator, reflector, setup, observers, **orchestrator_kw)
    return run(orch, timeout), orch, evaluator, reflector


def snapshot(result: EngineResult) -> list[tuple[Any, ...]]:
    """What must not depend on timing in deterministic mode."""
    return [
        (r.index, dict(r.candidate.texts), tuple(r.parent_indices), dict(sorted(r.val_scores.items())), r.mutation_seq,
         r.candidate.kind)
        for r in result.records
    ]


def hard_setup(
    train_n: int = 12, val_n: int = 8, components: tuple[str, ...] = ("instr",), num_keywords: int = 6
) -> Setup:
    """A task the search improves on but can never finish (some training examples hide their keyword)."""
    train = tuple(range(train_n))
    task = with_hidden(KeywordTask(components=components, num_keywords=num_keywords), train)
    return Setup(task=task, train_ids=train, val_ids=tuple(range(val_n)))


def check_invariants(result: EngineResult, orch: Orchestrator, ev: FakeEvaluator, setup: Setup) -> None:
    """Properties every finished run must have, whatever the configuration."""
    cfg = orch.config
    val = set(setup.val_ids)
    # budget: strict never exceeds it; GEPA-compatible lets only the last mutation finish past it, and
    # uses it up before stopping for it. Every metric call is a distinct (fingerprint, split, example) pair.
    overshoot = 0 if cfg.strict_budget else 2 * cfg.reflection_minibatch_size + len(val) - 1
    assert result.total_metric_calls <= cfg.max_metric_calls + overshoot
    if result.stop_reason == "max_metric_calls" and not cfg.strict_budget:
        assert result.total_metric_calls >= cfg.max_metric_calls, "stopped with budget left"
    assert result.total_metric_calls == ev.unique_pairs == sum(ev.calls.values()) == result.stats.executed
    assert max(ev.calls.values()) == 1, [k for k, v in ev.calls.items() if v > 1][:3]
    assert orch.budget.committed == result.total_metric_calls
    assert orch.budget.reserved == 0
    # the seed's full-validation evaluation comes first, and it is the seed's only validation work
    seed_fp = result.records[0].candidate.fingerprint
    assert set(ev.order[: len(val)]) == {(seed_fp, "val", i) for i in val}
    assert result.records[0].parent_indices == [None] and result.records[0].mutation_seq is None
    # every record holds a full-validation score, never a partial shard, and it is the true score
    fps = [r.candidate.fingerprint for r in result.records]
    assert len(fps) == len(set(fps)), "a candidate was added twice"
    for r in result.records:
        assert set(r.val_scores) == val, f"record {r.index} has a partial validation score"
        assert r.val_scores == {i: setup.task.score(r.candidate.texts, "val", i) for i in val}
        assert all((r.candidate.fingerprint, "val", i) in ev.calls for i in val)
        if r.index and r.candidate.kind == "merge":
            assert len(r.parent_indices) == 2 and all(p is not None and 0 <= p < r.index for p in r.parent_indices)
            assert set(r.candidate.parents) == {result.records[p].candidate.fingerprint for p in r.parent_indices}
        elif r.index:
            (p,) = r.parent_indices
            assert p is not None and 0 <= p < r.index
            assert r.candidate.parents == (result.records[p].candidate.fingerprint,)
    assert [r.index for r in result.records] == list(range(len(result.records)))
    assert result.num_full_val_evals == len(result.records)
    assert result.best_index == max(range(len(result.records)), key=lambda i: (result.records[i].aggregate, -i))
    assert set().union(*result.fronts.values()) <= set(range(len(result.records)))
    # bookkeeping: every launched mutation was committed exactly once
    assert sum(result.stats.mutations.values()) == sum(result.stats.mutations_by_kind.values())
    # the in-flight limits held
    assert ev.peak_in_flight <= cfg.max_evals_in_flight
    assert result.stats.peak_evals_in_flight <= cfg.max_evals_in_flight
    # speculative chaining may run one mutation beyond the width
    assert result.stats.peak_mutations_in_flight <= cfg.max_mutations_in_flight + int(cfg.speculative_chaining)
    # a chained mutation either settled on a parent that joined the pool, or was orphaned
    chaining = result.stats.chaining
    assert chaining.get("chained", 0) <= chaining.get("planned", 0)
    settled = chaining.get("accepted", 0) + chaining.get("orphaned", 0) + chaining.get("other", 0)
    assert settled == chaining.get("chained", 0), dict(chaining)
