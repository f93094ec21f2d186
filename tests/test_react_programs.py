"""Agent programs under TurboGEPA: ``dspy.ReAct`` with tools, and a module holding ``dspy.Tool`` objects.

The project's simulator does not speak ReAct, so this file brings its own deterministic fakes: a custom
engine (``dspy.LM(engine=...)``) whose agent calls ``lookup`` with the right argument only when the
``react`` instruction says ``USE_LOOKUP`` (otherwise with a lower-cased country, which the tool refuses
with a ``KeyError`` that ReAct turns into an observation), and a reflection engine that adds
``USE_LOOKUP`` to the instruction it is shown. Each compile runs on a few examples and a small budget.

Four tests pin bugs this file found (2026-12-05; each failed before its fix): a ReAct step that failed
to parse after an earlier step of the same predictor never reached the reflection; ``dspy.Tool`` trace
inputs came back from the run store as dicts, so a resumed reflection read other text; and the run key
saw neither a tool's argument schema nor the predictors of a module used as a tool.
"""

from __future__ import annotations

import dataclasses
import decimal
import itertools
import json
import re
import sqlite3
import threading
from typing import Any

import dspy
import pytest
from dspy import lm15
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.store import RunStoreMismatchError
from dspy_turbogepa.testing.fake_lm import request_messages
from dspy_turbogepa.testing.responder import Responder, format_outputs, parse_prompt

MAGIC = "USE_LOOKUP"
TABLE = {"France": "CODE-PAR", "Japan": "CODE-TYO", "Peru": "CODE-LIM", "Kenya": "CODE-NBO",
         "Chile": "CODE-SCL", "Spain": "CODE-MAD"}


# --------------------------------------------------------------------------------------------- fakes
class FakeEngine:
    """A dspy 3.4 custom engine answering with ``fn(parsed_prompt)``; ``before(text)`` may raise (a 429).
    Every parsed prompt is kept in ``prompts`` (the reflection's are what a reflection reads)."""

    def __init__(self, fn, before=None):
        self.fn, self.before = fn, before
        self.lock = threading.Lock()
        self.prompts: list[Any] = []
        self.ids = itertools.count(1)

    def complete(self, request):
        validate_request(request)
        messages = request_messages(request)
        if self.before is not None:
            self.before("\n".join(m["content"] for m in messages))
        parsed = parse_prompt(messages, {"response_format": request.config.response_format})
        with self.lock:
            self.prompts.append(parsed)
        return Response(id=f"fake-{next(self.ids)}", model="fake", finish_reason="stop",
                        message=Message.assistant([TextPart(self.fn(parsed))]),
                        usage=Usage(input_tokens=10, output_tokens=5))

    def stream(self, request):
        return iter(response_to_events(self.complete(request)))

    def close(self):
        pass

    def __deepcopy__(self, memo):
        return self


def make_lm(fn, before=None) -> tuple[dspy.LM, FakeEngine]:
    engine = FakeEngine(fn, before)
    return dspy.LM("fake/agent", engine=engine, cache=False), engine


def _country(prompt) -> str:
    match = re.search(r"of (\w+)\?", prompt.last_user)
    return match.group(1) if match else "?"


def make_agent(parse_fail: tuple[str, ...] = ()):
    """ReAct's ``react`` step: look the country up (right only with USE_LOOKUP), then finish; for a
    country in ``parse_fail`` the second step answers no parsable fields. ``extract``: the code seen
    in the trajectory. A tool's own ``country -> code`` predictor: the table. A module passing
    ``tools`` as an input (``ToolCalls``): one call of ``lookup``."""

    def agent(p):
        outs = p.output_names
        if "code" in outs:  # a tool's own predictor (asks the configured LM)
            return format_outputs({"code": TABLE.get(p.sections.get("country", ""), "none")}, p.output_fields,
                                  p.wants_json)
        country = _country(p)
        arg = country if MAGIC in p.instruction else country.lower()
        if "next_tool_name" in outs:
            if "observation_0" not in p.last_user:
                vals = {"next_thought": f"Look up {country}.", "next_tool_name": "lookup",
                        "next_tool_args": json.dumps({"country": arg})}
            elif country in parse_fail:
                return "I am not sure what to do next."
            else:
                vals = {"next_thought": "Done.", "next_tool_name": "finish", "next_tool_args": "{}"}
        elif "tool_calls" in outs:
            vals = {"tool_calls": json.dumps({"tool_calls": [{"name": "lookup", "args": {"country": arg}}]})}
        else:
            code = re.search(r"CODE-(\w+)", p.last_user)
            vals = {"reasoning": "From the trajectory.", "answer": f"CODE-{code.group(1)}" if code else "unknown"}
        return format_outputs(vals, p.output_fields, p.wants_json)

    return agent


