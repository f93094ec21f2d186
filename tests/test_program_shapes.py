"""compile() on unusual but legitimate DSPy program shapes: predictors in lists, dicts and nested
submodules, one predictor under two attributes, demos / field metadata / Predict config, pre-compiled
(frozen) submodules, re-optimizing an optimized program, and a forward that calls a predictor twice or
only sometimes. Each compile runs on the in-process fake LMs with a small budget."""

from __future__ import annotations

import copy
import json
import threading
import warnings

import dspy
import pytest
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.store.sqlite_store import RunStoreMismatchError
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm, sim_engine

from helpers import small_splits

ROUTING = TASKS["routing"]
PIPELINE = TASKS["pipeline"]
ROUTE_SEED = ROUTING.seed_instructions["route"]
EXTRACT_SEED = PIPELINE.seed_instructions["extract"]
RENDER_SEED = PIPELINE.seed_instructions["render"]


def instructions(program: dspy.Module) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def compile_on(task, program, *, budget=150, metric=None, lm=None, splits=None, **kw):
    kw.setdefault("num_threads", 8)
    kw.setdefault("track_stats", True)
    kw.setdefault("verbose", False)
    splits = splits or small_splits(task, n_test=0)
    opt = TurboGEPA(metric or task.metric, max_metric_calls=budget, reflection_lm=kw.pop("reflection_lm", None)
                    or make_reflection_lm(seed=0), **kw)
    with dspy.context(lm=lm or make_student_lm(seed=0, noise=0.0)):
        return opt.compile(program, trainset=splits.train, valset=splits.val)


def changed_components(detailed) -> set[str]:
    cands = detailed.to_dict()["candidates"]
    return {name for cand in cands[1:] for name, text in cand.items() if text != cands[0][name]}


class RecordingProposer:
    """dspy's proposer, keeping every reflective dataset (and the candidate) it was asked with."""

    def __init__(self) -> None:
        self.inner = InstructionProposer()
        self.calls: list[tuple[dict[str, str], dict[str, list[dict]]]] = []
        self._lock = threading.Lock()

    def __call__(self, candidate, reflective_dataset, components_to_update):
        with self._lock:
            self.calls.append((dict(candidate), {k: list(v) for k, v in reflective_dataset.items()}))
        return self.inner(candidate=candidate, reflective_dataset=reflective_dataset,
                          components_to_update=components_to_update)


# --------------------------------------------------------------------------------------------- shapes


class ListPipeline(dspy.Module):
    def __init__(self):
        super().__init__()
        self.steps = [dspy.Predict(dspy.Signature("message -> record", EXTRACT_SEED)),
                      dspy.Predict(dspy.Signature("record -> reply", RENDER_SEED))]

    def forward(self, message):
        record = self.steps[0](message=message).record
        return dspy.Prediction(record=record, reply=self.steps[1](record=record).reply)


class DictPipeline(dspy.Module):
    def __init__(self):
        super().__init__()
        self.steps = {"extract": dspy.Predict(dspy.Signature("message -> record", EXTRACT_SEED)),
                      "render": dspy.Predict(dspy.Signature("record -> reply", RENDER_SEED))}

    def forward(self, message):
        record = self.steps["extract"](message=message).record
        return dspy.Prediction(record=record, reply=self.steps["render"](record=record).reply)


class _ExtractInList(dspy.Module):
    def __init__(self):
        super().__init__()
        self.steps = [dspy.Predict(dspy.Signature("message -> record", EXTRACT_SEED))]

    def forward(self, message):
        return self.steps[0](message=message)


class NestedPipeline(dspy.Module):
    """A list inside a submodule, beside a ChainOfThought."""

    def __init__(self):
        super().__init__()
        self.inner = _ExtractInList()
        self.render = dspy.ChainOfThought(dspy.Signature("record -> reply", RENDER_SEED))

    def forward(self, message):
        record = self.inner(message=message).record
        return dspy.Prediction(record=record, reply=self.render(record=record).reply)


class _Render(dspy.Module):
    def __init__(self):
        super().__init__()
        self.p = dspy.ChainOfThought(dspy.Signature("record -> reply", RENDER_SEED))

    def forward(self, record):
        return self.p(record=record)


