"""log_dir: every finished evaluation and proposal is stored; a rerun resumes without paying again."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import functools
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import dspy
import pydantic
import pytest

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.store import RunStoreMismatchError
from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer
from dspy_turbogepa.testing.fake_lm import (
    make_reflection_lm,
    make_student_lm,
    request_messages,
    sim_engine,
)

from helpers import CountingMetric, FailsOnTracking, small_splits

SCRIPT = Path(__file__).parent / "scripts" / "slow_compile.py"


def _compile(task, budget, log_dir=None, splits=None, seed=0):
    splits = splits or small_splits(task, n_train=30, n_val=16)
    student, reflector = make_student_lm(seed=0, noise=0.0), make_reflection_lm(seed=0)
    metric = CountingMetric(task.metric)
    opt = TurboGEPA(metric, max_metric_calls=budget, reflection_lm=reflector, num_threads=6, track_stats=True,
                    log_dir=str(log_dir) if log_dir else None, seed=seed)
    with dspy.context(lm=student):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    return program, metric.scoring, sim_engine(student).calls, sim_engine(reflector).calls


def _instructions(program):
    return {n: p.signature.instructions for n, p in program.named_predictors()}


def test_rerun_and_extension_never_pay_twice(pipeline, tmp_path):
    full, full_calls, full_lm, full_refl = _compile(pipeline, 300)
    first, calls1, lm1, refl1 = _compile(pipeline, 150, tmp_path)
    # same arguments again: the run had reached its budget, so the best program comes back at once
    again, calls_again, lm_again, refl_again = _compile(pipeline, 150, tmp_path)
    assert (calls_again, lm_again, refl_again) == (0, 0, 0)
    assert _instructions(again) == _instructions(first)
    # A larger budget continues the run (dspy.GEPA's way to extend it). The width, the siblings and the
    # scouts depend on the budget left, so it plans with the first session's budget until the search
    # under it ends, then with its own: every stored evaluation is asked for again and served from the
    # store (planned with 300 from the start, it reused 44 of the 167 and paid 124 again).
    extended, calls2, lm2, refl2 = _compile(pipeline, 300, tmp_path)
    assert 0 < calls2 < full_calls and refl2 < full_refl
    assert lm2 <= 2 * calls2  # two predictors: only executed evaluations reach the student LM
    dr = extended.detailed_results
    # the budget counts the stored evaluations as spent, as the first run did (the run may also end sooner,
    # with the task solved everywhere it looks)
    assert dr.total_metric_calls == calls1 + calls2  # what the log_dir paid for, in both sessions
    assert dr.run_stats["metric_calls_replayed"] == calls1
    assert dr.total_metric_calls >= 300 or dr.stop_reason == "no_progress_possible"
    first_texts = [_instructions(c) for c in first.detailed_results.candidates]
    assert all(t in [_instructions(c) for c in dr.candidates] for t in first_texts)  # its best among them
    assert dr.val_aggregate_scores[dr.best_idx] >= first.detailed_results.val_aggregate_scores[
        first.detailed_results.best_idx]


def test_an_extended_run_replays_every_session_and_resumes_its_own_plan(tmp_path, caplog):
    """Each session plans with the earlier sessions' budgets in turn, so a third session with the second's
    budget replays the second exactly (paying nothing), and a smaller budget replays what it can reach
    of the stored plan instead of planning a narrower one of its own."""
    from dspy_turbogepa.testing import TASKS

    pricing = TASKS["pricing"]
    first, calls1, _, _ = _compile(pricing, 100, tmp_path)
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"):
        extended, calls2, _, _ = _compile(pricing, 250, tmp_path)
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "other search settings" in m]
    assert any("max_metric_calls 100 -> 250: the search replays" in m for m in said)
    assert any("an earlier session's budget (100 metric calls) ended it; it goes on planning with 250" in m
               for m in said)
    dr = extended.detailed_results
    assert dr.run_stats["metric_calls_replayed"] == calls1 and calls2 > 0
    assert dr.stop_reason == "max_metric_calls" and 250 <= dr.total_metric_calls == calls1 + calls2
    again, calls3, lm3, refl3 = _compile(pricing, 250, tmp_path)
    assert (calls3, lm3, refl3) == (0, 0, 0)
    assert _instructions(again) == _instructions(extended)
    assert [_instructions(c) for c in again.detailed_results.candidates] == [_instructions(c) for c in dr.candidates]
    smaller, calls4, _, _ = _compile(pricing, 180, tmp_path)
    # it replays the stored plan up to its own limit (where refused mutations are planned again from later
    # views: a few may be new work; none here)
    assert smaller.detailed_results.run_stats["metric_calls_replayed"] >= 180 - calls4 and calls4 < 30


def test_a_store_whose_last_session_planned_with_its_own_budget_alone_replays_that_plan(tmp_path, monkeypatch):
    """A review: the budgets were rebuilt from every earlier session's, so a store written before the
    sessions recorded theirs (where each planned with its own budget alone) was replayed with a plan it
    never ran: a rerun with the same budget paid 150 evaluations and returned a worse program. Each
    session now records the budgets it planned with; one without that record planned with its own."""
    from dspy_turbogepa import teleprompter
    from dspy_turbogepa.testing import TASKS

    routing = TASKS["routing"]
    _compile(routing, 100, tmp_path)
    with monkeypatch.context() as old_version:  # plans with its own budget alone, records nothing
        old_version.setattr(teleprompter, "earlier_budgets", lambda store: [])
        second, _, _, _ = _compile(routing, 250, tmp_path)
    with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
        conn.execute("DELETE FROM events WHERE kind = 'plan_budgets'")
    conn.close()
    again, calls, lm, refl = _compile(routing, 250, tmp_path)
    assert (calls, lm, refl) == (0, 0, 0)
    assert _instructions(again) == _instructions(second)


def test_changed_data_or_seed_under_the_same_log_dir_is_refused(routing, tmp_path):
    _compile(routing, 40, tmp_path)
    other = small_splits(routing, n_train=30, n_val=16, data_seed=5)
    with pytest.raises(RunStoreMismatchError, match="valset"):
        _compile(routing, 40, tmp_path, splits=other)
    with pytest.raises(RunStoreMismatchError, match="seed"):
        _compile(routing, 40, tmp_path, seed=9)
    # a different student (here: another seed instruction) under the same log_dir is refused too
    student = make_student_lm(seed=0, noise=0.0)
    splits = small_splits(routing, n_train=30, n_val=16)
    opt = TurboGEPA(CountingMetric(routing.metric), max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0),
                    num_threads=2, log_dir=str(tmp_path))
    with dspy.context(lm=student), pytest.raises(RunStoreMismatchError, match=r"run: student changed"):
        opt.compile(routing.make_program({"route": "Answer with a queue label."}), trainset=splits.train,
                    valset=splits.val)


def test_a_rerun_that_would_read_wrong_stored_scores_is_refused(routing, tmp_path):
    """Stored scores belong to one metric, one set of LMs and one student state (demos included); a
    rerun with another would report the old scores as its own (it did, with 0 LM calls). A rotated
    API key is the same run."""
    splits = small_splits(routing, n_train=30, n_val=16)

    def compile_with(metric=routing.metric, student_kw=None, reflector_kw=None, program=None):
        opt = TurboGEPA(metric, max_metric_calls=40, num_threads=2, log_dir=str(tmp_path), verbose=False,
                        reflection_lm=make_reflection_lm(seed=0, **(reflector_kw or {})))
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0, **(student_kw or {}))):
            return opt.compile(program or routing.make_program(), trainset=splits.train, valset=splits.val)

    compile_with()
    compile_with()  # the same run: resumed

    def zero(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 0.0

    with_demos = routing.make_program()
    next(iter(with_demos.named_predictors()))[1].demos = [splits.train[0]]
    for kwargs, changed, detail in [
        ({"metric": zero}, "metric", None), ({"student_kw": {"temperature": 0.9}}, "task_lm", "temperature=0.9"),
        ({"program": with_demos}, "student", None),
    ]:  # a changed reflection LM resumes: no stored score depends on it (run_store.md; test_docs_examples)
        with pytest.raises(RunStoreMismatchError, match=rf"run: {changed} changed") as info:
            compile_with(**kwargs)
        if detail:  # an LM's change is named, not only its hash ("stored 56f49cf2ee72 -> now fe54027cbde2")
            message = str(info.value)
            assert f"{changed} (stored model=" in message and "-> now model=" in message and detail in message, \
                message


def test_the_readable_lm_in_a_refusal_keeps_endpoint_tokens_out():
    """The readable form of an LM (stored in the session meta, shown when a log_dir is refused) showed
    a gateway token that is not key-shaped enough for masking (a UUID path part, a short query value);
    the endpoint is shown as logs and MLflow show it, tokens as digests (two endpoints still differ)."""
    from dspy_turbogepa.adapter.run_identity import readable_lm

    uuid = "4f3c2b1a-9d8e-4f7a-b6c5-1234567890ab"
    a = readable_lm(dspy.LM("openai/m", api_base=f"https://gw.local/proxy/{uuid}/v1?token=abc1234", cache=False))
    b = readable_lm(dspy.LM("openai/m", api_base="https://gw.local/proxy/other-token-0000-1111/v1", cache=False))
    assert uuid not in a and "abc1234" not in a and "gw.local" in a and "model=openai/m" in a
    assert a != b


@pytest.mark.http
def test_fix_the_key_and_rerun_does_not_replay_the_auth_failures(routing, tmp_path, caplog):
    """A bad key stops the run (SystemicFailureError: 'fix ... and run again'). The rerun with the right
    key under the same log_dir must evaluate for real: the stored LMAuthError rows say nothing about
    the program (they were replayed as its scores)."""
    cfg = SimConfig(models=(ModelConfig("sim-student"), ModelConfig("sim-reflector", "reflector")), api_key="good")
    splits = small_splits(routing, n_train=12, n_val=8, n_test=0)

    def compile_with(key: str, log_dir: Path):
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key=key, cache=False)
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="good", cache=False)
        opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=reflector, num_threads=4,
                        log_dir=str(log_dir), verbose=False, track_stats=True)
        with dspy.context(lm=student):
            return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)

    def student_requests() -> int:
        return srv.stats()["models"]["sim-student"]["requests"]

    with SimServer(cfg, seed=0) as srv:
        with pytest.raises(SystemicFailureError) as info:
            compile_with("bad", tmp_path / "run")
        # which fixes can reuse the log_dir (a fixed metric is refused with "metric changed" otherwise)
        assert "resumes this run" in str(info.value) and "new log_dir" in str(info.value)
        with caplog.at_level(logging.INFO, logger="dspy_turbogepa.teleprompter"):
            resumed = compile_with("good", tmp_path / "run").detailed_results
        assert "nothing stored there can be replayed" in caplog.text  # not "0 finished evaluations ..."
        before = student_requests()
        again = compile_with("good", tmp_path / "run").detailed_results  # the run is finished: replayed whole
        assert student_requests() == before  # the redone evaluations replaced the failed rows
        fresh = compile_with("good", tmp_path / "fresh").detailed_results
    assert resumed.val_aggregate_scores[0] == fresh.val_aggregate_scores[0] > 0
    assert again.val_aggregate_scores == resumed.val_aggregate_scores
    assert not resumed.run_stats["failures"]


def test_a_programs_own_error_named_like_an_lm_error_is_replayed(routing, tmp_path):
    """Only the evaluator's 'LM service failed' mark decides what a resume runs again: a program's own
    NotFoundError (a retrieval miss) is data, replayed like any score (it was re-run on every resume)."""

    class NotFoundError(Exception):
        pass

    class LooksUpAfterRouting(dspy.Module):  # calls the LM, then its own lookup fails on some tickets
        def __init__(self):
            super().__init__()
            self.inner = routing.make_program()

        def forward(self, ticket):
            pred = self.inner(ticket=ticket)
            if "tracking" in ticket.lower():
                raise NotFoundError("no CRM record")
            return pred

    splits = small_splits(routing, n_train=30, n_val=16)
    program = LooksUpAfterRouting()

    def compile_once():
        student = make_student_lm(seed=0, noise=0.0)
        opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=2, log_dir=str(tmp_path), verbose=False, track_stats=True)
        with dspy.context(lm=student):
            out = opt.compile(program, trainset=splits.train, valset=splits.val)
        return out, sim_engine(student).calls

    first, _ = compile_once()
    assert first.detailed_results.run_stats["failures"]["program_error"] > 0
    again, calls = compile_once()
    assert calls == 0
    # the replayed failures are still reported (summary.json and MLflow read these counts)
    assert again.detailed_results.run_stats["failures"] == first.detailed_results.run_stats["failures"]
    assert again.detailed_results.run_stats["metric_calls_replayed"] == first.detailed_results.total_metric_calls


def test_a_fixed_program_under_the_same_log_dir_is_refused_not_replayed(routing, tmp_path):
    """Stored scores belong to the program's code too: after 'fix the program and run again' the old
    failures must not be read back as the fixed program's."""
    splits = small_splits(routing, n_train=30, n_val=16)

    def compile_with(program):
        opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=2, log_dir=str(tmp_path), verbose=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            return opt.compile(program, trainset=splits.train, valset=splits.val)

    compile_with(FailsOnTracking(routing.make_program()))

    class FailsOnTrackingFixed(FailsOnTracking):
        def forward(self, ticket):
            return self.inner(ticket=ticket)

    with pytest.raises(RunStoreMismatchError, match=r"run: student changed"):
        compile_with(FailsOnTrackingFixed(routing.make_program()))


