"""Session 47's review findings: each test fails without its fix."""

from __future__ import annotations

import dspy
import pytest

from dspy_turbogepa.testing import TASKS

from helpers import quick_compile, small_splits


@pytest.mark.parametrize("cap", [0, 1, 0.0])
def test_a_users_max_trace_size_does_not_starve_reflection(cap):
    """``dspy.configure(max_trace_size=0)`` (a memory cap people set for servers) left every rollout's
    trace empty: the run stopped as "no rollout called the predictors being optimized". A cap of 1 kept
    only the pipeline's last predictor, so ``extract`` was never reflected on. The rollout's trace is the
    optimizer's own list; the user's cap is theirs, and is there again after compile."""
    pipeline = TASKS["pipeline"]
    with dspy.context(max_trace_size=cap):
        out = quick_compile(task=pipeline, data=small_splits(pipeline, n_train=12, n_val=8, n_test=0),
                            budget=120)
        assert dspy.settings.max_trace_size == cap
    proposed = {name for cand in out.detailed_results.candidates[1:]
                for name, pred in cand.named_predictors()
                if pred.signature.instructions != pipeline.seed_instructions[name]}
    assert proposed == {"extract", "render"}, proposed
    assert out.detailed_results.best_idx > 0


@pytest.mark.parametrize("first, then", [(None, dspy.ChatAdapter()), (dspy.ChatAdapter(), dspy.JSONAdapter())])
def test_a_log_dir_refused_for_another_adapter_names_the_adapter(tmp_path, first, then):
    """The adapter is keyed with the task LM; a rerun that only configured another adapter was refused as
    "task_lm changed", showing the same model on both sides."""
    from dspy_turbogepa.store import RunStoreMismatchError

    with dspy.context(adapter=first):
        quick_compile(budget=30, log_dir=str(tmp_path))
    with dspy.context(adapter=then), pytest.raises(RunStoreMismatchError, match="task_lm changed") as info:
        quick_compile(budget=30, log_dir=str(tmp_path))
    message = str(info.value)
    stored, now = message.split(" -> now ", 1)
    assert f"adapter={type(then).__name__}(" in now
    assert ("adapter: none configured" if first is None else f"adapter={type(first).__name__}(") in stored


def _proposer_every_other(bad):
    """A custom instruction proposer answering ``bad(candidate, components)`` on every other call and a new
    text otherwise."""
    calls = []

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        if len(calls) % 2 == 0:
            return bad(candidate, components_to_update)
        return {c: candidate[c] + f" Rule {len(calls)}." for c in components_to_update}
    return proposer


@pytest.mark.parametrize("bad, kind", [(lambda cand, comps: None, "invalid_proposal"),
                                       (lambda cand, comps: {}, "empty_proposal")])