class BlocksPipeline(dspy.Module):
    """A list of submodules."""

    def __init__(self):
        super().__init__()
        self.blocks = [_ExtractInList(), _Render()]

    def forward(self, message):
        record = self.blocks[0](message=message).record
        return dspy.Prediction(record=record, reply=self.blocks[1](record=record).reply)


SHAPES = {
    ListPipeline: ["steps[0]", "steps[1]"],
    DictPipeline: ["steps['extract']", "steps['render']"],
    NestedPipeline: ["inner.steps[0]", "render.predict"],
    BlocksPipeline: ["blocks[0].steps[0]", "blocks[1].p.predict"],
}


@pytest.mark.parametrize("cls", list(SHAPES), ids=lambda c: c.__name__)
def test_predictors_in_lists_dicts_and_nested_submodules_are_all_optimized_and_saved(cls, tmp_path):
    """Every predictor dspy's named_predictors() reaches is a component under that name; the returned
    program, every candidate, and the saved JSON loaded into a fresh instance carry the instructions."""
    program = cls()
    names = SHAPES[cls]
    assert [n for n, _ in program.named_predictors()] == names
    optimized = compile_on(PIPELINE, program, budget=200)
    dr = optimized.detailed_results
    cands = dr.to_dict()["candidates"]
    assert all(list(c) == names for c in cands)
    assert cands[0] == {names[0]: EXTRACT_SEED, names[1]: RENDER_SEED}
    assert changed_components(dr) == set(names)  # round robin reached each of them
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    assert instructions(optimized) == cands[dr.best_idx] != cands[0]
    for i, cand in enumerate(dr.candidates):
        assert instructions(cand) == cands[i]
    path = tmp_path / "program.json"
    optimized.save(str(path))
    assert set(json.loads(path.read_text())) == set(names) | {"metadata"}
    fresh = cls()
    fresh.load(str(path))
    assert instructions(fresh) == instructions(optimized)
    assert instructions(program) == cands[0]  # the student is untouched


class SharedPredictor(dspy.Module):
    """One predictor object under two attributes (and called through either)."""

    def __init__(self):
        super().__init__()
        p = dspy.Predict(dspy.Signature("ticket -> queue", ROUTE_SEED))
        self.a = p
        self.b = p

    def forward(self, ticket):
        return (self.a if len(ticket) % 2 else self.b)(ticket=ticket)


def test_one_predictor_under_two_attributes_is_one_component_as_in_dspy_gepa(tmp_path):
    """dspy.GEPA (checked on 3.4.1 with the same fake LMs): named_predictors() lists it once, as "a";
    build_program's deepcopy keeps the aliasing, so `b` runs the optimized text too. Calls made through
    `b` are the same object's, so they are "a"'s reflective examples."""
    program = SharedPredictor()
    assert [n for n, _ in program.named_predictors()] == ["a"]
    proposer = RecordingProposer()
    optimized = compile_on(ROUTING, program, instruction_proposer=proposer)
    dr = optimized.detailed_results
    assert [list(c) for c in dr.to_dict()["candidates"]] == [["a"]] * len(dr.candidates)
    assert optimized.a is optimized.b and optimized.a.signature.instructions != ROUTE_SEED
    assert all(c.a is c.b for c in dr.candidates)
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    parities = {len(rec["Inputs"]["ticket"]) % 2 for _, data in proposer.calls for rec in data.get("a", [])}
    assert parities == {0, 1}  # examples routed through `a` and through `b` both reached the reflection
    path = tmp_path / "shared.json"
    optimized.save(str(path))
    assert set(json.loads(path.read_text())) == {"a", "metadata"}
    fresh = SharedPredictor()
    fresh.load(str(path))
    assert fresh.a is fresh.b and fresh.b.signature.instructions == optimized.a.signature.instructions
    assert program.a is program.b and program.a.signature.instructions == ROUTE_SEED


# ------------------------------------------------------------------ demos, metadata, config

MULTILINE_SEED = (
    "Route the support ticket to a single queue label. Billing disputes and refunds go to payments.\n"
    "Zweite Zeile: Überprüfe die Sprache — 日本語のチケットも “general”.\n\n  Indented last line."
)
DEMO_MARK = "DEMO-TICKET-XYZZY"


def _metadata_signature():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # `prefix=` is deprecated (still saved by dspy)
        return dspy.Signature(
            {"ticket": (str, dspy.InputField(desc="the customer's raw ticket text", prefix="Ticket Text:")),
             "queue": (str, dspy.OutputField(desc="one queue label", prefix="Queue Label:"))},
            MULTILINE_SEED,
        )


