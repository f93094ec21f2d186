"""The proposer family at the DSPy level: feedback routing pays off, custom proposers of every shape, merge."""

from __future__ import annotations

import asyncio

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm, sim_engine

from helpers import small_splits


def _compile(task, metric, budget, seed=0, **kw):
    splits = small_splits(task, n_train=40, n_val=24, n_test=150)
    student = make_student_lm(seed=seed, noise=0.0)
    kw.setdefault("reflection_lm", make_reflection_lm(seed=seed))
    opt = TurboGEPA(metric, max_metric_calls=budget, num_threads=8, track_stats=True, seed=seed, **kw)
    with dspy.context(lm=student):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
        return program, task.evaluate(program, splits.test)


def _foreign_rules(task, program) -> int:
    """Rules of another stage written into a predictor's instruction (they cannot help it)."""
    return sum(
        len(task.known_rules(p.signature.instructions) - task.known_rules(p.signature.instructions, name))
        for name, p in program.named_predictors()
    )


def test_routed_feedback_teaches_each_stage_only_its_own_rules(pipeline):
    """With pred_name feedback routed, each stage's reflection reads only its own failures, so no stage's
    instruction picks up another stage's rules; with one program-level feedback for both stages they leak.
    (At 400 calls both end at the same test score on this fake task, so the check is on the instructions.)"""

    def unrouted(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return pipeline.metric(gold, pred, trace, None, None)  # ignores pred_name: mixed feedback

    routed = [_compile(pipeline, pipeline.metric, 300, seed)[0] for seed in range(4)]
    mixed = [_compile(pipeline, unrouted, 300, seed)[0] for seed in range(4)]
    assert [_foreign_rules(pipeline, p) for p in routed] == [0, 0, 0, 0]
    assert sum(_foreign_rules(pipeline, p) for p in mixed) >= 2
    for p in routed:  # and routing still learns: each stage knows some of its own rules
        assert all(pipeline.known_rules(q.signature.instructions, n) for n, q in p.named_predictors())


def test_async_proposer_is_awaited(routing):
    calls = []

    async def proposer(candidate, reflective_dataset, components_to_update):
        await asyncio.sleep(0)
        calls.append(list(components_to_update))
        return {c: candidate[c] + " Disputes over charges go to payments." for c in components_to_update}

    program, _ = _compile(routing, routing.metric, 120, instruction_proposer=proposer)
    assert calls
    assert "payments" in program.route.signature.instructions


def test_dspy_multimodal_instruction_proposer_works_unchanged(routing):
    from dspy.teleprompt.gepa.instruction_proposal import MultiModalInstructionProposer

    program, _ = _compile(routing, routing.metric, 120, instruction_proposer=MultiModalInstructionProposer())
    dr = program.detailed_results
    assert dr.run_stats["reflection_calls"] >= 1 and not dr.run_stats["proposal_skips"]
    assert len(dr.candidates) > 1 and dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]


def test_merge_combines_two_specialists_into_a_child_better_than_both(pipeline):
    """Scripted proposer: one lineage only ever fixes `extract`, another only `render`; merge combines them."""
    rules = pipeline.all_rules_instructions()
    first_time: set[str] = set()

    def proposer(candidate, reflective_dataset, components_to_update):
        # only the first proposal for each component is useful (keyed by component, not by call order,
        # which depends on timing when two mutations reflect at once)
        (name,) = components_to_update
        if name not in first_time:
            first_time.add(name)
            return {name: rules[name]}
        return {name: candidate[name] + " Keep it short."}

    program, _ = _compile(pipeline, pipeline.metric, 400, instruction_proposer=proposer,
                          component_selector="round_robin", max_mutations_in_flight=2)
    dr = program.detailed_results
    merges = [i for i, p in enumerate(dr.parents) if len(p) == 2]
    assert merges, dr.parents
    m = merges[0]
    a, b = dr.parents[m]
    assert dr.val_aggregate_scores[m] > max(dr.val_aggregate_scores[a], dr.val_aggregate_scores[b])
    assert dr.best_idx == m or dr.val_aggregate_scores[dr.best_idx] >= dr.val_aggregate_scores[m]


@pytest.mark.http
def test_reflection_tokens_and_cost_are_counted(routing):
    """DSPy keeps an LM call's cost only in its history entry; the reflection LM's calls must reach the
    run's reflection cost (so cost_budget_usd counts them), with the tokens the server saw."""
    from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer

    cfg = SimConfig(models=(ModelConfig("gpt-4o-mini", "reflector"),))  # a model name DSPy can price
    with SimServer(cfg, seed=0) as srv:
        reflector = dspy.LM("openai/gpt-4o-mini", api_base=srv.base_url, api_key="x", cache=False, max_tokens=4000)
        splits = small_splits(routing, n_train=20, n_val=10)
        opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflector, num_threads=4,
                        track_stats=True, use_merge=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        server = srv.stats()["models"]["gpt-4o-mini"]
    stats = program.detailed_results.run_stats
    assert server["requests"] > 0 and len(reflector.history) == server["requests"]
    assert stats["reflection_calls"] == server["requests"]
    assert stats["reflection_tokens"]["prompt"] == server["prompt_tokens"]
    assert stats["reflection_tokens"]["completion"] == server["completion_tokens"]
    paid = sum(h["cost"] for h in reflector.history)
    assert paid > 0 and stats["cost"]["reflection"] == pytest.approx(paid, abs=2e-6)