def test_the_run_key_of_examples_holding_plain_objects_is_stable(routing):
    """str() of a plain object holds its memory address: the same data must give the same key in
    every process (a rerun was refused as 'a different run')."""
    from dspy_turbogepa.adapter.run_identity import run_key

    class Attachment:  # a user's own type in an example field, no __eq__, no JSON form
        def __init__(self, name):
            self.name = name

    def data(name):
        ex = dspy.Example(ticket="where is my parcel", queue="shipping", file=Attachment(name))
        return [ex.with_inputs("ticket")]

    key = run_key(routing.make_program(), data("a.pdf"), data("b.pdf"), 0, metric=routing.metric)
    assert key == run_key(routing.make_program(), data("a.pdf"), data("b.pdf"), 0, metric=routing.metric)
    assert key != run_key(routing.make_program(), data("c.pdf"), data("b.pdf"), 0, metric=routing.metric)


_SET_METRIC = """
import sys
sys.path.insert(0, sys.argv[1])
from dspy_turbogepa.adapter.run_identity import callable_identity
def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return float(str(pred.answer).lower() not in {"n/a", "none", "unknown", "?"})
print(callable_identity(metric))
"""


def test_a_metric_with_a_set_literal_has_the_same_key_in_every_process(tmp_path):
    """A set literal is a frozenset constant whose repr order follows the per-process string hash."""
    script = tmp_path / "m.py"
    script.write_text(_SET_METRIC)
    root = str(Path(__file__).resolve().parents[1])
    outs = {subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3, 4)}
    assert len(outs) == 1, outs


def test_the_run_key_tells_metrics_and_data_apart_and_survives_odd_values():
    import functools

    import numpy as np
    import pandas as pd
    import pydantic

    from dspy_turbogepa.adapter.run_identity import _hashable, callable_identity, lm_identity

    def by_answer(gold, pred, trace=None):
        return float(gold.answer == pred.answer)

    def by_label(gold, pred, trace=None):
        return float(gold.label == pred.label)

    assert callable_identity(by_answer).split(":")[1] != callable_identity(by_label).split(":")[1]

    def scored(gold, pred, trace=None, threshold=0.5):
        return 1.0

    assert callable_identity(functools.partial(scored, threshold=0.5)) != callable_identity(
        functools.partial(scored, threshold=0.9))

    class Answer(pydantic.BaseModel):
        text: str

    identity = lm_identity(dspy.LM("openai/m", response_format=Answer))
    assert identity["response_format"] == f"class {Answer.__module__}.{Answer.__qualname__}"

    big = pd.DataFrame({"x": range(1000)})
    changed = big.copy()
    changed.loc[500, "x"] = -1  # deep inside: str() of the frame would not show it
    assert _hashable(big) != _hashable(changed)
    assert _hashable(np.zeros(2000)) != _hashable(np.ones(2000))

    class Node:
        def __init__(self, name):
            self.name, self.parent, self.children = name, None, []

    root, leaf = Node("r"), Node("l")
    root.children.append(leaf)
    leaf.parent = root
    assert _hashable(root) == _hashable(root)  # a cycle ends in a marker, no RecursionError

    class Slotted:
        __slots__ = ("value",)

        def __init__(self, value):
            self.value = value

    assert _hashable(Slotted(1)) != _hashable(Slotted(2))


def test_the_run_key_sees_an_lms_model_and_settings_never_its_credentials():
    from dspy_turbogepa.adapter.run_identity import lm_identity

    a = dspy.LM("openai/m", api_key="sk-first0key0123456789", api_base="http://alice:pw1@127.0.0.1:9/v1")
    b = dspy.LM("openai/m", api_key="sk-second1key987654321", api_base="http://alice:pw2@127.0.0.1:9/v1")
    assert lm_identity(a) == lm_identity(b)  # a rotated key is the same run
    assert "pw1" not in json.dumps(lm_identity(a)) and "sk-first" not in json.dumps(lm_identity(a))
    assert lm_identity(dspy.LM("openai/m", temperature=0.2)) != lm_identity(dspy.LM("openai/m", temperature=0.9))
    assert lm_identity(dspy.LM("openai/m")) != lm_identity(dspy.LM("openai/other"))


def test_the_run_key_sees_how_an_lm_is_asked_and_what_code_answers() -> None:
    """model_type, the developer role, a custom engine and a user-written LM class change the answers,
    and a rerun with another of them replayed the old scores with 0 LM calls. A plain LM's key is what
    it was (each is keyed only where it differs from DSPy's default)."""
    from dspy_turbogepa.adapter.run_identity import lm_identity
    from dspy_turbogepa.testing.fake_lm import SimEngine

    plain = lm_identity(dspy.LM("openai/m"))
    assert set(plain) == {"class", "model", "api_base"}
    assert lm_identity(dspy.LM("openai/m", model_type="text")) != plain
    assert lm_identity(dspy.LM("openai/m", use_developer_role=True)) != plain
    from dspy_turbogepa.testing.responder import ResponderConfig

    def engine_lm(**kw):
        return dspy.LM("openai/m", engine=SimEngine("student", **kw))

    exact = lm_identity(engine_lm(seed=0))
    assert exact != plain
    assert exact != lm_identity(engine_lm(seed=7))
    assert exact != lm_identity(engine_lm(seed=0, config=ResponderConfig(noise=0.5)))  # what dump_state() holds
    assert exact == lm_identity(engine_lm(seed=0))  # the same engine in another object: the same run

    class LocalLM(dspy.BaseLM):
        def __init__(self, system_prompt: str, api_key: str) -> None:
            super().__init__(model="local")
            self.system_prompt, self.api_key, self.calls = system_prompt, api_key, 0

        def forward(self, prompt=None, messages=None, **kwargs):  # pragma: no cover - never called
            raise NotImplementedError

        def dump_state(self):  # DSPy's protocol for what a custom LM is, which saving it uses too
            return {**super().dump_state(), "system_prompt": self.system_prompt, "api_key": self.api_key}

    terse, chatty = LocalLM("Answer tersely.", "k1"), LocalLM("Explain at length.", "k1")
    assert lm_identity(terse) != lm_identity(chatty)
    class NeverInitialised(dspy.BaseLM):  # no BaseLM.__init__: DSPy's own dump_state() cannot run on it
        def __init__(self, system_prompt: str) -> None:
            self.model, self.system_prompt, self.history = "local", system_prompt, []

        def forward(self, prompt=None, messages=None, **kwargs):  # pragma: no cover - never called
            raise NotImplementedError

        def dump_state(self):
            return {"system_prompt": self.system_prompt}

    assert lm_identity(NeverInitialised("Answer tersely.")) != lm_identity(NeverInitialised("Explain at length."))
    # what DSPy's own dump_state() adds for it (how calls are sent, credentials) is left out, as for a plain LM
    sent_otherwise = LocalLM("Answer tersely.", "k1")
    sent_otherwise.cache, sent_otherwise.kwargs["aws_access_key_id"] = False, "ASIAROTATED0000000001"
    assert lm_identity(sent_otherwise) == lm_identity(terse)
    before = lm_identity(terse)
    terse.calls += 3  # run-time state: a second compile in the same process is the same run
    assert lm_identity(terse) == before == lm_identity(LocalLM("Answer tersely.", "sk-rotated0key0123456789"))
    assert "k1" not in json.dumps(lm_identity(terse))


def test_a_rotated_key_held_by_a_module_or_a_partial_metric_is_the_same_run() -> None:
    """A module's ``self.search_api_key = os.environ[...]`` and ``partial(score, api_key=...)`` or a
    client bound into a partial were keyed by the key's value: a rotated key refused the rerun as
    "student changed" / "metric changed", whose advice deletes the paid work."""
    from dspy_turbogepa.adapter.run_identity import callable_identity, run_key

    class Rag(dspy.Module):
        def __init__(self, key: str, k: int = 3) -> None:
            super().__init__()
            self.search_api_key, self.k = key, k
            self.answer = dspy.Predict("question -> answer")

        def forward(self, question):
            return self.answer(question=question)

    class Client:
        def __init__(self, api_key: str) -> None:
            self.api_key, self.base_url = api_key, "http://127.0.0.1:9"

    def score(gold, pred, trace=None, pred_name=None, pred_trace=None, api_key=None, judge=None):
        return 1.0

    data = [dspy.Example(question="q", answer="a").with_inputs("question")]
    old, new = "sk-old0key0123456789abcdef", "sk-new1key9876543210fedcba"
    # the same whether or not this session also has the key in its environment
    plain_key = "Qx7fK2mZp9LwT4vBn8Rc"  # no known key prefix: masked as an environment secret, or not
    without_env = callable_identity(functools.partial(score, api_key=plain_key))
    os.environ["TURBOGEPA_TEST_SERVICE_KEY"] = plain_key
    try:
        from dspy_turbogepa.redaction import env_secret_values

        assert plain_key in env_secret_values()
        assert callable_identity(functools.partial(score, api_key=plain_key)) == without_env
    finally:
        del os.environ["TURBOGEPA_TEST_SERVICE_KEY"]
    # what only looks like a credential by its name still counts: a special token, a short word
    assert callable_identity(functools.partial(score, eos_token="</s>")) != \
        callable_identity(functools.partial(score, eos_token="<|endoftext|>"))
    assert run_key(Rag(old), data, data, 0)["student"] == run_key(Rag(new), data, data, 0)["student"]
    assert run_key(Rag(old), data, data, 0)["student"] != run_key(Rag(old, k=5), data, data, 0)["student"]
    assert callable_identity(functools.partial(score, api_key=old)) == \
        callable_identity(functools.partial(score, api_key=new))
    assert callable_identity(functools.partial(score, judge=Client(old))) == \
        callable_identity(functools.partial(score, judge=Client(new)))
    assert callable_identity(functools.partial(score, judge=Client(old))) != \
        callable_identity(functools.partial(score, judge=None))


def test_a_failing_report_never_loses_the_program(routing, tmp_path, monkeypatch, caplog):
    import dspy_turbogepa.tracking.summary as summary

    def broken(*args, **kwargs):
        raise TypeError("a value summary.json cannot hold")

    monkeypatch.setattr(summary, "write_summary", broken)
    program, *_ = _compile(routing, 40, tmp_path)
    assert program.detailed_results.val_aggregate_scores  # compile returned its program
    assert "Could not write summary.json" in caplog.text


