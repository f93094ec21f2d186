"""Review (session 33): docs/extending.md followed literally, as a developer building on its seams.

A custom evaluation backend (a ``concurrent.futures.ProcessPoolExecutor``; a simulated remote worker pool
with its own latency, lost workers, results out of order, hung workers, mislabelled results), a custom
reflector (a remote one that ships its request as JSON), engine observers, and two islands sharing
evaluations through ``known_evaluations``. extending.md has no code block to run; its table's
signatures and claims are what is checked (the signatures themselves are pinned by
tests/test_docs_examples.py).

A bug (code or doc) is pinned by a test asserting the correct behaviour, marked
``xfail(strict=True, reason="BUG: ...")``; the unmarked tests pin correct behaviour nothing else covered
with a misbehaving backend. Engine-only: no DSPy program, no LM; the whole file runs in a few seconds.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import math
import multiprocessing
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from dspy_turbogepa.adapter.run_identity import parse_source
from dspy_turbogepa.engine import (
    Candidate,
    EngineConfig,
    EngineObserver,
    EvalOutcome,
    Orchestrator,
    ProposalOutcome,
)

ROOT = Path(__file__).resolve().parents[1]
KEYWORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


# ------------------------------------------------------------------------------------------ a small task
def score_of(texts: Mapping[str, str], example_id: int) -> tuple[float, str]:
    """Example ``i`` is solved when its keyword is a word of the instruction."""
    word = KEYWORDS[example_id % len(KEYWORDS)]
    return float(word in texts["instr"].split()), word


def outcome(texts: Mapping[str, str], example_id: int, capture_traces: bool, label: int | None = None) -> EvalOutcome:
    score, word = score_of(texts, example_id)
    return EvalOutcome(example_id=example_id if label is None else label, score=score,
                       trajectory={"missing": None if score else word} if capture_traces else None)


class KeywordReflector:
    """Adds one keyword a failing outcome asks for (drawn with the engine's seed: deterministic)."""

    def __init__(self, latency_seed: int | None = None) -> None:
        self.rng = random.Random(latency_seed)
        self.latency = latency_seed is not None
        self.stops = 0
        self.calls = 0

    def stop(self) -> None:
        self.stops += 1

    async def reflect(self, parent_texts: Mapping[str, str], components: Sequence[str],
                      outcomes: Sequence[EvalOutcome], seed: int) -> ProposalOutcome:
        self.calls += 1
        await asyncio.sleep(self.rng.random() * 0.004 if self.latency else 0)
        missing = sorted({o.trajectory["missing"] for o in outcomes if o.trajectory and o.trajectory["missing"]})
        if not missing:
            return ProposalOutcome(skipped="empty_proposal")
        return ProposalOutcome(texts={"instr": parent_texts["instr"] + " " + random.Random(seed).choice(missing)},
                               reflection_calls=1)


def config(**overrides) -> EngineConfig:
    base = {"max_metric_calls": 200, "max_evals_in_flight": 4, "max_mutations_in_flight": 2,
            "max_reflections_in_flight": 1, "seed": 0}
    base.update(overrides)
    return EngineConfig(**base)


def run(orch: Orchestrator, timeout: float = 20.0):
    async def main():
        return await asyncio.wait_for(orch.run(), timeout)

    return asyncio.run(main())


# ============================================================ (1) a backend in a ProcessPoolExecutor
class ProcessPoolEvaluator:
    """What extending.md's Ray row describes, with the standard library: the call crosses a process
    boundary, so its arguments are pickled. ``dict`` is the worker function (a builtin: it pickles by
    reference with any start method), so what is sent is exactly what the engine passed."""

    def __init__(self, pool: Any, copy_texts: bool) -> None:  # a concurrent.futures.ProcessPoolExecutor
        self.pool = pool
        self.copy_texts = copy_texts
        self.in_flight = 0
        self.peak = 0

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            sent = dict(texts) if self.copy_texts else texts
            remote_texts = await asyncio.get_running_loop().run_in_executor(self.pool, dict, sent)
        finally:
            self.in_flight -= 1
        return outcome(remote_texts, example_id, capture_traces)


@pytest.fixture(scope="module")
def pool():
    # imported here: importing concurrent.futures.process at collection would skip test_resume's check that
    # reading a stored row never imports it
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as p:
        yield p


def test_a_process_pool_backend_that_copies_the_texts_runs_and_slots_cap_its_calls(pool):
    """extending.md (Ray row): "slots (engine/scheduling.py) cap evaluations in flight at num_threads, whatever
    runs them"; an out-of-process backend drives the engine to the best program."""
    ev = ProcessPoolEvaluator(pool, copy_texts=True)
    cfg = config(max_metric_calls=120, max_evals_in_flight=3)
    result = run(Orchestrator(cfg, ev, KeywordReflector(), Candidate({"instr": "base alpha"}), range(8), range(8)))
    assert result.best.aggregate > result.records[0].aggregate
    assert 1 <= ev.peak <= 3


def test_a_process_pool_backend_can_send_the_texts_it_is_given(pool):
    ev = ProcessPoolEvaluator(pool, copy_texts=False)
    cfg = config(max_metric_calls=120, max_evals_in_flight=3)
    result = run(Orchestrator(cfg, ev, KeywordReflector(), Candidate({"instr": "base alpha"}), range(8), range(8)))
    assert result.best.aggregate > result.records[0].aggregate


class JsonWireReflector(KeywordReflector):
    """A remote reflector: the request goes over HTTP as JSON, the answer comes back as JSON."""

    async def reflect(self, parent_texts, components, outcomes, seed):
        request = json.dumps({"parent_texts": parent_texts, "components": components, "seed": seed,
                              "missing": [o.trajectory["missing"] for o in outcomes if o.trajectory]})
        body = json.loads(request)  # the server's side
        missing = sorted({m for m in body["missing"] if m})
        if not missing:
            return ProposalOutcome(skipped="empty_proposal")
        pick = random.Random(body["seed"]).choice(missing)
        return ProposalOutcome(texts={"instr": body["parent_texts"]["instr"] + " " + pick}, reflection_calls=1)


def test_a_remote_reflector_can_send_the_parent_texts_as_json():
    class LocalEvaluator:
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            await asyncio.sleep(0)
            return outcome(texts, example_id, capture_traces)

    refl = JsonWireReflector()
    result = run(Orchestrator(config(), LocalEvaluator(), refl, Candidate({"instr": "base alpha"}), range(8),
                              range(8)))
    assert not result.stats.proposal_skips.get("proposer_error")
    assert result.best.aggregate == 1.0


# ======================================== (2) a remote worker pool: latency, lost workers, out of order
class RemotePool:
    """Each evaluation waits a random latency (so results come back out of order), some workers are lost
    (the backend reports the service's failure, as EvalOutcome documents it), calls are counted per key."""

    def __init__(self, latency_seed: int) -> None:
        self.rng = random.Random(latency_seed)
        self.calls: Counter[tuple[str, str, int]] = Counter()
        self.in_flight = 0
        self.peak = 0
        self.completion_order: list[tuple[str, str, int]] = []
        self.start_order: list[tuple[str, str, int]] = []

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        key = (fingerprint, split, example_id)
        self.calls[key] += 1
        self.start_order.append(key)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.rng.random() * 0.004)
        finally:
            self.in_flight -= 1
        self.completion_order.append(key)
        if split == "train" and example_id % 7 == 3:  # this worker is always lost: a failed outcome, not a raise
            return EvalOutcome(example_id=example_id, score=0.0, failure="program_error", service_failure=True,
                               message="worker lost", error_type="WorkerLostError")
        return outcome(texts, example_id, capture_traces)


