"""Typed signatures, adapters and pre-compiled programs: compile() and the saved program, beside dspy.GEPA.

A demanding DSPy user's program: a signature with typed outputs (``Literal``, ``list[str]``, ``int``,
``float``, ``bool``, a pydantic model, a dict), a ``dspy.History`` input, field descriptions and
prefixes, and instructions with braces and non-ASCII text; run under ``dspy.ChatAdapter`` (with its
JSON fallback), ``dspy.JSONAdapter``, ``dspy.XMLAdapter`` or ``dspy.TwoStepAdapter``, set with
``dspy.configure`` or ``dspy.context`` around compile; a student already compiled by
``LabeledFewShot`` / ``BootstrapFewShot``. The student LM is scripted: it answers in whichever format
the adapter's prompt asks for (rendered by that adapter itself), correctly once the instruction holds
``RULE``, and on some examples refuses the format until then. The reflection LM answers dspy's own
``InstructionProposer`` (JSON) with one fixed instruction that holds ``RULE``. Where the two should
agree, the same run is made under dspy.GEPA and compared.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from typing import Any, Literal

import dspy
import pydantic
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.store.sqlite_store import RunStoreMismatchError
from dspy_turbogepa.testing.fake_lm import request_messages

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------------------------------- the task


class Info(pydantic.BaseModel):
    name: str
    age: int


SEED = "Extract the facts {as JSON-ish} from the text — ünïcode ✓, 100% %s."


with warnings.catch_warnings():  # 'prefix' is deprecated in dspy 3.4, still saved and loaded
    warnings.simplefilter("ignore", DeprecationWarning)

    class Facts(dspy.Signature):
        """Extract the facts {as JSON-ish} from the text — ünïcode ✓, 100% %s."""

        text: str = dspy.InputField(desc="the raw text", prefix="Raw Text:")
        history: dspy.History = dspy.InputField(desc="earlier turns")
        label: Literal["pos", "neg"] = dspy.OutputField(desc="the sentiment", prefix="Sentiment Label:")
        tags: list[str] = dspy.OutputField(desc="keywords")
        count: int = dspy.OutputField()
        ratio: float = dspy.OutputField()
        flag: bool = dspy.OutputField()
        info: Info = dspy.OutputField(desc="who")
        meta: dict[str, int] = dspy.OutputField()


FIELDS = list(Facts.output_fields)
#: what the reflection LM proposes (braces, a format directive, non-ASCII, long): the fix is "RULE"
NEW_INSTRUCTION = ("Extract the facts {exactly}; 100% %(x)s — RULE ✓ applies.\n"
                   + "Keep every field typed. " * 299 + "End.")
HISTORY = dspy.History(messages=[{"text": "item 99", "label": "pos"}])


def gold(i: int) -> dict[str, Any]:
    return {"label": "pos" if i % 2 == 0 else "neg", "tags": [f"t{i}", "x"], "count": i, "ratio": i / 4,
            "flag": i % 3 == 0, "info": Info(name=f"n{i}", age=20 + i), "meta": {"k": i}}


def examples(ids) -> list[dspy.Example]:
    return [dspy.Example(text=f"item {i}", history=HISTORY, **gold(i)).with_inputs("text", "history") for i in ids]


def metric(g, pred, trace=None, pred_name=None, pred_trace=None):
    wrong = [f for f in FIELDS if getattr(pred, f, None) != g[f]]
    return dspy.Prediction(score=1 - len(wrong) / len(FIELDS),
                           feedback=f"wrong: {', '.join(wrong)}" if wrong else "all fields right")


# --------------------------------------------------------------------------------------- scripted LMs


class _Engine:
    """A dspy 3.4 custom engine whose completion text is ``answer(messages)``; keeps every request."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[list[dict[str, str]]] = []
        self._lock = threading.Lock()

    def complete(self, request):
        messages = request_messages(request)
        with self._lock:
            self.requests.append(messages)
        return Response(id=None, model="scripted", message=Message.assistant([TextPart(self.answer(messages))]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


class _AsyncEngine:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine

    async def complete(self, request):
        return self.engine.complete(request)


def scripted_lm(answer, name: str = "scripted/student") -> tuple[dspy.LM, _Engine]:
    engine = _Engine(answer)
    return dspy.LM(name, engine=engine, async_engine=_AsyncEngine(engine), cache=False), engine


def _format_of(messages) -> Any:
    system = messages[0]["content"]
    if "You are a helpful assistant that can solve tasks" in system:
        return "two_step_main"
    if "Outputs will be a JSON object" in system:
        return dspy.JSONAdapter
    if "<label>" in system:
        return dspy.XMLAdapter
    return dspy.ChatAdapter


def rendered(messages, values: dict[str, Any], signature=Facts) -> str:
    """``values`` as the adapter that wrote ``messages`` expects its answer (a ChainOfThought's too)."""
    fmt = _format_of(messages)
    if re.search(r"\[\[ ## reasoning ## \]\]|`reasoning`|<reasoning>", messages[0]["content"]):
        signature = dspy.ChainOfThought(signature).predict.signature
        values = {"reasoning": "Read the text.", **values}
    if fmt == "two_step_main":  # free text for the first step; the extraction LM structures it
        return "Answer: " + json.dumps({k: v.model_dump() if isinstance(v, pydantic.BaseModel) else v
                                        for k, v in values.items()})
    return fmt().format_assistant_message_content(signature, values)


REFUSAL = "I refuse to follow the format."


def item_of(messages) -> int:
    """The example the request is about: the first ``item N`` of its last message (the current input;
    a History's earlier turns, rendered after it by the TwoStepAdapter, mention ``item 99``)."""
    return int(re.search(r"item (\d+)", messages[-1]["content"]).group(1))


def student(broken=()):
    """Right on every field once the instruction holds RULE; before that the label is wrong, and the
    examples in ``broken`` get an answer no adapter can parse."""

    def answer(messages):
        i = item_of(messages)
        fixed = "RULE" in messages[0]["content"]
        if i in broken and not fixed:
            return REFUSAL
        values = gold(i)
        if not fixed:
            values["label"] = "neg" if values["label"] == "pos" else "pos"
        return rendered(messages, values)

    return answer


def extraction(messages):
    """The TwoStepAdapter's extraction LM: structures the main LM's ``Answer: {...}``, in ChatAdapter's
    format (or JSON, on the ChatAdapter's fallback call)."""
    found = re.search(r"Answer: (\{.*\})", messages[-1]["content"], re.S)
    return rendered(messages, json.loads(found.group(1))) if found else "nothing to extract"


def reflection_lm() -> tuple[dspy.LM, _Engine]:
    return scripted_lm(lambda messages: json.dumps({"new_instruction": NEW_INSTRUCTION}), "scripted/reflection")


class RecordingInstructionProposer(InstructionProposer):
    """dspy's own proposer (so the reflection gets the objects dspy.GEPA gives its built-in proposer),
    keeping every (candidate, reflective dataset) it is asked with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, str], dict[str, list[dict[str, Any]]]]] = []
        self._lock = threading.Lock()

    def __call__(self, candidate, reflective_dataset, components_to_update):
        with self._lock:
            self.calls.append((dict(candidate), {k: list(v) for k, v in reflective_dataset.items()}))
        return super().__call__(candidate, reflective_dataset, components_to_update)


# ------------------------------------------------------------------------------------------- plumbing

ADAPTERS = ["chat", "json", "xml", "two_step"]


def make_adapter(kind: str):
    if kind == "two_step":
        extractor, engine = scripted_lm(extraction, "scripted/extractor")
        return dspy.TwoStepAdapter(extractor), engine
    return {"chat": dspy.ChatAdapter, "json": dspy.JSONAdapter, "xml": dspy.XMLAdapter}[kind](), None


@pytest.fixture(autouse=True)
def _restore_global_settings():
    saved = {k: dspy.settings.get(k) for k in ("lm", "adapter")}
    yield
    dspy.configure(**saved)


def run(optimizer_cls, program, *, lm, adapter=None, how="context", train, val=None, budget=40, **kw):
    """One compile with the scripted LMs; ``optimizer_cls`` is TurboGEPA or dspy.GEPA, same arguments."""
    kw.setdefault("reflection_lm", reflection_lm()[0])
    kw.setdefault("num_threads", 2)
    kw.setdefault("track_stats", True)
    if optimizer_cls is TurboGEPA:
        kw.setdefault("verbose", False)
    opt = optimizer_cls(metric=kw.pop("metric", metric), max_metric_calls=budget, **kw)
    if how == "configure":
        dspy.configure(lm=lm, adapter=adapter)
        return opt.compile(program, trainset=train, valset=val)
    with dspy.context(lm=lm, adapter=adapter):
        return opt.compile(program, trainset=train, valset=val)


def answers(program, lm, adapter, ids) -> list[dict[str, Any]]:
    with dspy.context(lm=lm, adapter=adapter):
        return [dict(program(text=f"item {i}", history=HISTORY).items()) for i in ids]


def final_instruction(text: str) -> str:
    """``text`` as a signature keeps it (dspy cleans an instruction's indentation, under either optimizer)."""
    return Facts.with_instructions(text).instructions


# ------------------------------------------------------------------------ typed outputs under adapters


@pytest.mark.parametrize("how", ["context", "configure"])
@pytest.mark.parametrize("kind", ADAPTERS)
def test_typed_outputs_are_parsed_optimized_and_saved_under_every_adapter(kind, how, tmp_path):
    """Every output type parses under the adapter set around compile, the search finds the fix, and the
    program, its JSON and its pickled directory answer with the same typed values."""
    lm, engine = scripted_lm(student())
    adapter, extractor = make_adapter(kind)
    program = dspy.Predict(Facts)
    optimized = run(TurboGEPA, program, lm=lm, adapter=adapter, how=how, train=examples(range(6)))
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[0] == pytest.approx(6 / 7)  # the seed parses, only its label is wrong
    assert dr.val_aggregate_scores[dr.best_idx] == 1.0
    assert dr.to_dict()["candidates"][0] == {"self": SEED}
    assert optimized.signature.instructions == final_instruction(NEW_INSTRUCTION)
    assert program.signature.instructions == SEED  # the student is left alone
    # the adapter formatted every rollout
    if kind == "two_step":
        assert extractor.requests and all(_format_of(m) == "two_step_main" for m in engine.requests)
    else:
        assert {_format_of(m) for m in engine.requests} == {type(adapter)}
    got = answers(optimized, lm, adapter, [3])[0]
    assert got == {**gold(3)} and isinstance(got["info"], Info) and isinstance(got["count"], int)

    optimized.save(str(tmp_path / "program.json"))
    fresh = dspy.Predict(Facts)
    fresh.load(str(tmp_path / "program.json"))
    assert fresh.signature.instructions == optimized.signature.instructions
    for f in ("text", "history", *FIELDS):
        assert fresh.signature.fields[f].json_schema_extra == optimized.signature.fields[f].json_schema_extra
    optimized.save(str(tmp_path / "dir"), save_program=True)
    loaded = dspy.load(str(tmp_path / "dir"), allow_pickle=True)
    assert loaded.signature.instructions == optimized.signature.instructions
    assert loaded.detailed_results.val_aggregate_scores == dr.val_aggregate_scores
    assert answers(fresh, lm, adapter, range(4)) == answers(loaded, lm, adapter, range(4)) \
        == answers(optimized, lm, adapter, range(4))


# ------------------------------------------------------------------------------------- parse failures


def seed_scores(dr) -> list[float]:
    return [dr.val_subscores[0][i] for i in sorted(dr.val_subscores[0])]


def _records(proposer: RecordingInstructionProposer, index: int = 0) -> list[dict[str, Any]]:
    return sorted(proposer.calls[index][1]["self"], key=lambda r: r["Inputs"]["text"])


@pytest.mark.parametrize("flag", [True, False], ids=["format_feedback", "no_format_feedback"])
@pytest.mark.parametrize("kind", ADAPTERS)
def test_parse_failures_are_scored_and_reach_the_reflection_as_under_dspy_gepa(kind, flag):
    """Odd examples get an answer no adapter parses (after the ChatAdapter's JSON fallback, or the
    TwoStepAdapter's extraction): scored failure_score, counted as format errors, and shown to the
    reflection with the raw answer. With ``add_format_failure_as_feedback=True`` the first reflection
    reads exactly the records dspy.GEPA's reads (typed outputs, the History as Context, the structure
    of the reflected candidate's prompt); without it dspy.GEPA drops them, TurboGEPA keeps them with the
    parse error (docs/deviations.md)."""
    train = examples(range(6))
    results = {}
    for cls in (TurboGEPA, dspy.GEPA):
        lm, _ = scripted_lm(student(broken={1, 3, 5}))
        adapter, _ = make_adapter(kind)
        proposer = RecordingInstructionProposer()
        optimized = run(cls, dspy.Predict(Facts), lm=lm, adapter=adapter, train=train, budget=30,
                        instruction_proposer=proposer, add_format_failure_as_feedback=flag, failure_score=-0.5,
                        reflection_minibatch_size=6)
        results[cls] = (optimized, proposer)

    optimized, proposer = results[TurboGEPA]
    dr = optimized.detailed_results
    assert seed_scores(dr) == pytest.approx([6 / 7, -0.5] * 3)
    assert dr.run_stats["failures"]["format_error"] == 3
    assert dr.val_aggregate_scores[dr.best_idx] == 1.0
    records = _records(proposer)
    failed = [r for r in records if isinstance(r["Generated Outputs"], str)]
    assert [r["Inputs"]["text"] for r in failed] == ["item 1", "item 3", "item 5"]
    for r in failed:
        assert f"```\n{REFUSAL}\n```" in r["Generated Outputs"]
        assert r["Inputs"]["Context"] == HISTORY
        if flag:
            assert r["Feedback"].startswith("Your output failed to parse. Follow this structure:")
            assert SEED in r["Feedback"] and "[[ ## label ## ]]" in r["Feedback"]
        else:
            assert r["Feedback"].startswith("Your output failed to parse into the expected output fields")
    parsed = [r for r in records if not isinstance(r["Generated Outputs"], str)]
    assert all(isinstance(r["Generated Outputs"]["info"], Info) and r["Feedback"] == "wrong: label" for r in parsed)

    reference, ref_proposer = results[dspy.GEPA]
    assert seed_scores(reference.detailed_results) == seed_scores(dr)
    if flag:
        assert _records(ref_proposer) == records
    else:
        assert _records(ref_proposer) == parsed


def test_an_async_program_records_parse_failures_like_a_sync_one():
    class AsyncFacts(dspy.Module):
        def __init__(self):
            super().__init__()
            self.extract = dspy.Predict(Facts)

        async def aforward(self, text, history):
            return await self.extract.acall(text=text, history=history)

    lm, engine = scripted_lm(student(broken={1, 3, 5}))
    proposer = RecordingInstructionProposer()
    optimized = run(TurboGEPA, AsyncFacts(), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(6)),
                    budget=30, instruction_proposer=proposer, add_format_failure_as_feedback=True,
                    reflection_minibatch_size=6)
    dr = optimized.detailed_results
    assert dr.run_stats["failures"]["format_error"] == 3
    assert dr.val_aggregate_scores[dr.best_idx] == 1.0
    failed = [r for r in _records_of(proposer, "extract") if isinstance(r["Generated Outputs"], str)]
    assert len(failed) == 3 and all(REFUSAL in r["Generated Outputs"] for r in failed)


def _records_of(proposer, name):
    return [r for _, dataset in proposer.calls for r in dataset.get(name, [])]


@pytest.mark.parametrize("flag", [True, False])
def test_a_seed_that_never_parses_is_repaired_by_reflection(flag):
    """Every example of the seed fails to parse: the parse errors are all the reflection has, and they
    are enough (dspy.GEPA without add_format_failure_as_feedback has nothing to reflect on and returns
    the seed)."""
    lm, _ = scripted_lm(student(broken=range(100)))
    optimized = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(6)),
                    add_format_failure_as_feedback=flag)
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[0] == 0.0 and dr.val_aggregate_scores[dr.best_idx] == 1.0
    assert "RULE" in optimized.signature.instructions


