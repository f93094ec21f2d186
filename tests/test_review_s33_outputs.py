"""Session-33 review: adversarial and malformed LM outputs, beside dspy.GEPA.

The reflection LM is the simulator's reflector with its JSON answer rewritten (an empty or blank
``new_instruction``, an empty or NUL reply, odd but valid instruction texts); the student is the
simulator's student with some answers rewritten (empty, blank or NUL completions, typed values that
fail validation), or made to refuse prompts past a context window. Each case checks what is scored,
what is recorded (``run_stats`` and the run store), that the run goes on, and that the program saves
and loads with plain dspy and resumes from its ``log_dir``.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from collections import Counter
from typing import Any, Literal

import dspy
import pytest
from dspy import lm15
from dspy.lm15 import Message, Response, TextPart, Usage

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine, request_messages

from helpers import small_splits

pytestmark = pytest.mark.timeout(120)

ROUTING = TASKS["routing"]


@pytest.fixture(autouse=True)
def _quiet_dspy():
    """dspy.GEPA's INFO lines and dspy.Evaluate's per-example ERROR lines are not what is tested here."""
    log = logging.getLogger("dspy")
    level = log.level
    log.setLevel(logging.CRITICAL)
    yield
    log.setLevel(level)


def _data(n_train: int = 12, n_val: int = 8):
    return small_splits(ROUTING, n_train=n_train, n_val=n_val, n_test=0)


def _lm(engine: SimEngine) -> dspy.LM:
    return dspy.LM(f"sim/{engine.model_name}", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)


def _response(like: Response, text: str, finish_reason: str = "stop") -> Response:
    return Response(id=like.id, model=like.model, message=Message.assistant([TextPart(text)]),
                    finish_reason=finish_reason, usage=like.usage)


class RewritingReflector(SimEngine):
    """The simulated reflector, its n-th answer (1-based) rewritten by ``rewrite(n, answer_text)``."""

    def __init__(self, rewrite) -> None:
        super().__init__("reflector")
        self.rewrite = rewrite
        self.answers: list[str] = []
        self._n = 0

    def _respond(self, request):
        response = super()._respond(request)
        with self._lock:
            self._n += 1
            n = self._n
        text = self.rewrite(n, response.message.text)
        with self._lock:
            self.answers.append(text)
        return _response(response, text)


def _with_instruction(change):
    """A rewrite of the reflector's JSON answer: its ``new_instruction`` through ``change(n, text)``."""
    def rewrite(n: int, text: str) -> str:
        data = json.loads(text)
        data["new_instruction"] = change(n, data["new_instruction"])
        return json.dumps(data, ensure_ascii=False)
    return rewrite


class RewritingStudent(SimEngine):
    """The simulated student; its answers on about a third of the tickets (case number divisible by 3)
    rewritten by ``rewrite``."""

    def __init__(self, rewrite, finish_reason: str = "stop") -> None:
        super().__init__("student")
        self.rewrite = rewrite
        self.finish_reason = finish_reason
        self.rewritten = 0

    def _respond(self, request):
        response = super()._respond(request)
        case = re.search(r"\(case (\d+)\)", request_messages(request)[-1]["content"])
        if case is None or int(case.group(1)) % 3:  # the same tickets under the ChatAdapter and its JSON fallback
            return response
        with self._lock:
            self.rewritten += 1
        return _response(response, self.rewrite(response.message.text), self.finish_reason)


def _compile(reflection_lm=None, student_lm=None, budget: int = 60, data=None, cls=TurboGEPA, **kw):
    data = data or _data()
    if cls is TurboGEPA:
        kw.setdefault("verbose", False)
        kw.setdefault("num_threads", 4)
    if "instruction_proposer" not in kw:
        kw["reflection_lm"] = reflection_lm
    opt = cls(kw.pop("metric", ROUTING.metric), max_metric_calls=budget, track_stats=True, **kw)
    with dspy.context(lm=student_lm or make_student_lm()):
        return opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)


def _rows(log_dir, sql: str) -> list[tuple]:
    with sqlite3.connect(str(log_dir / "run.sqlite3")) as con:
        return con.execute(sql).fetchall()