def test_log_dir_gets_summary_and_plots(routing, tmp_path, monkeypatch):
    import dspy_turbogepa.tracking.plots as plots

    drawn = []
    original = plots.plot_best_over_time
    monkeypatch.setattr(plots, "plot_best_over_time", lambda result, *a, **kw: drawn.append(result) or original(
        result, *a, **kw))
    program, *_ = _compile(routing, 80, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] and summary["result"]["candidates"]
    for name in ("best_over_time.svg", "lineage.svg"):
        assert (tmp_path / name).read_text().startswith("<svg ")
    # the metric-calls panel runs on to the end of the run, not to the last new best
    (result,) = drawn
    assert result.total_metric_calls == program.detailed_results.total_metric_calls


def test_nothing_secret_is_written(routing, tmp_path, monkeypatch):
    secret = "sk-test-SUPERSECRET-123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    splits = small_splits(routing, n_train=20, n_val=8)
    student = make_student_lm(seed=0, noise=0.0)
    reflector = dspy.LM("openai/sim-reflector", api_key=secret, api_base="http://127.0.0.1:9/v1", cache=False)

    def proposer(candidate, reflective_dataset, components_to_update):
        return {c: candidate[c] + " Disputes over charges go to payments." for c in components_to_update}

    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflector, instruction_proposer=proposer,
                    num_threads=2, log_dir=str(tmp_path), wandb_api_key=secret)
    with dspy.context(lm=student):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.http
def test_a_key_passed_to_an_lm_object_is_never_written(routing, tmp_path, caplog):
    """A key of no known shape, not in the environment, given as dspy.LM(api_key=...): an error that
    quotes it must not carry it into the run store, summary.json or our logs."""
    import logging

    from dspy_turbogepa.testing import SimServer

    key = "prov-0a9b8c7d6e5f4a3b2c1d"

    def quoting_error() -> Exception:  # a client error that echoes the key it was given
        return RuntimeError(f"401 from provider: key {dspy.settings.lm.kwargs['api_key']} is not allowed")

    def proposer(candidate, reflective_dataset, components_to_update):
        return {c: candidate[c] + " Disputes over charges go to payments." for c in components_to_update}

    splits = small_splits(routing, n_train=30, n_val=12)
    assert any("tracking" in ex.ticket.lower() for ex in splits.val)
    with SimServer("test", seed=0) as srv, caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key=key, cache=False)
        opt = TurboGEPA(routing.metric, max_metric_calls=80, reflection_lm=student, instruction_proposer=proposer,
                        num_threads=4, log_dir=str(tmp_path), track_stats=True)
        with dspy.context(lm=student):
            program = opt.compile(FailsOnTracking(routing.make_program(), quoting_error),
                                  trainset=splits.train, valset=splits.val)
    assert program.detailed_results.run_stats["failures"].get("program_error", 0) > 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in written)
    for path in written:
        assert key.encode() not in path.read_bytes(), path
    assert not [r for r in caplog.records if key in r.getMessage()]
    assert "***REDACTED***" in (tmp_path / "summary.json").read_text() or any(
        b"***REDACTED***" in p.read_bytes() for p in written
    )


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_credentials_in_the_lm_url_and_headers_are_never_written(routing, tmp_path, caplog, engine):
    """Keys given as http://user:KEY@host in api_base, or as an x-api-key / Authorization header, of no
    known shape and not in the environment: nothing written (run store, summary.json, plots, logs) may
    hold them, whether quoted by an error or kept in the run's endpoint statistics."""
    import logging

    url_key, header_key = "urlsecret0a9b8c7d6e5f4a3b", "hdr-0a9b8c7d6e5f4a3b2c1d"

    def quoting_error() -> Exception:  # a client error that echoes what it was configured with
        kw = dspy.settings.lm.kwargs
        return RuntimeError(f"cannot reach {kw['api_base']} with {kw['extra_headers']}")

    splits = small_splits(routing, n_train=30, n_val=12)
    with SimServer("test", seed=0) as srv, caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        student = dspy.LM("openai/sim-student", api_base=srv.base_url.replace("http://", f"http://alice:{url_key}@"),
                          api_key="anything", extra_headers={"x-api-key": header_key}, cache=False, **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), track_stats=True, verbose=False)
        with dspy.context(lm=student):
            program = opt.compile(FailsOnTracking(routing.make_program(), quoting_error),
                                  trainset=splits.train, valset=splits.val)
        served = srv.stats()["models"]["sim-student"]["ok"]
    assert served > 0 and program.detailed_results.run_stats["failures"].get("program_error", 0) > 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for path in written:
        data = path.read_bytes()
        assert url_key.encode() not in data and header_key.encode() not in data, path
    assert not [r for r in caplog.records if url_key in r.getMessage() or header_key in r.getMessage()]
    # the endpoint, sans userinfo
    assert str(srv.base_url.split("://", 1)[1]) in (tmp_path / "summary.json").read_text()


def test_url_userinfo_is_masked_wherever_it_appears():
    from dspy_turbogepa.adapter.lm_copies import endpoint_key
    from dspy_turbogepa.redaction import mask_text

    masked = mask_text("POST https://bob:pw-1@proxy.local:8080/v1 failed")
    assert masked == "POST https://***REDACTED***@proxy.local:8080/v1 failed"
    unchanged = "see https://example.com/a:b@c and user@example.com"
    assert mask_text(unchanged) == unchanged
    lm = dspy.LM("openai/m", api_base="http://alice:urlsecret0a9b8c7d@127.0.0.1:9/v1")
    assert endpoint_key(lm) == "openai/m@http://127.0.0.1:9/v1"


def test_placeholder_lm_keys_are_not_treated_as_secrets():
    """Local servers get words as keys; masking those would rewrite instructions ("output anything else")."""
    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys

    program = dspy.Predict("question -> answer")
    real = "prov-0a9b8c7d6e5f4a3b2c1d"
    for placeholder in ("anything", "sk-no-key-required", "lm-studio", "not-needed", "EMPTY"):
        lm = dspy.LM("openai/local", api_base="http://127.0.0.1:9/v1", api_key=placeholder)
        assert lm_api_keys(program, lm) == []
    program.lm = dspy.LM("openai/x", api_key=real)
    assert lm_api_keys(program, None) == [real]
    program.lm = dspy.LM("openai/x", api_key="Kx9mP2qLw7z")  # a short gateway key: as short as env secrets
    assert lm_api_keys(program, None) == ["Kx9mP2qLw7z"]
    # a URL's password is a secret whatever it looks like; a credential header counts like api_key
    program.lm = dspy.LM("openai/x", api_base="http://alice:hunter22@127.0.0.1:9/v1", api_key="anything",
                         extra_headers={"Authorization": f"Bearer {real}", "X-Trace": "plain-0123456789abcdef"})
    # the token of "Bearer <token>", and what a client sends for the userinfo (Basic base64("alice:hunter22"))
    assert sorted(lm_api_keys(program, None)) == sorted([real, "hunter22", "YWxpY2U6aHVudGVyMjI="])
    # a token as the only userinfo of api_base, and a long mixed-case key with no digit, are credentials;
    # a plain user name in a URL is not
    token, no_digit = "tok0a9b8c7d6e5f4a3b", "AbCdEfGhIjKlMnOpQrStUvWxYz"
    program.lm = dspy.LM("openai/x", api_base=f"http://{token}@127.0.0.1:9/v1", api_key=no_digit)
    assert sorted(lm_api_keys(program, None)) == sorted([token, no_digit])
    program.lm = dspy.LM("openai/x", api_base="http://alice@127.0.0.1:9/v1", api_key="anything")
    assert lm_api_keys(program, None) == []


def test_a_failure_while_resuming_closes_the_store(routing, tmp_path, monkeypatch):
    import threading

    import dspy_turbogepa.adapter.persistence as persistence

    splits = small_splits(routing, n_train=20, n_val=8)

    def compile_once():
        opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0), num_threads=2,
                        log_dir=str(tmp_path))
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)

    compile_once()

    def broken_load(*args, **kwargs):
        raise ValueError("a stored trajectory does not decode")

    monkeypatch.setattr(persistence, "load_known", broken_load)
    with pytest.raises(ValueError, match="does not decode") as failure:  # kept alive, as Jupyter keeps it
        compile_once()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(t.name.startswith("turbogepa-run-store") for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("turbogepa-run-store")]
    assert failure.value is not None


def _stored_evaluations(log_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{log_dir / 'run.sqlite3'}?mode=ro", uri=True) as db:
            return db.execute("select count(*) from evaluations").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_loses_nothing_and_repeats_nothing(tmp_path):
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    budget = "400"
    ref_out = tmp_path / "ref.json"
    subprocess.run([sys.executable, str(SCRIPT), str(ref_out), "-", budget], env=env, check=True, timeout=300,
                   capture_output=True)
    log_dir = tmp_path / "run"
    killed = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "killed.json"), str(log_dir), budget],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in killed.stdout:
            if line.startswith("READY"):
                break
        time.sleep(1.0)
        deadline = time.monotonic() + 30  # and until the store's writer has committed a row (a loaded machine)
        while not _stored_evaluations(log_dir) and time.monotonic() < deadline and killed.poll() is None:
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert not (tmp_path / "killed.json").exists(), "the run finished before it was killed; slow it down"
    with sqlite3.connect(log_dir / "run.sqlite3") as db:
        stored = db.execute("select count(*) from evaluations").fetchone()[0]
    assert stored > 0
    resumed_out = tmp_path / "resumed.json"
    subprocess.run([sys.executable, str(SCRIPT), str(resumed_out), str(log_dir), budget], env=env, check=True,
                   timeout=300, capture_output=True)
    ref, resumed = json.loads(ref_out.read_text()), json.loads(resumed_out.read_text())
    assert resumed["instructions"] == ref["instructions"]
    assert resumed["metric_calls"] == ref["metric_calls"]
    # the resumed process executed exactly what the killed one had not finished: nothing repeated
    assert resumed["student_calls"] == ref["student_calls"] - stored


def test_unusable_log_dir_fails_before_any_lm_call(routing, tmp_path):
    from dspy_turbogepa.store import RunStoreError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    student = make_student_lm(seed=0, noise=0.0)
    splits = small_splits(routing, n_train=10, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(), num_threads=2,
                    log_dir=str(blocker / "run"))
    with dspy.context(lm=student), pytest.raises(RunStoreError, match="a_file"):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert sim_engine(student).calls == 0


_PROGRAM_SRC = """
import dspy

class Routed(dspy.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ticket):
        return self.inner(ticket=self.clean(ticket))

    async def aforward(self, ticket):
        return await self.inner.acall(ticket=self.clean(ticket))

    def clean(self, ticket):
        return ticket.strip(){extra}
"""


def _routed_class(clean_extra="", aforward_extra=""):
    ns: dict = {}
    src = _PROGRAM_SRC.format(extra=clean_extra)
    if aforward_extra:
        src = src.replace("return await self.inner.acall", aforward_extra + "return await self.inner.acall")
    exec(compile(src, "user_program.py", "exec"), ns)  # the same class name and module, other code
    return ns["Routed"]


def test_the_run_key_sees_every_method_of_the_users_modules_and_the_proposers_settings(routing, tmp_path):
    """'Fix the program and run again' must not replay the broken program's stored failures, whichever
    method held the bug (a helper, aforward); and a proposer with other settings must not replay
    reflections made with the old ones."""
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    from dspy_turbogepa.adapter.run_identity import run_key

    splits = small_splits(routing, n_train=4, n_val=2)

    def key(cls=None, **kw):
        program = (cls or _routed_class())(routing.make_program())
        return run_key(program, splits.train, splits.val, 0, metric=routing.metric, **kw)

    base = key()
    assert key() == base
    assert key(_routed_class(clean_extra=".lower()"))["student"] != base["student"]  # a helper method
    assert key(_routed_class(aforward_extra="ticket = ticket[:100]\n        "))["student"] != base["student"]
    default = key(proposer=InstructionProposer())["reflection"]
    assert key(proposer=InstructionProposer())["reflection"] == default
    assert key(proposer=InstructionProposer(max_chars=60))["reflection"] != default
    assert key(proposer=InstructionProposer(additional_instructions="Be brief."))["reflection"] != default
    skill = tmp_path / "cite.md"
    skill.write_text("# Cite\nAlways cite the refund policy.")
    with_skill = key(proposer=InstructionProposer(skills=[str(skill)]))["reflection"]
    assert with_skill != default  # skills= change the reflection prompt
    skill.write_text("# Cite\nNever cite the refund policy.")
    assert key(proposer=InstructionProposer(skills=[str(skill)]))["reflection"] != with_skill
    assert key(add_format_failure_as_feedback=True)["reflection"] != base["reflection"]