def test_a_partly_parsed_json_answer_is_a_format_failure_with_feedback():
    """A JSON answer missing one field (``parsed_result`` set): dspy.GEPA's trace capture divides two
    lists there (``TypeError``) and loses the example; here it is an ordinary format failure."""

    def answer(messages):
        if "RULE" in messages[0]["content"]:
            return student()(messages)
        i = item_of(messages)
        values = {k: v.model_dump() if isinstance(v, Info) else v for k, v in gold(i).items() if k != "meta"}
        return json.dumps(values)

    lm, _ = scripted_lm(answer)
    proposer = RecordingInstructionProposer()
    optimized = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(4)),
                    budget=30, instruction_proposer=proposer, add_format_failure_as_feedback=True,
                    failure_score=-1.0)
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[0] == -1.0 and dr.val_aggregate_scores[dr.best_idx] == 1.0
    first = _records(proposer)
    assert first and all(r["Feedback"].startswith("Your output failed to parse.") for r in first)
    assert all('"tags"' in r["Generated Outputs"] for r in first)  # the raw answer, as the LM gave it


class Who(dspy.Signature):
    """Find who the text is about."""

    text: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    info: Info = dspy.OutputField()


class Judge(dspy.Signature):
    """Label the person."""

    info: Info = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


class WhoThenJudge(dspy.Module):
    """Two typed steps: the second reads the first's pydantic output."""

    def __init__(self):
        super().__init__()
        self.who = dspy.Predict(Who)
        self.judge = dspy.Predict(Judge)

    def forward(self, text, history):
        info = self.who(text=text, history=history).info
        return dspy.Prediction(info=info, label=self.judge(info=info).label)