def reflector(p):
    """dspy's InstructionProposer (JSONAdapter): the instruction shown, plus USE_LOOKUP when the
    feedback asks for it."""
    current = Responder.current_instruction(p)
    new = current + "\n" + MAGIC if MAGIC in p.full_text and MAGIC not in current else current + " Be careful."
    values = {n: (new if "instruction" in n else "-") for n in p.output_names}
    return format_outputs(values, p.output_fields, p.wants_json)


def lookup(country: str) -> str:
    """Look up the capital code of a country."""
    return TABLE[country]  # KeyError for an unknown spelling: ReAct turns it into an observation


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    ok = pred.answer == gold.answer
    return dspy.Prediction(score=float(ok), feedback="Correct." if ok else
                           f"Expected {gold.answer}, got {pred.answer}. Call the lookup tool properly ({MAGIC}).")


def examples(names=tuple(TABLE)) -> list[dspy.Example]:
    return [dspy.Example(question=f"Capital code of {c}?", answer=TABLE[c]).with_inputs("question") for c in names]


def react(tool=lookup, max_iters=3) -> dspy.ReAct:
    """A ReAct over one tool, named ``lookup`` (the name the fake agent calls)."""
    tool = tool if isinstance(tool, dspy.Tool) else dspy.Tool(tool, name="lookup")
    return dspy.ReAct("question -> answer", tools=[tool], max_iters=max_iters)


class Recorder:
    """A custom instruction_proposer: records what it is given, adds USE_LOOKUP."""

    def __init__(self):
        self.calls: list[tuple[dict[str, str], dict[str, list[dict[str, Any]]], list[str]]] = []

    def __call__(self, candidate, reflective_dataset, components_to_update):
        self.calls.append((dict(candidate), {k: list(v) for k, v in reflective_dataset.items()},
                           list(components_to_update)))
        return {c: candidate[c] + "\n" + MAGIC for c in components_to_update}


def turbo(**kw) -> TurboGEPA:
    kw.setdefault("num_threads", 1)
    kw.setdefault("verbose", False)
    return TurboGEPA(metric=kw.pop("metric", metric), **kw)


def _narrow(**kw):
    """TurboGEPA reading what dspy.GEPA reads: the minibatch only, one reflection per step."""
    return {"reflection_scouts": 0, "reflection_feedback_reuse": 0, "max_sibling_reflections": 1, **kw}


# ---------------------------------------------------------------- components and the reflective dataset
def test_react_components_and_reflective_records_match_dspy_gepa():
    """Components are ``react`` and ``extract.predict`` (dspy.GEPA's ``named_predictors()``), and the
    records of the first reflection hold the trajectory (tool name, args, the observation of a tool
    that raised, caught by ReAct) exactly as dspy.GEPA formats it for a custom proposer."""
    train, val = examples(("France", "Japan", "Kenya")), examples(("Chile", "Spain"))
    lm, _ = make_lm(make_agent())
    got = {}
    for name in ("gepa", "turbo"):
        rec = Recorder()
        common = {"reflection_lm": lm, "instruction_proposer": rec, "reflection_minibatch_size": 3,
                  "component_selector": "all", "max_metric_calls": len(val) + 3}
        with dspy.context(lm=lm):
            if name == "gepa":
                dspy.GEPA(metric=metric, num_threads=1, seed=0, **common).compile(react(), trainset=train, valset=val)
            else:
                turbo(**_narrow(**common)).compile(react(), trainset=train, valset=val)
        got[name] = rec.calls[0]

    (g_cand, g_data, g_comps), (t_cand, t_data, t_comps) = got["gepa"], got["turbo"]
    assert list(t_cand) == list(g_cand) == ["react", "extract.predict"]
    assert sorted(t_comps) == sorted(g_comps) and set(t_data) == set(g_data) == {"react", "extract.predict"}

    def by_question(records):
        return {r["Inputs"]["question"]: r for r in records}

    # extract.predict runs once per rollout: the same record, field for field (stringified as dspy.GEPA does)
    assert by_question(t_data["extract.predict"]) == by_question(g_data["extract.predict"])
    for record in t_data["extract.predict"]:
        trajectory = record["Inputs"]["trajectory"]
        assert "[[ ## tool_name_0 ## ]]\nlookup" in trajectory
        assert '[[ ## tool_args_0 ## ]]\n{"country": "' in trajectory
        assert "Execution error in lookup" in trajectory and "KeyError" in trajectory
        assert "[[ ## tool_name_1 ## ]]\nfinish" in trajectory
    # react runs twice per rollout and both pick one call at random: a step of the same rollout, same shape
    t_react, g_react = by_question(t_data["react"]), by_question(g_data["react"])
    assert set(t_react) == set(g_react)
    extract = by_question(t_data["extract.predict"])
    for q, record in t_react.items():
        assert record["Feedback"] == g_react[q]["Feedback"]
        assert set(record["Generated Outputs"]) == set(g_react[q]["Generated Outputs"]) == {
            "next_thought", "next_tool_name", "next_tool_args"}
        assert extract[q]["Inputs"]["trajectory"].startswith(record["Inputs"]["trajectory"])
        country = q.split()[-1][:-1].lower()
        assert record["Generated Outputs"]["next_tool_args"] in ("{}", f"{{'country': '{country}'}}")