def test_a_proposer_that_fails_after_calling_the_lm_still_counts_its_usage(routing, reflection_lm):
    calls = []

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        dspy.Predict("question -> answer")(question="draft an instruction")  # paid for, then fails
        if len(calls) % 2 == 0:  # every other time (a proposer that always fails stops the run)
            raise RuntimeError("could not parse my own draft")
        return {c: candidate[c] + f" Draft {len(calls)}." for c in components_to_update}

    splits = small_splits(routing, n_train=20, n_val=10)
    opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=reflection_lm, num_threads=2,
                    instruction_proposer=proposer, track_stats=True, use_merge=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    stats = program.detailed_results.run_stats
    assert stats["proposal_skips"].get("proposer_error", 0) >= 1
    assert stats["reflection_calls"] >= stats["proposal_skips"]["proposer_error"]
    assert stats["reflection_tokens"]["prompt"] > 0


def test_price_table_prices_reflections_too(routing):
    """A self-hosted reflection model litellm cannot price: price_table prices its calls, as it does
    the program's, so cost_budget_usd sees them."""
    from dspy_turbogepa.testing import SimServer

    with SimServer("test", seed=0) as srv:
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="x", cache=False, max_tokens=4000)
        splits = small_splits(routing, n_train=20, n_val=10)
        opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflector, num_threads=4,
                        track_stats=True, use_merge=False, price_table={"sim-reflector": (1.0, 2.0)})
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    stats = program.detailed_results.run_stats
    tokens = stats["reflection_tokens"]
    assert tokens["prompt"] > 0
    expected = (tokens["prompt"] * 1.0 + tokens["completion"] * 2.0) / 1e6
    assert stats["cost"]["reflection"] == pytest.approx(expected, abs=2e-6)


# ------------------------------------------------------------------ gepa's own selectors and stoppers
def test_gepas_round_robin_selector_object_alternates_components(pipeline):
    """gepa's RoundRobinReflectionComponentSelector advances the counter it is handed in the state; the
    advance must be kept, or it rewrites the same component forever (it did: 'extract' only)."""
    from gepa.strategies.component_selector import RoundRobinReflectionComponentSelector

    program, _ = _compile(pipeline, pipeline.metric, 300, component_selector=RoundRobinReflectionComponentSelector(),
                          use_merge=False)
    records = program.detailed_results
    seed = records.candidates[0]
    changed = {name for cand in records.candidates[1:] for name, p in cand.named_predictors()
               if p.signature.instructions != dict(seed.named_predictors())[name].signature.instructions}
    assert changed == {name for name, _ in seed.named_predictors()}


def test_a_selector_written_for_dspy_gepa_reads_trace_data_dicts(pipeline):
    """dspy.GEPA's DspyAdapter hands selectors dicts (t["trace"], t["score"], ...), not our objects."""
    seen = []

    def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        for t in trajectories:
            assert set(t) == {"example_ind", "example", "prediction", "trace", "score"}
            seen.append((t["example_ind"], t["score"], len(t["trace"])))
        return [list(candidate)[len(seen) % len(candidate)]]

    _compile(pipeline, pipeline.metric, 150, component_selector=selector, use_merge=False)
    assert seen
    assert {j for j, _, _ in seen} == {0, 1, 2}  # positions in the minibatch of 3
    # t["score"] is what the metric returned, as in dspy's TraceData (the pipeline's metric gives feedback)
    assert all(isinstance(score, dspy.Prediction) and isinstance(score.score, float) and score.feedback
               and n_steps >= 1 for _, score, n_steps in seen)


@pytest.mark.parametrize("stopper, arg", [("MaxMetricCallsStopper", 60), ("MaxCandidateProposalsStopper", 3)])
def test_gepas_stop_conditions_work_as_stop_callbacks(routing, stopper, arg):
    """gepa's stop conditions read GEPAState fields (total_num_evals, i): they crashed on ours."""
    import gepa.utils

    stop = getattr(gepa.utils, stopper)(arg)
    program, _ = _compile(routing, routing.metric, 400, gepa_kwargs={"stop_callbacks": [stop]})
    dr = program.detailed_results
    assert dr.stop_reason == "stop_callback"
    assert dr.total_metric_calls < 400


def test_a_metric_whose_feedback_call_always_raises_stops_the_run(routing):
    """The metric works without pred_name but raises with it: no reflection can ever read feedback. The
    run must stop with a clear error naming the feedback call, not spin on free mutations and return
    the seed as optimized."""
    from dspy_turbogepa import SystemicFailureError

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            raise KeyError("feedback_template")
        return routing.metric(gold, pred, trace)

    reflection_lm = make_reflection_lm(seed=0)
    with pytest.raises(SystemicFailureError) as info:
        _compile(routing, metric, budget=200, reflection_lm=reflection_lm)
    message = str(info.value)
    assert "feedback_error" in message and "feedback_template" in message and "pred_name" in message
    assert reflection_lm.history == []  # no reflection LM call was paid for