def test_a_rerun_after_a_systemic_stop_runs_the_failures_again(routing, tmp_path, monkeypatch):
    """The error said "fix ... and run again": after a fix the run key cannot see (here the judge's
    environment), the rerun on the same log_dir must score the seed anew, not replay its failures."""
    splits = small_splits(routing, n_train=20, n_val=8)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if os.environ.get("TURBOGEPA_TEST_JUDGE") != "ok":
            raise RuntimeError("judge: the grading service refused the request")
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    def compile_once():
        student = make_student_lm(seed=0, noise=0.0)
        opt = TurboGEPA(metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0), num_threads=2,
                        log_dir=str(tmp_path), verbose=False, track_stats=True)
        with dspy.context(lm=student):
            return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)

    monkeypatch.delenv("TURBOGEPA_TEST_JUDGE", raising=False)
    with pytest.raises(SystemicFailureError, match="metric_error"):
        compile_once()
    monkeypatch.setenv("TURBOGEPA_TEST_JUDGE", "ok")
    fixed = compile_once().detailed_results
    assert fixed.run_stats["failures"] == {}
    assert fixed.val_aggregate_scores[0] > 0.0  # the seed was scored again, not read back as failures


def _judges():
    """Two versions of the same LLM-judge metric module, and of a callable object whose ``__call__``
    delegates to a helper: same class names, edited ``forward`` / helper."""

    def version(invert: bool):
        if invert:
            class Judge(dspy.Module):
                def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
                    return 1.0 - float(gold.answer == pred.answer)

            class Scorer:
                def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
                    return self.score(gold, pred)

                def score(self, gold, pred):
                    return 1.0 - float(gold.answer == pred.answer)
        else:
            class Judge(dspy.Module):
                def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
                    return float(gold.answer == pred.answer)

            class Scorer:
                def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
                    return self.score(gold, pred)

                def score(self, gold, pred):
                    return float(gold.answer == pred.answer)
        return Judge(), Scorer()

    return version(False), version(True)


def test_an_edited_metric_module_or_helper_method_changes_the_run_key():
    """A dspy.Module judge inherits ``__call__`` from DSPy: keying only ``__call__`` let an edited
    ``forward`` resume on the old scores."""
    from dspy_turbogepa.adapter.run_identity import callable_identity

    (judge_v1, scorer_v1), (judge_v2, scorer_v2) = _judges()
    assert type(judge_v1).__qualname__ == type(judge_v2).__qualname__
    assert callable_identity(judge_v1) != callable_identity(judge_v2)
    assert callable_identity(scorer_v1) != callable_identity(scorer_v2)
    assert callable_identity(scorer_v1.__call__) != callable_identity(scorer_v2.__call__)
    assert callable_identity(judge_v1) == callable_identity(_judges()[0][0])  # same code, same key


def _metric_with_default(lenient):
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None, *, strict=not lenient):
        return 1.0 if not strict else float(gold.answer == pred.answer)

    def positional(gold, pred, trace=None, pred_name=None, pred_trace=None, lenient=lenient):
        return 1.0 if lenient else float(gold.answer == pred.answer)

    return metric, positional


def test_a_changed_default_argument_seed_none_and_failure_score_in_the_run_key(tmp_path):
    """Defaults are not code: ``lenient=False`` edited to ``True`` resumed on the old scores (0 LM
    calls, validation 0.19 where a fresh run scores 1.0). ``seed=None`` runs as 0 but its log_dir
    refused seed=0; a changed failure_score was reported as "metric changed"."""
    from dspy_turbogepa.adapter.run_identity import callable_identity, run_key
    from dspy_turbogepa.store import RunStore, RunStoreMismatchError

    (kw_strict, pos_strict), (kw_lenient, pos_lenient) = _metric_with_default(False), _metric_with_default(True)
    assert callable_identity(kw_strict) != callable_identity(kw_lenient)
    assert callable_identity(pos_strict) != callable_identity(pos_lenient)
    assert callable_identity(kw_strict) == callable_identity(_metric_with_default(False)[0])

    def scorer(cutoff):  # a method's defaults too (a forward's, a judge's)
        class Scorer:
            def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None, cutoff=cutoff):
                return 1.0

        return Scorer()

    assert callable_identity(scorer(0.5)) != callable_identity(scorer(0.9))
    assert callable_identity(scorer(0.5)) == callable_identity(scorer(0.5))

    class Judge:  # a default holding state is keyed by its type, not its fields (run-time state)
        calls = 0

    def judged(gold, pred, trace=None, pred_name=None, pred_trace=None, judge=Judge()):
        judge.calls += 1
        return 1.0

    before = callable_identity(judged)
    judged(None, None)
    assert callable_identity(judged) == before

    def memoized(gold, pred, trace=None, pred_name=None, pred_trace=None, _cache={}):
        _cache[len(_cache)] = 1  # a memo dict is run-time state too: a rerun in the same process resumes
        return 1.0

    before = callable_identity(memoized)
    memoized(None, None)
    assert callable_identity(memoized) == before

    def version(lenient: bool, key: str):  # module-level functions, as the user's file would define them
        namespace: dict = {"__name__": "user_metrics"}
        exec(f"def helper(answer, lenient={lenient}):\n    return 1.0 if lenient else 0.0\n"
             "def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):\n    return helper(pred)\n"
             f"def keyed(gold, pred, trace=None, pred_name=None, pred_trace=None, api_key={key!r}):\n"
             "    return 1.0\n", namespace)
        return namespace["metric"], namespace["keyed"]

    # other kinds of default, each keyed by what it means (an enum member by name: its repr may show an
    # object's address, which changed the key in every process)
    from dspy_turbogepa.adapter.run_identity import _default_value

    class Mode(enum.Enum):
        A = object()

    assert _default_value("mode", Mode.A).endswith(".Mode.A") and "0x" not in _default_value("mode", Mode.A)
    for before, after in ((str.lower, str.upper), (functools.partial(round, ndigits=1),
                                                    functools.partial(round, ndigits=2)),
                          (re.compile("a+"), re.compile("b+")), (int, float),
                          (dspy.LM("openai/a", cache=False), dspy.LM("openai/b", cache=False))):
        assert _default_value("x", before) != _default_value("x", after), (before, after)
    assert _default_value("api_key", b"sk-0a9b8c7d6e5f4a3b2c") == "<credential>"
    assert _default_value("model", "gpt-4o-mini") != _default_value("model", "gpt-4o")

    (strict_metric, old_key), (lenient_metric, new_key) = (version(False, "sk-0a9b8c7d6e5f4a3b"),
                                                           version(True, "sk-9f8e7d6c5b4a3210"))
    assert callable_identity(strict_metric) != callable_identity(lenient_metric)  # one call down
    assert callable_identity(old_key) == callable_identity(new_key)  # a rotated key is the same run
    assert "0a9b8c7d6e5f" not in callable_identity(old_key)

    program = dspy.Predict("question -> answer")
    data = [dspy.Example(question="q", answer="a").with_inputs("question")]
    assert run_key(program, data, data, None) == run_key(program, data, data, 0)
    RunStore.open(tmp_path, run_key(program, data, data, 0, metric=kw_strict, failure_score=0.0)).close()
    with pytest.raises(RunStoreMismatchError) as info:
        RunStore.open(tmp_path, run_key(program, data, data, 0, metric=kw_strict, failure_score=-1.0))
    assert "failure_score changed [failure_score (stored 0.0 -> now -1.0)]" in str(info.value)
    assert "metric" not in info.value.changed
    with pytest.raises(RunStoreMismatchError, match="metric changed"):
        RunStore.open(tmp_path, run_key(program, data, data, 0, metric=kw_lenient, failure_score=0.0))


def test_a_resumed_run_evaluates_the_seed_itself_not_its_masked_copy(routing, tmp_path):
    """The store masks credential-looking text in candidate texts; a seed instruction holding a
    connection string came back masked on resume and every resumed evaluation ran that other program."""
    secret_url = "postgres://reader:Hunter2pass99@db.local/prod"
    program = routing.make_program()
    (_, pred), = program.named_predictors()
    pred.signature = pred.signature.with_instructions(
        pred.signature.instructions + f" Tickets are logged at {secret_url}.")
    splits = small_splits(routing, n_train=20, n_val=8)
    prompts: list[str] = []

    def record(request):
        prompts.append(" ".join(str(m["content"]) for m in request_messages(request)))

    for budget in (40, 120):
        student = make_student_lm(seed=0, noise=0.0, before_call=record)
        opt = TurboGEPA(routing.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), verbose=False)
        with dspy.context(lm=student):
            opt.compile(program, trainset=splits.train, valset=splits.val)
    assert prompts and not any("REDACTED" in p for p in prompts)
    assert "Hunter2pass99" not in (tmp_path / "run.sqlite3").read_bytes().decode("latin-1")


def test_a_resumed_run_never_hands_on_a_masked_trace_or_output(routing, tmp_path):
    """Data holding key-shaped text (a secret-scanning task): the store masks it, so a replayed trace
    showed the metric's feedback call and the reflection ``***REDACTED***`` where the live run showed
    the value (a right answer scored wrong), and ``best_outputs_valset`` returned masked answers. Such
    rows run again; the rest is replayed."""
    splits = small_splits(routing, n_train=20, n_val=8)

    def with_key(ex, i):
        return ex.copy(ticket=f"{ex.ticket} (ref sk-live{i}abc123def456ghi789)").with_inputs("ticket")

    train = [with_key(ex, i) for i, ex in enumerate(splits.train)]
    val = [with_key(ex, 100 + i) for i, ex in enumerate(splits.val)]
    masked_seen: list[str] = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None and "REDACTED" in f"{pred} {pred_trace}":
            masked_seen.append(pred_name)
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    prompts: list[str] = []

    def record(request):
        prompts.append(" ".join(str(m["content"]) for m in request_messages(request)))

    class QuotesTheRef(dspy.Module):  # its answer holds the key-shaped reference too
        def __init__(self):
            super().__init__()
            self.inner = routing.make_program()

        def forward(self, ticket):
            return dspy.Prediction(queue=self.inner(ticket=ticket).queue, ref=re.search(r"sk-\w+", ticket).group(0))

    results, student_calls = [], []
    for budget, best_outputs in ((40, False), (120, False), (120, False), (120, True)):
        opt = TurboGEPA(metric, max_metric_calls=budget, num_threads=4, log_dir=str(tmp_path), verbose=False,
                        reflection_lm=make_reflection_lm(seed=0, before_call=record), track_stats=True,
                        track_best_outputs=best_outputs)
        student = make_student_lm(seed=0, noise=0.0)
        with dspy.context(lm=student):
            results.append(opt.compile(QuotesTheRef(), trainset=train, valset=val).detailed_results)
        student_calls.append(sim_engine(student).calls)
    assert results[1].run_stats["proposals_replayed"] > 0  # the second session did resume the first
    assert not masked_seen, masked_seen
    assert prompts and not any("REDACTED" in p for p in prompts)
    # Only traces a new reflection reads run again: the second session paid for a few, the third (the
    # same run again, every reflection replayed) for none, however masked its store is.
    assert 0 < results[1].run_stats["metric_calls_executed"] < results[1].total_metric_calls
    assert student_calls[2] == 0 and results[2].run_stats["metric_calls_executed"] == 0
    assert results[2].best_idx == results[1].best_idx
    outputs = [o.ref for per_example in results[3].best_outputs_valset.values() for _, o in per_example]
    assert outputs and all(o.startswith("sk-live") for o in outputs), outputs
    assert "abc123def456ghi789" not in (tmp_path / "run.sqlite3").read_bytes().decode("latin-1")