def test_react_records_keep_objects_for_dspys_own_proposer():
    """With dspy's InstructionProposer the records keep the values (``next_tool_args`` a dict), as
    dspy.GEPA hands them to the built-in proposer; the reflection prompt shows the tool call."""
    train, val = examples(("France", "Japan")), examples(("Chile",))
    lm, _ = make_lm(make_agent())
    rlm, reng = make_lm(reflector)
    with dspy.context(lm=lm):
        out = turbo(reflection_lm=rlm, max_metric_calls=12, track_stats=True,
                    **_narrow()).compile(react(), trainset=train, valset=val)
    assert reng.prompts, "no reflection ran"
    text = reng.prompts[0].full_text
    assert '"next_tool_name": "lookup"' in text or '"next_tool_name": "finish"' in text
    assert '"next_tool_args": {' in text  # a JSON object, not the str() of a dict
    assert out.detailed_results.val_aggregate_scores[0] == 0.0
    assert max(out.detailed_results.val_aggregate_scores) == 1.0
    assert MAGIC in out.react.signature.instructions


def test_reference_dspy_gepa_reflects_on_a_react_parse_failure_after_a_tool_call():
    """Reference for the next test: dspy.GEPA (add_format_failure_as_feedback=True) gives ``react`` a
    "Couldn't parse" record for a rollout whose second ReAct step did not parse."""
    train, val = examples(("France", "Japan", "Peru")), examples(("Chile", "Spain"))
    lm, _ = make_lm(make_agent(parse_fail=("Peru",)))
    rec = Recorder()
    with dspy.context(lm=lm):
        dspy.GEPA(metric=metric, reflection_lm=lm, instruction_proposer=rec, reflection_minibatch_size=3,
                  max_metric_calls=len(val) + 3, num_threads=1, seed=0,
                  add_format_failure_as_feedback=True).compile(react(), trainset=train, valset=val)
    _, data, comps = rec.calls[0]
    assert comps == ["react"]
    peru = [r for r in data["react"] if r["Inputs"]["question"] == "Capital code of Peru?"]
    assert len(peru) == 1 and "Couldn't parse" in peru[0]["Generated Outputs"]
    assert "I am not sure what to do next." in peru[0]["Generated Outputs"]


@pytest.mark.parametrize("add_format_failure_as_feedback", [True, False])
def test_react_parse_failure_after_a_tool_call_reaches_the_reflection(add_format_failure_as_feedback):
    train, val = examples(("France", "Japan", "Peru")), examples(("Chile", "Spain"))
    lm, _ = make_lm(make_agent(parse_fail=("Peru",)))
    rec = Recorder()
    with dspy.context(lm=lm):
        turbo(reflection_lm=lm, instruction_proposer=rec, reflection_minibatch_size=3, max_metric_calls=len(val) + 3,
              add_format_failure_as_feedback=add_format_failure_as_feedback,
              **_narrow()).compile(react(), trainset=train, valset=val)
    _, data, comps = rec.calls[0]
    assert comps == ["react"]
    questions = [r["Inputs"]["question"] for r in data["react"]]
    assert "Capital code of Peru?" in questions, questions  # the parse failure, as dspy.GEPA shows it
    peru = next(r for r in data["react"] if r["Inputs"]["question"] == "Capital code of Peru?")
    assert "Couldn't parse" in str(peru["Generated Outputs"])