def test_a_parse_failure_of_the_second_typed_step_goes_to_that_step_as_under_dspy_gepa():
    """``judge`` (reading ``who``'s Info) fails to parse on odd examples: its records carry the failures,
    ``who``'s only the examples that got through, exactly as dspy.GEPA's first reflection reads them."""

    def answer(messages):
        last = messages[-1]["content"]
        if "[[ ## text ## ]]" in last:  # who: always right
            return rendered(messages, {"info": gold(item_of(messages))["info"]}, Who)
        i = int(re.search(r"n(\d+)", last.split("[[ ## info ## ]]")[-1]).group(1))
        if i % 2 and "RULE" not in messages[0]["content"]:
            return REFUSAL
        return rendered(messages, {"label": gold(i)["label"]}, Judge)

    def exact(g, pred, trace=None, pred_name=None, pred_trace=None):
        right = pred.label == g.label and pred.info == g.info
        return dspy.Prediction(score=float(right), feedback="right" if right else "wrong")

    first_reflection = {}
    for cls in (TurboGEPA, dspy.GEPA):
        lm, _ = scripted_lm(answer)
        proposer = RecordingInstructionProposer()
        optimized = run(cls, WhoThenJudge(), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(6)),
                        budget=30, metric=exact, instruction_proposer=proposer, add_format_failure_as_feedback=True,
                        reflection_minibatch_size=6, component_selector="all")
        first_reflection[cls] = {name: sorted(records, key=repr) for name, records in proposer.calls[0][1].items()}
        if cls is TurboGEPA:
            dr = optimized.detailed_results
            assert dr.run_stats["failures"]["format_error"] == 3
            assert dr.val_aggregate_scores[dr.best_idx] == 1.0
    turbo = first_reflection[TurboGEPA]
    assert [r["Inputs"]["text"] for r in turbo["who"]] == ["item 0", "item 2", "item 4"]
    assert sum(isinstance(r["Generated Outputs"], str) for r in turbo["judge"]) == 3
    assert turbo == first_reflection[dspy.GEPA]