def test_a_log_dir_under_home_keeps_the_store_summary_and_stop_file_together(routing, tmp_path, monkeypatch):
    """The store expanded ``~``; summary.json, the plots and the stop file used the path as given (a
    directory literally named ``~`` under the working directory)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    run_dir = home / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "gepa.stop").write_text("")  # present from the start: stops after the seed
    splits = small_splits(routing, n_train=10, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=200, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    log_dir="~/runs/r1", track_stats=True, verbose=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert program.detailed_results.stop_reason == "stop_file"
    assert (run_dir / "run.sqlite3").exists() and (run_dir / "summary.json").exists()
    assert not (cwd / "~").exists()


_ODD_KEY = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from dspy_turbogepa.adapter.run_identity import _hashable
from dspy_turbogepa.store.sqlite_store import stable_hash
tags = np.array([["refund", "late"], ["tracking"]], dtype=object)
longs = {"one": np.longdouble(1.5), "many": np.array([1.5, 2.5], dtype=np.longdouble)}  # padding bytes
print(stable_hash(_hashable({"tags": tags, "by_pair": {frozenset({"alpha", "beta", "gamma"}): 1}, **longs})))
"""


def test_object_arrays_and_set_keys_hash_the_same_in_every_process(tmp_path):
    """An object array's bytes are pointers, a frozenset key's str() follows the per-process string
    hash, and a long double's bytes hold uninitialised padding: each made every rerun "a different run"."""
    script = tmp_path / "k.py"
    script.write_text(_ODD_KEY)
    root = str(Path(__file__).resolve().parents[1])
    outs = {subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1, outs


def test_changing_which_fields_are_inputs_changes_the_data_key(routing):
    """``.with_inputs`` decides what the program is called with: the same fields with other inputs
    replayed the old evaluations."""
    import numpy as np

    from dspy_turbogepa.adapter.run_identity import _hashable, run_key

    splits = small_splits(routing, n_train=4, n_val=4)
    widened = [dspy.Example(**ex.toDict(), hint="x").with_inputs("ticket", "hint") for ex in splits.train]
    narrow = [dspy.Example(**ex.toDict(), hint="x").with_inputs("ticket") for ex in splits.train]
    program = routing.make_program()
    assert run_key(program, widened, splits.val, 0)["trainset"] != run_key(program, narrow, splits.val, 0)["trainset"]
    a = np.array([["a", "b"], ["c"]], dtype=object)
    assert _hashable(a) == _hashable(np.array([["a", "b"], ["c"]], dtype=object)) != _hashable(
        np.array([["a", "b"], ["d"]], dtype=object))


def test_the_adapter_and_a_predictors_own_settings_are_in_the_run_key(routing):
    """``dspy.configure(adapter=...)`` and ``dspy.Predict(sig, temperature=...)`` change every answer;
    neither changed the key, so a rerun replayed the other setup's scores. Unset, the key is as before."""
    from dspy_turbogepa.adapter.run_identity import run_key

    splits = small_splits(routing, n_train=4, n_val=4)
    plain = run_key(routing.make_program(), splits.train, splits.val, 0)
    assert run_key(routing.make_program(), splits.train, splits.val, 0, adapter=dspy.JSONAdapter())["task_lm"] \
        != plain["task_lm"]
    assert run_key(routing.make_program(), splits.train, splits.val, 0, adapter=dspy.ChatAdapter())["task_lm"] \
        != run_key(routing.make_program(), splits.train, splits.val, 0, adapter=dspy.JSONAdapter())["task_lm"]
    hot = routing.make_program()
    (_, pred), = hot.named_predictors()
    pred.config = {"temperature": 1.0}
    assert run_key(hot, splits.train, splits.val, 0)["student"] != plain["student"]


def test_turning_on_track_best_outputs_over_a_log_dir_reruns_what_lacks_outputs(routing, tmp_path, caplog):
    """Rows written without outputs were replayed as output-less: best_outputs_valset came back empty
    for every example, silently."""
    splits = small_splits(routing, n_train=10, n_val=8)
    calls = []

    def compile_once(track: bool):
        student = make_student_lm(seed=0, noise=0.0, before_call=calls.append)
        opt = TurboGEPA(routing.metric, max_metric_calls=30, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                        log_dir=str(tmp_path), track_stats=True, track_best_outputs=track, verbose=False)
        with dspy.context(lm=student):
            return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)

    compile_once(False)
    calls.clear()
    with caplog.at_level("WARNING", logger="dspy_turbogepa"):
        program = compile_once(True)
    assert "written without their outputs" in caplog.text
    outs = program.detailed_results.best_outputs_valset
    assert set(outs) == set(range(8)) and all(outs[i] for i in outs)
    assert 0 < len(calls) <= 8 * len(program.detailed_results.candidates)  # validation rows only, once
    calls.clear()
    compile_once(True)
    assert calls == []  # now stored with their outputs


class _Label(pydantic.BaseModel):
    team: str
    flags: list[str]


class _LabelledRouting(dspy.Module):
    """The routing program, adding typed fields to its prediction (a pydantic model and a date)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ticket):
        p = self.inner(ticket=ticket)
        team, *flags = str(p.queue).split("+")
        return dspy.Prediction(queue=p.queue, label=_Label(team=team, flags=flags), when=datetime.date(2024, 1, 2))


def test_a_resumed_run_hands_the_metric_the_types_a_live_run_does(routing, tmp_path):
    """Stored trajectories were rebuilt from str() of their values: after resume the metric's feedback
    calls got a string for a pydantic model (and for a date), raised on ``pred.label.team``, and
    the reflection lost those records."""
    seen: Counter[tuple[str, str, str]] = Counter()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            seen[(type(pred.label).__name__, type(pred.when).__name__, type(pred_trace[0][2].queue).__name__)] += 1
        assert pred.label.team  # attribute access on the model, as a live run allows
        return routing.metric(gold, dspy.Prediction(queue=pred.queue), trace, pred_name, pred_trace)

    splits = small_splits(routing, n_train=16, n_val=8)
    for budget in (40, 100):
        seen.clear()
        opt = TurboGEPA(metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                        log_dir=str(tmp_path), track_stats=True, verbose=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            program = opt.compile(_LabelledRouting(routing.make_program()), trainset=splits.train,
                                  valset=splits.val)
        skips = program.detailed_results.run_stats["reflective_records_skipped"]
        assert not skips.get("feedback_error"), skips
        assert set(seen) <= {("_Label", "date", "str")}
    assert seen  # the resumed session read stored trajectories through the metric


def test_valset_none_stores_trajectories_and_either_spelling_resumes(routing, tmp_path):
    """With no valset every evaluation is keyed as a validation one and carries a trajectory: the store
    kept trajectories of training rows only, so a resumed, longer run had nothing to reflect on; and
    ``valset=trainset`` spelled out resumed a ``valset=None`` run without replaying anything."""
    splits = small_splits(routing, n_train=16)

    def compile_once(budget, valset, calls):
        opt = TurboGEPA(routing.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), track_stats=True, use_merge=False, verbose=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0, before_call=calls.append)):
            return opt.compile(routing.make_program(), trainset=splits.train, valset=valset)

    first: list = []
    started = time.time()
    compile_once(60, None, first)
    with sqlite3.connect(tmp_path / "run.sqlite3") as con:
        rows, with_trajectory = con.execute(
            "select count(*), sum(trajectory_json is not null) from evaluations").fetchone()
        created = [r[0] for r in con.execute("select created_at from candidates")]
    assert rows > 0 and with_trajectory == rows
    # when each candidate was first stored, in Unix seconds (it was 0.0 for every row)
    assert len(created) > 1 and all(started <= t <= time.time() for t in created)
    again: list = []
    compile_once(60, list(splits.train), again)  # the same run, the valset spelled out
    assert again == []
    longer: list = []
    program = compile_once(200, None, longer)
    stats = program.detailed_results.run_stats
    assert stats["mutations"].get("accepted", 0) >= 1
    assert stats.get("proposal_skips", {}).get("no_reflective_data", 0) == 0


class _NoneOnTracking(dspy.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ticket):
        return None if "tracking" in ticket.lower() else self.inner(ticket=ticket)


def test_a_program_answering_none_is_not_rerun_on_every_resume(routing, tmp_path):
    """track_best_outputs=True: a None answer was stored as "no output kept", so every later session ran
    it again (and an LLM-judge metric paid again), with a false warning."""
    calls: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None:
            calls.append(gold)  # an LLM judge pays for each scoring call
        if pred is None:
            return dspy.Prediction(score=0.0, feedback="no answer")
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    splits = small_splits(routing, n_train=10, n_val=8)
    sessions = []
    for _ in range(2):
        calls.clear()
        opt = TurboGEPA(metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                        log_dir=str(tmp_path), track_stats=True, track_best_outputs=True, verbose=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            opt.compile(_NoneOnTracking(routing.make_program()), trainset=splits.train, valset=splits.val)
        sessions.append(len(calls))
    assert sessions[0] > 0 and sessions[1] == 0


class _Color(enum.Enum):
    RED = "red"


class _Client(pydantic.BaseModel):
    name: str
    token: str = pydantic.Field(repr=False)
    api_key: str = pydantic.Field(default="sk-LIVE-Q8z7Hunt2", exclude=True)


class _Colored(pydantic.BaseModel):
    color: _Color


class _Priority(str, enum.Enum):
    HIGH = "high"


class _Level(enum.IntEnum):
    ONE = 1


class _Planet(enum.Enum):
    EARTH = (1, 2)


@dataclasses.dataclass
class _WithLock:
    label: str
    lock: Any = dataclasses.field(default_factory=threading.Lock)


def test_stored_values_round_trip_without_hidden_fields_or_code_from_the_row():
    """What a trajectory stores: nested predictions and dspy types come back as themselves; a field
    declared repr=False (a key) is not stored, as str() left it out; a dataclass holding a lock is stored
    (asdict deep-copied it and crashed compile); and a row cannot make the reader import anything."""
    from dspy_turbogepa.adapter.trajectory_json import _TYPE, _revive, prediction_dict, prediction_from

    image = dspy.Image(url="https://example.com/a.png")
    pred = dspy.Prediction(image=image, inner=dspy.Prediction(x=1), client=_Client(name="crm", token="tok_Q8z7Hunt"),
                           held=_WithLock("queue"), when=datetime.date(2024, 1, 2), label=_Colored(color=_Color.RED))
    text = json.dumps(prediction_dict(pred))
    assert "tok_Q8z7Hunt" not in text and "sk-LIVE-Q8z7Hunt2" not in text  # repr=False, exclude=True
    assert prediction_from(json.loads(text)).label == _Colored(color=_Color.RED)
    # str / int enums are str / int too (they were stored as plain values), and tuple values come back
    members = dspy.Prediction(p=_Priority.HIGH, level=_Level.ONE, planet=_Planet.EARTH)
    back = prediction_from(json.loads(json.dumps(prediction_dict(members))))
    assert (back.p, back.level, back.planet) == (_Priority.HIGH, _Level.ONE, _Planet.EARTH)
    assert type(back.p) is _Priority and type(back.level) is _Level
    back = prediction_from(json.loads(text))
    assert back.image == image and isinstance(back.inner, dspy.Prediction) and back.inner.x == 1
    assert back.when == datetime.date(2024, 1, 2) and isinstance(back.held, _WithLock) and back.held.label == "queue"
    assert back.client == {"name": "crm"}  # the hidden field is gone, so the model does not validate
    assert "concurrent.futures.process" not in sys.modules or pytest.skip("already imported")
    import concurrent.futures  # noqa: F401 - loaded, but its lazy submodules must stay unloaded

    assert _revive({_TYPE: "concurrent.futures:ProcessPoolExecutor", "value": {}}) == {}
    assert "concurrent.futures.process" not in sys.modules


def test_numpy_values_come_back_as_numpy_values():
    """They came back as their text: a metric whose feedback did ``f"{pred.conf:.2f}"`` raised in a
    resumed session only, and the reflection read another prompt than the live run's (a review)."""
    import numpy as np

    from dspy_turbogepa.adapter.trajectory_json import _TYPE, _revive, prediction_dict, prediction_from

    live = dspy.Prediction(conf=np.float32(0.75), n=np.int64(3), ok=np.bool_(True), grid=np.array([[0, 1], [2, 3]]),
                           words=np.array(["a", "bc"]), zero_d=np.array(2.5), half=np.array([1.5], dtype=np.float16))
    back = prediction_from(json.loads(json.dumps(prediction_dict(live))))
    for key, value in live.items():
        assert type(back[key]) is type(value) and back[key].dtype == value.dtype, key
        assert np.array_equal(back[key], value), key
    assert f"{back.conf:.2f}" == "0.75" and back.grid.shape == (2, 2)
    # what is not stored typed stays text (a longdouble is no Python float: storing it typed crashed
    # every compile with a log_dir), and a row cannot make an object array or a huge one
    class Tagged(np.ndarray):  # a subclass (np.matrix, np.memmap) is not rebuilt as a plain array
        pass

    odd = dspy.Prediction(c=np.complex64(1j), long=np.longdouble(0.5), longs=np.array([1.5], dtype=np.longdouble),
                          m=np.array([[1, 2]]).view(Tagged))
    back = prediction_from(json.loads(json.dumps(prediction_dict(odd))))
    assert (back.c, back.long, back.longs, back.m) == ("1j", "0.5", "[1.5]", "[[1 2]]")
    for forged in ({_TYPE: "numpy:ndarray", "value": {"dtype": "|O", "shape": [1], "data": ["x"]}},
                   {_TYPE: "numpy:ndarray", "value": {"dtype": "<U5000000", "shape": [4], "data": ["x"] * 4}}):
        assert _revive(forged) == forged["value"]