class DemoRouter(dspy.Module):
    def __init__(self):
        super().__init__()
        self.route = dspy.Predict(_metadata_signature(), temperature=0.3)
        self.route.demos = [dspy.Example(ticket=DEMO_MARK + " [plan: pro] [locale: en] refund please",
                                         queue="payments")]

    def forward(self, ticket):
        return self.route(ticket=ticket)


def test_demos_field_metadata_config_and_non_ascii_instructions_are_kept_and_used(tmp_path):
    program = DemoRouter()
    state_before = copy.deepcopy(program.dump_state())
    lm = make_student_lm(seed=0, noise=0.0)
    proposer = RecordingProposer()
    optimized = compile_on(ROUTING, program, lm=lm, instruction_proposer=proposer)
    dr = optimized.detailed_results
    # the seed text reaches the search byte for byte (multi-line, non-ASCII, trailing indentation)
    assert dr.to_dict()["candidates"][0] == {"route": MULTILINE_SEED}
    assert proposer.calls and any(cand["route"] == MULTILINE_SEED for cand, _ in proposer.calls)
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    for prog in [optimized, *dr.candidates]:
        pred = prog.route
        assert pred.demos == program.route.demos
        assert pred.config == {"temperature": 0.3}
        for field, desc, prefix in (("ticket", "the customer's raw ticket text", "Ticket Text:"),
                                    ("queue", "one queue label", "Queue Label:")):
            extra = pred.signature.fields[field].json_schema_extra
            assert (extra["desc"], extra["prefix"]) == (desc, prefix)
    # rollouts ran with the demo and the field descriptions in every prompt
    prompts = [json.dumps(entry["messages"], ensure_ascii=False) for entry in lm.history]
    assert len(prompts) == sim_engine(lm).calls > 0
    assert all(DEMO_MARK in p and "the customer's raw ticket text" in p for p in prompts)
    # ... and the saved JSON keeps them
    path = tmp_path / "demo.json"
    optimized.save(str(path))
    saved = json.loads(path.read_text(encoding="utf-8"))["route"]
    assert saved["demos"] == [dict(program.route.demos[0])]
    assert saved["signature"]["instructions"] == optimized.route.signature.instructions
    assert saved["signature"]["fields"] == [
        {"prefix": "Ticket Text:", "description": "the customer's raw ticket text"},
        {"prefix": "Queue Label:", "description": "one queue label"}]
    fresh = DemoRouter()
    fresh.load(str(path))
    assert [dict(d) for d in fresh.route.demos] == [dict(d) for d in optimized.route.demos]  # dspy loads dicts
    assert fresh.route.signature.instructions == optimized.route.signature.instructions
    assert program.dump_state() == state_before


class SampledRouter(dspy.Module):
    """dspy.Predict with n=3: the program reads the first of the completions."""

    def __init__(self):
        super().__init__()
        self.route = dspy.Predict(dspy.Signature("ticket -> queue", ROUTE_SEED), n=3, temperature=0.7)

    def forward(self, ticket):
        return dspy.Prediction(queue=self.route(ticket=ticket).completions.queue[0])


def test_predict_with_n_and_chain_of_thought_config_are_kept():
    lm = make_student_lm(seed=0, noise=0.0)
    optimized = compile_on(ROUTING, SampledRouter(), lm=lm, budget=120)
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    assert all(c.route.config == {"n": 3, "temperature": 0.7} for c in [optimized, *dr.candidates])
    assert sim_engine(lm).calls >= 3 * dr.total_metric_calls  # n=3 reached the LM on every rollout

    cot = NestedPipeline()
    cot.render = dspy.ChainOfThought(dspy.Signature("record -> reply", RENDER_SEED), temperature=0.2)
    optimized = compile_on(PIPELINE, cot, budget=120)
    assert optimized.render.predict.config == {"temperature": 0.2}
    assert list(optimized.render.predict.signature.output_fields) == ["reasoning", "reply"]


# ------------------------------------------------------------------ compiled / frozen / re-optimized


def test_a_student_marked_compiled_at_the_top_is_still_optimized():
    """named_predictors() ignores the top module's own _compiled (as dspy.GEPA reads it): every
    predictor is a component; the flag is carried over to the result by the deepcopy."""
    program = ROUTING.make_program()
    program._compiled = True
    optimized = compile_on(ROUTING, program, budget=100)
    assert optimized.route.signature.instructions != ROUTE_SEED
    assert optimized._compiled is True