# ------------------------------------------------------------------------------ pre-compiled students


class Extractor(dspy.Module):
    def __init__(self):
        super().__init__()
        self.extract = dspy.ChainOfThought(Facts)

    def forward(self, text, history):
        return self.extract(text=text, history=history)


def _precompiled(how: str) -> dspy.Module:
    demos_from = examples([6, 7])
    if how == "labeled":
        return dspy.LabeledFewShot(k=2).compile(Extractor(), trainset=demos_from)
    teacher_lm, _ = scripted_lm(lambda m: rendered(m, gold(item_of(m))))
    with dspy.context(lm=teacher_lm):
        return dspy.BootstrapFewShot(metric=lambda g, p, trace=None: metric(g, p).score == 1.0,
                                     max_bootstrapped_demos=2, max_labeled_demos=0).compile(Extractor(),
                                                                                            trainset=demos_from)


@pytest.mark.parametrize("how", ["labeled", "bootstrap"])
def test_demos_of_a_precompiled_student_are_kept_and_saved_as_dspy_gepa_keeps_them(how, tmp_path):
    """The demos (typed values, a History) stay on the optimized program, on every candidate, in every
    prompt, and in the saved JSON, which is the JSON dspy.GEPA saves; reloaded, it answers the same."""
    compiled = _precompiled(how)
    demos = compiled.extract.predict.demos
    assert len(demos) == 2
    state_before = json.dumps(compiled.dump_state(), sort_keys=True, default=str)
    saved = {}
    for cls in (TurboGEPA, dspy.GEPA):
        lm, engine = scripted_lm(student())
        optimized = run(cls, compiled, lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(6)), budget=30)
        assert optimized.extract.predict.demos == demos
        assert optimized.extract.predict.signature.instructions == final_instruction(NEW_INSTRUCTION)
        for candidate in optimized.detailed_results.candidates:
            assert candidate.extract.predict.demos == demos
        # the demos were in every rollout's prompt
        assert engine.requests and all("item 6" in json.dumps(m) and "item 7" in json.dumps(m)
                                       for m in engine.requests)
        optimized.save(str(tmp_path / f"{cls.__name__}.json"))
        saved[cls] = json.loads((tmp_path / f"{cls.__name__}.json").read_text(encoding="utf-8"))
        if cls is TurboGEPA:
            turbo, turbo_lm = optimized, lm
    assert saved[TurboGEPA] == saved[dspy.GEPA]
    assert json.dumps(compiled.dump_state(), sort_keys=True, default=str) == state_before

    fresh = Extractor()
    fresh.load(str(tmp_path / "TurboGEPA.json"))
    assert len(fresh.extract.predict.demos) == 2
    assert fresh.extract.predict.signature.instructions == turbo.extract.predict.signature.instructions
    turbo.save(str(tmp_path / "dir"), save_program=True)
    loaded = dspy.load(str(tmp_path / "dir"), allow_pickle=True)
    assert loaded.extract.predict.demos == demos
    expected = answers(turbo, turbo_lm, dspy.JSONAdapter(), range(4))
    assert answers(fresh, turbo_lm, dspy.JSONAdapter(), range(4)) == expected
    assert answers(loaded, turbo_lm, dspy.JSONAdapter(), range(4)) == expected