def test_an_evaluation_the_store_cannot_write_is_kept_for_the_run_and_run_again_on_resume(
        routing, tmp_path, monkeypatch, caplog):
    """A value that JSON cannot write (a numpy longdouble once got through) ended every compile with a
    log_dir: the store's observer raised inside the evaluation."""
    import logging

    from dspy_turbogepa.adapter import persistence

    real = persistence.trajectory_to_json
    refused: list[int] = []

    def sometimes_unwritable(trajectory):
        if trajectory is not None and len(refused) < 3:
            refused.append(1)
            raise TypeError("Object of type longdouble is not JSON serializable")
        return real(trajectory)

    monkeypatch.setattr(persistence, "trajectory_to_json", sometimes_unwritable)
    splits = small_splits(routing, n_train=16, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    log_dir=str(tmp_path), verbose=False, track_stats=True)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), dspy.context(lm=make_student_lm(seed=0)):
        result = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    assert len(refused) == 3 and result.total_metric_calls >= 60
    assert sum("could not be written to the run store" in r.getMessage() for r in caplog.records) == 1
    stored = sqlite3.connect(tmp_path / "run.sqlite3").execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    assert stored == result.run_stats["metric_calls_executed"] - 3


_Pair = collections.namedtuple("_Pair", "queue priority")


def test_containers_json_cannot_tell_apart_come_back_as_themselves():
    """Tuples came back as lists, sets as sorted lists, int keys as strings: a resumed run's feedback
    calls (``pred.route != gold.route``) and reflections read other values than the live run's, so
    resuming did not replay the run (a different final program on 6 of 7 stop points)."""
    from dspy_turbogepa.adapter.trajectory_json import _TYPE, _revive, prediction_dict, prediction_from

    live = dspy.Prediction(pair=("billing", 2), labels={"a", "b"}, frozen=frozenset({1}), by_id={1: "x", 2: "y"},
                           by_pair={("a", 1): [("b", 2)]}, seq=["p", ("q",)], named=_Pair("billing", 1),
                           nested={"k": ({"v"},)}, names={"a": 1})
    back = prediction_from(json.loads(json.dumps(prediction_dict(live))))
    for key, _ in live.items():
        assert back[key] == live[key] and type(back[key]) is type(live[key]), key
    assert type(back.seq[1]) is tuple and type(back.nested["k"][0]) is set
    assert type(back.named) is _Pair and back.named.queue == "billing"
    # rows written before containers were typed still read as they did
    assert _revive({"pair": ["billing", 2]}) == {"pair": ["billing", 2]}
    # a key that cannot be one any more (its class is gone) is keyed by its JSON text, as every key was
    # before; the other keys keep theirs; a mapping's own class and a tuple subclass come back too
    assert _revive({_TYPE: "builtins:dict", "value": [[{"k": 1}, "x"], [2, "y"]]}) == {'{"k": 1}': "x", 2: "y"}
    ordered = collections.OrderedDict([(2, "b"), (1, "a")])
    back = prediction_from(json.loads(json.dumps(prediction_dict(dspy.Prediction(o=ordered, t=time.gmtime(0))))))
    assert type(back.o) is collections.OrderedDict and list(back.o.items()) == [(2, "b"), (1, "a")]
    assert back.t == time.gmtime(0) and type(back.t) is time.struct_time
    # other mappings come back as dicts with their keys (a Counter rebuilt from pairs counted the pairs),
    # and a user's tuple subclass as a plain tuple (its __new__ is not run on a row's values)

    class Vec(tuple):
        def __new__(cls, *xs):
            return super().__new__(cls, xs)

    odd = dspy.Prediction(c=collections.Counter({1: 3, 2: 5}), m=types.MappingProxyType({1: "a"}), v=Vec(1, 2))
    back = prediction_from(json.loads(json.dumps(prediction_dict(odd))))
    assert back.c == {1: 3, 2: 5} and type(back.c) is dict and back.m == {1: "a"}
    assert back.v == (1, 2) and type(back.v) is tuple


class _PydanticScorer(pydantic.BaseModel):
    weight: float = 1.0

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return self.weight * float(gold.answer == pred.answer)


def test_a_class_is_keyed_by_its_own_code_not_its_librarys():
    """A pydantic-based scorer keyed ~50 pydantic functions: upgrading pydantic refused the log_dir."""
    from dspy_turbogepa.adapter.run_identity import _class_code

    assert [part.split("=")[0] for part in _class_code(_PydanticScorer)] == ["__call__"]


def test_examples_sharing_an_object_are_hashed_by_content_each_time():
    """The walk's "seen" set kept every object it had met: one met again in a sibling (two examples
    sharing an array) was hashed as a cycle marker, so datasets that differ could hash the same (a
    resume accepted a changed dataset; valset=trainset was wrongly assumed)."""
    import numpy as np

    from dspy_turbogepa.adapter.run_identity import data_identity

    p, q = np.array([1.0, 2.0]), np.array([9.0, 9.0])
    train = [dspy.Example(a=p, b=q, x="t").with_inputs("x"), dspy.Example(a=p, x="u").with_inputs("x")]
    val = [dspy.Example(a=p, b=q, x="t").with_inputs("x"), dspy.Example(a=q, x="u").with_inputs("x")]
    assert data_identity(train) != data_identity(val)

    class Node:
        def __init__(self):
            self.me = self  # a real cycle still ends in a marker

    assert data_identity([dspy.Example(x=Node()).with_inputs("x")])