def test_an_unusable_proposal_mid_run_is_said_once(caplog, bad, kind):
    """A proposer answering ``None`` (or ``{}``) on every other call wasted half its reflections with nothing
    said above DEBUG (dspy.GEPA logs each at INFO). Now the first is a WARNING, the rest are counted."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        out = quick_compile(instruction_proposer=_proposer_every_other(bad), budget=80)
    skipped = out.detailed_results.run_stats["proposal_skips"][kind]
    said = [r for r in caplog.records if r.levelno == logging.WARNING and "answer is unusable" in r.getMessage()]
    assert skipped >= 2
    assert len(said) == 1 and f"proposal_skips'][{kind!r}]" in said[0].getMessage()


def test_ignored_parts_of_proposals_are_said_once_naming_what_came():
    """A proposer adding a ``"reasoning"`` key to every good answer gave one identical WARNING per proposal
    (60 in a review's run); a text that is not a string was "no usable instruction", not saying what it was."""
    import logging

    from dspy_turbogepa.proposers.reflection import _validate_answer

    asked = []

    def proposer(candidate, reflective_dataset, components_to_update):
        asked.append(1)
        return {"reasoning": "why", **{c: candidate[c] + f" More {len(asked)}." for c in components_to_update}}

    handler_records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_records.append(record)

    keep = Keep(logging.WARNING)
    logging.getLogger("dspy_turbogepa").addHandler(keep)
    try:
        quick_compile(instruction_proposer=proposer, budget=80)
    finally:
        logging.getLogger("dspy_turbogepa").removeHandler(keep)
    assert len(asked) >= 3
    said = [r for r in handler_records if "Ignoring parts of a proposal" in r.getMessage()]
    assert len(said) == 1 and "unknown component 'reasoning'" in said[0].getMessage()
    message = _validate_answer({"a": dspy.Prediction(a="x"), "b": "new"}, {"a": "A", "b": "B"}).message
    assert "no usable instruction for 'a' (a Prediction, expected str)" in message


def test_an_echo_differing_only_in_whitespace_is_an_echo():
    """DSPy reads an instruction through ``inspect.cleandoc``: the parent's text with a newline added or
    indented builds the parent's program. It was paid for as a new candidate every time (the whole budget
    re-evaluating the seed); it is an echo, and a proposer that only echoes stops the run as one."""
    from dspy_turbogepa.engine.errors import SystemicFailureError
    from dspy_turbogepa.proposers.reflection import _validate_answer

    assert dict(_validate_answer({"a": "  Be brief.\n"}, {"a": "Be brief."}).texts) == {"a": "Be brief."}
    assert dict(_validate_answer({"a": "\n  Be brief.\n  Be kind.\n"}, {"a": "x"}).texts) == {
        "a": "Be brief.\nBe kind."}

    def echo(candidate, reflective_dataset, components_to_update):
        return {c: "  " + candidate[c] + "\n" for c in components_to_update}

    with pytest.raises(SystemicFailureError, match="unchanged"):
        quick_compile(instruction_proposer=echo, budget=200)


def test_a_custom_base_lm_whose_forward_returns_no_response_is_told_so():
    """DSPy reads a custom ``dspy.BaseLM`` whose ``forward`` returns ``None`` (or a dict, or text) as an answer
    with no choices; the error blamed the service."""
    from dspy_turbogepa.engine.errors import SystemicFailureError

    class MyLM(dspy.BaseLM):
        def __init__(self):
            super().__init__(model="custom/student", model_type="chat", cache=False)

        def forward(self, prompt=None, messages=None, **kwargs):
            return None

    hint = r"MyLM is a custom dspy.BaseLM: if its forward\(\) answered, check that it returns an OpenAI-style"
    with pytest.raises(SystemicFailureError, match=hint):
        quick_compile(lm=MyLM(), budget=40)


class _RaisesOn(dspy.Module):
    """The routing program, with downstream code that raises on some tickets."""

    def __init__(self, inner, tickets):
        super().__init__()
        self.inner = inner
        self.tickets = frozenset(tickets)

    def forward(self, ticket):
        out = self.inner(ticket=ticket)
        if ticket in self.tickets:
            raise ValueError("CRM rejected the queue")
        return out


def test_a_tiny_split_failing_on_every_example_says_how_little_that_is():
    """On a 3-example trainset the first-N rule stops after 3 program errors, where the valset had a success
    among failures; the message said the valset's evaluations "succeed", and not that 3 examples are all the
    evidence there is, nor what to do when better instructions would avoid the error."""
    from dspy_turbogepa.engine.errors import SystemicFailureError

    routing = TASKS["routing"]
    data = small_splits(routing, n_train=3, n_val=3, n_test=0)
    raising = [e.ticket for e in data.train] + [data.val[0].ticket]
    with pytest.raises(SystemicFailureError) as info:
        quick_compile(program=_RaisesOn(routing.make_program(), raising), data=data, budget=60)
    message = str(info.value)
    assert "the first 3 evaluations on the trainset all failed" in message
    assert "while some on the valset succeeded" in message
    assert "On a split of 3 examples, that is every one" in message and "catch it in forward()" in message


@pytest.mark.parametrize("budget, warned", [(8 + 13, True), (8 + 14, False)])
def test_a_strict_budget_too_small_for_one_mutation_is_said(caplog, budget, warned):
    """``strict_budget=True`` with room after the seed's validation for no mutation's worst case ran
    nothing and said nothing (the non-strict ``max_metric_calls == len(valset)`` case warns)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        out = quick_compile(budget=budget, strict_budget=True)
    said = [r.getMessage() for r in caplog.records if "strict_budget=True" in r.getMessage()]
    mutated = len(out.detailed_results.candidates) > 1 or sum(out.detailed_results.run_stats["mutations"].values())
    if warned:
        assert said and "fewer than one mutation's worst case (14" in said[0] and "at least 22" in said[0]
        assert not mutated
    else:
        assert not said and mutated


def _drain_pressed(callbacks, on_press=None):
    """One candidate drained to ``callbacks`` by the autolog pump, under Python's own SIGINT handler (the
    callbacks send the presses); the drain must end in ``KeyboardInterrupt``. A class named MlflowCallback
    among them is taken for MLflow's (give it ``__module__ = "mlflow.dspy.callback"``)."""
    import signal

    from test_mlflow import _record

    from dspy_turbogepa.tracking import CompileThreadCallbackPump

    pump = CompileThreadCallbackPump(lambda texts: dspy.Predict("q -> a"), [dspy.Example(q="q").with_inputs("q")],
                                     callbacks=callbacks)
    pump.on_press = on_press
    pump.on_candidate(_record(0, {0: 1.0}, texts={"self": "Answer."}))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pump.drain()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_first_ctrl_c_held_for_mlflow_stops_the_search_at_once(monkeypatch, tmp_path):
    """A Ctrl-C during MLflow's callback is held until it returns (its nested run must be ended), and
    against a tracking server that died that took 8.5 minutes, the search spending its budget meanwhile.
    The first held press now calls the pump's stop hook at once; the press itself is still delivered after."""
    import os
    import signal
    import time


    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    stops: list[int] = []

    class MlflowCallback:
        optimizer_stack_level = 1
        stops_seen_during_call: list[int] = []

        def on_evaluate_start(self, call_id, instance, inputs):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            self.stops_seen_during_call.append(len(stops))

        def on_evaluate_end(self, call_id, outputs, exception=None):
            pass

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    cb = MlflowCallback()
    _drain_pressed([cb], on_press=lambda: stops.append(1))
    assert cb.stops_seen_during_call == [1] and stops == [1]