# ----------------------------------------------------------------------------------- tools that raise
class ToolAbort(BaseException):
    """Not an ``Exception``: ReAct's ``except Exception`` around the tool call does not catch it."""


def test_a_tool_raising_what_react_does_not_catch_ends_compile_as_in_dspy_gepa():
    def lookup_or_abort(country: str) -> str:
        """Look up the capital code of a country."""
        if country == "peru":
            raise ToolAbort("the tool's quota is spent")
        return TABLE.get(country, "none")

    lm, _ = make_lm(make_agent())
    rlm, _ = make_lm(reflector)
    result: dict[str, BaseException | None] = {}

    def run():
        try:
            with dspy.context(lm=lm):
                turbo(reflection_lm=rlm, max_metric_calls=10, num_threads=2).compile(
                    react(dspy.Tool(lookup_or_abort, name="lookup")), trainset=examples(("France", "Peru")),
                    valset=examples(("Peru", "Chile")))
            result["error"] = None
        except BaseException as exc:  # what compile raised is the finding
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "compile hung after a tool raised a BaseException"
    assert isinstance(result["error"], ToolAbort)


def test_context_window_truncation_inside_react_is_not_a_failure():
    """ReAct catches a context-window error itself (it truncates the trajectory, then ends it): our LM
    copies note the error, which must not turn the rollout into a retry or a failure."""

    def agent(p):
        if "next_tool_name" in p.output_names:  # look up again and again
            return format_outputs({"next_thought": "again", "next_tool_name": "lookup",
                                   "next_tool_args": json.dumps({"country": _country(p)})}, p.output_fields,
                                  p.wants_json)
        return make_agent()(p)

    def before(text):
        if "next_tool_name" in text and "observation_1" in text:
            raise lm15.ContextLengthError("maximum context length is 100 tokens", status=400)

    lm, _ = make_lm(agent, before)
    data = examples(("France", "Japan", "Peru"))
    with dspy.context(lm=lm):
        out = turbo(reflection_lm=lm, max_metric_calls=len(data), track_stats=True).compile(
            react(max_iters=4), trainset=data, valset=data)
    stats = out.detailed_results.run_stats
    assert out.detailed_results.val_aggregate_scores == [1.0]
    assert not stats["failures"]
    assert stats["rate_limits"]["transient_errors"] == 0 and stats["rate_limits"]["rate_limited"] == 0


# ------------------------------------------------------------------------------------------ rate limits
def _raise_429_on(pattern: str, times: int):
    left = {"n": times}
    lock = threading.Lock()

    def before(text):
        if pattern in text:
            with lock:
                if left["n"] > 0:
                    left["n"] -= 1
                    raise lm15.RateLimitError("Too many requests", status=429, retry_after=0.0)

    return before, left


def _compile_a_perfect_seed(student, before):
    """``student`` (a ReAct) with the instruction that solves every example, validated once on three
    examples with ``before`` run ahead of each LM call."""
    lm, _ = make_lm(make_agent(), before)
    data = examples(("France", "Japan", "Peru"))
    student.react.signature = student.react.signature.with_instructions(
        student.react.signature.instructions + "\n" + MAGIC)
    with dspy.context(lm=lm):
        return turbo(reflection_lm=lm, max_metric_calls=len(data), track_stats=True).compile(
            student, trainset=data, valset=data)


def test_a_429_inside_the_react_loop_is_retried_not_scored():
    """Two 429s in a row (ChatAdapter, then its JSONAdapter fallback) on a react step after a tool call:
    the error leaves ReAct, and the rollout is retried as a rate limit, not scored as a wrong answer."""
    before, left = _raise_429_on("[[ ## observation_0 ## ]]", 2)
    out = _compile_a_perfect_seed(react(), before)
    stats = out.detailed_results.run_stats
    assert left["n"] == 0
    assert out.detailed_results.val_subscores[0] == {0: 1.0, 1: 1.0, 2: 1.0}
    assert stats["rate_limits"]["rate_limited"] >= 1 and stats["rate_limits"]["rate_limit_retries"] >= 1
    assert not stats["failures"]