def _instruction(program: dspy.Module) -> str:
    return program.predictors()[0].signature.instructions


# =========================================================================== reflection LM outputs

def _explode(n: int, text: str) -> str:
    if n % 2 == 0:
        raise RuntimeError("reflection backend exploded")
    return text


#: every second answer of the reflection LM, and what the stored skip says
MALFORMED_REFLECTIONS = {
    # dspy's InstructionProposer raises "empty instruction" on a blank draft
    "empty_instruction": (_with_instruction(lambda n, text: text if n % 2 else ""), "empty instruction"),
    "blank_instruction": (_with_instruction(lambda n, text: text if n % 2 else " \n\t "), "empty instruction"),
    # the JSONAdapter cannot parse these at all
    "empty_reply": (lambda n, text: text if n % 2 else "", "AdapterParseError"),
    "nul_reply": (lambda n, text: text if n % 2 else "\x00\x00", "AdapterParseError"),
    # the reflection LM raises mid-run (not a rate limit or a transient error: not retried)
    "raises": (_explode, "reflection backend exploded"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_REFLECTIONS))
def test_a_malformed_reflection_on_some_calls_is_a_recorded_skip_and_the_run_goes_on(case, tmp_path):
    """Every second reflection answer is malformed (or raises): each such reflection is a skipped proposal
    (``proposer_error``) counted in run_stats and stored with its cause, none becomes a candidate, the
    run ends on its budget (not as systemic) and still improves on the seed, as dspy.GEPA's does."""
    rewrite, cause = MALFORMED_REFLECTIONS[case]
    engine = RewritingReflector(rewrite)
    optimized = _compile(_lm(engine), log_dir=tmp_path)
    dr = optimized.detailed_results
    skips = dr.run_stats.get("proposal_skips", {})
    assert skips.get("proposer_error", 0) >= 1, skips
    stored = _rows(tmp_path, "select skipped, message from proposals where skipped is not null")
    assert len(stored) == sum(skips.values())
    assert all(skipped == "proposer_error" and message for skipped, message in stored)
    assert all(cause in message for _, message in stored), stored
    assert dr.stop_reason == "max_metric_calls"
    assert max(dr.val_aggregate_scores) > dr.val_aggregate_scores[0]
    for candidate in dr.candidates:
        assert _instruction(candidate).strip() and "\x00" not in _instruction(candidate)


#: A valid but hostile instruction tail: format placeholders, fences, a JSON object, non-BMP text, NUL,
#: and 200 KB of padding.
ODD_TAIL = (' {instruction} {{x}} } { %s %(a)s ```json\n{"new_instruction": "x"}\n``` 😀𝄞\U0010ffff a\x00b '
            + "pad " * 50_000 + "end.")


def test_an_odd_but_valid_instruction_is_kept_verbatim_saved_reloaded_and_resumed(tmp_path):
    """The reflection LM appends ODD_TAIL to every instruction it writes (dspy.GEPA evaluates such a
    text as it is). The best program holds it verbatim, its JSON reloads into a plain dspy program, the
    pickled directory loads, summary.json is valid JSON holding it, and a rerun with the same log_dir
    replays the run without one LM call."""
    def append(n, text):
        return text if ODD_TAIL in text else text + ODD_TAIL

    engine = RewritingReflector(_with_instruction(append))
    optimized = _compile(_lm(engine), log_dir=tmp_path / "run")
    dr = optimized.detailed_results
    best = _instruction(optimized)
    assert best.endswith(ODD_TAIL) and max(dr.val_aggregate_scores) > dr.val_aggregate_scores[0]

    optimized.save(str(tmp_path / "program.json"))
    plain = ROUTING.make_program()
    plain.load(str(tmp_path / "program.json"))
    assert _instruction(plain) == best
    optimized.save(str(tmp_path / "dir"), save_program=True)
    assert _instruction(dspy.load(str(tmp_path / "dir"), allow_pickle=True)) == best
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["best"]["instructions"][ROUTING.predictor_names[0]] == best

    again = RewritingReflector(_with_instruction(append))
    student = make_student_lm()
    rerun = _compile(_lm(again), student_lm=student, log_dir=tmp_path / "run")
    assert _instruction(rerun) == best
    assert rerun.detailed_results.val_aggregate_scores == dr.val_aggregate_scores
    assert again.calls == 0 and student.engine.calls == 0