def test_autologs_callback_is_not_called_once_the_tracking_server_is_down(monkeypatch, caplog):
    """MLflow's callback catches its own errors after retrying each request for minutes: with the server
    killed mid-run, compile() replayed every queued candidate into it for over 15 minutes and said
    nothing. The pump asks the server's /health first and, once it does not answer, says so once and
    leaves MLflow out; other callbacks are still called."""
    import logging
    import socket

    from test_mlflow import _record

    from dspy_turbogepa.tracking import CompileThreadCallbackPump

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")

    class Recording:
        def __init__(self):
            self.started = 0

        def on_evaluate_start(self, call_id, instance, inputs):
            self.started += 1

        def on_evaluate_end(self, call_id, outputs, exception=None):
            pass

    class MlflowCallback(Recording):
        optimizer_stack_level = 1

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    mlflow_cb, plain = MlflowCallback(), Recording()
    val = [dspy.Example(q="q", a="x").with_inputs("q")]
    pump = CompileThreadCallbackPump(lambda texts: dspy.Predict("q -> a"), val, callbacks=[mlflow_cb, plain])
    for index in range(3):
        pump.on_candidate(_record(index, {0: 1.0}, texts={"self": f"Answer {index}."}))
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        assert pump.drain() == 3
    assert mlflow_cb.started == 0 and plain.started == 3
    said = [r.getMessage() for r in caplog.records if "stopped answering" in r.getMessage()]
    assert len(said) == 1 and f"127.0.0.1:{port}" in said[0]


class _SeedFailsOnTrain(dspy.Module):
    """The routing program, whose downstream code rejects every training ticket while the instruction is
    the seed's: any rewritten instruction fixes it."""

    def __init__(self, inner, seed_text, tickets):
        super().__init__()
        self.inner = inner
        self.seed_text = seed_text
        self.tickets = frozenset(tickets)

    def forward(self, ticket):
        out = self.inner(ticket=ticket)
        if ticket in self.tickets and self.inner.route.signature.instructions == self.seed_text:
            raise RuntimeError("downstream CRM rejected the ticket")
        return out