class WithFrozenSubmodule(dspy.Module):
    """A pre-compiled submodule (dspy keeps it frozen: named_predictors() does not enter it) whose
    answer the program returns on English tickets."""

    def __init__(self, frozen_text: str = ROUTE_SEED):
        super().__init__()
        self.frozen = ROUTING.make_program({"route": frozen_text})
        self.frozen.route.demos = [dspy.Example(ticket="frozen demo", queue="general")]
        self.frozen._compiled = True
        self.live = ROUTING.make_program()

    def forward(self, ticket):
        a = self.live(ticket=ticket)
        b = self.frozen(ticket=ticket)
        return b if "[locale: en]" in ticket and "refund" in ticket else a


def test_a_frozen_submodule_is_left_alone_as_in_dspy_gepa():
    program = WithFrozenSubmodule()
    assert [n for n, _ in program.named_predictors()] == ["live.route"]
    optimized = compile_on(ROUTING, program, budget=120)
    dr = optimized.detailed_results
    assert [list(c) for c in dr.to_dict()["candidates"]] == [["live.route"]] * len(dr.candidates)
    assert optimized.live.route.signature.instructions != ROUTE_SEED
    for prog in [optimized, *dr.candidates]:
        assert prog.frozen._compiled is True
        assert prog.frozen.route.signature.instructions == ROUTE_SEED
        assert prog.frozen.route.demos == program.frozen.route.demos


def test_reoptimizing_a_turbogepa_output_starts_from_its_instructions_and_leaves_it_alone():
    first = compile_on(ROUTING, ROUTING.make_program(), budget=60)
    first_result = first.detailed_results
    first_state = copy.deepcopy(first.dump_state())
    second = compile_on(ROUTING, first, budget=100)
    dr = second.detailed_results
    assert dr is not first_result and dr.to_dict()["candidates"][0] == instructions(first)
    assert dr.val_aggregate_scores[0] == first_result.val_aggregate_scores[first_result.best_idx]
    assert first.dump_state() == first_state and first.detailed_results is first_result
    # the first run's result is not carried into the second run's programs (dspy.GEPA's build_program,
    # student.deepcopy(), copies it into every candidate, and without track_stats into the result)
    assert all(not hasattr(c, "detailed_results") for c in dr.candidates)
    third = compile_on(ROUTING, first, budget=60, track_stats=False)
    assert not hasattr(third, "detailed_results")
    assert first.detailed_results is first_result


def test_compile_never_mutates_the_student():
    """Instructions, demos, config, per-predictor LM objects and their settings, aliases, the frozen
    submodule and every attribute of every submodule are as before (the LM's history list is shared
    on purpose, see docs/deviations.md "LM objects")."""
    program = WithFrozenSubmodule()
    lm = make_student_lm(seed=0, noise=0.0, num_retries=7)
    program.live.route.lm = lm
    program.live.route.demos = [dspy.Example(ticket="live demo", queue="general")]
    program.alias = program.live.route
    program.live.route.config = {"temperature": 0.4}
    modules = list(program.named_sub_modules())
    attrs = {name: dict(vars(m)) for name, m in modules}
    deep = {name: copy.deepcopy({k: v for k, v in vars(m).items() if not isinstance(v, dspy.BaseLM)})
            for name, m in modules if isinstance(m, dspy.Predict)}
    state = copy.deepcopy(program.dump_state())
    lm_attrs = {k: v for k, v in vars(lm).items() if k != "history"}
    lm_attrs_copy = copy.copy(lm_attrs)
    history = lm.history
    compile_on(ROUTING, program, budget=100)
    assert [(n, m) for n, m in program.named_sub_modules()] == modules
    for name, m in modules:
        now = vars(m)
        assert now.keys() == attrs[name].keys(), name
        assert all(now[k] is attrs[name][k] for k in now), name
    for name, m in modules:
        if isinstance(m, dspy.Predict):
            assert {k: v for k, v in vars(m).items() if not isinstance(v, dspy.BaseLM)} == deep[name]
    assert program.dump_state() == state
    assert {k: v for k, v in vars(lm).items() if k != "history"} == lm_attrs_copy
    assert lm.num_retries == 7 and lm.history is history
    assert program.alias is program.live.route and program.frozen._compiled is True