def test_a_proposal_too_long_for_the_students_window_is_scored_as_the_candidates_failure(tmp_path):
    """A 120 KB proposal makes the student LM refuse every prompt of that candidate as longer than its
    context window. As under dspy.GEPA (dspy.Evaluate scores the error), each is the candidate's failure
    (failure_score, a program error stored as such, not an LM-service failure that a rerun would pay
    again), and the run goes on to the shorter proposals."""
    def refuse_long(request):
        size = sum(len(m["content"]) for m in request_messages(request))
        if size > 50_000:
            raise lm15.ContextLengthError(f"maximum context length is 8192 tokens, the prompt has {size // 4}",
                                          status=400)

    calls: list[int] = []
    good = ROUTING.all_rules_instructions()[ROUTING.predictor_names[0]]

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        extra = " " + "pad " * 30_000 if len(calls) == 1 else ""
        return dict.fromkeys(components_to_update, good + extra)

    optimized = _compile(student_lm=make_student_lm(before_call=refuse_long), instruction_proposer=proposer,
                         log_dir=tmp_path)
    dr = optimized.detailed_results
    assert dr.run_stats["failures"].get("program_error", 0) >= 1
    assert dr.stop_reason in ("max_metric_calls", "no_progress_possible")  # it returned: not a systemic stop
    assert max(dr.val_aggregate_scores) == 1.0 and _instruction(optimized) == good
    stored = _rows(tmp_path, "select failure, service_failure from evaluations where failure is not null")
    assert stored and all(failure == "program_error" and not service for failure, service in stored)


def test_a_proposal_holding_a_lone_surrogate_is_skipped_not_a_crash_and_the_log_dir_still_resumes(tmp_path):
    """A custom proposer that reads the reflection LM's JSON itself gets a lone surrogate from a cut
    escape ("\\ud83d"). Such a text cannot become a signature (pydantic refuses to encode it): it is
    "nothing usable", which the reflector's contract says is recorded and skipped, never the end of the
    run (dspy.GEPA's build crashes too). Here compile() dies with UnicodeEncodeError while evaluating the
    child, after the proposal was stored; every rerun with the same log_dir replays that proposal and
    dies the same way, without asking the proposer again."""
    good = ROUTING.all_rules_instructions()[ROUTING.predictor_names[0]]
    calls: list[int] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        text = json.loads('"Route it \\ud83d"') if len(calls) == 1 else good
        return dict.fromkeys(components_to_update, text)

    kw = {"instruction_proposer": proposer, "log_dir": tmp_path, "num_threads": 1, "max_mutations_in_flight": 1,
          "budget": 40}
    first = _compile(**kw).detailed_results
    # recorded: a skipped proposal, or (another fix) a child whose evaluations failed
    assert first.run_stats.get("proposal_skips") or first.run_stats.get("failures")
    assert max(first.val_aggregate_scores) == 1.0
    assert all("\ud83d" not in _instruction(c) for c in first.candidates)
    rerun = _compile(**kw).detailed_results
    assert rerun.val_aggregate_scores == first.val_aggregate_scores


# =========================================================================== student LM outputs

STUDENT_ANSWERS = {
    "empty": (lambda text: "", "stop"),
    "blank": (lambda text: "  \n ", "stop"),
    "empty_truncated": (lambda text: "", "length"),
    "nul": (lambda text: "\x00", "stop"),
}


