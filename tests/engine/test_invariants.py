"""Engine invariants over random configurations (a seeded property-based sweep).

Each case draws a configuration (budgets, sizes, widths, rungs, merge, best-of-k, scouts, sampling,
selection, strict or GEPA budget, deterministic or not, stop callbacks, a callable selector), a fake task
with partial credit or hidden examples, injected program/metric/format failures and a reflector that
raises, skips or echoes as a pure function of its input, and random timing. It checks what docs/engine.md
promises whatever the configuration: the budget, no evaluation paid twice, full validation of every
candidate, the best candidate, the fronts, counters that agree, concurrency caps, a stop at N candidates,
and (deterministic runs) the same result under other timing. A broad net, not a substitute for the targeted
tests: 200 cases run in a few seconds and catch, say, a wrong tie-break of the best candidate in 31 of
them, but rare interactions need more (the stop-callback drain gap took a ~5,000-case sweep to show).
"""

from __future__ import annotations

import logging
import random
import traceback
import zlib
from typing import Any

import pytest

from dspy_turbogepa.engine import EngineConfig, Orchestrator, ProposalOutcome
from dspy_turbogepa.engine.errors import SystemicFailureError

from .fakes import (
    FakeEvaluator,
    FakeReflector,
    KeywordTask,
    ReflectCall,
    RunTimeout,
    Setup,
    jitter,
    propose,
    run,
    snapshot,
    with_hidden,
)

STOPS = {"max_metric_calls", "stop_file", "stop_callback", "interrupted", "no_progress_possible", "completed",
         "time_budget", "token_budget", "cost_budget"}


def h(*parts: Any) -> float:
    return (zlib.crc32(repr(parts).encode()) % 10_000) / 10_000


class RandReflector(FakeReflector):
    """Fails / skips / echoes as a pure function of (parent texts, seed): timing-independent."""

    def __init__(self, sleep_seed, p_raise=0.0, p_skip=0.0, p_echo=0.0, mode="add", **kw):
        super().__init__(sleep_seed, mode=mode, **kw)
        self.p_raise, self.p_skip, self.p_echo = p_raise, p_skip, p_echo
        self.raised = 0
        self.cur = self.peak = 0

    async def reflect(self, parent_texts, components, outcomes, seed):
        self.calls.append(ReflectCall(dict(parent_texts), tuple(components), tuple(outcomes), seed))
        self.cur += 1
        self.peak = max(self.peak, self.cur)
        try:
            await jitter(self.sleep_seed, ("reflect", seed), self.max_yields)
        finally:
            self.cur -= 1
        u = h("refl", sorted(parent_texts.items()), seed)
        if u < self.p_raise:
            self.raised += 1
            raise RuntimeError("injected")
        u -= self.p_raise
        if u < self.p_skip:
            return ProposalOutcome(skipped="empty_proposal", message="inj", reflection_calls=1)
        u -= self.p_skip
        if u < self.p_echo:
            return ProposalOutcome(texts={c: parent_texts[c] for c in components}, reflection_calls=1)
        return ProposalOutcome(texts=propose(parent_texts, components, outcomes, seed, self.mode), reflection_calls=1)


W = [1.0, 0.1, 0.2, 0.3, 1 / 3, 0.7, 0.6]


class FracTask:
    def __init__(self, task):
        self.t = task
    def __getattr__(self, a):
        return getattr(self.t, a)
    def score(self, texts, split, i):
        w = W[zlib.crc32(f"{split}{i}".encode()) % len(W)]
        base = self.t.score(texts, split, i)
        comp, kw = self.t.needs(split, i)
        # partial credit: 1.0 when solved, a fraction from the token count otherwise
        return base if base else w * (len(texts[comp].split()) % 3) / 3


class FracEvaluator(FakeEvaluator):
    def __init__(self, task, *a, **k):
        super().__init__(FracTask(task), *a, **k)