# ------------------------------------------------------------------ calls per example


class CallsTwice(dspy.Module):
    def __init__(self):
        super().__init__()
        self.route = dspy.Predict(dspy.Signature("ticket -> queue", ROUTE_SEED))

    def forward(self, ticket):
        self.route(ticket="[draft] " + ticket)
        return self.route(ticket=ticket)


def test_a_predictor_called_twice_gives_one_reflective_example_per_rollout():
    """As dspy.GEPA: one of the calls (chosen at random) per example, never both."""
    proposer = RecordingProposer()
    lm = make_student_lm(seed=0, noise=0.0)
    optimized = compile_on(ROUTING, CallsTwice(), lm=lm, instruction_proposer=proposer)
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    assert sim_engine(lm).calls == 2 * dr.total_metric_calls
    drafts = set()
    for _, data in proposer.calls:
        tickets = [rec["Inputs"]["ticket"] for rec in data["route"]]
        plain = [t.removeprefix("[draft] ") for t in tickets]
        assert len(plain) == len(set(plain)), tickets  # one record per example
        drafts |= {t.startswith("[draft] ") for t in tickets}
    assert drafts == {True, False}


class RoutesByLocale(dspy.Module):
    """`english` runs on English tickets only, `other` on the rest (never both on one example)."""

    def __init__(self):
        super().__init__()
        self.english = dspy.Predict(dspy.Signature("ticket -> queue", ROUTE_SEED))
        self.other = dspy.Predict(dspy.Signature("ticket -> queue", ROUTE_SEED))

    def forward(self, ticket):
        return (self.english if "[locale: en]" in ticket else self.other)(ticket=ticket)


def test_a_conditionally_called_predictor_reflects_only_on_examples_where_it_ran():
    proposer = RecordingProposer()
    optimized = compile_on(ROUTING, RoutesByLocale(), budget=200, instruction_proposer=proposer)
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    seen = {"english": 0, "other": 0}
    for _, data in proposer.calls:
        for rec in data.get("english", []):
            assert "[locale: en]" in rec["Inputs"]["ticket"]
            seen["english"] += 1
        for rec in data.get("other", []):
            assert "[locale: en]" not in rec["Inputs"]["ticket"]
            seen["other"] += 1
    assert seen["english"] > 0 and seen["other"] > 0
    assert "english" in changed_components(dr)


# ------------------------------------------------------------------ predictors in a frozen submodule
# (found by this file; each test failed before all_named_predictors() in adapter/program.py)

ALL_RULES = ROUTING.all_rules_instructions()["route"]


def test_resume_refuses_a_student_whose_frozen_submodule_changed(tmp_path):
    """Same log_dir, the frozen submodule's instruction changed (it decides the answer on some tickets):
    docs/deviations.md says changing the student under a log_dir is refused. The run key once covered
    the components only, and the second session replayed the old program's stored evaluations as the
    new program's scores."""
    compile_on(ROUTING, WithFrozenSubmodule(ROUTE_SEED), budget=40, log_dir=str(tmp_path))
    with pytest.raises(RunStoreMismatchError, match="student changed"):
        compile_on(ROUTING, WithFrozenSubmodule(ALL_RULES), budget=40, log_dir=str(tmp_path))


class _Summarize(dspy.Module):
    def __init__(self):
        super().__init__()
        self.p = dspy.Predict("ticket -> summary")

    def forward(self, ticket):
        return self.p(ticket=ticket)


class WithFrozenHelper(dspy.Module):
    def __init__(self):
        super().__init__()
        self.helper = _Summarize()
        self.helper._compiled = True
        self.live = ROUTING.make_program()

    def forward(self, ticket):
        self.helper(ticket=ticket)
        return self.live(ticket=ticket)