@pytest.mark.parametrize("case", sorted(STUDENT_ANSWERS))
def test_an_empty_or_nul_completion_is_a_format_failure_scored_and_fed_back_as_under_dspy_gepa(case, tmp_path):
    """About a third of the student's answers are empty, blank, cut at max_tokens with nothing in it, or
    a NUL: dspy cannot parse them (ChatAdapter, then its JSON fallback). Each is scored failure_score as
    under dspy.GEPA (same seed scores), counted as a format error (not an LM-service failure, which a
    rerun would pay again), and reaches the reflection as a parse failure with
    add_format_failure_as_feedback, as in dspy.GEPA's first reflection."""
    rewrite, finish = STUDENT_ANSWERS[case]
    data = _data(n_train=6, n_val=8)
    first_reflection: dict[Any, list[dict[str, Any]]] = {}
    seeds = {}
    for cls in (TurboGEPA, dspy.GEPA):
        sink: list[list[dict[str, Any]]] = []

        def proposer(candidate, reflective_dataset, components_to_update, sink=sink):
            for c in components_to_update:
                sink.append([dict(r) for r in reflective_dataset[c]])
            return {c: candidate[c] + f" Variant {len(sink)}." for c in components_to_update}

        student = RewritingStudent(rewrite, finish)
        kw = {"log_dir": tmp_path} if cls is TurboGEPA else {}
        optimized = _compile(student_lm=_lm(student), budget=40, data=data, cls=cls, instruction_proposer=proposer,
                             add_format_failure_as_feedback=True, failure_score=-1.0, reflection_minibatch_size=6,
                             **kw)
        dr = optimized.detailed_results
        seeds[cls] = [dr.val_subscores[0][i] for i in sorted(dr.val_subscores[0])]
        first_reflection[cls] = sink[0]
        if cls is TurboGEPA:
            assert student.rewritten >= 1
            assert dr.run_stats["failures"].get("format_error", 0) >= 1
            assert set(dr.run_stats["failures"]) == {"format_error"}
            stored = _rows(tmp_path, "select failure, service_failure from evaluations where failure is not null")
            assert stored and all(f == "format_error" and not service for f, service in stored)
    assert seeds[TurboGEPA] == seeds[dspy.GEPA]
    assert -1.0 in seeds[TurboGEPA]

    def parse_failures(records):
        return sorted(r["Inputs"]["ticket"] for r in records
                      if str(r["Feedback"]).startswith("Your output failed to parse"))

    turbo, gepa = parse_failures(first_reflection[TurboGEPA]), parse_failures(first_reflection[dspy.GEPA])
    assert turbo and turbo == gepa


class Verdict(dspy.Signature):
    """Label the text."""

    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()
    ratio: float = dspy.OutputField()