def test_the_data_key_sees_a_value_changed_inside_a_long_table_or_an_arrays_dtype() -> None:
    """pyarrow tables and arrays and pandas indexes were keyed by their str(), which is abridged: a value
    changed in the middle kept the key, and the rerun replayed the old data's scores. And arrays were
    keyed by their bytes alone: uint8 255 and int8 -1 are the same byte."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from dspy_turbogepa.adapter.run_identity import data_identity

    def key(value):
        return data_identity([dspy.Example(x=value).with_inputs("x")])

    big = list(range(1000))
    edited = big[:500] + [-1] + big[501:]
    assert key(pa.array(big)) != key(pa.array(edited))
    assert key(pa.table({"a": big})) != key(pa.table({"a": edited}))
    assert key(pd.Index(big)) != key(pd.Index(edited))
    assert key(np.array([255], dtype=np.uint8)) != key(np.array([-1], dtype=np.int8))
    assert key(pa.table({"a": big})) == key(pa.table({"a": list(range(1000))}))  # equal data, equal key

def test_a_resumed_runs_progress_counts_what_the_budget_counts(routing, tmp_path, caplog):
    """The progress display added every stored evaluation of earlier sessions to this session's
    executions, while the budget counts a stored one only when this session replays it: a resumed run
    showed 100%, ETA 0s with much of its work ahead, and ended at 389/300."""
    import logging
    import re

    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

    splits = small_splits(routing, n_train=16, n_val=8)

    def run(budget: int):
        opt = TurboGEPA(routing.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), track_stats=True, verbose=True)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)

    run(60)
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa.tracking.progress"):
        stats = run(140).detailed_results.run_stats
    final = [r.getMessage() for r in caplog.records if "search ended" in r.getMessage() and "/140" in r.getMessage()]
    assert final, [r.getMessage() for r in caplog.records]
    shown = int(re.search(r"(\d+)/140 metric calls", final[-1]).group(1))
    assert stats["metric_calls_replayed"] > 0
    assert shown == stats["metric_calls_executed"] + stats["metric_calls_replayed"]


def _lookup_v1(key: str) -> str:
    """Look up the value stored under key."""
    return key.upper()


def _lookup_v2(key: str) -> str:
    """Look up the value stored under key."""
    return key.lower()


def _make_lookup(suffix: str):
    def lookup(key: str) -> str:
        """Look up the value stored under key."""
        return key + suffix
    return lookup


def _normalize(text: str) -> str:
    return text.strip()


class _UsesAHelper(dspy.Module):
    def __init__(self, inner, upper: bool = False):
        super().__init__()
        self.inner = inner
        self.upper = upper
        self._calls = 0  # run-time state in a private field: not a setting

    def forward(self, ticket):
        ticket = _normalize(ticket)
        return self.inner(ticket=ticket.upper() if self.upper else ticket)


def test_the_run_key_sees_tools_settings_and_helper_functions(routing, monkeypatch):
    """A fixed ReAct tool, a changed module setting (``self.upper``, a retriever's ``k``) or a fixed
    module-level helper that ``forward`` calls kept the run key: a resumed run replayed the broken
    program's scores (seed 0.0 while the fixed program scores 1.0)."""
    from dspy_turbogepa.adapter.run_identity import run_key

    splits = small_splits(routing, n_train=4, n_val=2)

    def key(program):
        return run_key(program, splits.train, splits.val, 0, metric=routing.metric)["student"]

    def react(tool, **kw):
        return dspy.ReAct("question -> answer", tools=[tool], **kw)

    assert key(react(_lookup_v1)) == key(react(_lookup_v1))
    assert key(react(_lookup_v1)) != key(react(_lookup_v2))  # the tool's code
    assert key(react(_make_lookup("-a"))) == key(react(_make_lookup("-b")))  # closures are state: not seen
    assert key(react(_lookup_v1, max_iters=3)) != key(react(_lookup_v1, max_iters=5))

    base = key(_UsesAHelper(routing.make_program()))
    assert key(_UsesAHelper(routing.make_program(), upper=True)) != base
    counted = _UsesAHelper(routing.make_program())
    counted._calls = 7
    assert key(counted) == base
    monkeypatch.setitem(globals(), "inner", lambda: "an unrelated global named like an attribute")
    assert key(_UsesAHelper(routing.make_program())) == base  # self.inner is an attribute, not this global
    monkeypatch.setitem(globals(), "_normalize", lambda text: text.strip().lower())
    assert key(_UsesAHelper(routing.make_program())) != base

    best_of = dspy.BestOfN(routing.make_program(), N=3, reward_fn=lambda args, pred: 1.0, threshold=1.0)
    before = key(best_of)
    best_of.fail_count -= 2  # lowered by failed attempts when the student ran before compile
    assert key(best_of) == before


class _Answer:
    """What a user's forward may return instead of a dspy.Prediction."""

    def __init__(self, text: str, meta: dict):
        self.text = text
        self.meta = meta


class _Dropped:
    """A class with a finaliser: a stored row must never build one (its __del__ would run on the row's data)."""

    def __init__(self, path: str):
        self.path = path

    def __del__(self):
        pass


def test_a_plain_object_a_program_returns_comes_back_as_itself():
    """A forward returning a plain object was stored as its str(): after a resume the metric's feedback
    calls got a str, raised AttributeError on ``pred.text``, and those reflective records were lost.
    Only the user's own plain classes are rebuilt, from their fields, with none of their code run."""
    from dspy_turbogepa.adapter.trajectory_json import _TYPE, _revive, prediction_dict, prediction_from

    back = prediction_from(json.loads(json.dumps(prediction_dict(_Answer("HELLO", {"n": 1})))))
    assert type(back) is _Answer and back.text == "HELLO" and back.meta == {"n": 1}
    nested = prediction_from(json.loads(json.dumps(prediction_dict(dspy.Prediction(answer=_Answer("x", {}))))))
    assert type(nested.answer) is _Answer
    stored = json.loads(json.dumps(prediction_dict(_Dropped("/tmp/x"))))
    assert isinstance(prediction_from(stored), str)  # stored as its text, never rebuilt
    # a library class named in a row is never built from it, however plain; nor one of ours
    assert _revive({_TYPE: "argparse:Namespace", "value": {"a": 1}}) == {"a": 1}
    assert _revive({_TYPE: "dspy_turbogepa.adapter.program:ProgramCodec", "value": {"a": 1}}) == {"a": 1}


def test_a_token_budget_counts_the_stored_usage_of_a_resumed_run(routing, tmp_path):
    """Stored evaluations and reflections carried no usage: a run stopped by token_budget, compiled again
    with the same arguments, started its token count at zero and paid 54 student and 13 reflection
    calls past the budget. Replayed work counts its tokens as the first session did."""
    from dspy_turbogepa.testing import sim_engine
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

    splits = small_splits(routing, n_train=10, n_val=8)

    def run():
        lm, refl = make_student_lm(seed=0, noise=0.0), make_reflection_lm(seed=0)
        opt = TurboGEPA(routing.metric, max_metric_calls=400, token_budget=20000, reflection_lm=refl, num_threads=8,
                        track_stats=True, log_dir=str(tmp_path), verbose=False)
        with dspy.context(lm=lm):
            dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
        return dr, sim_engine(lm).calls, sim_engine(refl).calls

    first, student_calls, reflection_calls = run()
    assert first.stop_reason == "token_budget" and student_calls > 0 and reflection_calls > 0
    again, student_calls, reflection_calls = run()
    assert (student_calls, reflection_calls) == (0, 0)
    assert again.stop_reason == "token_budget" and again.total_metric_calls == first.total_metric_calls
    assert again.run_stats["task_tokens"] == first.run_stats["task_tokens"]
    assert again.run_stats["reflection_tokens"] == first.run_stats["reflection_tokens"]


class _Node:
    def __init__(self, name: str, parent: _Node | None = None):
        self.name = name
        self.parent = parent
        self.children: list[_Node] = []
        self._cache = {"rank": 1}  # a property may read a _private field: kept
        self.token = "can"  # data in an NLP object, not a credential
        self.db_password = "hunter2-internal"
        if parent is not None:
            parent.children.append(self)


def test_a_stored_object_graph_with_cycles_and_private_fields():
    """A tree with parent links returned in a prediction made storing it recurse forever (compile hung
    with log_dir set); a plain object's credential-named fields were written to the store."""
    from dspy_turbogepa.adapter.trajectory_json import prediction_dict, prediction_from

    root = _Node("root")
    _Node("leaf", root)
    text = json.dumps(prediction_dict(dspy.Prediction(tree=root)))
    assert "hunter2" not in text
    back = prediction_from(json.loads(text)).tree
    assert type(back) is _Node and back.name == "root" and back.children[0].name == "leaf"
    assert back.token == "can" and back._cache == {"rank": 1}
    assert back.children[0].parent == "<see above: _Node>"  # the loop is cut, not followed
    nodes = [_Node(f"n{i}") for i in range(14)]
    for i, node in enumerate(nodes):  # a graph: every node linked to three others, both ways
        node.children = [nodes[(i + k) % 14] for k in (1, 2, 3)]
    text = json.dumps(prediction_dict(dspy.Prediction(entities=nodes)))
    assert len(text) < 500_000, len(text)  # bounded (every path through the graph: hundreds of MB)
    shared, when, node = ["a", "b"], datetime.date(2024, 1, 2), _Node("shared")
    twice = prediction_from(json.loads(json.dumps(prediction_dict(
        dspy.Prediction(x=shared, y=shared, created=when, updated=when, best=node, nodes=[node])))))
    assert twice.x == twice.y == ["a", "b"] and twice.updated == when  # shared values, stored for both
    assert twice.nodes[0].name == "shared"


def test_a_resume_replays_what_the_candidate_earned_not_what_the_service_or_a_masked_text_did(routing, tmp_path):
    """Unit level, on a store written by hand: a rollout the LM service failed (a 503 given up on) and a
    reflection whose proposer raised (often the reflection LM's key) are paid for again after the fix,
    not replayed as the candidate's failure; and a candidate whose stored texts were masked (they held
    a key) is not used to rebuild trajectories, which would run that other program under its name."""
    from dspy_turbogepa.adapter.persistence import load_known
    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep
    from dspy_turbogepa.adapter.trajectory_json import trajectory_to_json
    from dspy_turbogepa.engine.candidate import Candidate
    from dspy_turbogepa.store import RunStore

    program = routing.make_program()
    codec = ProgramCodec(program)
    seed = codec.seed_texts()
    (name, predictor), = program.named_predictors()
    examples = small_splits(routing, n_train=2, n_val=2, n_test=0).val
    seed_fp = Candidate(seed).fingerprint
    keyed = {name: seed[name] + " Escalations go to the gateway with key sk-proj-0a9b8c7d6e5f4a3b2c1d."}
    keyed_fp = Candidate(keyed).fingerprint
    inputs, outputs = dict(examples[0].inputs()), dspy.Prediction(queue="billing")
    traj = trajectory_to_json(DspyTrajectory(examples[0], outputs, [TraceStep(name, predictor, inputs, outputs)],
                                             [(predictor, inputs, outputs)]))
    none = dict.fromkeys(("objective_scores", "failure", "message", "error_type", "trajectory_json", "output_json",
                          "tokens", "seconds"))
    with RunStore.open(tmp_path, {"trainset": "t" * 32}) as store:
        store.record_candidate(keyed_fp, keyed, [seed_fp], "reflection", 1.0)
        store.record_evaluation(seed_fp, "val", 0, 0.0, **{**none, "failure": "program_error",
                                "message": "LMServerError: 503", "error_type": "LMServerError"},
                                service_failure=True)
        store.record_evaluation(seed_fp, "val", 1, 1.0, **none)
        store.record_evaluation(keyed_fp, "train", 0, 1.0, **{**none, "trajectory_json": traj})
        store.record_evaluation(seed_fp, "train", 0, 1.0, **{**none, "trajectory_json": traj})
        store.record_proposal("raised", {}, "proposer_error", "AuthenticationError: bad key", 1)
        store.record_proposal("answered", {name: "Route by topic."}, None, None, 1)
        store.flush()
        known, proposals = load_known(store, codec, {"train": examples, "val": examples}, seed)
    assert (seed_fp, "val", 1) in known and (seed_fp, "val", 0) not in known
    assert set(proposals) == {"answered"}
    assert known[(keyed_fp, "train", 0)].score == 1.0 and known[(keyed_fp, "train", 0)].trajectory is None
    assert known[(seed_fp, "train", 0)].trajectory is not None  # the seed's texts come from the student


def test_a_key_looking_default_under_a_neutral_name_is_keyed_as_a_credential():
    """``def metric(..., client="sk-proj-...")``: the parameter's name says nothing, the text is a key.
    Rotating it must resume the run (same callable identity), and the key must not shape the run key."""
    from dspy_turbogepa.adapter.run_identity import callable_identity

    def version(key: str):
        namespace: dict = {"__name__": "user_metrics"}
        exec(f"def metric(gold, pred, trace=None, pred_name=None, pred_trace=None, client={key!r}):\n"
             "    return 1.0\n", namespace)
        return namespace["metric"]

    old, new = version("sk-proj-0a9b8c7d6e5f4a3b2c1d"), version("sk-proj-9f8e7d6c5b4a39281706")
    assert callable_identity(old) == callable_identity(new)
    assert callable_identity(version("gpt-4o-mini")) != callable_identity(version("gpt-4o"))  # not a key: counts


def test_a_trace_entry_matched_to_two_predictors_comes_back_once(routing):
    """A call made by a per-call copy whose signature equals two predictors' is one entry of the rollout's
    trace and a step under each name. The store keeps steps; a reload rebuilt one trace entry per step,
    so a resumed run handed the metric's feedback call a trace with that call twice."""
    import copy

    from dspy_turbogepa.adapter.trajectory_json import trajectory_from_json, trajectory_to_json

    from helpers import seed_trajectory

    (_, seed_predictor), = routing.make_program().named_predictors()

    class Twins(dspy.Module):
        def __init__(self):
            super().__init__()
            self.first = copy.deepcopy(seed_predictor)
            self.second = copy.deepcopy(seed_predictor)

        def forward(self, ticket):
            return copy.deepcopy(self.first)(ticket=ticket)  # a fresh copy: matched by signature

    live, codec = seed_trajectory(routing, Twins())
    assert [s.pred_name for s in live.steps] == ["first", "second"] and len(live.raw_trace) == 1
    back = trajectory_from_json(trajectory_to_json(live), live.example, codec, "seed", codec.seed_texts())
    assert [s.pred_name for s in back.steps] == ["first", "second"]
    assert len(back.raw_trace) == 1, back.raw_trace
    assert back.raw_trace[0][1] == live.raw_trace[0][1]
    assert back.steps[0].inputs == back.steps[1].inputs == live.steps[0].inputs
    assert back.steps[0].predictor is codec.get("seed", codec.seed_texts()).program.first

    # a store written before the trace index was kept: one entry per step, as it was then
    old = json.loads(trajectory_to_json(live))
    for step in old["steps"]:
        del step["raw"]
    legacy = trajectory_from_json(json.dumps(old), live.example, codec, "seed", codec.seed_texts())
    assert len(legacy.raw_trace) == 2 and [s.pred_name for s in legacy.steps] == ["first", "second"]
    # an edited store never merges steps it cannot tell belong together: only equal, consecutive,
    # non-negative integer indexes do
    for first, second in ((1, None), (True, True), (-1, -1), ("0", "0"), (0, 1)):
        edited = json.loads(trajectory_to_json(live))
        edited["steps"][0]["raw"], edited["steps"][1]["raw"] = first, second
        edited["steps"][1]["inputs"] = {"ticket": "another"}
        apart = trajectory_from_json(json.dumps(edited), live.example, codec, "seed", codec.seed_texts())
        assert [s.inputs["ticket"] for s in apart.steps][1] == "another", (first, second)
        assert len(apart.raw_trace) == 2 and [s.raw_index for s in apart.steps] == [0, 1], (first, second)


def test_a_resumed_run_logs_its_replayed_mutations_as_replayed(routing, tmp_path, caplog):
    """A resumed run replays the earlier session's mutations from the store; its log said "new candidate"
    for each as if it had paid for them again. Only the replayed ones carry the note."""
    import logging

    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

    splits = small_splits(routing, n_train=16, n_val=8)

    def run(budget: int) -> list[str]:
        caplog.clear()
        opt = TurboGEPA(routing.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=1, log_dir=str(tmp_path), track_stats=True)
        with caplog.at_level(logging.INFO, logger="dspy_turbogepa.engine.orchestrator"), \
                dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Mutation ")]

    first = run(60)
    assert any("new candidate" in m for m in first), first
    assert not any("replayed" in m for m in first), first
    resumed = run(140)
    replayed = [m for m in resumed if "replayed from the run store" in m]
    assert replayed and len(replayed) <= len(first), (first, resumed)
    assert "replayed" not in resumed[-1], resumed  # then new work, unmarked


def test_the_replay_note_says_when_only_some_siblings_were_replayed():
    from dspy_turbogepa.engine.orchestrator import _replayed
    from dspy_turbogepa.engine.records import MutationResult

    def note(made, stored):
        return _replayed(MutationResult(None, "accepted", proposals=made, proposals_from_store=stored))

    assert note(3, 0) == "" and note(0, 0) == ""
    assert note(1, 1) == note(3, 3) == " (reflection replayed from the run store)"
    assert note(3, 1) == " (1 of its 3 reflections replayed from the run store)"


class _OddBytes(dspy.Module):
    """Routing, its answer followed by bytes read as text with ``surrogateescape`` (a file or a
    subprocess's output in an unknown encoding): a lone surrogate in every output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ticket):
        pred = self.inner(ticket=ticket)
        return dspy.Prediction(queue=pred.queue, raw=b"caf\xe9".decode("utf-8", "surrogateescape"))


def test_text_with_lone_surrogates_in_data_and_outputs_is_stored_and_never_paid_again(routing, tmp_path):
    """With a log_dir, a surrogate in the trainset failed the run key with a bare UnicodeEncodeError, and
    one in a program's output kept its evaluation out of the store, so every rerun paid for it again."""
    splits = small_splits(routing, n_train=20, n_val=10)
    odd = b"\xff".decode("utf-8", "surrogateescape")
    train = [ex.copy(note=f"imported {odd}").with_inputs("ticket") for ex in splits.train]

    def run():
        student, reflector = make_student_lm(seed=0, noise=0.0), make_reflection_lm(seed=0)
        opt = TurboGEPA(routing.metric, max_metric_calls=80, reflection_lm=reflector, num_threads=4,
                        track_stats=True, track_best_outputs=True, log_dir=str(tmp_path))
        with dspy.context(lm=student):
            program = opt.compile(_OddBytes(routing.make_program()), trainset=train, valset=splits.val)
        return program, sim_engine(student).calls

    first, calls = run()
    assert calls > 0 and first.detailed_results.run_stats["failures"] == {}
    again, calls_again = run()
    assert calls_again == 0
    assert _instructions(again) == _instructions(first)
    outputs = again.detailed_results.best_outputs_valset
    assert outputs[0][0][1].raw == "caf\udce9"  # read back from the store as it was
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))  # written, valid JSON
    assert summary