def test_a_429_inside_a_tool_that_react_caught_is_retried_not_scored():
    """A tool that asks the configured LM (a dspy.Predict inside the tool) hits a 429: the tool raises,
    ReAct turns it into an observation and answers "unknown". The swallowed 429 is still a rate limit."""

    def ask_lookup(country: str) -> str:
        """Look up the capital code of a country."""
        return dspy.Predict("country -> code")(country=country).code

    before, left = _raise_429_on("`code`", 2)
    out = _compile_a_perfect_seed(react(ask_lookup), before)
    stats = out.detailed_results.run_stats
    assert left["n"] == 0
    assert out.detailed_results.val_subscores[0] == {0: 1.0, 1: 1.0, 2: 1.0}
    assert stats["rate_limits"]["rate_limited"] >= 1 and not stats["failures"]


# ------------------------------------------------------------------------------------------------ resume
class CountingMetric:
    def __init__(self):
        self.scoring = self.feedback = 0
        self.lock = threading.Lock()

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        with self.lock:
            if pred_name is None:
                self.scoring += 1
            else:
                self.feedback += 1
        return metric(gold, pred, trace, pred_name, pred_trace)


def test_a_finished_react_run_resumes_with_no_new_call(tmp_path):
    train, val = examples(("France", "Japan", "Peru")), examples(("Chile", "Spain"))
    lm, eng = make_lm(make_agent())
    rlm, reng = make_lm(reflector)
    counter = CountingMetric()

    def run():
        with dspy.context(lm=lm):
            return turbo(metric=counter, reflection_lm=rlm, max_metric_calls=20, log_dir=str(tmp_path),
                         track_stats=True).compile(react(), trainset=train, valset=val)

    first = run()
    calls = (counter.scoring, counter.feedback, len(eng.prompts), len(reng.prompts))
    assert calls[0] > 0 and calls[3] > 0 and max(first.detailed_results.val_aggregate_scores) == 1.0
    again = run()
    assert (counter.scoring, counter.feedback, len(eng.prompts), len(reng.prompts)) == calls
    assert again.react.signature.instructions == first.react.signature.instructions
    assert again.detailed_results.val_aggregate_scores == first.detailed_results.val_aggregate_scores


@dataclasses.dataclass
class Hit:
    code: str
    price: decimal.Decimal


def lookup_hit(country: str) -> Hit:
    """Look up the capital code of a country."""
    return Hit(TABLE.get(country, "none"), decimal.Decimal("2.10"))