def random_case(r: random.Random) -> dict[str, Any]:
    train_n = r.randint(1, 30)
    val_n = r.randint(1, 30)
    shared = r.random() < 0.15
    if shared:
        val_n = train_n
    ncomp = r.choice([1, 1, 2, 3])
    mb = r.randint(1, 5)
    cfg = {
        "max_metric_calls": val_n + r.choice([0, 1, 2, 3, 5, 7, 11, 17, 29, 41, 63, 97, 150, 230, 333, 501]),
        "max_evals_in_flight": r.randint(1, 10),
        "max_mutations_in_flight": r.randint(1, 6),
        "max_reflections_in_flight": r.randint(1, 4),
        "reflection_minibatch_size": mb,
        "rung_fractions": r.choice([(1.0,), (0.5, 1.0), (0.25, 1.0), (0.1, 0.5, 1.0), (0.34, 0.67, 1.0)]),
        "seed": r.randint(0, 1000),
        "deterministic": r.random() < 0.6,
        "strict_budget": r.random() < 0.4,
        "use_merge": r.random() < 0.4,
        "max_merge_invocations": r.randint(0, 6),
        "max_siblings": r.randint(1, 4),
        "reflection_scouts": r.choice([0, 0, 2, 5]),
        "reflection_feedback_reuse": r.choice([0, 1, 3]),
        "skip_perfect_score": r.random() < 0.7,
        "perfect_score": r.choice([1.0, 1.0, 1.0, 0.5, 2.0]),
        "minibatch_sampling": r.choice(["failure_first", "failure_first", "epoch"]),
        "candidate_selection": r.choice(["pareto", "pareto", "current_best", "epsilon_greedy", "top_k_pareto"]),
        "adaptive_width": r.random() < 0.7,
        "speculative_chaining": r.random() < 0.8,
        "accept_equal_on_minibatch": r.random() < 0.2,
        "component_selector": r.choice(["round_robin", "round_robin", "all"]),
        "adaptive_components": r.random() < 0.5,
        "merge_subsample_size": r.randint(1, 6),
        "promotion_z": r.choice([0.0, 0.0, 0.5, 2.0]),
        "min_mutations_in_flight": r.choice([1, 1, 2, 3]),
        "max_noop_mutations": r.choice([1, 2, 3, 5, 200]),
        "max_paid_noop_mutations": r.choice([1, 2, 3, 25]),
        "width_window": r.choice([1, 2, 4, 16]),
    }
    if not cfg["adaptive_width"] and r.random() < 0.5:
        cfg["max_staleness"] = cfg["max_mutations_in_flight"] + r.randint(0, 3)
    if r.random() < 0.15:
        cfg["component_selector"] = "CALLABLE"
    if r.random() < 0.15:
        cfg["stop_callbacks"] = ("CANDS", r.randint(1, 6))
    return {
        "cfg": cfg, "train_n": train_n, "val_n": val_n, "ncomp": ncomp, "hidden_every": r.choice([0, 2, 4]),
        "p_fail": r.choice([0, 0, 0.1, 0.3]), "fail_kind": r.choice(["program_error", "metric_error", "format_error"]),
        "p_raise": r.choice([0, 0, 0.1, 0.3]), "p_skip": r.choice([0, 0, 0.1, 0.3]),
        "p_echo": r.choice([0, 0, 0.1, 0.3]),
        "mode": r.choice(["add", "add", "replace", "noise"]), "num_keywords": r.randint(2, 8),
        "shared": shared, "ids": r.choice(["range", "range", "random"]), "frac": r.random() < 0.4,
    }