def _first_n_verdict(reflection_delay: float) -> str:
    import time

    from dspy_turbogepa.testing import make_reflection_lm, make_student_lm

    routing = TASKS["routing"]
    data = small_splits(routing, n_train=30, n_val=8, n_test=0)
    seed = routing.make_program()
    program = _SeedFailsOnTrain(seed, seed.route.signature.instructions, [e.ticket for e in data.train])
    try:
        out = quick_compile(program=program, data=data, budget=150, num_threads=1, reflection_minibatch_size=4,
                            lm=make_student_lm(seed=0, noise=0.0, before_call=lambda _: time.sleep(0.005)),
                            reflection_lm=make_reflection_lm(before_call=lambda _: time.sleep(reflection_delay)))
    except Exception as exc:  # the verdict as a user sees it
        return f"{type(exc).__name__}: {str(exc)[:80]}"
    return f"program: {out.detailed_results.val_aggregate_scores}"


def test_the_trainsets_first_n_verdict_does_not_depend_on_the_reflection_lms_latency():
    """A determinism review: with one evaluation slot, mutation 0's child (its reflection answered) and
    mutation 1's parent evaluations compete for the slot, so which were "the first 8 evaluations started"
    on the trainset depended on the reflection LM's latency, and the same deterministic run stopped as
    systemic 10 times in 16 and returned a program the other 6. In a deterministic run the trainset's rule
    reads each mutation's evaluations at its commit, in commit order."""
    assert _first_n_verdict(0.0) == _first_n_verdict(0.08)


def test_a_refusal_for_another_extraction_model_names_it():
    """The readable adapter showed only its plain settings; the run key also hashes the LMs an adapter holds
    (``TwoStepAdapter``'s extraction model), so a rerun that changed only that model fell back to hashes."""
    from dspy_turbogepa.adapter.run_identity import readable_task_lm
    from dspy_turbogepa.testing import make_student_lm

    lm = make_student_lm()
    first = readable_task_lm(lm, dspy.TwoStepAdapter(make_student_lm(temperature=0.0)))
    then = readable_task_lm(lm, dspy.TwoStepAdapter(make_student_lm(temperature=0.7)))
    assert first != then and "extraction_model=[model=sim/sim-student, temperature=0.7" in then


def test_a_stored_evaluation_with_an_unknown_failure_kind_is_a_damaged_store(tmp_path):
    """Replayed, a stored failure of a kind the engine never records fed the trainset's first-N rule (now
    read in commit order, stored evaluations included) and stopped the rerun as systemic with cause "zz:"."""
    import sqlite3

    from dspy_turbogepa.store import RunStoreError

    quick_compile(budget=40, log_dir=str(tmp_path))
    with sqlite3.connect(tmp_path / "run.sqlite3") as con:
        con.execute("UPDATE evaluations SET failure='zz'")
    with pytest.raises(RunStoreError, match="unknown failure kind 'zz'"):
        quick_compile(budget=40, log_dir=str(tmp_path))


def test_a_log_dir_written_under_another_python_says_so_when_refused(tmp_path):
    """Code is keyed as Python compiled it: a run written under Python 3.11 and resumed under 3.12 was refused
    as "metric, student changed", sending the user after an edit nobody made (dspy.GEPA's pickle resumed)."""
    import json
    import sqlite3
    import sys

    from dspy_turbogepa.store import RunStoreMismatchError

    routing = TASKS["routing"]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    quick_compile(metric=metric, budget=30, log_dir=str(tmp_path))
    with sqlite3.connect(tmp_path / "run.sqlite3") as con:
        meta = json.loads(con.execute("SELECT value FROM meta WHERE key = 'run_meta'").fetchone()[0])
        assert meta["run_key_readable"]["python"] == "{}.{}".format(*sys.version_info[:2])
        meta["run_key_readable"]["python"] = "3.9"  # as if written elsewhere; its bytecode would differ
        con.execute("UPDATE meta SET value = ? WHERE key = 'run_meta'", (json.dumps(meta),))

    def edited(gold, pred, trace=None, pred_name=None, pred_trace=None):  # stands for the other bytecode
        return routing.metric(gold, pred, trace, pred_name, pred_trace) * 1

    said = r"metric changed .*It was written under Python 3\.9, and this is Python 3\.\d+: .*if only they changed, "
    with pytest.raises(RunStoreMismatchError, match=said + r"resume it under Python 3\.9"):
        quick_compile(metric=edited, budget=30, log_dir=str(tmp_path))