def metric_reading_observations(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """Feedback that quotes what the tool returned (a dataclass holding a Decimal)."""
    observations = [v for k, v in (getattr(pred, "trajectory", None) or {}).items() if k.startswith("observation")]
    answer = getattr(pred, "answer", "")
    ok = answer == gold.answer
    return dspy.Prediction(score=float(ok), feedback="Correct." if ok else
                           f"Expected {gold.answer}; the tool returned {observations!r} ({MAGIC}).")


def _first_reflection_fresh_and_resumed(tmp_path, make_student, agent_metric=metric):
    """The first reflection prompt of a run, and of the same run resumed from a session that only
    evaluated the seed (valset = trainset: the seed's rows hold trajectories): the resumed reflection
    reads the stored trajectories."""
    data = examples(("France", "Japan", "Peru", "Kenya"))
    lm, _ = make_lm(make_agent())

    def run(log_dir, budget):
        rlm, reng = make_lm(reflector)
        with dspy.context(lm=lm):
            turbo(metric=agent_metric, reflection_lm=rlm, max_metric_calls=budget, log_dir=str(log_dir),
                  track_stats=True).compile(make_student(), trainset=data, valset=data)
        return [p.full_text for p in reng.prompts]

    fresh = run(tmp_path / "fresh", 12)
    assert run(tmp_path / "resumed", len(data)) == []  # the seed only: no reflection yet
    resumed = run(tmp_path / "resumed", 12)
    assert fresh and resumed
    return fresh[0], resumed[0]


def test_a_resumed_reflection_reads_the_same_react_trajectories(tmp_path):
    """Tool names, JSON args, observations (a dataclass with a Decimal the tool returned) come back from
    the store so that the resumed reflection's prompt is the live one, metric feedback included."""
    fresh, resumed = _first_reflection_fresh_and_resumed(
        tmp_path, lambda: react(lookup_hit), metric_reading_observations)
    assert "Hit(code=" in fresh and "Decimal('2.10')" in fresh  # the feedback quotes the tool's object
    assert resumed == fresh


class ToolSig(dspy.Signature):
    """Call tools to answer the question."""

    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    tool_calls: dspy.ToolCalls = dspy.OutputField()


class ToolUser(dspy.Module):
    """A module holding dspy.Tool objects and passing them to its predictor (native tool-call style)."""

    def __init__(self, tool=None):
        super().__init__()
        self.tools = [tool or dspy.Tool(lambda_free_lookup, name="lookup")]
        self.call = dspy.Predict(ToolSig)

    def forward(self, question):
        out = self.call(question=question, tools=self.tools)
        results = [c.execute(functions=self.tools) for c in out.tool_calls.tool_calls]
        return dspy.Prediction(answer=str(results[0]))


def lambda_free_lookup(country: str) -> str:
    """Look up the capital code of a country."""
    return TABLE.get(country, f"no such country: {country}")


def test_a_module_holding_tools_optimizes():
    data = examples(("France", "Japan", "Peru"))
    lm, _ = make_lm(make_agent())
    rlm, _ = make_lm(reflector)
    student = ToolUser()
    with dspy.context(lm=lm):
        out = turbo(reflection_lm=rlm, max_metric_calls=12, track_stats=True).compile(
            student, trainset=data, valset=data)
    assert out.detailed_results.val_aggregate_scores[0] == 0.0 and max(out.detailed_results.val_aggregate_scores) == 1.0
    assert MAGIC in out.call.signature.instructions and MAGIC not in student.call.signature.instructions
    assert out.tools[0].func is lambda_free_lookup and student.tools[0].func is lambda_free_lookup


def test_a_resumed_reflection_reads_the_same_tool_inputs(tmp_path):
    fresh, resumed = _first_reflection_fresh_and_resumed(tmp_path, ToolUser)
    assert "lookup, whose description is" in fresh
    assert resumed == fresh


# ---------------------------------------------------------------------------------------------- run key
def lookup_fixed(country: str) -> str:
    """Look up the capital code of a country."""
    return TABLE.get(country.title(), "none")  # the edited tool: accepts any spelling


def test_an_edited_tool_or_description_under_the_same_log_dir_is_refused(tmp_path, monkeypatch):
    def lookup_v(country: str) -> str:
        """Look up the capital code of a country."""
        return TABLE[country]

    train, val = examples(("France", "Japan")), examples(("Peru",))
    lm, _ = make_lm(make_agent())

    def run(student, log_dir):
        with dspy.context(lm=lm):
            return turbo(reflection_lm=lm, max_metric_calls=len(val), log_dir=str(log_dir)).compile(
                student, trainset=train, valset=val)

    run(react(lookup_v), tmp_path / "react")
    monkeypatch.setattr(lookup_v, "__code__", lookup_fixed.__code__)  # the user edited the tool's body
    with pytest.raises(RunStoreMismatchError, match="student changed"):
        run(react(lookup_v), tmp_path / "react")
    with pytest.raises(RunStoreMismatchError, match="student changed"):
        run(react(dspy.Tool(lookup, desc="Find a country's capital code.")), tmp_path / "react")

    # a module holding its tools (their description is in no instruction): the description is keyed too
    run(ToolUser(dspy.Tool(lambda_free_lookup, name="lookup")), tmp_path / "tools")
    with pytest.raises(RunStoreMismatchError, match="student changed"):
        run(ToolUser(dspy.Tool(lambda_free_lookup, name="lookup", desc="Find a country's capital code.")),
            tmp_path / "tools")


def _subagent_react(instructions: str) -> dspy.ReAct:
    expert = dspy.Predict(dspy.Signature("country -> code", instructions))
    return dspy.ReAct("question -> answer", tools=[dspy.Tool(expert, name="lookup", desc="Ask the expert.",
                                                             args={"country": {"type": "string"}})], max_iters=3)


def test_an_edited_subagent_tool_under_the_same_log_dir_is_refused(tmp_path):
    def agent(p):
        if "code" in p.output_names:  # the sub-agent: right only when told to use the table
            code = TABLE.get(p.sections.get("country", ""), "none") if "table" in p.instruction else "CODE-???"
            return format_outputs({"code": code}, p.output_fields, p.wants_json)
        return make_agent()(p)

    train, val = examples(("France", "Japan")), examples(("Peru", "Chile"))
    lm, eng = make_lm(agent)
    seed = react()
    magic = seed.react.signature.instructions + "\n" + MAGIC

    def run(instructions):
        student = _subagent_react(instructions)
        student.react.signature = student.react.signature.with_instructions(magic)
        with dspy.context(lm=lm):
            return turbo(reflection_lm=lm, max_metric_calls=len(val), log_dir=str(tmp_path),
                         track_stats=True).compile(student, trainset=train, valset=val)

    assert run("Answer from the table.").detailed_results.val_aggregate_scores == [1.0]
    calls = len(eng.prompts)
    with pytest.raises(RunStoreMismatchError):  # an edited sub-agent answers differently: another run
        replayed = run("Guess the code.")
        # what happened instead: the old score replayed, nothing evaluated
        assert len(eng.prompts) == calls and replayed.detailed_results.val_aggregate_scores == [1.0]


def test_an_edited_tool_argument_description_under_the_same_log_dir_is_refused(tmp_path):
    train, val = examples(("France", "Japan")), examples(("Peru",))
    lm, _ = make_lm(make_agent())

    def run(tool):
        with dspy.context(lm=lm):
            turbo(reflection_lm=lm, max_metric_calls=len(val), log_dir=str(tmp_path)).compile(
                ToolUser(tool), trainset=train, valset=val)

    run(dspy.Tool(lambda_free_lookup, name="lookup"))
    with pytest.raises(RunStoreMismatchError):
        run(dspy.Tool(lambda_free_lookup, name="lookup",
                      arg_desc={"country": "The country's name, capitalised (France)."}))


# --------------------------------------------------------------------------------- the optimized program
class CachedLookup:
    """A stateful tool: a cache filled before compile, and a call counter."""

    def __init__(self):
        self.cache = {"Atlantis": "CODE-ATL"}
        self.calls = 0

    def __call__(self, country: str) -> str:
        """Look up the capital code of a country."""
        self.calls += 1
        return self.cache.get(country) or TABLE[country]


class DbLookup:
    """A tool holding what cannot be deep-copied (a database connection)."""

    def __init__(self, conn):
        self.conn = conn

    def __call__(self, country: str) -> str:
        """Look up the capital code of a country."""
        row = self.conn.execute("select code from codes where country = ?", (country,)).fetchone()
        if row is None:
            raise KeyError(country)
        return row[0]


def test_the_optimized_react_saves_loads_and_leaves_the_students_tools_alone(tmp_path):
    train, val = examples(("France", "Japan", "Peru")), examples(("Chile", "Spain"))
    lm, _ = make_lm(make_agent())
    rlm, _ = make_lm(reflector)
    cached = CachedLookup()
    student = dspy.ReAct("question -> answer", tools=[lookup, dspy.Tool(cached, name="cached_lookup")], max_iters=3)
    tools_before = dict(student.tools)
    instructions_before = {n: p.signature.instructions for n, p in student.named_predictors()}
    with dspy.context(lm=lm):
        out = turbo(reflection_lm=rlm, max_metric_calls=20, track_stats=True).compile(
            student, trainset=train, valset=val)
    assert MAGIC in out.react.signature.instructions

    # the student: same tool objects, same instructions, its stateful tool never called (evaluations run
    # on copies of the program, as dspy.GEPA's build_program deep-copies it)
    assert student.tools == tools_before and all(student.tools[k] is v for k, v in tools_before.items())
    assert student.tools["lookup"].func is lookup and student.tools["cached_lookup"].func is cached
    assert {n: p.signature.instructions for n, p in student.named_predictors()} == instructions_before
    assert cached.calls == 0
    # the optimized program: the user's function itself; a stateful tool object copied with its state
    assert out.tools["lookup"].func is lookup
    assert isinstance(out.tools["cached_lookup"].func, CachedLookup)
    assert out.tools["cached_lookup"].func.cache == {"Atlantis": "CODE-ATL"}

    path = tmp_path / "react.json"
    out.save(str(path))
    state = json.loads(path.read_text())
    assert set(state) >= {"react", "extract.predict"}
    fresh = dspy.ReAct("question -> answer", tools=[lookup, dspy.Tool(cached, name="cached_lookup")], max_iters=3)
    fresh.load(str(path))
    assert fresh.react.signature.instructions == out.react.signature.instructions
    assert fresh.extract.predict.signature.instructions == out.extract.predict.signature.instructions
    assert fresh.tools["lookup"].func is lookup and fresh.tools["cached_lookup"].func is cached
    with dspy.context(lm=lm):
        assert fresh(question="Capital code of Kenya?").answer == "CODE-NBO"


def test_a_tool_holding_an_uncopyable_connection_is_shared_not_broken():
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute("create table codes (country text, code text)")
    conn.executemany("insert into codes values (?, ?)", TABLE.items())
    tool = dspy.Tool(DbLookup(conn), name="lookup")
    train, val = examples(("France", "Japan")), examples(("Chile", "Spain"))
    lm, _ = make_lm(make_agent())
    rlm, _ = make_lm(reflector)
    student = dspy.ReAct("question -> answer", tools=[tool], max_iters=3)
    with dspy.context(lm=lm):
        out = turbo(reflection_lm=rlm, max_metric_calls=16, track_stats=True).compile(
            student, trainset=train, valset=val)
        assert max(out.detailed_results.val_aggregate_scores) == 1.0
        assert out(question="Capital code of Kenya?").answer == "CODE-NBO"
    assert out.tools["lookup"].func.conn is conn


def test_a_stored_tool_comes_back_as_the_programs_tool_that_shows_the_same_else_as_a_stand_in():
    """Found by a review of the fix above: tools were looked up by name alone (two modules' ``lookup``
    tools were confused), a tool the program does not hold came back as a string (a list of tools then
    printed differently from the live one, and ``tool.name`` failed), and every resumed evaluation walked
    every list the program holds. A stored tool is now rebuilt as the program's tool that shows the same
    name, description and arguments, else as a stand-in that shows exactly that."""
    from dspy_turbogepa.adapter import trajectory_json as tj

    def capital(city: str) -> str:
        """Capital code of a country."""
        return city

    def population(city: str) -> str:
        """Population of a city."""
        return city

    a, b = dspy.Tool(capital, name="lookup"), dspy.Tool(population, name="lookup")

    class Holder(dspy.Module):
        def __init__(self):
            super().__init__()
            self.a_tools = [a]
            self.b_tools = {"lookup": b}
            self.corpus = ["a passage"] * 1000  # not a container of tools: not walked item by item
            self.answer = dspy.Predict("question -> answer")

    stored = json.loads(json.dumps(tj.jsonable({"tools": [b], "one": a})))
    token = tj._PROGRAM_TOOLS.set(tj._ProgramTools(Holder()))
    try:
        back = tj._revive(stored)
    finally:
        tj._PROGRAM_TOOLS.reset(token)
    assert back["tools"][0] is b and back["one"] is a  # the live trace's own objects
    elsewhere = tj._revive(stored)  # not rebuilt for a program (an output read back): stand-ins
    assert str(elsewhere["tools"]) == str([b]) and repr(elsewhere["one"]) == repr(a)
    assert elsewhere["one"].name == "lookup" and elsewhere["one"] is not a
    with pytest.raises(RuntimeError, match="run store"):
        elsewhere["one"].func(city="Paris")


def test_the_tools_and_settings_of_an_agent_used_as_a_tool_are_keyed():
    """Found by a review: a sub-agent used as a tool was keyed by its predictors only (its class is
    DSPy's ReAct, which has no user code): editing its own tool's code or its ``max_iters`` under the same
    log_dir replayed the old scores. The key is also the same in every process (pinned elsewhere)."""
    from dspy_turbogepa.adapter.run_identity import run_key

    def answer_a(country: str) -> str:
        """Look up."""
        return "A"

    def answer_b(country: str) -> str:
        """Look up."""
        return "B-edited"

    answer_b.__name__ = answer_b.__qualname__ = "answer_a"  # the same tool name; only the code differs
    data = examples(("France",))

    def key(inner, max_iters=3):
        sub = dspy.ReAct("country -> code", tools=[inner], max_iters=max_iters)
        expert = dspy.Tool(sub, name="expert", desc="Ask the expert.", args={"country": {"type": "string"}})
        return run_key(dspy.ReAct("question -> answer", tools=[expert], max_iters=3), data, data, 0)["student"]

    assert key(answer_a) == key(answer_a)
    assert key(answer_b) != key(answer_a)
    assert key(answer_a, max_iters=5) != key(answer_a)