def test_a_labeled_few_shot_bare_predict_is_still_the_one_component():
    student_program = dspy.LabeledFewShot(k=2).compile(dspy.Predict(Facts), trainset=examples([6, 7]))
    lm, _ = scripted_lm(student())
    optimized = run(TurboGEPA, student_program, lm=lm, adapter=dspy.XMLAdapter(), train=examples(range(6)),
                    budget=30)
    assert [n for n, _ in optimized.named_predictors()] == ["self"]
    assert optimized.demos == student_program.demos and len(optimized.demos) == 2
    assert "RULE" in optimized.signature.instructions


def test_typed_best_outputs_survive_a_pickled_save(tmp_path):
    lm, _ = scripted_lm(student(broken={1}))
    optimized = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.XMLAdapter(), train=examples(range(4)),
                    budget=30, track_best_outputs=True)
    optimized.save(str(tmp_path / "dir"), save_program=True)
    loaded = dspy.load(str(tmp_path / "dir"), allow_pickle=True)
    for dr in (optimized.detailed_results, loaded.detailed_results):
        best = dr.best_outputs_valset
        assert set(best) == {0, 1, 2, 3}
        for i, outputs in best.items():
            assert outputs and all(isinstance(o.info, Info) and o.info == gold(i)["info"] for _, o in outputs)