def make(case: dict[str, Any], sleep_seed):
    task = KeywordTask(components=tuple(f"c{i}" for i in range(case["ncomp"])), num_keywords=case["num_keywords"])
    train = tuple(range(case["train_n"]))
    vals = tuple(range(case["val_n"]))
    if case.get("ids") == "random":
        rr = random.Random(case["cfg"]["seed"])
        train = tuple(rr.sample(range(-50, 1000), case["train_n"]))
        vals = tuple(rr.sample(range(-50, 1000), case["val_n"]))
    if case["hidden_every"]:
        task = with_hidden(task, train, case["hidden_every"])
    val = train if case.get("shared") else vals
    setup = Setup(task=task, train_ids=train, val_ids=val)
    p_fail, kind = case["p_fail"], case["fail_kind"]

    def fail(texts, split, i):
        if p_fail and h("fail", sorted(texts.items()), split, i) < p_fail:
            return (kind, "Injected")
        return None

    yl = random.Random(f"y{sleep_seed}").choice([0, 2, 6, 20])
    ev = (FracEvaluator if case.get("frac") else FakeEvaluator)(task, sleep_seed, fail=fail, max_yields=yl)
    refl = RandReflector(sleep_seed, case["p_raise"], case["p_skip"], case["p_echo"], mode=case["mode"],
                         max_yields=random.Random(f"z{sleep_seed}").choice([0, 3, 10, 60]))
    c = dict(case["cfg"])
    names = list(task.components)
    if c.get("component_selector") == "CALLABLE":
        def selector(state, traj, scores, idx, cand):
            counters = state.named_predictor_id_to_update_next_for_program_candidate
            pid = counters[idx] % len(names)
            counters[idx] = (pid + 1) % len(names)
            return [names[pid]]
        c["component_selector"] = selector
    if "stop_callbacks" in c:
        nmax = c["stop_callbacks"][1]
        c["stop_callbacks"] = (lambda st: len(st.program_candidates) >= nmax,)
    cfg = EngineConfig(**c)
    orch = Orchestrator(cfg, ev, refl, setup.seed(), setup.train_ids, setup.val_ids,
                        shared_splits=bool(case.get("shared")))
    return cfg, setup, ev, refl, orch


def expected_score(ev: FakeEvaluator, texts, split, i):
    f = ev.fail(texts, split, i)
    return 0.0 if f else ev.task.score(texts, split, i)