def test_a_metrics_failing_feedback_calls_are_counted_and_warned_about_once(routing, caplog):
    """A feedback call that raises now and then leaves that example out of the reflection. Each one
    logged a WARNING (130 in a 200-call run) and none was counted anywhere a user could see."""
    import itertools
    import logging

    calls = itertools.count()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None and next(calls) % 2 == 0:
            raise KeyError("feedback_template")
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        program, _ = _compile(routing, metric, budget=200)
    skipped = program.detailed_results.run_stats["reflective_records_skipped"]
    assert skipped.get("feedback_error", 0) >= 3, skipped
    warned = [r for r in caplog.records if "giving feedback" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "reflective_records_skipped" in warned[0].getMessage()


def test_the_metrics_feedback_call_runs_on_the_users_lm_not_the_reflection_lm(routing):
    """An LLM judge inside the metric reads dspy.settings.lm: for the feedback call (pred_name set) that
    must be the user's configured LM, as in dspy.GEPA, and its calls are not reflection calls."""
    seen = []
    judge = dspy.Predict("ticket -> queue")  # stands in for an LLM judge: one call on the configured LM

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            seen.append(dspy.settings.lm.model)
            judge(ticket=gold.ticket)
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    reflection_lm = make_reflection_lm(seed=0)
    program, _ = _compile(routing, metric, budget=60, reflection_lm=reflection_lm)
    student_model = make_student_lm(seed=0).model
    assert seen and set(seen) == {student_model} != {reflection_lm.model}
    stats = program.detailed_results.run_stats
    assert stats["reflection_calls"] == len(reflection_lm.history)
    # the judge's tokens still count (token and dollar budgets must see them), beside the reflections'
    reflection_prompt = sum(h["usage"]["prompt_tokens"] for h in reflection_lm.history)
    assert stats["reflection_tokens"]["prompt"] > reflection_prompt > 0


def test_a_reflection_waiting_out_a_rate_limit_gives_up_when_the_run_stops():
    """The backoff ran on a worker thread nothing could interrupt: after Ctrl-C or a time budget the
    thread slept on (73 s) and called the reflection LM once compile() had returned."""
    import threading
    import time

    from dspy import lm15

    from dspy_turbogepa.adapter.ratelimit import RetryPolicy
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    calls = []

    def always_limited(candidate, reflective_dataset, components_to_update):
        calls.append(time.monotonic())
        raise lm15.RateLimitError("quota", status=429, retry_after=60.0)

    proposer = ReflectiveProposer(None, always_limited, None, max_workers=1,
                                  rate_limit_policy=RetryPolicy(max_retries=10, max_elapsed_s=300.0, base_s=60.0,
                                                                cap_s=60.0))
    box = {}
    worker = threading.Thread(target=lambda: box.update(out=proposer._propose({"p": "x"}, {"p": []}, [], ["p"])))
    worker.start()
    deadline = time.monotonic() + 10  # asked once, then backing off for 60 s (not a fixed delay: load)
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    stopped = time.monotonic()
    proposer.stop()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - stopped < 5  # not the 60 s backoff
    assert box["out"].skipped == "proposer_error" and len(calls) == 1  # not asked again after the stop
    assert proposer.rate_limit_stats()["rate_limit_gave_up"] == 1
    proposer.close()


def test_a_reflection_waiting_out_a_rate_limit_reports_the_wait_left():
    """The progress line showed nothing while a reflection waited out the reflection LM's Retry-After (the
    search, at a width near one, waits with it): the proposer must say how long is left, and only while it
    waits; a transient failure's short backoff is not a rate limit's pause."""
    import threading
    import time

    from dspy import lm15

    from dspy_turbogepa.adapter.ratelimit import RetryPolicy
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    asked = threading.Event()
    faults = [lm15.ServerError("busy", status=503), lm15.RateLimitError("quota", status=429, retry_after=60.0)]

    def limited(candidate, reflective_dataset, components_to_update):
        asked.set()
        raise faults.pop(0) if faults else lm15.RateLimitError("quota", status=429, retry_after=60.0)

    policy = RetryPolicy(max_retries=10, max_elapsed_s=300.0, base_s=1.0, cap_s=60.0)
    short = RetryPolicy(max_retries=3, max_elapsed_s=30.0, base_s=1.5, cap_s=1.5)
    proposer = ReflectiveProposer(None, limited, None, max_workers=1, rate_limit_policy=policy, transient_policy=short)
    assert proposer.paused_seconds() == 0.0
    worker = threading.Thread(target=lambda: proposer._propose({"p": "x"}, {"p": []}, [], ["p"]))
    worker.start()
    assert asked.wait(5)
    time.sleep(0.3)
    assert proposer.paused_seconds() == 0.0  # the 503 backoff (1.5 s with jitter) is no rate limit
    deadline = time.monotonic() + 10
    while not proposer.paused_seconds() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 50.0 < proposer.paused_seconds() <= 60.0 * 1.25  # Retry-After, with the policy's jitter at most
    proposer.stop()
    worker.join(timeout=5)
    assert not worker.is_alive() and proposer.paused_seconds() == 0.0
    proposer.close()


def test_the_engine_tells_the_reflector_when_the_run_stops(routing, student_lm, reflection_lm, monkeypatch):
    import dspy_turbogepa.teleprompter as teleprompter_module
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    told = []

    class Recording(ReflectiveProposer):
        def stop(self):
            told.append(True)
            super().stop()

    monkeypatch.setattr(teleprompter_module, "ReflectiveProposer", Recording)
    splits = small_splits(routing, n_train=10, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=200, reflection_lm=reflection_lm, num_threads=4, verbose=False,
                    gepa_kwargs={"stop_callbacks": [lambda state: state.i >= 1]})  # a stop, while work is in flight
    with dspy.context(lm=student_lm):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert told


def test_a_failing_proposer_is_reported_once_per_error_type_not_on_every_reflection(routing, caplog):
    """Eight identical multi-line warnings preceded the systemic stop of a reflection LM that never parsed."""
    import logging

    from dspy_turbogepa import SystemicFailureError

    calls = {"n": 0}

    def proposer(candidate, reflective_dataset, components_to_update):
        calls["n"] += 1
        raise ValueError(f"cannot parse the reflection (attempt {calls['n']})")

    splits = small_splits(routing)
    opt = TurboGEPA(routing.metric, max_metric_calls=200, instruction_proposer=proposer, num_threads=4)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"), dspy.context(lm=make_student_lm(seed=0)), \
            pytest.raises(SystemicFailureError, match="proposer_error"):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    raised = [r for r in caplog.records if r.getMessage().startswith("The instruction proposer raised")]
    assert calls["n"] >= 2 and len(raised) == calls["n"]
    assert [r.levelno for r in raised].count(logging.WARNING) == 1
    assert "attempt 1" in next(r for r in raised if r.levelno == logging.WARNING).getMessage()


def test_a_reflection_served_from_dspys_cache_counts_as_a_call_but_costs_nothing(routing, monkeypatch):
    """dspy.LM caches by default, so a rerun's reflections are cache hits. reflection_calls counts every
    reflection LM call, a cache hit included (documented; the paid-no-op stop reads it, and a cached
    reflection that rebuilt a known candidate rebuilds it again); tokens and cost count only what was paid."""
    from dspy.clients.cache import Cache

    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True,
                                             disk_cache_dir=None, memory_max_entries=10_000))
    runs = []
    for _ in range(2):
        reflection_lm = make_reflection_lm(seed=0, cache=True, temperature=1.0)
        program, _ = _compile(routing, routing.metric, budget=80, reflection_lm=reflection_lm)
        stats = program.detailed_results.run_stats
        runs.append((stats["reflection_calls"], sim_engine(reflection_lm).calls, stats["reflection_tokens"]["prompt"]))
    (first_counted, first_real, first_tokens), (second_counted, second_real, second_tokens) = runs
    assert first_counted == first_real > 0 and first_tokens > 0
    assert second_real == 0 and second_counted == first_counted and second_tokens == 0


