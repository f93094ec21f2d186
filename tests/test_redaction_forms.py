"""Credential forms beyond the well-known key shapes must not reach anything a run writes.

Two forms leaked into the run store (``evaluations.message`` / ``trajectory_json``) when a program
error quoted the LM's settings: a token given as the only userinfo of ``api_base``
(``http://TOKEN@host``), and the value of an ``Ocp-Apim-Subscription-Key`` header (Azure API
Management), whose name the sensitive-key matcher did not know. These tests pin both, their near
relatives, and that ordinary counting fields are left alone.
"""

from __future__ import annotations

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.redaction import REDACTED, is_sensitive_key, mask_json_text, mask_text, redact
from dspy_turbogepa.testing import SimServer
from dspy_turbogepa.testing.fake_lm import make_reflection_lm

from helpers import FailsOnTracking, small_splits

USER_TOKEN = "usrtok0a9b8c7d6e5f4a3b2c1d"
APIM = "apim0a9b8c7d6e5f4a3b2c1d9e8f"


@pytest.mark.parametrize(
    "name",
    [
        "Ocp-Apim-Subscription-Key",  # Azure API Management: the form that leaked
        "subscription_key",
        "AZURE_SUBSCRIPTION_KEY",
        "x-functions-key",  # Azure Functions
        "AccountKey",  # Azure Storage connection strings
        "X-Authorization",  # gateways that rename the standard header
        "Proxy-Authorization",
        "authorization",
        "x-api-key",
        "api-key",  # Azure OpenAI
        "x-goog-api-key",
        "X-Auth-Token",
        "PRIVATE-TOKEN",  # GitLab
        "x-amz-security-token",
        "refresh_token",
        "client_secret",
        "x-api-secret",
        "db_password",
        "ssh_passphrase",
        "password",
        "X-Auth-Key",  # Cloudflare
        "Helicone-Auth",
        "x-portkey-virtual-key",
        "vertex_credentials",
        "aws_session_token",
    ],
)
def test_credential_header_and_field_names_are_sensitive(name):
    """Each name carries a credential in a header or a settings dict: its value must be dropped by
    :func:`redact`, and (through ``lm_api_keys``, which asks :func:`is_sensitive_key`) masked
    wherever an error quotes it."""
    assert is_sensitive_key(name)
    assert redact({name: "value-0a9b8c7d"}) == {name: REDACTED}


@pytest.mark.parametrize(
    "name",
    [
        "max_tokens",
        "max_completion_tokens",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "tokens",
        "token_count",
        "num_tokens",
        "keywords",
        "key",
        "cache_key",
        "primary_key",
        "sort_key",
        "subscription",
        "author",
        "authority",
        "authored_by",
        "model",
        "monkey",
    ],
)
def test_ordinary_field_names_are_not_sensitive(name):
    """Counters and plain names must keep their values: masking ``max_tokens`` or ``cache_key`` would
    make stored settings, usage statistics and summaries useless."""
    assert not is_sensitive_key(name)
    assert redact({name: 1000}) == {name: 1000}


def test_a_token_as_the_only_url_userinfo_is_masked():
    """``http://TOKEN@host`` carries the credential as the username; only ``user:password@`` was masked."""
    text = f"cannot reach http://{USER_TOKEN}@127.0.0.1:9/v1 (timeout)"
    assert mask_text(text) == f"cannot reach http://{REDACTED}@127.0.0.1:9/v1 (timeout)"
    assert USER_TOKEN not in mask_json_text(f'{{"error": "{text}"}}')
    # a user:password pair is masked as before, as one unit
    assert mask_text("https://bob:pw-1@proxy.local/v1") == f"https://{REDACTED}@proxy.local/v1"


def test_plain_url_usernames_and_emails_are_kept():
    """A lone username is masked only when it looks like key material, so instructions or outputs that
    mention ``ssh://git@github.com`` or a person's login are stored as written."""
    for text in (
        "clone ssh://git@github.com/org/repo.git",
        "open https://alice@example.com/dashboard",
        "open https://firstname.lastname@example.com/",
        "write to support@example.com",
        "see https://example.com/a:b@c",
        "see https://example.com/path/0a9b8c7d6e5f4a3b2c1d@x",  # '@' in a path, not userinfo
    ):
        assert mask_text(text) == text, text