def check(case, result, orch, ev, refl, setup) -> list[str]:
    errs: list[str] = []
    cfg = orch.config
    val = set(setup.val_ids)
    V = len(val)
    shared = bool(case.get("shared"))
    mb = min(cfg.reflection_minibatch_size, len(setup.train_ids))

    def chk(cond, msg):
        if not cond:
            errs.append(msg)

    chk(result.stop_reason in STOPS, f"stop_reason {result.stop_reason}")
    over = 0 if cfg.strict_budget else 2 * cfg.reflection_minibatch_size + V - 1
    chk(result.total_metric_calls <= cfg.max_metric_calls + over,
        f"budget {result.total_metric_calls} > {cfg.max_metric_calls}+{over}")
    chk(result.total_metric_calls == sum(ev.calls.values()) == result.stats.executed,
        f"total {result.total_metric_calls} vs ev {sum(ev.calls.values())} vs stats {result.stats.executed}")
    dup = [k for k, v in ev.calls.items() if v > 1]
    chk(not dup, f"pair executed twice: {dup[:3]}")
    chk(orch.budget.reserved == 0, f"reserved left {orch.budget.reserved}")
    chk(orch.budget.committed <= result.total_metric_calls + 0, f"committed {orch.budget.committed} > executed")
    fps = [r.candidate.fingerprint for r in result.records]
    chk(len(fps) == len(set(fps)), "duplicate candidates in records")
    for r in result.records:
        chk(set(r.val_scores) == val, f"record {r.index} partial val")
        exp = {i: expected_score(ev, r.candidate.texts, "val", i) for i in val}
        if shared:
            exp = r.val_scores  # which split executed first decides the score (the fake scores splits differently)
        chk(r.val_scores == exp, f"record {r.index} wrong val scores")
        for p in r.parent_indices:
            if r.index:
                chk(p is not None and 0 <= p < r.index, f"record {r.index} parent {p}")
    chk([r.index for r in result.records] == list(range(len(result.records))), "indices")
    if result.records:
        best = max(range(len(result.records)), key=lambda i: (result.records[i].aggregate, -i))
        chk(result.best_index == best, f"best_index {result.best_index} != {best}")
    st = result.stats
    chk(sum(st.mutations.values()) == sum(st.mutations_by_kind.values()), "mutations vs by_kind")
    acc = st.mutations.get("accepted", 0)
    chk(acc == len(result.records) - 1, f"accepted {acc} != records-1 {len(result.records) - 1}")
    chk(sum(st.accepted_by_kind.values()) == acc, "accepted_by_kind")
    for k, v in st.survived_rung0_by_kind.items():
        chk(v <= st.mutations_by_kind.get(k, 0), f"survived {k} > attempts")
    for k, v in st.accepted_by_kind.items():
        chk(v <= st.survived_rung0_by_kind.get(k, 0),
            f"accepted {k} {v} > survived {st.survived_rung0_by_kind.get(k, 0)}")
    chk(st.reflection_calls == len(refl.calls) - refl.raised,
        f"reflection_calls {st.reflection_calls} vs {len(refl.calls)}")
    chk(ev.peak_in_flight <= cfg.max_evals_in_flight, "evals in flight")
    chk(st.peak_mutations_in_flight <= cfg.max_mutations_in_flight + int(cfg.speculative_chaining),
        f"peak mutations {st.peak_mutations_in_flight}")
    ch = st.chaining
    chk(ch.get("accepted", 0) + ch.get("orphaned", 0) + ch.get("other", 0) == ch.get("chained", 0),
        f"chaining {dict(ch)}")
    chk(ch.get("chained", 0) <= ch.get("planned", 0), "chained>planned")
    if cfg.use_merge:
        chk(st.accepted_by_kind.get("merge", 0) <= cfg.max_merge_invocations,
            f"merges accepted {st.accepted_by_kind.get('merge', 0)} > max {cfg.max_merge_invocations}")
    else:
        chk(st.mutations_by_kind.get("merge", 0) == 0, "merge without use_merge")
    # skip_perfect_score off => no skipped_perfect
    if not cfg.skip_perfect_score:
        chk(st.mutations.get("skipped_perfect", 0) == 0, "skipped_perfect with skip off")
    # GEPA rule: stopping for the budget means the budget was used up; strict: within one mutation of it
    if result.stop_reason == "max_metric_calls":
        worst = 2 * mb + V
        if not cfg.strict_budget:
            chk(orch.budget.committed >= cfg.max_metric_calls,
                f"gepa: stopped for budget with {orch.budget.committed} < {cfg.max_metric_calls}")
        else:
            chk(orch.budget.committed > cfg.max_metric_calls - worst,
                f"strict: stopped at {orch.budget.committed}, limit {cfg.max_metric_calls}, worst {worst}")
    chk(orch.budget.committed == result.total_metric_calls,
        f"committed {orch.budget.committed} != executed {result.total_metric_calls}")
    # fronts agree with records
    for vid in val:
        top = max(r.val_scores[vid] for r in result.records)
        members = {r.index for r in result.records if abs(r.val_scores[vid] - top) <= 1e-9}
        chk(result.fronts[vid] == members, f"front {vid}: {result.fronts[vid]} vs {members}")
    calls = [r.discovery_metric_calls for r in result.records]
    chk(calls == sorted(calls), "discovery calls not sorted")
    chk(refl.peak <= cfg.max_reflections_in_flight, f"reflections in flight {refl.peak}")
    allowed = {"accepted", "rejected_rung0", "pruned", "duplicate", "no_proposal", "skipped_perfect", "cancelled",
               "orphaned", "after_stop"}
    chk(set(st.mutations) <= allowed, f"statuses {set(st.mutations)}")
    chk(st.mutations.get("cancelled", 0) == 0, "cancelled mutations")
    for r in result.records[1:]:
        if r.candidate.kind == "merge":
            chk(len(r.parent_indices) == 2 and r.parent_indices[0] != r.parent_indices[1],
                f"merge parents {r.parent_indices}")
            chk(set(r.candidate.parents) == {result.records[p].candidate.fingerprint for p in r.parent_indices},
                f"merge record {r.index} parents mismatch")
        else:
            chk(len(r.parent_indices) == 1, "parents len")
            p = r.parent_indices[0]
            chk(r.candidate.parents == (result.records[p].candidate.fingerprint,),
                f"record {r.index} parent_indices {r.parent_indices} but candidate.parents differ")
            # child differs from parent in exactly the components
            diff = [c for c in r.candidate.texts if r.candidate.texts[c] != result.records[p].candidate.texts[c]]
            chk(len(diff) >= 1, f"record {r.index} identical to parent")
    seed_fp = result.records[0].candidate.fingerprint
    chk(set(ev.order[:V]) == {(seed_fp, "val", i) for i in val}, "seed validation not first")
    chk(result.num_full_val_evals == len(result.records), "num_full_val_evals")
    oc = st.operator_credit
    for k in set(oc) | set(st.accepted_by_kind):
        c = oc.get(k, {})
        chk(c.get("accepted", 0) == st.accepted_by_kind.get(k, 0), f"credit accepted {k} {c} vs {st.accepted_by_kind}")
        chk(c.get("survived_rung0", 0) <= st.survived_rung0_by_kind.get(k, 0), f"credit survived {k}")
    attempts = st.mutations.get("accepted", 0) + st.mutations.get("rejected_rung0", 0) + st.mutations.get("pruned", 0)
    chk(sum(c["attempts"] for c in oc.values()) == attempts, f"credit attempts {oc} vs {dict(st.mutations)}")
    new_best, top = 0, result.records[0].aggregate
    for rr in result.records[1:]:
        if rr.aggregate > top:
            new_best, top = new_best + 1, rr.aggregate
    chk(sum(c["improved_best"] for c in oc.values()) == new_best, f"improved_best {oc} vs {new_best}")
    sib = st.siblings
    chk(sib.get("children_passed", 0) <= sib.get("children_tried", 0), "siblings passed>tried")
    chk(sib.get("best_of_k_children", 0) <= cfg.max_siblings * sib.get("best_of_k_mutations", 0), "best_of_k children")
    if case["cfg"].get("stop_callbacks"):
        nmax = case["cfg"]["stop_callbacks"][1]
        if result.stop_reason == "stop_callback":
            chk(len(result.records) <= max(nmax, 1), f"stop callback at {nmax} but {len(result.records)} records")
    return errs