def test_deterministic_run_is_the_same_whatever_the_backends_latency_and_each_pair_is_paid_once():
    """engine.md "Reproducibility" / extending.md rules: with deterministic=True what a run decides is derived
    from committed state; results returned out of order change nothing; no (candidate, split, example) is
    sent twice, and the budget counts exactly the calls the backend received (GEPA's overshoot bound)."""
    snapshots = []
    for latency_seed in (1, 2):
        ev = RemotePool(latency_seed)
        cfg = config(max_metric_calls=250, max_evals_in_flight=6, max_mutations_in_flight=3,
                     max_reflections_in_flight=2, seed=3)
        result = run(Orchestrator(cfg, ev, KeywordReflector(latency_seed), Candidate({"instr": "base alpha"}),
                                  range(16), range(10)))
        assert ev.completion_order != ev.start_order  # the backend did answer out of order
        assert max(ev.calls.values()) == 1
        assert result.total_metric_calls == sum(ev.calls.values())
        assert result.total_metric_calls <= 250 + 2 * 3 + 10
        assert ev.peak <= 6
        assert result.stats.failures["program_error"] >= 1
        snapshots.append([(r.candidate.fingerprint, sorted(r.val_scores.items()), r.parent_indices)
                          for r in result.records] + [result.stop_reason, result.total_metric_calls])
    assert snapshots[0] == snapshots[1]