def test_a_ctrl_c_while_the_engine_thread_starts_is_the_first_press(monkeypatch):
    """A press landing inside ``thread.start()`` (it waits for the new thread to run, and under load the run is
    already evaluating by then) escaped the runner's handling: compile raised "Aborted by a second Ctrl-C"
    with no grace period and no program (2 in 23 tries on Python 3.12 under load)."""
    import os
    import signal
    import threading
    import time

    from dspy_turbogepa.adapter import runner

    class PressedWhileStarting(threading.Thread):
        def start(self):
            super().start()
            if self.name == "turbogepa-engine":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the signal lands here, inside start()

    monkeypatch.setattr(runner.threading, "Thread", PressedWhileStarting)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = quick_compile(budget=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.detailed_results.stop_reason == "interrupted"


def test_after_a_second_press_escapes_mlflows_start_its_end_is_not_waited_for(monkeypatch, tmp_path):
    """A second Ctrl-C gets through MLflow's held ``on_evaluate_start`` (a hung server); its
    ``on_evaluate_end`` was then held again in full, against a dead server for minutes, and the third press
    was held with nothing said: only the fourth got through."""
    import os
    import signal
    import time


    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    ended: list[bool] = []

    class MlflowCallback:
        optimizer_stack_level = 1

        def on_evaluate_start(self, call_id, instance, inputs):
            for _ in range(2):  # the first press held, the second gets through
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.02)

        def on_evaluate_end(self, call_id, outputs, exception=None):
            os.kill(os.getpid(), signal.SIGINT)  # a third press, while the end hangs
            time.sleep(0.05)
            ended.append(True)

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    _drain_pressed([MlflowCallback()])
    assert ended == []  # the third press cut the end short


def test_a_first_press_in_another_callback_still_holds_mlflows_end(monkeypatch, tmp_path):
    """A review of the change above: a first Ctrl-C landing (unheld) in another callback's start was taken
    for a second press through MLflow's, so MLflow's end, which closes its nested run, was cut short by the
    next press and the compile run left RUNNING."""
    import os
    import signal
    import time


    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    log: list[str] = []

    class MlflowCallback:
        optimizer_stack_level = 1

        def on_evaluate_start(self, call_id, instance, inputs):
            log.append("mlflow start")

        def on_evaluate_end(self, call_id, outputs, exception=None):
            os.kill(os.getpid(), signal.SIGINT)  # the user's second press, while the end closes its run
            time.sleep(0.05)
            log.append("mlflow end finished")

    class Tracing:  # another tracing callback, after autolog's: runs unheld
        def on_evaluate_start(self, call_id, instance, inputs):
            os.kill(os.getpid(), signal.SIGINT)  # the user's first press lands here
            time.sleep(0.05)

        def on_evaluate_end(self, call_id, outputs, exception=None):
            log.append("other end")

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    _drain_pressed([MlflowCallback(), Tracing()])
    assert log == ["mlflow start", "mlflow end finished", "other end"]


def test_a_press_before_the_engine_thread_started_aborts_at_once(monkeypatch):
    """A press in the few bytecodes before the start is held: taken for the first press, compile waited out
    the grace period with no engine thread, then started the run anyway."""
    import contextlib

    from dspy_turbogepa.adapter import runner

    ran: list[str] = []

    @contextlib.contextmanager
    def pressed_on_entry(*args, **kwargs):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    async def coro():
        ran.append("run")
        return "result"

    monkeypatch.setattr(runner, "ctrl_c_held", pressed_on_entry)
    graces: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner.run_coroutine_in_thread(coro, on_interrupt=lambda: graces.append("interrupt"), grace_seconds=5)
    assert ran == [] and graces == []