# ---------------------------------------------------------------------------- a run store under log_dir


def test_typed_values_history_and_long_instructions_go_through_the_run_store(tmp_path):
    """log_dir keeps typed outputs and History inputs, and a resumed run reads back what the first did:
    the same scores, no LM call for what was stored, the same instruction (braces, %, non-ASCII, long)."""
    lm, engine = scripted_lm(student(broken={1}))
    first = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(6)),
                budget=30, log_dir=str(tmp_path))
    calls = len(engine.requests)
    again = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(6)),
                budget=30, log_dir=str(tmp_path))
    assert len(engine.requests) == calls
    assert again.detailed_results.val_subscores == first.detailed_results.val_subscores
    assert again.signature.instructions == first.signature.instructions == final_instruction(NEW_INSTRUCTION)
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["stop_reason"]


def test_a_resumed_run_refuses_another_adapter(tmp_path):
    lm, _ = scripted_lm(student())
    run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.JSONAdapter(), train=examples(range(4)), budget=12,
        log_dir=str(tmp_path))
    with pytest.raises(RunStoreMismatchError, match="task_lm"):
        run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.XMLAdapter(), train=examples(range(4)), budget=30,
            log_dir=str(tmp_path))


class AsInt(dspy.Signature):
    q: str = dspy.InputField()
    answer: int = dspy.OutputField()