def test_url_credentials_returns_the_username_when_there_is_no_password():
    """The extractor for exact masking: a URL's password, else its username (the ``TOKEN@host`` form)."""
    from dspy_turbogepa.redaction import url_credentials  # imported here: absent before the fix

    assert url_credentials(f"http://{USER_TOKEN}@127.0.0.1:9/v1") == [USER_TOKEN]
    assert url_credentials("http://alice:hunter22@127.0.0.1:9/v1") == ["hunter22"]
    assert url_credentials("http://127.0.0.1:9/v1") == []
    assert url_credentials("http://tok%2Fen0123456789@h/") == ["tok%2Fen0123456789", "tok/en0123456789"]
    assert url_credentials("http://[bad") == []
    # a lone username only when the caller's test accepts it; a password always
    assert url_credentials("http://alice@127.0.0.1:9/v1", username_if=lambda u: len(u) >= 16) == []
    assert url_credentials(f"http://{USER_TOKEN}@h/", username_if=lambda u: len(u) >= 16) == [USER_TOKEN]
    assert url_credentials("http://alice:pw@h/", username_if=lambda u: False) == ["pw"]


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_quoted_url_token_and_apim_header_are_never_written(routing, tmp_path, engine):
    """End to end (the reviewer's repro): a program error quotes the LM's api_base and headers; neither
    the URL-username token nor the APIM subscription key may be in any byte under log_dir."""

    def quoting_error() -> Exception:  # a client error that echoes what it was configured with
        kw = dspy.settings.lm.kwargs
        return RuntimeError(f"cannot reach {kw['api_base']} headers={kw['extra_headers']}")

    splits = small_splits(routing, n_train=20, n_val=10)
    with SimServer("test", seed=0) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url.replace("http://", f"http://{USER_TOKEN}@"),
                          api_key="anything", extra_headers={"Ocp-Apim-Subscription-Key": APIM}, cache=False,
                          **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), track_stats=True, verbose=False)
        with dspy.context(lm=student):
            program = opt.compile(FailsOnTracking(routing.make_program(), quoting_error),
                                  trainset=splits.train, valset=splits.val)
    assert program.detailed_results.run_stats["failures"].get("program_error", 0) > 0  # the errors were stored
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.sqlite3" for p in written)
    for path in written:
        data = path.read_bytes()
        assert USER_TOKEN.encode() not in data and APIM.encode() not in data, path


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_a_key_in_the_api_base_path_is_never_written_or_raised(routing, tmp_path, engine, caplog):
    """A gateway that takes its key in the path (``.../gw/<token>/v1``) answers 404 quoting that path:
    the token reached the run store, the log and the SystemicFailureError's text (only endpoint names
    hid it)."""
    import logging

    from dspy_turbogepa import SystemicFailureError

    token = "gwtok0a9b8c7d6e5f4a3b2c1"
    splits = small_splits(routing, n_train=20, n_val=10)
    with SimServer("test", seed=0) as srv, caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        student = dspy.LM("openai/sim-student", api_base=srv.base_url.replace("/v1", f"/gw/{token}/v1"),
                          api_key="anything", cache=False, **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), verbose=False)
        with dspy.context(lm=student), pytest.raises(SystemicFailureError) as info:
            opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert "/gw/" + REDACTED in str(info.value)  # the 404 is quoted, the token masked
    assert token not in str(info.value) and token not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.sqlite3" for p in written)
    for path in written:
        assert token.encode() not in path.read_bytes(), path


def test_key_material_in_an_api_base_path_or_query_is_a_run_secret():
    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys
    from dspy_turbogepa.redaction import url_key_material

    path_token, query_token = "gwtok0a9b8c7d6e5f4a3b2c1", "qtok9z8y7x6w5v4u3t2s1"
    lm = dspy.LM("openai/x", api_base=f"http://h:9/gw/{path_token}/v1?key={query_token}&api-version=2024-06-01")
    keys = set(lm_api_keys(dspy.Predict("q -> a"), lm))
    assert {path_token, query_token} <= keys
    assert not {"gw", "v1", "h:9", "2024-06-01"} & keys
    assert url_key_material("http://h/gw/tok%2Dabc0123456789xyz/v1") == ["tok%2Dabc0123456789xyz",
                                                                          "tok-abc0123456789xyz"]
    # a SAS signature as written in the URL (what a 404 quotes) and decoded; a short credential parameter
    assert url_key_material("https://s.blob.core.windows.net/c?sv=2022-11-02&sig=ab%2Bcd%2Fef0123456789XYZ%3D") == [
        "ab%2Bcd%2Fef0123456789XYZ%3D", "ab+cd/ef0123456789XYZ="]
    assert url_key_material("http://h/v1?api_key=shortish") == ["shortish"]
    # names are not key material: masked everywhere, they would hide the model in logs, MLflow and texts
    for url in ("https://x.openai.azure.com/openai/deployments/gpt-4o-mini-2024-07-18/chat?api-version=2024-08-01-preview",
                "https://x.openai.azure.com/openai/deployments/customer-classification/v1",
                "https://x.openai.azure.com/openai/deployments/my-chat/v1"):
        assert url_key_material(url) == [], url