class _TypedEngine:
    """Answers ``Verdict`` in the format the adapter asked for; on items divisible by 3, until the
    instruction says RULE, with a value its type refuses (``bad``)."""

    def __init__(self, bad) -> None:
        self.bad = bad
        self.lock = threading.Lock()
        self.formats: Counter[str] = Counter()

    def complete(self, request):
        messages = request_messages(request)
        i = int(re.search(r"item (\d+)", messages[-1]["content"]).group(1))
        values: dict[str, Any] = {"label": "pos" if i % 2 == 0 else "neg", "ratio": i / 4}
        if i % 3 == 0 and "RULE" not in messages[0]["content"]:
            values = {**values, **self.bad}
        is_json = "Outputs will be a JSON object" in messages[0]["content"]
        with self.lock:
            self.formats["json" if is_json else "chat"] += 1
        text = json.dumps(values) if is_json else \
            "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in values.items()) + "[[ ## completed ## ]]"
        return Response(id=None, model="typed", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


class _AsyncTypedEngine:
    def __init__(self, engine: _TypedEngine) -> None:
        self.engine = engine

    async def complete(self, request):
        return self.engine.complete(request)


def _typed_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    right = pred.label == gold.label and pred.ratio == gold.ratio
    return dspy.Prediction(score=float(right), feedback="right" if right else "wrong")


@pytest.mark.parametrize("bad", [{"label": "maybe"}, {"ratio": "abc"}], ids=["literal", "float"])
def test_a_typed_value_that_fails_validation_is_a_format_failure_that_reaches_the_reflection(bad):
    """Under dspy's default ChatAdapter the answer has every field marker, but ``label`` is not one of
    the Literal's values (or ``ratio`` is no float); the JSON fallback fails the same way. Scored
    failure_score, exactly as dspy.GEPA scores the seed; counted as a format error; shown to the
    reflection with the raw answer and the parse feedback (dspy.GEPA's trace capture loses these
    examples: a TypeError dividing two lists), and the reflection's fix is found."""
    examples = [dspy.Example(text=f"item {i}", label="pos" if i % 2 == 0 else "neg", ratio=i / 4).with_inputs("text")
                for i in range(6)]
    seeds = {}
    records: list[dict[str, Any]] = []
    for cls in (TurboGEPA, dspy.GEPA):
        calls: list[dict[str, list[dict[str, Any]]]] = []

        def proposer(candidate, reflective_dataset, components_to_update, calls=calls):
            calls.append({c: [dict(r) for r in reflective_dataset[c]] for c in components_to_update})
            return {c: candidate[c] + " RULE" for c in components_to_update}

        engine = _TypedEngine(bad)
        lm = dspy.LM("typed/student", engine=engine, async_engine=_AsyncTypedEngine(engine), cache=False)
        kw = {"verbose": False, "num_threads": 2} if cls is TurboGEPA else {}
        opt = cls(_typed_metric, max_metric_calls=30, instruction_proposer=proposer, track_stats=True,
                  add_format_failure_as_feedback=True, failure_score=-0.5, reflection_minibatch_size=6, **kw)
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
            optimized = opt.compile(dspy.Predict(Verdict), trainset=examples, valset=examples)
        dr = optimized.detailed_results
        seeds[cls] = [dr.val_subscores[0][i] for i in sorted(dr.val_subscores[0])]
        if cls is TurboGEPA:
            assert engine.formats["chat"] and engine.formats["json"]  # the ChatAdapter fell back to JSON
            assert dr.run_stats["failures"] == {"format_error": 2}
            assert dr.val_aggregate_scores[dr.best_idx] == 1.0
            records = calls[0]["self"]
    assert seeds[TurboGEPA] == seeds[dspy.GEPA] == [-0.5, 1.0, 1.0, -0.5, 1.0, 1.0]
    failed = sorted((r for r in records if isinstance(r["Generated Outputs"], str)), key=lambda r: r["Inputs"]["text"])
    assert [r["Inputs"]["text"] for r in failed] == ["item 0", "item 3"]
    value = json.dumps(next(iter(bad.values())))
    assert all(value in r["Generated Outputs"] and r["Feedback"].startswith("Your output failed to parse")
               for r in failed)


class VotingRouter(dspy.Module):
    """The routing predictor asked for three completions; the metric takes their majority vote."""

    def __init__(self):
        super().__init__()
        self.route = dspy.Predict(ROUTING.make_program().route.signature, n=3)

    def forward(self, ticket):
        return self.route(ticket=ticket)


def test_a_prediction_with_several_completions_reaches_the_feedback_call_whole_after_a_resume(tmp_path):
    """A student predictor with ``n=3`` returns a Prediction carrying three completions; the metric
    votes over ``pred.completions``. In a live run every scoring and feedback call sees the three. A
    run extended from its log_dir (40 -> 80 metric calls) reflects on evaluations replayed from the
    store: their prediction comes back as ``dspy.Prediction(**first_completion)``, ``completions`` is
    None, the feedback call raises, and the example is dropped from the reflection
    (``feedback_error``), which the same run without a store never does."""
    seen: Counter[str] = Counter()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        completions = pred.completions
        seen["feedback" if pred_name else "score", 0 if completions is None else len(completions)] += 1
        vote = Counter(completions.queue).most_common(1)[0][0]
        return ROUTING.metric(gold, dspy.Prediction(queue=vote), trace, pred_name, pred_trace)

    for budget in (40, 80):
        opt = TurboGEPA(metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(), track_stats=True,
                        verbose=False, num_threads=4, log_dir=tmp_path)
        data = _data()
        with dspy.context(lm=make_student_lm()):
            dr = opt.compile(VotingRouter(), trainset=data.train, valset=data.val).detailed_results
    assert seen[("feedback", 3)] >= 1
    assert all(n == 3 for (_, n) in seen), dict(seen)
    assert "feedback_error" not in dr.run_stats.get("reflective_records_skipped", {})