class AsBool(dspy.Signature):
    q: str = dspy.InputField()
    answer: bool = dspy.OutputField()


class AsTwoLabels(dspy.Signature):
    q: str = dspy.InputField()
    answer: Literal["small", "large"] = dspy.OutputField()


class AsThreeLabels(dspy.Signature):
    q: str = dspy.InputField()
    answer: Literal["tiny", "medium", "huge"] = dspy.OutputField()


@pytest.mark.parametrize("before, after, value_for", [
    (AsInt, AsBool, lambda i: i),
    (AsTwoLabels, AsThreeLabels, lambda i: "small" if i % 2 else "large"),
], ids=["int_to_bool", "literal_choices"])
def test_a_resumed_run_refuses_a_student_whose_output_type_changed(before, after, value_for, tmp_path):
    data = [dspy.Example(q=f"item {i}", answer=value_for(i)).with_inputs("q") for i in range(2, 6)]

    def answer(messages):
        i = item_of(messages)
        return f"[[ ## answer ## ]]\n{value_for(i)}\n\n[[ ## completed ## ]]"

    def exact(g, pred, trace=None, pred_name=None, pred_trace=None):
        return float(pred.answer == g.answer)

    # nothing but the type tells the two apart: same names, instructions, prefixes, descriptions
    assert before.instructions == after.instructions and before.dump_state() == after.dump_state()
    lm, _ = scripted_lm(answer)
    first = run(TurboGEPA, dspy.Predict(before), lm=lm, train=data, budget=8, metric=exact, log_dir=str(tmp_path))
    assert first.detailed_results.val_aggregate_scores[0] == 1.0
    with pytest.raises(RunStoreMismatchError, match="student"):
        run(TurboGEPA, dspy.Predict(after), lm=lm, train=data, budget=16, metric=exact, log_dir=str(tmp_path))


def test_a_resumed_run_refuses_another_two_step_extraction_lm(tmp_path):
    lm, _ = scripted_lm(student())
    extractor, _ = scripted_lm(extraction, "scripted/extractor-a")
    run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.TwoStepAdapter(extractor), train=examples(range(4)),
        budget=12, log_dir=str(tmp_path))
    # another extraction LM (one that would fail every parse): not the run stored there
    broken_extractor, _ = scripted_lm(lambda m: "nothing to extract", "scripted/extractor-b")
    with pytest.raises(RunStoreMismatchError):
        run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.TwoStepAdapter(broken_extractor),
            train=examples(range(4)), budget=30, log_dir=str(tmp_path))


class _RaisingEngine(_Engine):
    """An engine whose every request fails with ``error()``."""

    def __init__(self, error) -> None:
        super().__init__(None)
        self.error = error

    def complete(self, request):
        with self._lock:
            self.requests.append(request_messages(request))
        raise self.error()


def test_the_two_step_extraction_model_is_bound_by_our_retry_policy_not_dspys():
    # A used-up quota on the extraction model (Retry-After past the whole policy): stopped at once, as on
    # the student LM. The user's extraction LM retried on DSPy's own policy, which waits out any
    # Retry-After (3 times 900 s here), holding a rollout for most of an hour.
    from dspy import lm15

    from dspy_turbogepa import SystemicFailureError

    lm, _ = scripted_lm(student())
    engine = _RaisingEngine(lambda: lm15.RateLimitError("quota exhausted", status=429, retry_after=900.0))
    extractor = dspy.LM("scripted/extractor", engine=engine, async_engine=_AsyncEngine(engine), cache=False)
    adapter = dspy.TwoStepAdapter(extractor)
    retries_before = extractor.num_retries
    outcome: dict[str, BaseException] = {}

    def compile_it():
        try:
            run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=adapter, train=examples(range(4)), budget=12)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=compile_it, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "compile still waiting on the extraction model's Retry-After"
    assert isinstance(outcome.get("error"), SystemicFailureError), outcome
    assert "rate limited" in str(outcome["error"])
    # each rollout sent one request (no DSPy retries), and only the first rollouts before the stop
    assert 1 <= len(engine.requests) <= 2 * 2
    assert adapter.extraction_model is extractor and extractor.num_retries == retries_before  # the user's untouched