def test_an_endpoint_from_the_environment_masks_its_key_material(monkeypatch):
    """litellm reads OPENAI_API_BASE, AZURE_API_BASE, OPENAI_BASE_URL...: a path token there is no LM
    argument, and those names hold no KEY/TOKEN/SECRET marker."""
    from dspy_turbogepa.redaction import env_secret_values

    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:9/gw/gwtok0a9b8c7d6e5f4a3b2c1/v1")
    monkeypatch.setenv("AZURE_API_BASE", "https://me:LKazurePassw0rd1234@x.openai.azure.com/openai/"
                       "deployments/gpt-4o-mini-2024-07-18")
    assert mask_text("404 for /gw/gwtok0a9b8c7d6e5f4a3b2c1/v1") == f"404 for /gw/{REDACTED}/v1"
    assert "LKazurePassw0rd1234" in env_secret_values()
    assert mask_text("model azure/gpt-4o-mini-2024-07-18") == "model azure/gpt-4o-mini-2024-07-18"


def test_an_endpoint_name_never_holds_a_path_token_or_a_query():
    """Endpoint names key the rate-limit stats in summary.json, detailed_results and MLflow metric names
    (which are never redacted): a gateway that takes its key in the path (``/gw/<token>/v1``) or the
    query wrote the key into all three."""
    from dspy_turbogepa.adapter.lm_copies import endpoint_key
    from dspy_turbogepa.redaction import endpoint_url
    from dspy_turbogepa.tracking.mlflow_tracking import sanitize_key

    token = "LKtok3nQ9w8e7r6t5y4u"
    for url in (f"http://127.0.0.1:9/gw/{token}/v1", f"http://127.0.0.1:9/v1?api_key={token}",
                f"http://me:{token}@127.0.0.1:9/v1", "http://127.0.0.1:9/gw/sk-proj-abcdefghijklmnopqrstu/v1"):
        name = endpoint_key(dspy.LM("openai/x", api_base=url))
        assert token not in name and "abcdefghijklmnopqrstu" not in name, name
        assert name.startswith("openai/x@http://127.0.0.1:9/")
    assert endpoint_url(f"http://h/gw/{token}/v1") != endpoint_url("http://h/gw/another0token1xyz2/v1")
    assert endpoint_url("https://x.openai.azure.com/openai/deployments/my-chat/v1") == \
        "https://x.openai.azure.com/openai/deployments/my-chat/v1"  # plain paths stay readable
    assert "sk-LEAKCHECK" not in sanitize_key("rate_limits/endpoints/x@http://h/sk-LEAKCHECK-1234567890abcdef")


_HELD_KEY = "LKheldKEYq1W2e3R4t5Y6u7I8o9"
_GLOBAL_JUDGE = dspy.LM("openai/judge", api_key="LKglobalJudge1a2b3c4d5e6f7")


