"""Session 35's review of docs/run_store.md and docs/errors.md against the code, each finding fixed:

- A DSPy example stored in a trace or a prediction came back on resume without the keys `.with_inputs(...)`
  had marked, so a metric's feedback call reading `.inputs()` on it raised on every replayed row (run_store.md:
  typed values "come back as themselves on resume").
- A stored value of another type than this version writes (a store edited by hand, another program: SQLite
  keeps whatever a row is given) surfaced as a bare TypeError or AttributeError, some mid-run, one after the
  whole search, instead of errors.md's `RunStoreError` naming the store and the way to start over. A sweep
  of every column with 13 kinds of value then found 9 more, in the event log (6) and the run key (3).
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import dspy
import pydantic
import pytest

from dspy_turbogepa.adapter.trajectory_json import _revive, jsonable
from dspy_turbogepa.store import RunStoreError, RunStoreMismatchError
from dspy_turbogepa.testing import TASKS

from helpers import quick_compile, small_splits

ROUTING = TASKS["routing"]


def test_a_stored_example_keeps_its_input_keys():
    marked = dspy.Example(ticket="printer on fire", queue="it").with_inputs("ticket")
    stored = json.loads(json.dumps(jsonable({"source": marked, "plain": dspy.Example(ticket="t")})))
    back = _revive(stored)
    assert back["source"] == marked and back["source"].inputs().toDict() == {"ticket": "printer on fire"}
    assert back["source"].labels().toDict() == {"queue": "it"}
    assert back["plain"]._input_keys is None  # none marked, none made up
    # rows written before the keys were stored come back as they always did
    old_row = {key: value for key, value in stored["source"].items() if key != "input_keys"}
    assert _revive(old_row)._input_keys is None and _revive(old_row).toDict() == marked.toDict()


class _WithSource(dspy.Module):
    """Returns the example it answered as part of its prediction, its input marked."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ROUTING.make_program()

    def forward(self, ticket):
        out = self.inner(ticket=ticket)
        return dspy.Prediction(queue=out.queue,
                               source=dspy.Example(ticket=ticket, queue=out.queue).with_inputs("ticket"))


def test_a_resumed_run_gives_the_feedback_call_the_example_as_marked(tmp_path):
    data = small_splits(ROUTING, n_train=16, n_val=8, n_test=0)
    calls = {"feedback": 0}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            calls["feedback"] += 1
            assert pred.source.inputs().toDict() == {"ticket": gold.ticket}  # raised on replayed rows before
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    quick_compile(metric=metric, program=_WithSource(), budget=50, log_dir=tmp_path, data=data)
    calls["feedback"] = 0
    resumed = quick_compile(metric=metric, program=_WithSource(), budget=120, log_dir=tmp_path, data=data)
    stats = resumed.detailed_results.run_stats
    assert stats["metric_calls_replayed"] > 0 and calls["feedback"] > 0
    assert not stats["reflective_records_skipped"].get("feedback_error")


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    """A finished run's store (objective scores and usage included), copied for each damage."""
    base = tmp_path_factory.mktemp("finished")
    data = small_splits(ROUTING, n_train=8, n_val=4, n_test=0)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        result = ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
        return dspy.Prediction(score=float(result.score), feedback=result.feedback,
                               objective_scores={"acc": float(result.score)})

    quick_compile(metric=metric, budget=40, log_dir=base, data=data)
    return base, metric, data


@pytest.mark.parametrize("damage", [
    "UPDATE evaluations SET objective_scores_json='[1,2]'",
    "UPDATE evaluations SET objective_scores_json='{\"acc\":\"x\"}'",
    "UPDATE evaluations SET usage_json='\"x\"'",
    "UPDATE evaluations SET usage_json='{\"cost\":\"x\"}'",
    "UPDATE evaluations SET score='abc'",
    "UPDATE evaluations SET example_id='zz' WHERE seq=(SELECT MIN(seq) FROM evaluations)",
    "UPDATE evaluations SET example_id=-1 WHERE seq=(SELECT MIN(seq) FROM evaluations)",
    "UPDATE proposals SET reflection_calls='x'",
    "UPDATE proposals SET texts_json='{\"route\": 3}'",
    "UPDATE candidates SET parents_json='7'",
    "UPDATE events SET payload_json='[1]'",
    "UPDATE run_key SET component=NULL WHERE component=(SELECT MIN(component) FROM run_key)",
    "UPDATE run_key SET value=X'00ff' WHERE component=(SELECT MIN(component) FROM run_key)",
], ids=["objectives-list", "objective-text", "usage-text", "usage-value-text", "score-text", "example-id-text",
        "example-id-negative", "reflection-calls-text", "proposal-text-number", "parents-number", "event-payload-list",
        "run-key-component-null", "run-key-value-blob"])