class MislabellingPool:
    """A backend that pairs a request with another request's answer: for ``wrong`` example ids of ``split``
    it returns an outcome labelled with another example id (results matched up by position, a
    duplicated delivery, a worker answering for the wrong task)."""

    def __init__(self, split: str, wrong: int) -> None:
        self.split, self.wrong = split, wrong
        self.mislabelled = 0

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        await asyncio.sleep(0)
        if split == self.split and example_id == self.wrong:
            self.mislabelled += 1
            return outcome(texts, example_id + 1, capture_traces)  # example_id + 1's result, its own label
        return outcome(texts, example_id, capture_traces)


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_outcome_for_another_example_is_refused_at_the_evaluation(split):
    ev = MislabellingPool(split, wrong=2)
    orch = Orchestrator(config(), ev, KeywordReflector(), Candidate({"instr": "base alpha"}), range(8), range(8))
    with pytest.raises(Exception, match="example_id") as info:
        run(orch)
    assert ev.mislabelled >= 1
    assert "2" in str(info.value) and "3" in str(info.value)


class NanPool:
    """A remote metric that breaks on one validation example of the candidates holding "beta": its score
    comes back NaN (a division by zero on the worker, a judge's unparsable answer turned into float("nan"))."""

    def __init__(self) -> None:
        self.nans = 0

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        await asyncio.sleep(0)
        result = outcome(texts, example_id, capture_traces)
        if split == "val" and example_id == 5 and "beta" in texts["instr"].split():
            self.nans += 1
            return dataclasses.replace(result, score=math.nan)
        return result


def test_a_non_finite_score_from_the_backend_is_refused_or_recorded_not_taken_silently():
    ev = NanPool()
    orch = Orchestrator(config(max_metric_calls=300), ev, KeywordReflector(), Candidate({"instr": "base alpha"}),
                        range(8), range(8))
    try:
        result = run(orch)
    except Exception as exc:  # refused at the evaluation, naming the bad score
        assert "nan" in str(exc).lower()
        return
    assert ev.nans >= 1
    assert not any(math.isnan(r.aggregate) for r in result.records)
    assert sum(result.stats.failures.values()) >= 1


# ============================================ (3) Ctrl-C / cancellation while a remote worker hangs
class HangingPool:
    """Answers the first ``answered`` calls, then every call hangs (a worker that never returns)."""

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.calls = 0
        self.live = 0
        self.cancelled = 0

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        self.calls += 1
        n = self.calls
        self.live += 1
        try:
            if n > self.answered:
                await asyncio.sleep(3600)
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.live -= 1
        return outcome(texts, example_id, capture_traces)