def test_every_credential_of_every_lm_the_run_can_reach_is_masked():
    """Only api_key, credential-named headers and the URL password of the predictors', the configured
    and the reflection LM were masked: an aws_secret_access_key, a portkey virtual key, or the key of
    an LM the program holds (run with dspy.context inside forward), a judge metric's or a custom
    proposer's own LM were written as is when an error body echoed them."""
    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys

    secrets = {
        "aws": "LKawssecretN1m2B3v4C5x6Z7lf",
        "session": "LKsesstokA1s2D3f4G5h6J7k8L9",
        "virtual": "LKvirtkeyP9o8I7u6Y5t4R3e2Wq",
    }
    student_lm = dspy.LM("bedrock/x", aws_secret_access_key=secrets["aws"], aws_session_token=secrets["session"],
                         extra_headers={"x-portkey-virtual-key": secrets["virtual"]})

    class Program(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict("question -> answer")
            self.answer.lm = student_lm
            self.big_lm = dspy.LM("openai/big", api_key="LKmoduleHeld1a2b3c4d5e6f7")

    closure_lm = dspy.LM("openai/judge", api_key="LKclosureJudge1a2b3c4d5e6f7")

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        closure_lm("is it right?")
        _GLOBAL_JUDGE("is it right?")
        return 1.0

    class Judge(dspy.Module):
        def __init__(self):
            super().__init__()
            self.grade = dspy.Predict("answer -> score: float")
            self.grade.lm = dspy.LM("openai/grader", api_key="LKmoduleJudge1a2b3c4d5e6f7")

    class Proposer:
        def __init__(self):
            self.lm = dspy.LM("openai/proposer", api_key=_HELD_KEY)

        def __call__(self, candidate, reflective_dataset, components_to_update):
            return {}

    keys = set(lm_api_keys(Program(), None, metric, Proposer()))
    assert set(secrets.values()) <= keys
    assert {"LKmoduleHeld1a2b3c4d5e6f7", "LKclosureJudge1a2b3c4d5e6f7", "LKglobalJudge1a2b3c4d5e6f7", _HELD_KEY} <= keys
    assert "LKmoduleJudge1a2b3c4d5e6f7" in set(lm_api_keys(Program(), None, Judge()))

    class FrozenJudge(dspy.Module):  # the grader in a submodule marked compiled: named_predictors() skips it
        def __init__(self):
            super().__init__()
            self.inner = Judge()
            self.inner._compiled = True

    assert "LKmoduleJudge1a2b3c4d5e6f7" in set(lm_api_keys(Program(), None, FrozenJudge()))


def test_a_judge_lm_named_by_a_callable_metric_objects_call_or_a_module_judges_forward_is_masked():
    """For a function metric the globals its code names were searched; for a callable object or a
    dspy.Module judge only the instance's attributes, so a module-level judge LM run with dspy.context
    in ``__call__`` / ``forward`` was missed, and a gateway key it echoed was stored unmasked."""
    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys

    class CallableJudge:
        def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
            with dspy.context(lm=_GLOBAL_JUDGE):
                return 1.0

    class ModuleJudge(dspy.Module):
        def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
            with dspy.context(lm=_GLOBAL_JUDGE):
                return 1.0

    for judge in (CallableJudge(), ModuleJudge()):
        assert "LKglobalJudge1a2b3c4d5e6f7" in set(lm_api_keys(dspy.Predict("q -> a"), None, judge)), judge


def test_the_program_uploaded_to_mlflow_holds_no_lm_credential():
    """DSPy's save() leaves out api_key only; the MLflow artifact masked credential-looking text, not
    credential-named fields, so an aws_secret_access_key or a virtual-key header was uploaded."""
    import json

    from dspy_turbogepa.tracking.mlflow_tracking import _program_json

    class Tagger(dspy.Module):
        def __init__(self):
            super().__init__()
            self.tag = dspy.Predict("token -> pos")

    lm = dspy.LM("bedrock/x", aws_secret_access_key="LKawssecretN1m2B3v4C5x6Z7lf",
                 extra_headers={"x-portkey-virtual-key": "LKvirtkeyP9o8I7u6Y5t4R3e2Wq"})
    for program in (dspy.Predict("token -> pos"), Tagger()):
        predictor = program if isinstance(program, dspy.Predict) else program.tag
        predictor.lm = lm
        predictor.demos = [dspy.Example(token="can", pos="VERB")]
        text, error = _program_json(program)
        assert error is None and text is not None and "LKawssecret" not in text and "LKvirtkey" not in text
        state = json.loads(text)
        state = state if isinstance(program, dspy.Predict) else state["tag"]
        assert state["signature"]["instructions"]  # still the program
        assert state["demos"][0]["token"] == "can"  # a demo field named like a credential is data


def test_a_string_score_is_masked_where_it_is_quoted():
    from dspy_turbogepa.adapter.metric import read_metric_return

    reading = read_metric_return("judge said: use sk-LEAKCHECK-1234567890abcdef", failure_score=0.0)
    assert reading.invalid and "LEAKCHECK" not in reading.invalid and "string score" in reading.invalid


_GATEWAY_KEY = "gw0a9b8c7d6e5f4a3b2c1d"  # no known key shape: masked only because the environment holds it


def test_a_feedback_call_error_quoting_a_key_is_masked_in_the_log(routing, caplog, monkeypatch):
    """A judge metric's feedback call may fail with an error that quotes its key (an echoed request);
    the warning about it goes to the user's log handlers, which may ship logs anywhere."""
    import logging
    import random

    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep

    monkeypatch.setenv("X_API_KEY", _GATEWAY_KEY)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise RuntimeError(f"judge request failed: headers={{'x-api-key': '{_GATEWAY_KEY}'}}")

    program = routing.make_program()
    (name, predictor), = program.named_predictors()
    ex = small_splits(routing, n_train=1, n_val=1, n_test=0).train[0]
    inputs, outputs = dict(ex.inputs()), dspy.Prediction(queue="billing")
    traj = DspyTrajectory(ex, outputs, [TraceStep(name, predictor, inputs, outputs)], [(predictor, inputs, outputs)])
    builder = ReflectiveDatasetBuilder(ProgramCodec(program), metric, 0.0, False, False, False)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), pytest.raises(Exception, match="feedback"):
        builder.build([name], [traj], [1.0], random.Random(0))
    logged = [r.getMessage() for r in caplog.records if "giving feedback" in r.getMessage()]
    assert logged and "judge request failed" in logged[0]
    assert not any(_GATEWAY_KEY in r.getMessage() for r in caplog.records)