def test_a_stored_value_of_another_type_is_a_damaged_store(finished_store, tmp_path, damage):
    base, metric, data = finished_store
    log_dir = tmp_path / "run"
    shutil.copytree(base, log_dir)
    with sqlite3.connect(log_dir / "run.sqlite3") as con:
        assert con.execute(damage).rowcount > 0
    with pytest.raises(RunStoreError, match="is not a readable run store") as err:
        quick_compile(metric=metric, budget=40, log_dir=log_dir, data=data)
    assert "run.sqlite3" in str(err.value)
    # read as the store opens, before the search starts (some raised mid-run, one after the whole search)
    engine_frames = [e for e in err.traceback if "dspy_turbogepa/engine/" in str(e.path)]
    assert not engine_frames, engine_frames


def test_the_undamaged_copy_resumes(finished_store, tmp_path):
    """The control of the test above: the copy itself is a readable store, replayed in full."""
    base, metric, data = finished_store
    shutil.copytree(base, tmp_path / "run")
    resumed = quick_compile(metric=metric, budget=40, log_dir=tmp_path / "run", data=data)
    assert resumed.detailed_results.run_stats["metric_calls_executed"] == 0



def test_only_litellms_trace_and_session_ids_are_left_out_of_an_lms_identity():
    """run_store.md: what only labels a call for logging is left out of the run key: litellm's trace and
    session ids (a trace id set per process would refuse every rerun); a setting of another name is sent
    with the request, so it is part of the LM's identity (the doc said "trace and session ids")."""
    from dspy_turbogepa.adapter.run_identity import lm_identity

    base = lm_identity(dspy.LM("openai/m", api_base="http://127.0.0.1:1/v1"))
    for labels in ({"litellm_trace_id": "t-1"}, {"litellm_session_id": "s-1"}, {"metadata": {"a": 1}}):
        assert lm_identity(dspy.LM("openai/m", api_base="http://127.0.0.1:1/v1", **labels)) == base, labels
    for sent in ({"trace_id": "t-1"}, {"session_id": "s-1"}):
        assert lm_identity(dspy.LM("openai/m", api_base="http://127.0.0.1:1/v1", **sent)) != base, sent