def test_a_custom_proposer_that_keeps_rebuilding_a_known_candidate_stops_the_run_soon(routing):
    """A proposer calling its vendor's SDK directly pays for calls no DSPy callback sees. Repeating a
    known text, it made 212 calls on a 100-call budget (31 metric calls), counted as free no-ops; it
    must count as paid and stop the run after max_paid_noop_mutations (25) of them, as a DSPy LM does."""
    calls = {"n": 0}

    def proposer(candidate, reflective_dataset, components_to_update):
        calls["n"] += 1  # a paid request to an external LLM, made without dspy.LM
        return dict.fromkeys(components_to_update, "Route the support ticket to a single queue label.")

    splits = small_splits(routing, n_train=12, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=100, instruction_proposer=proposer, num_threads=4,
                    track_stats=True, seed=0)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    results = program.detailed_results
    assert results.stop_reason == "no_progress_possible"
    # 25 in a row, plus what was already in flight when the 25th committed (siblings included)
    assert 25 <= calls["n"] <= 25 + 2 * opt.max_sibling_reflections * 4



def _context_window(limit):
    """A reflection LM whose context window holds ``limit`` prompt tokens (counted as the simulator counts
    them): a longer prompt is refused as a real provider refuses it (dspy.lm15.ContextLengthError, what
    DSPy's native client raises for OpenAI's context_length_exceeded). Records what it read."""
    from dspy import lm15

    from dspy_turbogepa.testing.fake_lm import request_messages
    from dspy_turbogepa.testing.responder import count_prompt_tokens

    seen = {"refused": 0, "examples_answered": []}

    def before_call(request):
        messages = request_messages(request)
        used = count_prompt_tokens(messages)
        if used > limit:
            seen["refused"] += 1
            raise lm15.ContextLengthError(f"maximum context length is {limit} tokens, the prompt has {used}",
                                          status=400)
        seen["examples_answered"].append(sum(m["content"].count('"Inputs"') for m in messages))

    return make_reflection_lm(seed=0, before_call=before_call), seen


def test_a_reflection_longer_than_the_reflection_lms_context_window_is_asked_again_with_fewer_examples(
        routing, caplog):
    """A reflection reads up to minibatch + scouts + reused failures (5-8 here, about 1,100 tokens). With a
    window of 800 tokens every such prompt was refused, each failed reflection counted as the proposer's
    failure, and the run stopped as systemic where dspy.GEPA, reading 3, would have run. Now a refused
    reflection is asked again with fewer examples, and later ones start from what was learned to fit."""
    reflection_lm, seen = _context_window(800)
    splits = small_splits(routing, n_train=30, n_val=16)
    opt = TurboGEPA(routing.metric, max_metric_calls=150, reflection_lm=reflection_lm, num_threads=8,
                    track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), caplog.at_level("WARNING"):
        dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    answered = seen["examples_answered"]
    assert seen["refused"] >= 2 and answered  # the first reflection's bisection takes two refusals here
    assert max(answered) >= 2  # halved by size, not cut straight down to one example
    assert seen["refused"] < len(answered)  # later reflections start from what fitted, not from a refusal each
    assert max(dr.val_aggregate_scores) >= dr.val_aggregate_scores[0] + 0.3  # the run learned from what fit
    assert dr.run_stats["reflective_records_skipped"]["context_window"] >= 1
    assert "proposer_error" not in dr.run_stats["proposal_skips"]
    warned = [r.getMessage() for r in caplog.records if "longer than its context window" in r.getMessage()]
    assert len(warned) == 1 and "To fix" not in warned[0]  # once per predictor, on one line (no lm15 advice list)


@pytest.mark.parametrize("perfect_score", [1.0, None])
def test_the_window_plan_knows_the_metrics_perfect_score(routing, monkeypatch, perfect_score):
    """The example every reflection shows under a tight window is a failure by the metric's perfect_score:
    the compile hands it to the plan (None, unknown, when the user passed None)."""
    import dspy_turbogepa.proposers.reflection as reflection_module

    seen_perfect: list[float | None] = []
    real_plan = reflection_module.plan

    def recording_plan(instructions, examples, budget, perfect=None):
        seen_perfect.append(perfect)
        return real_plan(instructions, examples, budget, perfect)

    monkeypatch.setattr(reflection_module, "plan", recording_plan)
    reflection_lm, _ = _context_window(800)
    splits = small_splits(routing, n_train=30, n_val=16)
    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=8,
                    perfect_score=perfect_score, skip_perfect_score=perfect_score is not None)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert seen_perfect and set(seen_perfect) == {perfect_score}