def test_an_instruction_proposer_error_quoting_a_key_is_masked_in_the_log(caplog, monkeypatch):
    """A custom proposer's LM error may echo its key; the warning and the skip message (stored and shown
    in run_stats) must not carry it."""
    import logging

    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    monkeypatch.setenv("X_API_KEY", _GATEWAY_KEY)

    def proposer(candidate, reflective_dataset, components_to_update):
        raise ValueError(f"gateway refused key {_GATEWAY_KEY}")

    reflector = ReflectiveProposer(None, proposer, None, max_workers=1)
    try:
        with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
            out = reflector._propose({"p": "x"}, {"p": []}, [], ["p"])
    finally:
        reflector.close()
    assert out.skipped == "proposer_error" and _GATEWAY_KEY not in out.message
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("The instruction proposer raised")]
    assert logged and "gateway refused key" in logged[0]
    assert not any(_GATEWAY_KEY in r.getMessage() for r in caplog.records)


def test_cookies_keys_and_set_members_are_masked_in_structured_data():
    """Run meta and event payloads go through redact(), the stored JSON through mask_json_text(): a
    session cookie, a key used as a dict key (a per-key counter), a set of keys, or a JSON object key
    quoting a key must come out masked, not only string values."""
    import json

    key = "sk-LEAKCHECK-1234567890abcdef"
    assert is_sensitive_key("Cookie")
    out = redact({"headers": {"Cookie": "session=s3ss10nvalue"}, f"calls for {key}": 3, "keys": {key, "plain"}})
    dumped = json.dumps(out)
    assert "s3ss10nvalue" not in dumped and "LEAKCHECK" not in dumped
    assert out["headers"]["Cookie"] == REDACTED
    assert f"calls for {REDACTED}" in out and REDACTED in out["keys"] and "plain" in out["keys"]
    text = mask_json_text(json.dumps({f"quota of {key}": {"note": key}}))
    assert "LEAKCHECK" not in text and json.loads(text) == {f"quota of {REDACTED}": {"note": REDACTED}}


def test_a_custom_credential_header_is_a_run_secret():
    """A gateway's own header (``X-Gateway-Key``) is named like no known credential; its value must
    still be masked wherever an error body echoes the request, or it lands in the store and the log."""
    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys

    program = dspy.Predict("question -> answer")
    program.lm = dspy.LM("openai/x", headers={"X-Gateway-Key": "gw-0a9b8c7d6e5f4a3b"})
    assert "gw-0a9b8c7d6e5f4a3b" in lm_api_keys(program, None)
    configured = dspy.LM("openai/y", extra_headers={"X-Tenant-Key": "tn-9f8e7d6c5b4a3928"})
    with dspy.context(lm=configured):
        assert "tn-9f8e7d6c5b4a3928" in lm_api_keys(dspy.Predict("question -> answer"), None)