def test_a_resumed_trace_keeps_every_predictor_object(tmp_path):
    """The metric's feedback call gets dspy's trace of (predictor, inputs, outputs). In the first session
    every entry holds a predictor. A resume rebuilt the frozen helper's entries from the run store with
    None there (its steps were stored under "?"), and a metric that reads `t[0].signature` raised (those
    records were skipped as feedback_error)."""
    errors: list[str] = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            try:
                [t[0].signature.instructions for t in trace]
            except AttributeError as exc:
                errors.append(repr(exc))
                raise
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    compile_on(ROUTING, WithFrozenHelper(), budget=60, metric=metric, log_dir=str(tmp_path))
    assert errors == []  # first session: fine
    resumed = compile_on(ROUTING, WithFrozenHelper(), budget=200, metric=metric, log_dir=str(tmp_path))
    assert resumed.detailed_results.run_stats["metric_calls_replayed"] > 0
    assert errors == [], f"{len(errors)} feedback calls failed after the resume: {errors[0]}"


def test_a_frozen_submodules_lm_is_called_like_every_other_student_lm():
    """docs/deviations.md, "LM objects": each student LM is called through one copy with num_retries=0
    that shares `history`, so `lm.history` (and cost summed from it) sees every call. An LM set on a
    frozen submodule's predictor ran as the deep copy the build made: none of its calls reached
    lm.history, and DSPy's own retries stayed on."""
    program = WithFrozenSubmodule(ALL_RULES)
    frozen_lm = make_student_lm(seed=0, noise=0.0, num_retries=5)
    program.frozen.route.lm = frozen_lm
    retries: list[int] = []

    class Seen(dspy.utils.callback.BaseCallback):
        def on_lm_start(self, call_id, instance, inputs):
            if getattr(instance, "engine", None) is frozen_lm.engine:
                retries.append(instance.num_retries)

    with dspy.context(callbacks=[Seen()]):
        compile_on(ROUTING, program, budget=60)
    calls = sim_engine(frozen_lm).calls
    assert calls > 0 and len(retries) == calls
    assert len(frozen_lm.history) == calls and set(retries) == {0}


# ------------------------------------------------------------------ found by a review of the fixes above
class _FrozenPlusBestOfN(WithFrozenSubmodule):
    """A frozen submodule beside ``dspy.BestOfN``: every evaluation runs on a per-call copy."""

    def __init__(self, frozen_text):
        super().__init__(frozen_text)
        self.best = dspy.BestOfN(ROUTING.make_program(), N=1, reward_fn=lambda args, pred: 1.0, threshold=0.0)


def test_a_per_call_copy_shares_every_predictors_lm_the_frozen_ones_included(monkeypatch):
    """``BuiltProgram.for_call`` shares the LMs of the component predictors with each per-call copy; a
    frozen predictor's LM (our copy, swapped in by the evaluator) was deep-copied per evaluation instead,
    with its whole growing call history (about 1 s of CPU per evaluation at DSPy's 10,000 entries)."""
    from dspy_turbogepa.adapter import program as program_module

    seen = []
    original = program_module.BuiltProgram.for_call

    def spy(self):
        built, names = original(self)
        if built is not self.program:
            seen.append((built.frozen.route.lm is self.program.frozen.route.lm,
                         built.live.route.lm is self.program.live.route.lm))
        return built, names

    monkeypatch.setattr(program_module.BuiltProgram, "for_call", spy)
    program = _FrozenPlusBestOfN(ALL_RULES)
    frozen_lm = make_student_lm(seed=0, noise=0.0)
    program.frozen.route.lm = frozen_lm
    compile_on(ROUTING, program, budget=60)
    assert seen and set(seen) == {(True, True)}
    assert len(frozen_lm.history) == sim_engine(frozen_lm).calls > 0


def test_a_predictor_in_a_nested_container_is_keyed_though_not_optimized():
    """``named_predictors()`` skips a predictor in a list of lists (dspy.GEPA does not optimize it
    either), but it answers: its instruction is part of the run key."""
    from dspy_turbogepa.adapter.run_identity import run_key

    class Nested(dspy.Module):
        def __init__(self, text):
            super().__init__()
            self.route = dspy.Predict("ticket -> queue")
            self.grid = [[dspy.Predict(dspy.Signature("ticket -> note", text))]]

    splits = ROUTING.splits(n_train=4, n_val=4, n_test=0)
    assert [n for n, _ in Nested("a").named_predictors()] == ["route"]
    keys = [run_key(Nested(t), splits.train, splits.val, 0)["student"] for t in ("a", "a", "b")]
    assert keys[0] == keys[1] != keys[2]


