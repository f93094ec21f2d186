"""Session 43's review of the reflective dataset: a parse failure that reaches the evaluator wrapped in
another exception (a program that re-raises it as its own error) is still the predictor's parse failure,
with the model's answer shown to that predictor's reflection and to no other predictor."""

from __future__ import annotations

import re
import threading

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

from dspy_turbogepa import TurboGEPA
from tests.helpers import engine_lm

REFUSAL = "I refuse to follow the format"


class _Engine:
    """``draft`` answers ``D``; ``answer`` answers ``A``, except on even-numbered questions, where the
    answer step replies in no format at all (so ChatAdapter and its JSON retry both fail to parse)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0

    def complete(self, request):
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(p, "text", "") or "" for p in request.system or ())
        user = "".join((m.text or "") for m in request.messages)
        with self._lock:
            self.calls += 1
        outputs = re.search(r"Your output fields are:(.*?)(All interactions|\n\n)", system, re.S)
        fields = re.findall(r"`(\w+)`", outputs.group(1)) if outputs else []
        number = re.search(r"q(\d+)", user)
        if "answer" in fields and "`draft`" in system and number and int(number.group(1)) % 2 == 0:
            text = REFUSAL
        else:
            text = "".join(f"[[ ## {f} ## ]]\n{'D' if f == 'draft' else 'A'}\n\n" for f in fields)
            text += "[[ ## completed ## ]]"
        return Response(id=None, model="fake", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


class _Pipe(dspy.Module):
    """``fallback`` runs only when the draft is empty, which it never is."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("q -> draft")
        self.final = dspy.Predict("q, draft -> answer")
        self.fallback = dspy.Predict("q -> answer")

    def forward(self, q):
        d = self.draft(q=q)
        if not d.draft:
            return self.fallback(q=q)
        try:
            return self.final(q=q, draft=d.draft)
        except Exception:
            raise RuntimeError("the answer step failed")  # without "from", as user code often does


def _metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return dspy.Prediction(score=0.5 if pred.answer == "A" else 0.0, feedback=f"feedback for {pred_name}")


def _records_shown(program: dspy.Module, engine: _Engine, **kw) -> list[tuple[str, list]]:
    """Compile ``program`` on ``engine`` with a proposer that records each (component, its records)."""
    seen: list[tuple[str, list]] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        for name in components_to_update:
            seen.append((name, list(reflective_dataset.get(name, []))))
        return {name: candidate[name] + f" v{len(seen)}." for name in components_to_update}

    lm = engine_lm(engine, "fake/s43")
    data = [dspy.Example(q=f"q{i}").with_inputs("q") for i in range(8)]
    opt = TurboGEPA(_metric, max_metric_calls=40, instruction_proposer=proposer, component_selector="all",
                    num_threads=2, use_merge=False, verbose=False, **kw)
    with dspy.context(lm=lm):
        opt.compile(program, trainset=data, valset=data)
    return seen


def test_a_reraised_parse_failure_reaches_only_the_predictor_that_failed_with_its_answer():
    seen = _records_shown(_Pipe(), _Engine(), add_format_failure_as_feedback=True)

    assert seen, "no reflection ran"
    assert not [records for name, records in seen if name == "fallback" and records]
    final = [r for name, records in seen if name == "final" for r in records]
    failed = [r for r in final if "failed to parse" in str(r["Feedback"])]
    assert failed, final
    assert all(REFUSAL in r["Generated Outputs"] for r in failed), failed
    assert all("`answer`" in r["Feedback"] for r in failed)  # the structure of final's own signature


def test_the_skip_reason_of_a_predictor_that_answered_beside_a_parse_failure():
    from dspy_turbogepa.adapter.reflective import _why_no_record
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep

    pipe = _Pipe()
    example = dspy.Example(q="q0").with_inputs("q")
    step = TraceStep("draft", pipe.draft, {"q": "q0"}, dspy.Prediction(draft="D"), 0)
    traj = DspyTrajectory(example, None, [step], [], "AdapterParseError: ...", "AdapterParseError", "format_error",
                          failed_predictor="final")
    assert _why_no_record("draft", traj) == "where another predictor's output failed to parse"
    assert _why_no_record("fallback", traj) == "where it did not run"


class _Twins(dspy.Module):
    """Two predictors of one signature; the second runs after the first, on a prefixed question, and the
    program re-raises the first's parse failure with ``from`` (the second never runs then)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("q -> answer")
        self.second = dspy.Predict("q -> answer")

    def forward(self, q):
        try:
            self.first(q=q)
        except Exception as exc:
            raise RuntimeError("the first step failed") from exc
        return self.second(q="again " + q)


class _TwinEngine(_Engine):
    def complete(self, request):
        user = "".join((m.text or "") for m in request.messages)
        if "again q" not in user and int(re.search(r"q(\d+)", user).group(1)) % 2 == 0:
            return Response(id=None, model="fake", message=Message.assistant([TextPart(REFUSAL)]),
                            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))
        return Response(id=None, model="fake", message=Message.assistant([TextPart(
            "[[ ## answer ## ]]\nA\n\n[[ ## completed ## ]]")]), finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


def test_a_parse_failure_of_one_of_two_twin_predictors_reaches_only_that_one():
    seen = _records_shown(_Twins(), _TwinEngine())
    parse: dict[str, list] = {}
    for name, records in seen:
        parse.setdefault(name, []).extend(r for r in records if "failed to parse" in str(r["Feedback"]))
    assert parse.get("first"), seen
    assert not parse.get("second"), parse.get("second")