def test_a_dspy_gepa_log_dir_is_not_resumed_silently(routing, tmp_path, caplog):
    """A user switching from dspy.GEPA points TurboGEPA at its old log_dir and expects a resume; its
    checkpoint (a pickle of gepa's state) is never loaded, so the run says it starts over, and the file
    is left as it was."""
    import logging

    checkpoint = tmp_path / "gepa_state.bin"
    checkpoint.write_bytes(b"\x80\x04not ours to unpickle")
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        _program, calls, _lm, _refl = _compile(routing, 60, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "gepa_state.bin" in r.getMessage()]
    assert len(warned) == 1 and "cannot resume" in warned[0] and str(tmp_path) in warned[0]
    assert calls > 0 and checkpoint.read_bytes() == b"\x80\x04not ours to unpickle"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):  # resuming our own store: no warning
        _compile(routing, 60, tmp_path)
    assert not [r for r in caplog.records if "gepa_state.bin" in r.getMessage()]


def test_the_search_is_committed_before_the_reports_are_written(tmp_path, monkeypatch):
    """A kill -9 while the reports were written lost the search's last evaluations (a review: 2 of 134,
    paid again on the rerun): up to a commit interval of rows still waited in the writer. Here the writer
    commits only when asked (a minute's interval), and the reports see every evaluation in the database."""
    from dspy_turbogepa.store import RunStore

    from helpers import quick_compile

    real_open = RunStore.open.__func__

    def slow_writer(cls, *args, **kw):
        return real_open(cls, *args, **{**kw, "commit_interval": 60.0})

    monkeypatch.setattr(RunStore, "open", classmethod(slow_writer))
    seen: dict[str, int] = {}
    real_reports = TurboGEPA._write_reports

    def reports(self, *args, **kw):
        with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
            seen["rows"] = conn.execute("SELECT count(*) FROM evaluations").fetchone()[0]
        return real_reports(self, *args, **kw)

    monkeypatch.setattr(TurboGEPA, "_write_reports", reports)
    optimized = quick_compile(budget=60, log_dir=str(tmp_path))
    assert seen["rows"] == optimized.detailed_results.run_stats["metric_calls_executed"] > 0


def test_a_session_that_committed_no_mutation_does_not_shape_the_next_sessions_plan(tmp_path):
    """A session stopped right after the seed (here by the stop file) left no plan to replay: the session
    after it plans as a fresh run with its own budget would (not first with the stopped one's), and the
    third replays the second for nothing."""
    from dspy_turbogepa.testing import TASKS

    pricing = TASKS["pricing"]
    fresh, fresh_calls, _, _ = _compile(pricing, 250)
    stop = tmp_path / "gepa.stop"
    stop.write_text("")
    _compile(pricing, 100, tmp_path)
    stop.unlink()
    second, calls2, _, _ = _compile(pricing, 250, tmp_path)
    assert [_instructions(c) for c in second.detailed_results.candidates] == [
        _instructions(c) for c in fresh.detailed_results.candidates]
    assert calls2 + second.detailed_results.run_stats["metric_calls_replayed"] == fresh_calls
    third, calls3, lm3, refl3 = _compile(pricing, 250, tmp_path)
    assert (calls3, lm3, refl3) == (0, 0, 0)
    assert [_instructions(c) for c in third.detailed_results.candidates] == [
        _instructions(c) for c in second.detailed_results.candidates]


@pytest.mark.parametrize("how", ["interrupted", "killed_before_recording", "nondeterministic"])
def test_a_session_that_ended_as_it_set_up_does_not_lose_the_plan_of_the_one_before(pipeline, tmp_path, monkeypatch,
                                                                                     how):
    """A review: the budgets a session plans with were recorded only once its setup (MLflow, the progress
    display) was done; a session interrupted in it left no record, and the next fell back to planning
    with its budget alone: 124 evaluations paid again instead of 27. They are recorded as the store
    opens, and a session that planned nothing (no mutation committed, no proposal stored) is passed over,
    whatever it recorded (a deterministic=False one records its own budget alone)."""
    from dspy_turbogepa import teleprompter

    first, calls1, _, _ = _compile(pipeline, 150, tmp_path)
    with monkeypatch.context() as setup_fails:
        def interrupted(*args, **kw):
            raise KeyboardInterrupt

        setup_fails.setattr(teleprompter, "ProgressDisplay", interrupted)
        if how == "nondeterministic":
            setup_fails.setattr(teleprompter.TurboGEPA, "__init__", functools.partialmethod(
                teleprompter.TurboGEPA.__init__, deterministic=False))
        with pytest.raises(KeyboardInterrupt):
            _compile(pipeline, 300, tmp_path)
    if how == "killed_before_recording":  # as a kill -9 within the writer's first 50 ms would leave it
        with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
            conn.execute("DELETE FROM events WHERE kind = 'plan_budgets' AND session = 2")
        conn.close()
    extended, calls3, _, _ = _compile(pipeline, 300, tmp_path)
    assert extended.detailed_results.run_stats["metric_calls_replayed"] == calls1
    assert calls3 == 27  # as the uninterrupted extension (test_rerun_and_extension_never_pay_twice, run_store.md)


def test_resuming_with_other_search_settings_warns_that_stored_work_goes_unused(tmp_path, caplog):
    """A review resumed a killed run with num_threads 4 -> 8: the log said 60 stored evaluations would not be
    paid again, the search used 20 of them and paid 115 again, without a word. Settings that shape the
    plan are compared with the last session's; the same settings resume silently."""
    from helpers import quick_compile

    quick_compile(budget=60, log_dir=str(tmp_path), num_threads=4)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(budget=60, log_dir=str(tmp_path), num_threads=4)
    assert not [r for r in caplog.records if "other search settings" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(budget=80, log_dir=str(tmp_path), num_threads=8)
    said = [r.getMessage() for r in caplog.records if "other search settings" in r.getMessage()]
    assert len(said) == 1
    assert "num_threads 4 -> 8" in said[0] and "max_metric_calls 60 -> 80" in said[0] and "seed" not in said[0]
    caplog.clear()  # a list setting is kept in the session meta too, and perfect_score shapes the plan
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(budget=80, log_dir=str(tmp_path), num_threads=8, rung_fractions=(0.25, 1.0), perfect_score=2.0)
    said = [r.getMessage() for r in caplog.records if "other search settings" in r.getMessage()]
    assert len(said) == 1 and "rung_fractions [1.0] -> [0.25, 1.0]" in said[0] and "perfect_score 1.0 -> 2.0" in said[0]
    caplog.clear()  # strict_budget decides which mutations launch near each budget a resume replays
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(budget=80, log_dir=str(tmp_path), num_threads=8, rung_fractions=(0.25, 1.0), perfect_score=2.0,
                      strict_budget=True)
    said = [r.getMessage() for r in caplog.records if "other search settings" in r.getMessage()]
    assert len(said) == 1 and "strict_budget False -> True" in said[0], said


def test_resuming_with_a_setting_spelled_as_what_it_resolves_to_does_not_warn(tmp_path, caplog):
    """The sessions' plans are compared as the engine runs them: ``rung_fractions=None`` on a small valset
    and an explicit ``(1.0,)`` are the same plan (the warning fired on the constructor values), while
    ``num_threads=None`` under another ``dspy.settings.num_threads`` is another plan."""
    import dspy

    from helpers import quick_compile

    quick_compile(budget=60, log_dir=str(tmp_path), num_threads=4)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(budget=60, log_dir=str(tmp_path), num_threads=4, rung_fractions=(1.0,))
    assert not [r for r in caplog.records if "other search settings" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), dspy.context(num_threads=6):
        quick_compile(budget=60, log_dir=str(tmp_path), num_threads=None)
    said = [r.getMessage() for r in caplog.records if "other search settings" in r.getMessage()]
    assert len(said) == 1 and "num_threads 4 -> 6" in said[0], said


def test_a_candidate_whose_text_was_stored_masked_still_teaches_its_reflections_on_resume(routing, tmp_path):
    """A store review: a proposer whose instructions quote a key-shaped example (a secret-scanning task)
    has its candidates' texts stored masked, so their stored traces cannot be rebuilt; they were loaded
    as no trace at all, not as lost ones, so a reflection asked again on resume read 1 record where the
    live run read 6, wrote another text, and an identical rerun of a finished run diverged and paid
    127 new calls. Such traces now count as lost: the rerun runs them again for the reflection and
    makes the same candidates."""
    splits = small_splits(routing, n_train=24, n_val=12)
    mark = " Keys look like AKIAIOSFODNN7EXAMPL3."
    phrases = [r.phrases[0] for r in routing.rules]

    class Proposer(dspy.teleprompt.gepa.InstructionProposer):
        def __call__(self, candidate, reflective_dataset, components_to_update):
            out = {}
            for name in components_to_update:
                text = candidate[name].split(" [")[0].replace(mark, "")
                rule = next((p for p in phrases if p.lower() not in text.lower()), "")
                out[name] = f"{text} {rule}.{mark} [records {len(reflective_dataset.get(name, []))}]"
            return out

    runs, calls = [], []
    for _ in range(2):
        seen = [0]

        def count(request, seen=seen):
            seen[0] += 1

        opt = TurboGEPA(routing.metric, max_metric_calls=150, instruction_proposer=Proposer(), num_threads=2,
                        seed=3, track_stats=True, log_dir=str(tmp_path), verbose=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.1, before_call=count)):
            result = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
        runs.append(([c.named_predictors()[0][1].signature.instructions for c in result.candidates],
                     result.val_aggregate_scores))
        calls.append(seen[0])
    stored = sqlite3.connect(tmp_path / "run.sqlite3").execute("SELECT texts_json FROM candidates").fetchall()
    assert any("REDACTED" in row[0] for row in stored)  # the premise: the proposals' texts were stored masked
    assert len(runs[0][0]) > 2 and runs[1] == runs[0]
    assert calls[1] < calls[0]  # only the traces a reflection reads are run again