def test_a_student_that_deepcopy_cannot_copy_keeps_its_callbacks_when_it_carries_old_results():
    """dspy copies such a module attribute by attribute, keeping its callbacks; building from a student
    that carried ``detailed_results`` went through ``copy.copy`` first, whose ``__getstate__`` drops them."""
    from dspy.utils.callback import BaseCallback

    from dspy_turbogepa.adapter.program import ProgramCodec

    class WithLock(dspy.Module):
        def __init__(self):
            super().__init__(callbacks=[BaseCallback()])
            self.lock = threading.Lock()  # copy.deepcopy fails on it
            self.p = dspy.Predict("q -> a")

    for carries in (False, True):
        student = WithLock()
        if carries:
            student.detailed_results = object()
        built = ProgramCodec(student).build({})
        assert len(built.callbacks) == 1 and not hasattr(built, "detailed_results")
        assert hasattr(student, "detailed_results") == carries


def test_the_programs_the_search_evaluates_keep_no_module_history():
    """DSPy appends each LM call to the history of every module on the call's stack (up to 10,000 per
    module); the codec's cached candidate programs would hold that many per predictor for the whole run
    (45 KB per metric call at 10 predictors). Their history keeps nothing; the LM's history still records
    every call, and the program returned to the user records its own calls as any DSPy program does."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    task = TASKS["pipeline"]
    lm = make_student_lm(seed=0, noise=0.0)
    example = small_splits(task, n_train=4, n_val=4, n_test=0).val[0]
    codec = ProgramCodec(task.make_program())
    searched = codec.get("seed", codec.seed_texts()).program
    returned = codec.build(codec.seed_texts())
    with dspy.context(lm=lm):
        for _ in range(3):
            searched(**example.inputs())
        returned(**example.inputs())
    assert len(lm.history) == 3 * 2 + 2  # two predictors per call: every call recorded by the LM
    assert all(len(m.history) == 0 for _, m in searched.named_sub_modules())
    assert all(len(p.history) == 1 for _, p in returned.named_predictors())
    # and a per-call copy (BestOfN / Refine programs run on one) keeps the no-op history
    assert all(len(m.history) == 0 for _, m in copy.deepcopy(searched).named_sub_modules())


class _Locked(dspy.Module):
    """Holds what deepcopy cannot copy (a lock, as a client holds): built attribute by attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.p = dspy.Predict("q -> a")

    def forward(self, q):
        return self.p(q=q)


class _BigIndex:
    copies = 0

    def __deepcopy__(self, memo):
        _BigIndex.copies += 1
        return _BigIndex()


class _SharesItsIndex(dspy.Module):
    """Overrides deepcopy() to share a large index, which dspy.GEPA's build calls too."""

    def __init__(self) -> None:
        super().__init__()
        self.index = _BigIndex()
        self.p = dspy.Predict("q -> a")

    def deepcopy(self):
        index, self.index = self.index, None
        try:
            new = super().deepcopy()
        finally:
            self.index = index
        new.index = index
        return new

    def forward(self, q):
        return self.p(q=q)


class _LockedAroundAnIndex(dspy.Module):
    """Copied attribute by attribute (the lock), around a submodule with its own deepcopy(): DSPy's
    fallback calls that submodule's deepcopy(), and so must the build."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.rag = _SharesItsIndex()
        self.p = self.rag.p

    def forward(self, q):
        return self.rag(q=q)


@pytest.mark.parametrize("make", [_Locked, _SharesItsIndex, _LockedAroundAnIndex],
                         ids=["uncopyable-attribute", "own-deepcopy", "own-deepcopy-inside-the-fallback"])
def test_every_way_of_building_a_candidate_gives_its_lm_the_history_of_compile_start(make) -> None:
    """A predictor's LM shares its history with the copies the search calls. The whole-program deepcopy
    got a snapshot instead, but a student holding a lock took DSPy's attribute-by-attribute fallback, and
    one with its own deepcopy() was no longer called; the fallback copied the run's history again."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    lm = dspy.LM("openai/unused", cache=False)
    lm.history.append({"before": "compile"})
    student = make()
    student.set_lm(lm)
    codec = ProgramCodec(student)
    lm.history.extend({"run": i} for i in range(500))  # what the search's calls add
    copies_before = _BigIndex.copies
    built = codec.build({"p": "new instruction"})
    assert built.p.signature.instructions == "new instruction"
    assert built.p.lm.history == [{"before": "compile"}] and built.p.lm.history[0] is not lm.history[0]
    assert len(lm.history) == 501  # the user's LM keeps the run's calls
    if make is _SharesItsIndex:
        assert built.index is student.index and _BigIndex.copies == copies_before  # their deepcopy() ran
    else:
        assert built.lock is student.lock  # kept by reference, as DSPy's fallback does
    if make is _LockedAroundAnIndex:
        assert built.rag.index is student.rag.index and _BigIndex.copies == copies_before