def test_a_parse_failure_whose_json_fallback_call_failed_on_the_service_is_not_a_format_error(monkeypatch):
    # ChatAdapter's answer does not parse; the JSON-mode retry it then makes gets a 503, retries given up.
    # The rollout failed because the service did: counted as a format error, it pointed at the prompt.
    from dspy import lm15

    from dspy_turbogepa import teleprompter as teleprompter_module
    from dspy_turbogepa.adapter.evaluator import DspyEvaluator
    from dspy_turbogepa.adapter.ratelimit import RetryPolicy

    class FastEvaluator(DspyEvaluator):  # millisecond backoffs
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, transient_policy=RetryPolicy(3, 30.0, 0.005, 0.05), **kwargs)

    monkeypatch.setattr(teleprompter_module, "DspyEvaluator", FastEvaluator)

    def answer(messages):
        if item_of(messages) == 1:
            if _format_of(messages) is dspy.JSONAdapter:
                raise lm15.ServerError("upstream busy", status=503)
            return REFUSAL
        return student()(messages)

    lm, _ = scripted_lm(answer)
    optimized = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.ChatAdapter(), train=examples(range(4)),
                    budget=12, add_format_failure_as_feedback=True, reflection_minibatch_size=4)
    failures = optimized.detailed_results.run_stats["failures"]
    assert "format_error" not in failures, failures
    assert sum(failures.values()) >= 1
    assert optimized.detailed_results.run_stats["rate_limits"]["transient_gave_up"] >= 1



def test_a_429_from_the_two_step_extraction_model_narrows_its_own_window():
    # its endpoint is one of the rollout's: gated by our windows, and its 429 charged to it, not the student's
    from dspy import lm15

    lm, _ = scripted_lm(student())
    told: list[int] = []
    lock = threading.Lock()

    def extract(messages):
        with lock:
            limited = len(told) < 2
            if limited:
                told.append(1)
        if limited:
            raise lm15.RateLimitError("slow down", status=429, retry_after=0.01)
        return extraction(messages)

    extractor, engine = scripted_lm(extract, "scripted/extractor")
    optimized = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=dspy.TwoStepAdapter(extractor),
                    train=examples(range(4)), budget=12)
    endpoints = optimized.detailed_results.run_stats["rate_limits"]["endpoints"]
    assert endpoints["scripted/extractor"]["rate_limited"] == 2 and endpoints["scripted/extractor"]["decreases"] >= 1
    assert endpoints["scripted/student"]["rate_limited"] == 0
    assert optimized.detailed_results.run_stats["failures"] == {}  # both retried, none scored as failed


class _NoCopyTwoStep(dspy.TwoStepAdapter):
    def __copy__(self):
        raise TypeError("cannot copy NoCopy")


def test_an_adapter_that_cannot_be_copied_runs_as_given_with_a_warning(caplog):
    lm, _ = scripted_lm(student())
    extractor, engine = scripted_lm(extraction, "scripted/extractor")
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        optimized = run(TurboGEPA, dspy.Predict(Facts), lm=lm, adapter=_NoCopyTwoStep(extractor),
                        train=examples(range(4)), budget=12)
    assert optimized.detailed_results.val_aggregate_scores[0] is not None and engine.requests
    said = [r.getMessage() for r in caplog.records if "Could not copy the configured adapter" in r.getMessage()]
    assert len(said) == 1 and "_NoCopyTwoStep" in said[0] and "extraction_model" in said[0]


def test_an_adapter_given_another_lm_is_copied_again():
    from dspy_turbogepa.adapter.lm_copies import LMCopies

    first, _ = scripted_lm(extraction, "scripted/one")
    second, _ = scripted_lm(extraction, "scripted/two")
    adapter = dspy.TwoStepAdapter(first)
    copies = LMCopies()
    before = copies.adapter(adapter)
    assert before is not adapter and before.extraction_model is copies.get(first)
    assert copies.adapter(adapter) is before  # one copy per adapter
    adapter.extraction_model = second
    after = copies.adapter(adapter)
    assert after.extraction_model is copies.get(second) and after.extraction_model.model == "scripted/two"
    chat = dspy.ChatAdapter()
    assert copies.adapter(chat) is chat  # no LM held: the adapter itself