def test_a_stop_then_cancel_while_remote_workers_hang_ends_promptly_and_cleanly():
    """engine.md: ``Reflector.stop()`` is called when a stop request stops new launches; Orchestrator:
    request_stop / cancel_in_flight are safe from any thread (Ctrl-C's handler and its grace period).
    With workers hung, the run ends at once with what it committed: no evaluation left running, nothing
    reserved, the cancelled mutations not charged."""
    ev = HangingPool(answered=20)
    refl = KeywordReflector()
    orch = Orchestrator(config(max_metric_calls=400), ev, refl, Candidate({"instr": "base alpha"}), range(8),
                        range(8))
    box: dict = {}

    def engine_thread() -> None:
        try:
            box["result"] = asyncio.run(orch.run())
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=engine_thread, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while ev.calls <= ev.answered + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    orch.request_stop()  # Ctrl-C
    deadline = time.monotonic() + 10  # the loop's turn comes when a loaded machine gives it
    while refl.stops < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive()  # work in flight is waited for during the grace period
    assert refl.stops >= 1
    t0 = time.monotonic()
    orch.cancel_in_flight()  # the grace period expired
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5  # measured 0.01 s: hung workers are not waited for
    result = box.get("result")
    assert result is not None, box
    assert result.stop_reason == "interrupted"
    assert ev.live == 0 and ev.cancelled >= 1
    assert orch.budget.reserved == 0
    assert result.stats.mutations["cancelled"] >= 1
    assert result.records[0].aggregate == 0.125


def test_a_backend_that_raises_for_a_lost_worker_ends_the_run_with_its_error_and_launches_nothing_after():
    """evaluation.py: "an evaluation that raises (a systemic failure) cancels its siblings"; the error is the
    backend's own, not swallowed, and no evaluation is sent once the run has raised."""

    class LostWorker(Exception):
        pass

    class Pool:
        def __init__(self) -> None:
            self.calls = 0

        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            self.calls += 1
            await asyncio.sleep(0.001)
            if self.calls == 12:
                raise LostWorker("worker 7 lost")
            return outcome(texts, example_id, capture_traces)

    ev = Pool()
    orch = Orchestrator(config(max_metric_calls=400), ev, KeywordReflector(), Candidate({"instr": "base"}),
                        range(8), range(8))

    async def main():
        with pytest.raises(LostWorker, match="worker 7 lost"):
            await orch.run()
        at_raise = ev.calls
        await asyncio.sleep(0.05)
        return at_raise

    at_raise = asyncio.run(main())
    assert ev.calls == at_raise


# ============================================================================== (4) engine observers
class Watcher(EngineObserver):
    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.evaluated: Counter[tuple[str, str, int]] = Counter()
        self.candidates: list[int] = []
        self.mutations: list[str] = []
        self.proposals = 0

    def on_evaluation(self, candidate, split, outcome_):
        self.threads.add(threading.get_ident())
        self.evaluated[(candidate.fingerprint, split, outcome_.example_id)] += 1

    def on_candidate(self, record):
        self.threads.add(threading.get_ident())
        self.candidates.append(record.index)

    def on_mutation(self, result, status):
        self.threads.add(threading.get_ident())
        self.mutations.append(status)

    def on_proposal(self, key, proposal):
        self.threads.add(threading.get_ident())
        self.proposals += 1


def test_observers_are_called_on_the_loop_thread_once_per_execution_candidate_and_commit():
    """observer.py: "called on the engine's event loop thread, synchronously"; on_evaluation never for a
    cache hit; on_candidate for every pool member (the seed too); on_mutation for every commit."""
    ev = RemotePool(4)
    refl = KeywordReflector(4)
    watcher = Watcher()
    box: dict = {}

    async def main():
        box["loop_thread"] = threading.get_ident()
        orch = Orchestrator(config(max_metric_calls=200, max_evals_in_flight=6, max_mutations_in_flight=3),
                            ev, refl, Candidate({"instr": "base alpha"}), range(16), range(8), observers=[watcher])
        return await orch.run()

    engine = threading.Thread(target=lambda: box.setdefault("result", asyncio.run(main())))
    engine.start()
    engine.join(20)
    result = box["result"]
    assert watcher.threads == {box["loop_thread"]} != {threading.get_ident()}
    assert watcher.evaluated == ev.calls
    assert result.stats.cache_hits > 0
    assert watcher.candidates == [r.index for r in result.records]
    assert len(watcher.mutations) == sum(result.stats.mutations.values())
    assert watcher.proposals == refl.calls > 0