class _Swapping(dspy.Module):
    """A user's deepcopy() that rebuilds the module with its two predictors' LMs swapped (from a config
    that lists them in another order, say): handed over as they are, or deep-copied."""

    def __init__(self, a_lm, b_lm, copy_lms: bool) -> None:
        super().__init__()
        self.a, self.b = dspy.Predict("q -> x"), dspy.Predict("x -> y")
        self.a.lm, self.b.lm, self.copy_lms = a_lm, b_lm, copy_lms

    def deepcopy(self):
        lms = (copy.deepcopy(self.b.lm), copy.deepcopy(self.a.lm)) if self.copy_lms else (self.b.lm, self.a.lm)
        return _Swapping(*lms, copy_lms=self.copy_lms)


def test_a_build_never_resets_the_history_of_an_lm_the_student_holds() -> None:
    """A user's deepcopy() that hands the student's own LMs to the copy under other predictor names
    (rebuilt from a config, say): those LMs are the user's, and their history is theirs to keep."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    first, second = dspy.LM("openai/a", cache=False), dspy.LM("openai/b", cache=False)
    codec = ProgramCodec(_Swapping(first, second, copy_lms=False))
    first.history.extend({"run": i} for i in range(5))
    second.history.extend({"run": i} for i in range(7))
    built = codec.build({})
    assert built.a.lm is second and (len(first.history), len(second.history)) == (5, 7)


def test_a_build_copies_each_history_snapshot_only_where_the_copy_meets_it(monkeypatch) -> None:
    """Built attribute by attribute, a program asks for one memo per attribute: copying every snapshot
    into each (35 times a build for 10 predictors and 20 settings) cost a second a build."""
    from dspy_turbogepa.adapter import program as program_module

    copies = []
    real = program_module._fresh
    monkeypatch.setattr(program_module, "_fresh", lambda snapshot: copies.append(1) or real(snapshot))
    lm = dspy.LM("openai/unused", cache=False)
    student = _Locked()
    student.settings = {f"k{i}": i for i in range(20)}
    student.set_lm(lm)
    program_module.ProgramCodec(student).build({})
    assert len(copies) == 1  # the one attribute holding the predictor (and its LM)


def test_a_copied_lm_gets_its_own_snapshot_whatever_its_predictor_is_called() -> None:
    """The snapshot was found by the predictor's name in the student: a user's deepcopy() that renames or
    swaps predictors (copying their LMs) left the run's history in, or gave an LM another LM's snapshot;
    an aliased predictor copied attribute by attribute kept the shared list itself."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    first, second = dspy.LM("openai/a", cache=False), dspy.LM("openai/b", cache=False)
    first.history.append({"who": "first"})
    second.history.append({"who": "second"})
    codec = ProgramCodec(_Swapping(first, second, copy_lms=True))
    first.history.append({"who": "first, during the run"})
    second.history.append({"who": "second, during the run"})
    built = codec.build({})
    assert (built.a.lm.model, built.a.lm.history) == ("openai/b", [{"who": "second"}])
    assert (built.b.lm.model, built.b.lm.history) == ("openai/a", [{"who": "first"}])

    class LockedLM(dspy.LM):  # cannot be deep-copied: shallow-copied, its history the shared list
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.guard = threading.Lock()

    class Inner(dspy.Module):
        def __init__(self, lm) -> None:
            super().__init__()
            self.p = dspy.Predict("q -> a")
            self.p.lm = lm

    class Outer(dspy.Module):
        def __init__(self, lm) -> None:
            super().__init__()
            self.inner = Inner(lm)
            self.alias = self.inner.p

    locked = LockedLM("openai/y", cache=False)
    locked.history.append({"before": "compile"})
    codec = ProgramCodec(Outer(locked))
    locked.history.extend({"run": i} for i in range(50))
    built = codec.build({})
    for pred in (built.inner.p, built.alias):
        assert pred.lm.history == [{"before": "compile"}] and pred.lm.history is not locked.history
    assert len(locked.history) == 51