def one(case, sleep_seed, timeout=20.0):
    cfg, setup, ev, refl, orch = make(case, sleep_seed)
    try:
        result = run(orch, timeout)
    except SystemicFailureError as e:
        return None, orch, ev, refl, setup, f"systemic: {e}"[:100]
    return result, orch, ev, refl, setup, None


def _errors_of_case(n: int) -> list[str]:
    case = random_case(random.Random(n))
    try:
        result, orch, ev, refl, setup, _systemic = one(case, sleep_seed=n)
        if result is None:
            return []  # injected failures everywhere: a systemic stop is the right outcome
        errs = check(case, result, orch, ev, refl, setup)
        if case["cfg"]["deterministic"]:
            result2, orch2, ev2, refl2, setup2, _ = one(case, sleep_seed=n + 7777)
            if result2 is None:
                return [*errs, "deterministic: the second run stopped as systemic"]
            if snapshot(result) != snapshot(result2):
                errs.append(f"deterministic: snapshots differ ({len(result.records)} vs {len(result2.records)})")
            if (result.best_index, result.stop_reason) != (result2.best_index, result2.stop_reason):
                errs.append("deterministic: best or stop reason differs")
            if result.stop_reason in ("max_metric_calls", "no_progress_possible"):
                if result.total_metric_calls != result2.total_metric_calls:
                    errs.append(f"deterministic: calls {result.total_metric_calls} vs {result2.total_metric_calls}")
                for attr in ("mutations", "mutations_by_kind", "chaining", "siblings", "feedback_reused",
                             "scouted", "reflection_calls", "proposal_skips", "scout_failures_read"):
                    a, b = getattr(result.stats, attr), getattr(result2.stats, attr)
                    if a != b:
                        errs.append(f"deterministic: stats.{attr} {a} vs {b}")
            errs += ["second run: " + e for e in check(case, result2, orch2, ev2, refl2, setup2)]
        return errs
    except RunTimeout:
        return ["TIMEOUT"]
    except Exception as exc:
        return ["raised " + "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300]]


@pytest.mark.parametrize("chunk", range(4))
def test_engine_invariants_hold_over_random_configurations(chunk: int) -> None:
    logging.disable(logging.CRITICAL)
    try:
        failures = {n: errs for n in range(chunk * 50, (chunk + 1) * 50) if (errs := _errors_of_case(n))}
    finally:
        logging.disable(logging.NOTSET)
    assert not failures, {n: (random_case(random.Random(n)), errs[:4]) for n, errs in failures.items()}