def test_no_damaged_column_escapes_as_a_bare_error(finished_store, tmp_path):
    """Every column of every table, given a value of another kind (text where a number goes, a blob, a JSON
    list where an object goes): the rerun either resumes (the value was harmless: a message, a label) or
    stops with the store's own errors, never a bare TypeError or AttributeError from deep in the run (a
    sweep of 13 values per column found 9 such after the loaders of evaluations and proposals were fixed;
    these kinds stand for them)."""
    base, metric, data = finished_store
    with sqlite3.connect(base / "run.sqlite3") as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        columns = [(t, c) for t in tables for (_, c, *_rest) in con.execute(f"PRAGMA table_info({t})") if c != "seq"]
    assert len(columns) > 40
    outcomes: dict[str, int] = {}
    for n, ((table, column), value) in enumerate(
            (tc, v) for tc in columns for v in (b"\x00\xff", "[1]" if column_is_json(tc[1]) else "zz")):
        log_dir = tmp_path / f"{n}"
        shutil.copytree(base, log_dir)
        with sqlite3.connect(log_dir / "run.sqlite3") as con:
            try:
                con.execute(f"UPDATE {table} SET {column}=?", (value,))
            except sqlite3.IntegrityError:
                continue
        try:
            quick_compile(metric=metric, budget=40, log_dir=log_dir, data=data)
            outcome = "resumed"
        except (RunStoreError, RunStoreMismatchError) as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # the finding, named with its column
            pytest.fail(f"{table}.{column} = {value!r}: {type(exc).__name__}: {exc}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(log_dir)
    # (a failure kind that is none of the engine's is a damaged row: a RunStoreError, not a resumed run)
    assert outcomes.get("RunStoreError", 0) >= 10 and outcomes.get("resumed", 0) >= 8, outcomes


def column_is_json(column: str) -> bool:
    return column.endswith("_json")


# ---- a review of what a resumed run hands the metric (run_store.md: typed values "come back as themselves")


def _round_trip(value):
    return _revive(json.loads(json.dumps(jsonable(value))))


def test_numpy_float64_and_str_come_back_as_numpy_values():
    """np.float64 and np.str_ are a float and a str too, so they were stored as plain Python values:
    a metric's ``x.round(2)`` or ``x.item()`` raised on resume."""
    import numpy as np

    for value in (np.float64(0.75), np.str_("billing"), np.float32(0.5), np.int64(3)):
        back = _round_trip(value)
        assert type(back) is type(value) and back == value, (value, back)
    assert _round_trip(np.float64(0.755)).round(2) == np.float64(0.755).round(2)


def test_a_string_array_wider_than_its_strings_comes_back_as_an_array():
    import numpy as np

    for value in (np.array(["a"], dtype="U10"), np.where(np.array([False, True]), "yes", "no").astype("U8")):
        back = _round_trip(value)
        assert isinstance(back, np.ndarray) and back.dtype == value.dtype and (back == value).all(), back
    # bounded: a row cannot make a tiny array allocate gigabytes (left as its JSON)
    forged = {"__turbogepa_type__": "numpy:ndarray", "value": {"dtype": "<U100000000", "shape": [1], "data": ["a"]}}
    assert not isinstance(_revive(forged), np.ndarray)


class AliasedTicket(pydantic.BaseModel):
    """At module level: a class is found again by its module and name (one defined in a function is not)."""

    label: str = pydantic.Field(alias="Label")


def test_a_pydantic_model_with_an_aliased_field_comes_back_as_the_model():
    back = _round_trip({"t": AliasedTicket(Label="billing")})["t"]
    assert isinstance(back, AliasedTicket) and back.label == "billing"


def test_a_predictions_lm_usage_is_stored_with_it():
    """With dspy's track_usage, ``pred.get_lm_usage()`` was None on every replayed row."""
    from dspy_turbogepa.adapter.trajectory_json import prediction_dict, prediction_from

    usage = {"openai/sim-student": {"prompt_tokens": 120, "completion_tokens": 7}}
    for pred in (dspy.Prediction(queue="billing"), dspy.Prediction.from_completions([{"queue": "a"}, {"queue": "b"}])):
        pred.set_lm_usage(usage)
        back = prediction_from(json.loads(json.dumps(prediction_dict(pred))))
        assert back.get_lm_usage() == usage and dict(back.items()) == dict(pred.items())
        assert "__turbogepa_lm_usage__" not in dict(back.items())
    assert prediction_from(json.loads(json.dumps(prediction_dict(dspy.Prediction(queue="x"))))).get_lm_usage() is None


def test_a_resumed_run_gives_the_feedback_call_the_lm_usage(tmp_path):
    data = small_splits(ROUTING, n_train=12, n_val=8, n_test=0)
    seen: dict[str, int] = {"with_usage": 0, "without": 0}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            seen["with_usage" if pred.get_lm_usage() else "without"] += 1
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    with dspy.context(track_usage=True):
        quick_compile(metric=metric, budget=40, log_dir=tmp_path, data=data)
        assert seen["with_usage"] > 0 and seen["without"] == 0  # live
        seen.update(with_usage=0, without=0)
        resumed = quick_compile(metric=metric, budget=90, log_dir=tmp_path, data=data)
    assert resumed.detailed_results.run_stats["metric_calls_replayed"] > 0
    assert seen["with_usage"] > 0 and seen["without"] == 0, seen


def test_a_class_made_at_run_time_comes_back_as_its_findable_base():
    """``dspy.Code["python"]`` is a class ``Code.__class_getitem__`` makes (``Code_python``), which a resume
    cannot find by name: it came back as a dict (``.code`` raised). Now as ``dspy.Code``, the nearest base
    that can be found and declares every stored field. A class defined in a function has no such base
    (``pydantic.BaseModel`` declares none of its fields): its fields, as documented."""
    code = dspy.Code["python"](code="print('refund')")
    back = _round_trip({"code": code})["code"]
    assert isinstance(back, dspy.Code) and back.code == "print('refund')"

    def local_model():
        class Local(pydantic.BaseModel):
            x: int

        return Local(x=1)

    assert _round_trip({"m": local_model()})["m"] == {"x": 1}
    assert isinstance(_round_trip({"t": AliasedTicket(Label="x")})["t"], AliasedTicket)  # a findable class: itself