def test_a_reflection_lm_whose_window_cannot_hold_one_example_stops_the_run_saying_so(routing):
    from dspy_turbogepa.engine.errors import SystemicFailureError

    reflection_lm, seen = _context_window(300)  # the proposer's instructions alone are ~500 tokens
    splits = small_splits(routing, n_train=30, n_val=16)
    opt = TurboGEPA(routing.metric, max_metric_calls=150, reflection_lm=reflection_lm, num_threads=8)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), \
            pytest.raises(SystemicFailureError, match="even 1 example of 'route' is longer than the reflection LM's "
                                                      "context window"):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert not seen["examples_answered"]


def test_what_a_reflection_shows_within_a_window_failures_first_in_their_order():
    from dspy_turbogepa.proposers.context_fit import choose

    scores, sizes = [1.0, 0.0, 0.5, 0.0, 1.0], [100, 100, 100, 100, 100]
    assert choose(scores, sizes, None) == [0, 1, 2, 3, 4]  # no refusal yet: everything, as before
    assert choose(scores, sizes, 200) == [1, 3]  # the two failures, in the order the engine gave them
    assert choose(scores, sizes, 300) == [1, 2, 3]  # then the partial one, before solved examples
    assert choose(scores, [100, 900, 100, 100, 100], 300) == [0, 2, 3]  # a failure too long is passed over
    assert choose(scores, [500, 900, 400, 700, 600], 300) == [2]  # nothing fits: the shortest failure
    assert choose(scores, [50, 900, 400, 700, 60], 30) == [2]  # ... not a shorter solved example


def test_a_reflection_under_a_tight_window_is_shown_a_failure_not_only_a_solved_example():
    """Each predictor's guaranteed example was its shortest, whatever its score: with the failures the
    long ones, a tight window gave a prompt showing one solved example, paid for and nothing to fix."""
    from dspy_turbogepa.proposers.context_fit import Example, plan

    examples = {"qa": [Example(1.0, 100), Example(0.0, 900), Example(0.0, 950)]}
    assert plan({"qa": 200}, examples, None) == {"qa": [0, 1, 2]}
    assert plan({"qa": 200}, examples, 1_100) == {"qa": [1]}  # the shortest failure fits
    assert plan({"qa": 200}, examples, 700) == {"qa": [1]}  # even past the budget: the floor is a failure
    assert plan({"qa": 200}, examples, 1_500) == {"qa": [0, 1]}  # the solved one only beside a failure
    alike = {"qa": [Example(0.0, 300), Example(0.0, 100)]}
    assert plan({"qa": 10}, alike, 50) == {"qa": [1]}  # all scored alike: the shortest
    # two failures, a short partial one and a long one: the short one is a failure too (below the perfect
    # score), not only the one below the best score shown (that made the smallest prompt the long one)
    partial = {"qa": [Example(0.3, 100), Example(0.0, 5_000)]}
    assert plan({"qa": 200}, partial, 900, perfect=1.0) == {"qa": [0]}
    assert plan({"qa": 200}, {"qa": [Example(1.0, 100), Example(0.3, 900)]}, 700, perfect=1.0) == {"qa": [1]}
    # a metric scored past perfect_score (0-10 with the default 1.0): below the best shown, as without one
    assert plan({"qa": 10}, {"qa": [Example(5.0, 100), Example(9.0, 50)]}, 20, perfect=1.0) == {"qa": [0]}


def test_a_units_size_is_shared_so_a_predictor_whose_examples_fit_keeps_them_all():
    from dspy_turbogepa.proposers.context_fit import Example, plan

    long, short = [Example(0.0, 6_000)] * 8, [Example(0.0, 1_000)] * 8
    assert plan({"a": 10, "b": 10}, {"a": long, "b": short}, None) == {"a": list(range(8)), "b": list(range(8))}
    shown = plan({"a": 10, "b": 10}, {"a": long, "b": short}, 28_000)
    assert shown["b"] == list(range(8)) and len(shown["a"]) == 3  # b whole; a gets what b leaves
    # an instruction longer than an equal share: each predictor first gets its smallest prompt
    shown = plan({"a": 5_000, "b": 10}, {"a": [Example(0.0, 1_000)], "b": [Example(0.0, 342)] * 10}, 6_400)
    assert shown == {"a": [0], "b": [0]}
    assert plan({"a": 5_000, "b": 10}, {"a": [Example(0.0, 1_000)], "b": [Example(0.0, 342)] * 10}, 7_100) == {
        "a": [0], "b": [0, 1, 2]}


def test_a_refusal_is_learned_per_predictor_and_in_size_so_one_long_example_does_not_starve_the_rest():
    from dspy_turbogepa.proposers.context_fit import ContextFit, choose

    fit, a = ContextFit(), ("a",)
    fit.fitted(a, 30_000)  # fits before any refusal are remembered: nothing is cut until one
    assert fit.budget(a) is None
    fit.refused(a, 110_000)  # a 90,000-character example beside two of 10,000 (and the instruction)
    assert fit.budget(("b",)) is None  # another predictor is not cut
    assert fit.budget(a) == 70_000  # bisected between what fitted and what was refused
    fit.refused(a, 200_000)  # a stale, larger refusal from another thread changes nothing
    assert fit.budget(a) == 70_000
    assert choose([0.0] * 5, [11_000] * 5, fit.budget(a)) == list(range(5))  # five failures of 11,000 fit
    fit.fitted(a, 60_000)
    assert fit.budget(a) == 85_000
    fit.refused(a, 50_000)  # the window is smaller now: what fitted above it is forgotten
    assert fit.budget(a) == 25_000
    fit.fitted(a, 55_000)  # a prompt above the refusal fitted: the refused one was denser, move it up
    assert fit.budget(a) == 55_000 and fit.known_fit(a) == 55_000


