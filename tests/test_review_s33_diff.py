"""Review of 2a2b2ad..3b128f8 (session 33): bugs confirmed by running code, now fixed. Each test asserts the
correct behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the "Basic" key shape (redaction.py)

PROSE = [
    "Basic input/output handling comes first.",
    "Answer Basic true/false questions with one word.",
    "Explain Basic client/server terms to the user.",
    "Basic read/write access is enough.",
]


@pytest.mark.parametrize("text", PROSE)
def test_basic_key_shape_leaves_prose_alone(text):
    from dspy_turbogepa.redaction import contains_secret, mask_text

    assert mask_text(text, ()) == text
    assert not contains_secret(text, ())


def test_a_proposal_mentioning_basic_input_output_is_stored(tmp_path):
    from dspy_turbogepa.store import RunStore

    with RunStore.open(tmp_path, {"k": "v"}) as store:
        stored = store.record_proposal("p1", {"predict": "Use Basic input/output conventions."}, None, None, 1)
        store.flush()
        proposals = store.load_proposals()
    assert stored
    assert proposals["p1"].texts == {"predict": "Use Basic input/output conventions."}


# ------------------------------------------- literal module constants in the run key (run_identity.py)

_MODULE = textwrap.dedent("""
    ALLOWED = {"yes", "no", None}   # a set literal of mixed types: redact() cannot sort it


    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return float(pred.answer in ALLOWED)
""")

_PROBE = ("import s33_user_metric as m\n"
          "from dspy_turbogepa.adapter.run_identity import callable_identity\n"
          "print(callable_identity(m.metric))\n")


def test_a_mixed_type_set_constant_keys_the_metric_the_same_in_every_process(tmp_path):
    (tmp_path / "s33_user_metric.py").write_text(_MODULE)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], env={**env, "PYTHONHASHSEED": str(seed)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for seed in (1, 2, 3, 4)]
    keys = set()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        keys.add(out.strip())
    assert len(keys) == 1, keys


def test_equal_set_constants_give_equal_identities():
    from dspy_turbogepa.adapter.run_identity import _literal_identity

    a, b = set([0, 8, "x"]), set([8, 0, "x"])  # noqa: C405 - insertion order matters (0 and 8 collide)
    assert a == b
    assert _literal_identity("ALLOWED", a) == _literal_identity("ALLOWED", b)


# ------------------------------------------------------------ LM settings in the run key (run_identity.py)

def test_refreshed_temporary_aws_credentials_keep_the_lm_identity():
    import dspy

    from dspy_turbogepa.adapter.run_identity import lm_identity

    def bedrock(key_id, secret, token):
        return dspy.LM("bedrock/anthropic.claude-3-haiku-20240307-v1:0", aws_region_name="us-east-1",
                       aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token)

    before = bedrock("ASIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdzEAAaDEXAMPLE1")
    after = bedrock("ASIA5GRJQZ4XKEXAMPLE", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY", "FwoGZXIvYXdzEBBaDEXAMPLE2")
    assert lm_identity(before) == lm_identity(after)


# --------------------------------------------------------- code under a decorator (run_identity.py)

_DECORATED_METHOD = textwrap.dedent("""
    import functools


    def traced(fn):  # a user's tracing decorator, written with functools.wraps
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            return fn(*args, **kwargs)
        return inner


    class Scorer:
        def score(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
            return float(gold.answer == pred.answer) * SCALE


    metric = traced(Scorer().score)
""")


def test_an_edited_bound_method_under_a_decorator_changes_the_metric_identity():
    from dspy_turbogepa.adapter.run_identity import callable_identity

    def metric(scale):
        namespace = {"__name__": "s33_decorated_method"}
        exec(compile(_DECORATED_METHOD.replace("SCALE", scale), "<s33>", "exec"), namespace)
        return namespace["metric"]

    assert callable_identity(metric("1.0")) == callable_identity(metric("1.0"))  # stable
    assert callable_identity(metric("1.0")) != callable_identity(metric("0.5"))


@pytest.mark.parametrize("name", ["metadata", "litellm_session_id", "litellm_trace_id", "tags"])
def test_logging_only_lm_kwargs_keep_the_lm_identity(name):
    import dspy

    from dspy_turbogepa.adapter.run_identity import lm_identity

    def value(run):
        return {"metadata": {"session_id": run}, "tags": [run]}.get(name, run)

    first = dspy.LM("openai/gpt-4o-mini", temperature=0.0, **{name: value("run-3f9a1c")})
    second = dspy.LM("openai/gpt-4o-mini", temperature=0.0, **{name: value("run-77b2e0")})
    assert lm_identity(first) == lm_identity(second)


# ------------------------------------------------------ damaged stored rows (persistence.py / sqlite_store.py)

def test_a_proposal_row_of_another_shape_is_a_run_store_error(tmp_path):
    import sqlite3

    import dspy

    from dspy_turbogepa.adapter.persistence import load_known
    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.store import RunStore, RunStoreError

    codec = ProgramCodec(dspy.Predict("question -> answer"))
    examples = [dspy.Example(question="q", answer="a").with_inputs("question")]
    with RunStore.open(tmp_path, {"k": "v"}) as store:
        store.record_proposal("p", {"predict": "Answer briefly."}, None, None, 1)
        store.flush()
    con = sqlite3.connect(tmp_path / "run.sqlite3")
    with con:
        con.execute("UPDATE proposals SET texts_json = '[\"Answer briefly.\"]'")
    con.close()
    with RunStore.open(tmp_path, {"k": "v"}) as store, pytest.raises(RunStoreError, match="cannot be decoded"):
        load_known(store, codec, {"train": examples, "val": examples}, codec.seed_texts())