# ==================================================================================== (5) islands
def test_an_island_given_another_islands_evaluations_as_known_evaluations_pays_nothing_for_them():
    """extending.md (Islands row): candidates are content-hashed, "so islands agree on identity: an evaluation
    one island paid for is the same evaluation for every other"; an orchestrator "takes earlier results only
    at start, as known_evaluations"."""
    first_pool = RemotePool(5)
    seen = Watcher()
    known: dict = {}

    class Keep(EngineObserver):
        def on_evaluation(self, candidate, split, outcome_):
            known[(candidate.fingerprint, split, outcome_.example_id)] = outcome_

    cfg = config(max_metric_calls=150)
    first = run(Orchestrator(cfg, first_pool, KeywordReflector(), Candidate({"instr": "base"}), range(12),
                             range(8), observers=[Keep(), seen]))
    second_pool = RemotePool(6)
    # the second island starts from the same seed, written in another key order: the same candidate
    second = run(Orchestrator(config(max_metric_calls=150, seed=9), second_pool, KeywordReflector(),
                              Candidate(dict(reversed(list({"instr": "base"}.items())))), range(12), range(8),
                              known_evaluations=known))
    assert not set(second_pool.calls) & set(first_pool.calls)
    assert second.stats.replayed >= len(range(8))  # the seed's validation came from the first island
    assert first.records[0].val_scores == second.records[0].val_scores


# =================================================================== (6) extending.md's other claims
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def test_extending_md_counts_the_deliberate_process_wide_objects_test_layers_allows():
    text = " ".join((ROOT / "docs" / "extending.md").read_text().split())
    said = re.search(r"(\w+) process-wide objects are there on purpose", text).group(1).lower()
    tree = parse_source((ROOT / "tests" / "test_layers.py").read_text(), "test_layers.py")
    allowed = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "_DELIBERATE" for t in node.targets))
    assert isinstance(allowed, ast.Dict)
    assert NUMBER_WORDS[said] == len(allowed.keys)


@pytest.mark.parametrize("how", ["max_metric_calls", "stop_callback", "time_budget", "stop_file"])
def test_reflector_stop_is_called_when_launches_stop_but_not_when_the_metric_budget_runs_out(how, tmp_path):
    """engine.md: "an optional Reflector.stop() is called (possibly more than once) when a stop request, a
    stop callback, the stop file or a secondary budget stops new launches ...; not when max_metric_calls
    runs out"."""
    refl = KeywordReflector(latency_seed=7)
    stop_file = tmp_path / "STOP"
    overrides: dict = {"max_metric_calls": 60 if how == "max_metric_calls" else 5000}
    if how == "stop_callback":
        overrides["stop_callbacks"] = (lambda state: len(state.program_candidates) >= 2,)
    if how == "time_budget":
        overrides["max_seconds"] = 0.15
    if how == "stop_file":
        overrides["stop_file"] = stop_file

    class SlowPool(RemotePool):
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            if how in ("time_budget", "stop_file"):
                await asyncio.sleep(0.02 if how == "time_budget" else 0.005)
                if how == "stop_file" and sum(self.calls.values()) == 40:
                    stop_file.write_text("")
            return await super().evaluate(texts, fingerprint, split, example_id, capture_traces)

    result = run(Orchestrator(config(**overrides), SlowPool(7), refl, Candidate({"instr": "base"}), range(24),
                              range(8)))
    expected = {"max_metric_calls": "max_metric_calls", "stop_callback": "stop_callback",
                "time_budget": "time_budget", "stop_file": "stop_file"}[how]
    assert result.stop_reason == expected
    assert (refl.stops == 0) if how == "max_metric_calls" else (refl.stops >= 1)