def test_a_proposer_asked_with_every_predictor_shares_the_size_so_a_short_predictor_keeps_its_examples():
    """A custom proposer gets every predictor in one call. A refusal caused by one predictor's long
    examples cut the others too, with every refusal, for the rest of the run."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    asked = []

    def proposal_fn(candidate, reflective_dataset, components_to_update):  # one LM prompt per predictor
        asked.append({name: len(records) for name, records in reflective_dataset.items()})
        if sum(len(str(r)) for r in reflective_dataset["a"]) > 20_000:
            raise dspy.ContextWindowExceededError(model="m", message="maximum context length exceeded")
        return {name: candidate[name] + " more" for name in components_to_update}

    def records(size):
        return [(i, {"Inputs": {"x": "y" * size}, "Feedback": "wrong"}) for i in range(8)]

    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    outcome = proposer._propose({"a": "A", "b": "B"}, {"a": records(6_000), "b": records(1_000)}, [0.0] * 8,
                                ["a", "b"])
    later = proposer._propose({"a": "A", "b": "B"}, {"a": records(6_000), "b": records(1_000)}, [0.0] * 8,
                              ["a", "b"])
    proposer.close()
    assert outcome.skipped is None and later.skipped is None
    assert all(call["b"] == 8 for call in asked)  # b's examples fit whole: never cut
    answered = [call["a"] for call in asked if call["a"] * 6_040 <= 20_000]
    assert answered[0] == 3  # what b leaves goes to a: the most that fits, on the first retry already
    assert answered[-1] >= 2  # and not much less on the next reflection


def test_a_multi_predictor_call_is_cut_to_what_fits_even_when_an_instruction_is_long():
    """With one predictor's instruction longer than its share, the other's examples were cut to nothing
    and the first kept its shortest example above the budget: the prompt never got smaller, and the
    reflection gave up (and every later one) although a shorter prompt fitted."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    sizes = []

    def proposal_fn(candidate, reflective_dataset, components_to_update):  # one joint prompt
        size = sum(map(len, candidate.values())) + sum(len(str(r)) for rs in reflective_dataset.values() for r in rs)
        sizes.append(size)
        if size > 6_600:
            raise dspy.ContextWindowExceededError(model="m", message="maximum context length exceeded")
        return {name: candidate[name] + " more" for name in components_to_update}

    def records(n, size):
        return [(i, {"Inputs": {"x": "y" * size}, "Feedback": "wrong"}) for i in range(n)]

    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    parent = {"a": "i" * 5_000, "b": "B"}
    outcomes = [proposer._propose(parent, {"a": records(1, 1_000), "b": records(10, 300)}, [0.0] * 10, ["a", "b"])
                for _ in range(3)]
    proposer.close()
    assert [o.skipped for o in outcomes] == [None, None, None]
    assert sizes[0] > 6_600 >= sizes[1]  # the first retry already fits
    # later reflections probe between what fitted and what was refused: at most one refusal each
    assert sum(size > 6_600 for size in sizes) <= len(outcomes) + 1


@pytest.mark.parametrize("n_examples, fits_meanwhile, max_calls", [
    # a sparser prompt of another reflection fitted: the retry asked a larger prompt, then the refused
    # one again, as often as such fits came
    (11, lambda chars: 40_000, 4),
    # another reflection fitted just below each refusal: one call per example (38 for 40), not log2(40) + 2
    (40, lambda chars: chars - 1, 8),
], ids=["larger-fit", "fit-just-below"])
def test_what_other_reflections_learn_meanwhile_never_sends_a_reflection_back_up(n_examples, fits_meanwhile,
                                                                                  max_calls):
    """Between a reflection's refusal and its retry, the shared sizes move with other reflections' fits;
    each retry still halves this reflection's own gap."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    sizes = []

    def proposal_fn(candidate, reflective_dataset, components_to_update):
        size = len(candidate["p"]) + sum(len(str(r)) for r in reflective_dataset["p"])
        sizes.append(size)
        if size > 10_000:
            raise dspy.ContextWindowExceededError(model="m", message="maximum context length exceeded")
        return {"p": candidate["p"] + " more"}

    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    learn = proposer._fit.refused

    def refused_then_another_fits(unit, chars):
        learn(unit, chars)
        proposer._fit.fitted(unit, fits_meanwhile(chars))

    proposer._fit.refused = refused_then_another_fits
    dataset = {"p": [(i, {"Inputs": {"x": "y" * 3_000}, "Feedback": "wrong"}) for i in range(n_examples)]}
    outcome = proposer._propose({"p": "x"}, dataset, [0.0] * n_examples, ["p"])
    proposer.close()
    assert outcome.skipped is None and len(sizes) <= max_calls
    assert all(later < earlier for earlier, later in zip(sizes, sizes[1:]))

def test_a_parent_with_a_very_long_instruction_does_not_cut_later_reflections_on_short_ones():
    """The size learned is the instruction's and the examples' together: a refusal caused by one parent's
    70,000-character instruction must not leave every later parent one example."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    window = 40_000
    asked = []

    def proposal_fn(candidate, reflective_dataset, components_to_update):
        size = len(candidate["p"]) + sum(len(str(r)) for r in reflective_dataset["p"])
        asked.append((len(candidate["p"]), len(reflective_dataset["p"])))
        if size > window:
            raise dspy.ContextWindowExceededError(model="m", message="maximum context length exceeded")
        return {"p": candidate["p"] + " more"}

    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    dataset = {"p": [(i, {"Inputs": {"x": "y" * 2_000}, "Feedback": "wrong"}) for i in range(8)]}
    long_parent = proposer._propose({"p": "z" * 70_000}, dataset, [0.0] * 8, ["p"])
    assert long_parent.skipped == "proposer_error" and "even 1 example" in long_parent.message
    asked.clear()
    short_parent = proposer._propose({"p": "short"}, dataset, [0.0] * 8, ["p"])
    proposer.close()
    assert short_parent.skipped is None and asked == [(5, 8)]  # every example, in one call


def test_dspys_proposer_is_asked_per_predictor_so_a_refusal_for_one_neither_repeats_nor_cuts_another():
    """dspy's InstructionProposer calls the LM once per predictor: asked with both at once, a refusal of
    the second threw away the first's answer, and the retry cut and paid for the first again."""
    from dspy import lm15

    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder  # noqa: F401 - the type used below
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer
    from dspy_turbogepa.testing.fake_lm import request_messages

    calls = []

    def before_call(request):
        text = "\n".join(m["content"] for m in request_messages(request))
        which = "a" if "Instruction A" in text else "b"
        calls.append((which, text.count('"Inputs"')))
        if len(text) > 6_000:
            calls[-1] += ("refused",)
            raise lm15.ContextLengthError("maximum context length exceeded", status=400)

    def record(i, size):
        return {"Inputs": {"x": f"{i} " + "y" * size}, "Generated Outputs": {"z": "wrong"}, "Feedback": "Wrong."}

    dataset = {"a": [(i, record(i, 50)) for i in range(4)], "b": [(i, record(i, 1_500)) for i in range(4)]}
    proposer = ReflectiveProposer(None, dspy.teleprompt.gepa.InstructionProposer(), None, max_workers=1)
    with dspy.context(lm=make_reflection_lm(seed=0, before_call=before_call)):
        outcome = proposer._propose({"a": "Instruction A", "b": "Instruction B"}, dataset, [0.0] * 4, ["a", "b"])
    proposer.close()
    assert outcome.skipped is None and set(outcome.texts) == {"a", "b"}
    assert [c for c in calls if c[0] == "a"] == [("a", 4)]  # asked once, with every example
    b_calls = [c for c in calls if c[0] == "b"]
    assert b_calls[0] == ("b", 4, "refused") and len(b_calls[-1]) == 2 and 1 <= b_calls[-1][1] < 4
    assert proposer._fit.left_out == 4 - b_calls[-1][1]


def test_a_refusal_is_warned_about_once_per_predictor(caplog):
    from dspy import lm15

    from dspy_turbogepa.proposers.reflection import ReflectiveProposer
    from dspy_turbogepa.testing.fake_lm import request_messages

    def before_call(request):
        if len("\n".join(m["content"] for m in request_messages(request))) > 6_000:
            raise lm15.ContextLengthError("maximum context length exceeded", status=400)

    def record(i):
        return (i, {"Inputs": {"x": f"{i} " + "y" * 1_500}, "Generated Outputs": {"z": "wrong"}, "Feedback": "Wrong."})

    dataset = {"a": [record(i) for i in range(4)], "b": [record(i) for i in range(4)]}
    proposer = ReflectiveProposer(None, dspy.teleprompt.gepa.InstructionProposer(), None, max_workers=1)
    with dspy.context(lm=make_reflection_lm(seed=0, before_call=before_call)), caplog.at_level("WARNING"):
        for _ in range(3):
            proposer._propose({"a": "Instruction A", "b": "Instruction B"}, dataset, [0.0] * 4, ["a", "b"])
    proposer.close()
    warned = [r.getMessage() for r in caplog.records if "longer than its context window" in r.getMessage()]
    assert len(warned) == 2 and "'a'" in warned[0] and "'b'" in warned[1]


def test_a_reflection_refused_as_too_long_is_not_asked_again_once_the_run_stops():
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    calls = []

    def proposal_fn(candidate, reflective_dataset, components_to_update):
        calls.append(len(reflective_dataset["p"]))
        proposer.stop()  # the run stops while this call is on the wire
        raise dspy.ContextWindowExceededError(model="m", message="maximum context length exceeded")

    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    dataset = {"p": [(i, {"Inputs": {"x": str(i)}, "Feedback": "wrong"}) for i in range(8)]}
    outcome = proposer._propose({"p": "x"}, dataset, [0.0] * 8, ["p"])
    proposer.close()
    assert calls == [8] and outcome.skipped == "proposer_error" and "run stopped" in outcome.message


@pytest.mark.parametrize("max_retries, max_elapsed_s, backoff_s", [
    (3, 60.0, 0.001),  # four 429s in one proposal: past its three retries
    (100, 0.3, 0.1),  # a's two backoffs (0.2-0.25 s) leave b too little of the 0.3 s for its two
], ids=["retries", "time"])
def test_dspys_proposer_shares_one_retry_policy_across_its_per_predictor_calls(max_retries, max_elapsed_s, backoff_s):
    """Asked one predictor at a time, each call had the whole policy to itself: two predictors could back
    off twice as long, and a proposal dspy.GEPA's policy would give up on went on."""
    from dspy import lm15

    from dspy_turbogepa.adapter.ratelimit import RetryPolicy
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer
    from dspy_turbogepa.testing.fake_lm import request_messages

    limited = {"a": 2, "b": 2}

    def before_call(request):
        which = "a" if "Instruction A" in "\n".join(m["content"] for m in request_messages(request)) else "b"
        if limited[which]:
            limited[which] -= 1
            raise lm15.RateLimitError("slow down", status=429, retry_after=0.0)

    policy = RetryPolicy(max_retries=max_retries, max_elapsed_s=max_elapsed_s, base_s=backoff_s, cap_s=backoff_s)
    proposer = ReflectiveProposer(None, dspy.teleprompt.gepa.InstructionProposer(), None, max_workers=1,
                                  rate_limit_policy=policy)
    record = {"Inputs": {"x": "1"}, "Generated Outputs": {"z": "wrong"}, "Feedback": "Wrong."}
    # DSPy's own retries off, as on the copy of the reflection LM a run uses
    with dspy.context(lm=make_reflection_lm(seed=0, before_call=before_call, num_retries=0)):
        outcome = proposer._propose({"a": "Instruction A", "b": "Instruction B"},
                                    {"a": [(0, record)], "b": [(0, record)]}, [0.0], ["a", "b"])
    proposer.close()
    assert outcome.skipped == "proposer_error" and proposer.rate_limit_stats()["rate_limit_gave_up"] == 1


def test_a_subclass_of_dspys_proposer_is_asked_with_every_predictor_at_once():
    """Its own __call__ may rewrite the predictors together: it gets them all, as dspy.GEPA gives them."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    seen = []

    class Joint(dspy.teleprompt.gepa.InstructionProposer):
        def __call__(self, candidate, reflective_dataset, components_to_update):
            seen.append((sorted(components_to_update), sorted(reflective_dataset)))
            return {name: candidate[name] + " (joint)" for name in components_to_update}

    proposer = ReflectiveProposer(None, Joint(), None, max_workers=1)
    record = {"Inputs": {"x": "1"}, "Feedback": "Wrong."}
    outcome = proposer._propose({"a": "A", "b": "B"}, {"a": [(0, record)], "b": [(0, record)]}, [0.0], ["a", "b"])
    proposer.close()
    assert outcome.skipped is None and seen == [(["a", "b"], ["a", "b"])]


def test_the_providers_messages_are_read_as_litellm_reads_them():
    """The list is a copy of litellm's (not imported: DSPy's native client never loads litellm); it must
    agree with the pinned litellm, vLLM's message aside."""
    from litellm.litellm_core_utils.exception_mapping_utils import ExceptionCheckers

    from dspy_turbogepa.adapter import ratelimit

    checker = ExceptionCheckers.is_error_str_context_window_exceeded
    theirs = {c for const in checker.__code__.co_consts if isinstance(const, tuple) for c in const}
    assert theirs == set(ratelimit._CONTEXT_WINDOW_MESSAGES) - {"is longer than the maximum model length"}
    messages = [*ratelimit._CONTEXT_WINDOW_MESSAGES, "Current length is 9000 while limit is 8192",
                "Maximum input length is 4096 tokens", "Invalid 'user': string too long. Expected a string with "
                "maximum length 64", "string_above_max_length: string too long. expected a string with maximum length",
                "unknown parameter: top_q", "Invalid 'logit_bias': too many tokens", "rate limit reached"]
    for message in messages:
        ours, theirs = ratelimit._says_context_window(message), ExceptionCheckers.is_error_str_context_window_exceeded(
            message)
        assert ours == theirs or message == "is longer than the maximum model length", message


class BadRequestError(Exception):
    """A user's own error of a common name: not the LM stack's."""


@pytest.mark.parametrize("make_error, expected", [
    (lambda: dspy.ContextWindowExceededError(model="m", message="too long"), True),  # a legacy LM raises it itself
    (lambda: __import__("dspy").lm15.ContextLengthError("too long", status=400), True),
    (lambda: __import__("litellm").ContextWindowExceededError("too long", model="m", llm_provider="openai"), True),
    # an OpenAI-compatible server that says it in the message only (code 400, as vLLM answers)
    (lambda: dspy.utils.exceptions.LMInvalidRequestError(
        model="m", message="This model's maximum context length is 2048 tokens. However, you requested 3000"), True),
    (lambda: dspy.utils.exceptions.LMInvalidRequestError(
        model="m", message="The prompt (5000 tokens) is longer than the maximum model length of 4096"), True),  # vLLM
    (lambda: dspy.utils.exceptions.LMInvalidRequestError(model="m", message="unknown parameter: top_q"), False),
    (lambda: dspy.utils.exceptions.LMInvalidRequestError(
        model="m", message="Invalid 'logit_bias': too many tokens, expected at most 300"), False),
    (lambda: BadRequestError("This model's maximum context length is 2048 tokens"), False),  # not the LM stack's
])
def test_which_errors_mean_a_prompt_longer_than_the_context_window(make_error, expected):
    from dspy_turbogepa.adapter.ratelimit import context_window_exceeded

    assert context_window_exceeded(make_error()) is expected


def test_a_reflection_failing_after_compile_is_done_with_it_logs_no_skip_warning(caplog):
    """A reflection call still on the wire when a systemic stop ends compile() fails once the server goes
    away (the test's server stops: a connection reset). Its "this proposal is skipped; further failures are
    counted" WARNING came after compile had raised, and made CI flaky: nothing is counted any more."""
    from dspy import lm15

    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    def proposal_fn(candidate, reflective_dataset, components_to_update):
        proposer.close()  # compile() raised (a systemic stop) while this call was on the wire
        raise lm15.TransportError("read failed: [Errno 104] Connection reset by peer")

    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    with caplog.at_level("DEBUG", logger="dspy_turbogepa"):
        outcome = proposer._propose({"p": "x"}, {"p": [(0, {"Inputs": {"x": "0"}, "Feedback": "wrong"})]}, [0.0],
                                    ["p"])
    assert outcome.skipped == "proposer_error"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r for r in caplog.records if "Connection reset" in r.getMessage()]  # still logged, at DEBUG
