"""Review (session 33): credentials from LM configuration in logs, the run store, results, MLflow; and
what a long run shows while it runs (INFO log, MLflow, run_stats)."""

from __future__ import annotations

import base64
import functools
import json
import logging
import traceback
from pathlib import Path
from typing import Any

import dspy
import pytest
from test_http_faults import FaultProxy, compile_through, error_body, fast_runs, proxy  # noqa: F401 - fixtures

from dspy_turbogepa import SystemicFailureError, TurboGEPA

from helpers import small_splits

ENGINES = [pytest.param({}, id="native"), pytest.param({"engine": "litellm"}, id="litellm")]


def _leaks(secret: str, caplog: pytest.LogCaptureFixture, log_dir: Path | None, *texts: str) -> list[str]:
    """Where ``secret`` shows: log records (with tracebacks), given texts, files under log_dir."""
    found = []
    fmt = logging.Formatter()
    ours = [fmt.format(r) for r in caplog.records if r.name.startswith("dspy_turbogepa")]
    if any(secret in line for line in ours):
        found.append("log")
    found += [f"text[{i}]" for i, t in enumerate(texts) if secret in t]
    if log_dir is not None:
        found += [str(p) for p in log_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    return found


def _echo_auth(status: int, when=lambda model, n, headers: True, code: str = "invalid_api_key"):
    """A plan answering ``status`` with an error body that quotes the request's Authorization header."""
    def plan(model: str, n: int, body: dict[str, Any], headers: dict[str, str]):
        if not when(model, n, headers):
            return None
        auth = headers.get("Authorization", "")
        message = f"Request rejected: Authorization: {auth} (key {auth.split(' ')[-1]})"
        return ("status", status, error_body(code, message), {})
    return plan


# --------------------------------------------------------------------------- a judge LM bound with functools.partial
JUDGE_KEY = "LKpartialJudge1a2b3c4d5e6f"  # no known key shape: only the run's own key list can mask it


def _judge_metric(gold, pred, trace=None, pred_name=None, pred_trace=None, *, judge):
    judge("Is this routing right? " + str(pred.get("queue")))
    return float(pred.get("queue") == gold.queue)


@pytest.mark.http
def test_a_partial_bound_judge_lms_echoed_key_is_masked(proxy, routing, tmp_path, caplog):  # noqa: F811
    """``metric=functools.partial(judge_metric, judge=dspy.LM(..., api_key=K))`` is the usual way to give a
    judge metric its LM (the run key docs name partials). The provider answers the judge's call 401
    quoting the Authorization header: the run stops (right), but the key is in the error, the log and
    run.sqlite3."""
    proxy.reset(_echo_auth(401, lambda model, n, headers: JUDGE_KEY in headers.get("Authorization", "")))
    judge = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=JUDGE_KEY, cache=False, num_retries=0)
    student = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key="anything", cache=False, num_retries=0)
    reflector = dspy.LM("openai/sim-reflector", api_base=proxy.base_url, api_key="anything", cache=False,
                        num_retries=0, max_tokens=4000)
    splits = small_splits(routing, n_train=6, n_val=4, n_test=0)
    opt = TurboGEPA(functools.partial(_judge_metric, judge=judge), max_metric_calls=30, reflection_lm=reflector,
                    num_threads=2, log_dir=str(tmp_path), verbose=False)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"), dspy.context(lm=student), \
            pytest.raises(SystemicFailureError) as info:
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    texts = [str(info.value), "".join(traceback.format_exception(info.value))]
    assert "Request rejected" in texts[0]  # the echo reached the error: the check below is not vacuous
    assert _leaks(JUDGE_KEY, caplog, tmp_path, *texts) == []


# --------------------------------------------------------------------------- HTTP Basic credentials from api_base
URL_PASSWORD = "Pw0rdSecret99x"


@pytest.mark.http
def test_basic_auth_from_api_base_userinfo_echoed_by_the_server_is_masked(proxy, routing, tmp_path,  # noqa: F811
                                                                         caplog):
    """``api_base="http://alice:<password>@host/v1"`` (a basic-auth gateway in front of vLLM): with
    ``engine="litellm"`` httpx turns the userinfo into ``Authorization: Basic base64(alice:<password>)``
    (the Bearer key is replaced). A gateway's 400 echoing the header puts that credential — the
    password, trivially decoded — into the run store and the log: only ``Bearer`` is a masked shape,
    and only the plain password is a run secret."""
    basic = base64.b64encode(f"alice:{URL_PASSWORD}".encode()).decode()
    proxy.reset(_echo_auth(400, lambda model, n, headers: "student" in model and n % 3 == 0, code="rejected"))
    base = proxy.base_url.replace("http://", f"http://alice:{URL_PASSWORD}@")
    student = dspy.LM("openai/sim-student", api_base=base, api_key="anything", cache=False, num_retries=0,
                      engine="litellm")
    reflector = dspy.LM("openai/sim-reflector", api_base=proxy.base_url, api_key="anything", cache=False,
                        num_retries=0, max_tokens=4000)
    splits = small_splits(routing, n_train=6, n_val=4, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=30, reflection_lm=reflector, num_threads=2,
                    log_dir=str(tmp_path), verbose=False, track_stats=True)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"), dspy.context(lm=student):
        dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    assert dr.run_stats["failures"].get("program_error", 0) > 0  # the echoes were stored as failures
    assert _leaks(URL_PASSWORD, caplog, tmp_path) == []  # the plain password is masked...
    assert _leaks(basic, caplog, tmp_path, json.dumps(dr.run_stats, default=str)) == []  # ...its Basic form too


# ------------------------------------------------------------------------- a DSPy callback's error, logged by the pump
CALLBACK_PW = "cbPassw0rd9x8y7"
CALLBACK_KEY = "LKtracerKey1a2b3c4d5e6f"


def test_a_dspy_callback_error_quoting_credentials_is_masked_in_the_log(caplog, monkeypatch):
    """MLflow's autolog callback (or any exporter callback) fails with a message naming its endpoint: MLflow
    says ``API request to http://user:pw@host/api/... failed``. Every other error path of the package goes
    through ``describe_error`` (masking a URL's password and the environment's keys); the pump's warning
    formats the exception itself."""
    from dspy.utils.callback import BaseCallback

    from helpers import quick_compile

    monkeypatch.setenv("OPENAI_API_KEY", CALLBACK_KEY)  # the key litellm reads

    class Exporter(BaseCallback):
        def on_evaluate_end(self, call_id, outputs, exception=None):
            raise RuntimeError(f"API request to http://admin:{CALLBACK_PW}@127.0.0.1:5000/api/2.0/runs/log-batch "
                               f"failed (x-api-key {CALLBACK_KEY})")

    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"), dspy.context(callbacks=[Exporter()]):
        quick_compile(budget=30)
    fmt = logging.Formatter()
    ours = [fmt.format(r) for r in caplog.records if r.name.startswith("dspy_turbogepa")]
    assert any("on_evaluate_end failed" in line for line in ours)  # the warning was written
    assert not [line for line in ours if CALLBACK_PW in line or CALLBACK_KEY in line]


# --------------------------------------------------------------------------- Azure keys (covered: a pin)
AZURE_CREDENTIALS = {
    "api_key": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",  # sent as the api-key header
    "azure_ad_token": "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJjb2duaXRpdmUifQ.c2lnbmF0dXJlMTIz",  # Bearer
}


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("credential", sorted(AZURE_CREDENTIALS))
def test_an_azure_key_or_ad_token_echoed_by_a_401_is_never_written(proxy, routing, tmp_path, caplog, engine,  # noqa: F811
                                                                   credential):
    """Azure's 401 quotes the subscription key it was given; the bearer AD token is echoed the same way
    here (the ``api-key`` header and ``Authorization``, each printed bare)."""
    secret = AZURE_CREDENTIALS[credential]

    def plan(model, n, body, headers):
        bare = headers.get("api-key") or headers.get("Authorization", "").split(" ")[-1]
        return ("status", 401, error_body("401", f"Access denied due to invalid subscription key {bare}."), {})

    proxy.reset(plan)
    student = dspy.LM("azure/my-deploy", api_base=proxy.base_url.replace("/v1", ""), api_version="2024-06-01",
                      cache=False, num_retries=0, **{credential: secret}, **engine)
    texts = _stopped_run(routing, tmp_path, caplog, student, dspy.LM("openai/unused", api_key="x"))
    assert "invalid subscription key ***REDACTED***" in texts[0]
    assert _leaks(secret, caplog, tmp_path, *texts) == []


# --------------------------------------------------------------------------- a judge LM given as a default argument
_DEFAULT_JUDGE_KEY = "LKdefaultJudge1a2b3c4d5e6f"


def _metric_with_default_judge(gold, pred, trace=None, pred_name=None, pred_trace=None,
                               judge=dspy.LM("openai/judge", api_key=_DEFAULT_JUDGE_KEY)):
    return 1.0


@pytest.mark.parametrize("metric, key", [
    pytest.param(functools.partial(_judge_metric, judge=dspy.LM("openai/judge", api_key=JUDGE_KEY)), JUDGE_KEY,
                 id="partial"),
    pytest.param(_metric_with_default_judge, _DEFAULT_JUDGE_KEY, id="default-argument"),
])
def test_a_judge_lm_bound_to_the_metric_is_a_run_secret(metric, key):
    """The run key already reads a partial's bound arguments and a metric's defaults (run_store.md); the
    credential scan (``lm_api_keys``, one step from the metric: attributes, closure cells, globals) does
    not, so ``run_secrets`` never masks these keys (the end-to-end leak is the test above)."""
    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys

    keys = set(lm_api_keys(dspy.Predict("question -> answer"), None, metric))
    assert key in keys


# --------------------------------------------------------------------------- a key litellm reads from the environment
ENV_KEY = "LKenvOnlyKey9z8y7x6w5v4u3"  # no known shape: masked only because the environment holds it


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_key_read_from_the_environment_and_echoed_is_never_written(proxy, routing, tmp_path, caplog,  # noqa: F811
                                                                     monkeypatch, engine):
    """No api_key argument: the client reads OPENAI_API_KEY; the provider's 401 quotes it bare."""
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    proxy.reset(_echo_auth(401, lambda model, n, headers: "student" in model and n > 2))
    student = dspy.LM("openai/sim-student", api_base=proxy.base_url, cache=False, num_retries=0, **engine)
    reflector = dspy.LM("openai/sim-reflector", api_base=proxy.base_url, cache=False, num_retries=0, max_tokens=4000)
    texts = _stopped_run(routing, tmp_path, caplog, student, reflector)
    assert "Request rejected" in texts[0]
    assert _leaks(ENV_KEY, caplog, tmp_path, *texts) == []


def _stopped_run(routing, tmp_path, caplog, student, reflector) -> list[str]:
    """A small compile that must stop with SystemicFailureError: the error's text and its traceback."""
    splits = small_splits(routing, n_train=6, n_val=4, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=30, reflection_lm=reflector, num_threads=2,
                    log_dir=str(tmp_path), verbose=False)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"), dspy.context(lm=student), \
            pytest.raises(SystemicFailureError) as info:
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    return [str(info.value), "".join(traceback.format_exception(info.value))]


# --------------------------------------------------------------------------- print
def test_the_package_never_calls_print():
    """Output goes through logging (or tqdm); a print bypasses the user's handlers and levels."""
    import ast

    import dspy_turbogepa
    from dspy_turbogepa.adapter.run_identity import parse_source

    root = Path(dspy_turbogepa.__file__).parent
    calls = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(parse_source(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                calls.append(f"{path.relative_to(root)}:{node.lineno}")
    assert calls == []


# --------------------------------------------------------------------------- observability
def _flaky_after_first(sink: list):
    """A ProposalFn whose first proposal is usable (so no systemic stop) and every later one raises."""
    def proposer(candidate, reflective_dataset, components_to_update):
        sink.append(1)
        if len(sink) > 1:
            raise RuntimeError("proposer flake")
        return {c: candidate[c] + " Variant 1." for c in components_to_update}
    return proposer


def test_repeated_proposer_failures_are_not_logged_at_info_after_the_warning_says_debug(caplog):
    """ReflectiveProposer warns once: "The instruction proposer raised ... (this proposal is skipped; further
    RuntimeError failures are counted in run_stats['proposal_skips'] and logged at DEBUG)". The orchestrator
    then logs each of them at INFO as "Mutation N: no usable proposal (proposer_error: ...)": one INFO line
    per failed reflection for the rest of a long run, contradicting the warning."""
    from helpers import quick_compile

    calls: list = []
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        dr = quick_compile(budget=60, instruction_proposer=_flaky_after_first(calls)).detailed_results
    failures = dr.run_stats["proposal_skips"].get("proposer_error", 0)
    assert failures >= 3  # the scenario happened
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "proposer flake" in r.getMessage()
              and not r.getMessage().startswith("Stopping")]  # the stop's own warning names the cause once
    assert len(warned) == 1 and "logged at DEBUG" in warned[0].getMessage()
    info = [r.getMessage() for r in caplog.records
            if r.name.startswith("dspy_turbogepa") and r.levelno == logging.INFO and "proposer flake" in r.getMessage()]
    assert info == []


def test_run_stats_agree_with_the_run_store_and_summary(tmp_path, routing):
    """A run with program errors, proposer errors and unchanged proposals: every count in run_stats is
    the one the run store's rows and events give, and summary.json repeats them."""
    import sqlite3

    from helpers import FailsOnTracking, quick_compile

    n = [0]

    def proposer(candidate, reflective_dataset, components_to_update):
        n[0] += 1
        if n[0] % 3 == 0:
            raise RuntimeError("proposer flake")
        if n[0] % 3 == 1 and n[0] > 1:
            return dict(candidate)
        return {c: candidate[c] + f" Variant {n[0]}." for c in components_to_update}

    data = small_splits(routing, n_train=16, n_val=10, n_test=0)
    dr = quick_compile(program=FailsOnTracking(routing.make_program()), budget=80, data=data, log_dir=str(tmp_path),
                       instruction_proposer=proposer).detailed_results
    rs = dr.run_stats
    db = sqlite3.connect(tmp_path / "run.sqlite3")
    try:
        q = lambda sql: db.execute(sql).fetchall()  # noqa: E731
        assert q("select count(*) from evaluations") == [(rs["metric_calls_executed"],)] == [(dr.total_metric_calls,)]
        assert dict(q("select failure, count(*) from evaluations where failure is not null group by failure")) == \
            rs["failures"] and rs["failures"].get("program_error", 0) > 0
        assert dict(q("select skipped, count(*) from proposals where skipped is not null group by skipped")) == {
            k: v for k, v in rs["proposal_skips"].items() if k != "unchanged_texts"}
        assert q("select count(*) from proposals") == [(sum(c["attempts"] for c in rs["operator_credit"].values())
                                                       + rs["proposal_skips"].get("proposer_error", 0)
                                                       + rs["proposal_skips"].get("unchanged_texts", 0),)]
        statuses = dict(q("select json_extract(payload_json, '$.status'), count(*) from events "
                          "where kind = 'mutation_committed' group by 1"))
        assert statuses == rs["mutations"] and sum(statuses.values()) == sum(rs["mutations_by_kind"].values())
        assert q("select count(*) from events where kind = 'candidate_accepted'") == [(len(dr.candidates),)]
        usage = q("select sum(json_extract(usage_json, '$.prompt_tokens')), "
                  "sum(json_extract(usage_json, '$.completion_tokens')) from evaluations")[0]
        assert usage == (rs["task_tokens"]["prompt"], rs["task_tokens"]["completion"])
    finally:
        db.close()
    counts = json.loads((tmp_path / "summary.json").read_text())["counts"]
    assert counts["total_metric_calls"] == dr.total_metric_calls and counts["mutations"] == rs["mutations"]
    assert counts["candidates"] == len(dr.candidates) and counts["num_full_val_evals"] == dr.num_full_val_evals


@pytest.mark.http
def test_reflection_rate_limit_retries_do_not_flood_the_info_log(proxy, routing, caplog):  # noqa: F811
    """A reflection model at its rate limit for a long run: three of four reflection requests get a 429
    (Retry-After 10 ms). Rollouts log their first retry of a kind at INFO and the rest at DEBUG (the
    progress line shows the pause); each reflection retry is an INFO line of its own, so a 2-hour run
    against a busy reflection model logs hundreds of them."""
    proxy.reset(lambda model, n, body, headers: ("status", 429, error_body("rate_limit_exceeded", "Rate limit reached",
                                                                            "requests"), {"Retry-After": "0.01"})
                if "reflector" in model and n % 4 != 0 else None)
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"):
        dr = compile_through(proxy, routing, {}, budget=120, n_train=12, n_val=6, threads=4)
    retries = dr.run_stats["rate_limits"]["reflection"]["rate_limit_retries"]
    assert retries >= 6  # the scenario happened
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and r.name.startswith("dspy_turbogepa") and "reflection LM is rate limited" in r.getMessage()]
    assert len(lines) <= 1, f"{len(lines)} INFO lines for {retries} retries"


@pytest.mark.http
def test_task_and_reflection_lm_call_counts_count_the_same_thing(proxy, routing):  # noqa: F811
    """Every second request of each model is refused with a 429 and retried. ``task_lm_calls`` equals the
    student requests the provider answered; ``reflection_calls`` equals every reflector request sent,
    refused ones included (5 for 3 answered). Side by side in run_stats, summary.json, the progress
    counts and MLflow (``lm/task_calls`` vs ``lm/reflection_calls``), the two "LM calls" mean different
    things."""
    refused = ("status", 429, error_body("rate_limit_exceeded", "Rate limit reached", "requests"),
               {"Retry-After": "0.01"})
    proxy.reset(lambda model, n, body, headers: refused if n % 2 == 0 else None)
    rs = compile_through(proxy, routing, {}, budget=60, n_train=12, n_val=6, threads=4).run_stats
    answered = {m: sum(1 for model, _ in proxy.served if model == m) for m in ("sim-student", "sim-reflector")}
    assert rs["rate_limits"]["rate_limit_retries"] > 0 and rs["rate_limits"]["reflection"]["rate_limit_retries"] > 0
    refused_task = rs["task_lm_calls"] - answered["sim-student"]  # 0: answered calls only
    refused_reflection = rs["reflection_calls"] - answered["sim-reflector"]  # every refused request too
    rl = rs["rate_limits"]
    both_answered_only = refused_task == 0 and refused_reflection == 0
    both_every_request = refused_task == rl["rate_limit_retries"] and refused_reflection == rl["reflection"][
        "rate_limit_retries"]
    assert both_answered_only or both_every_request, (refused_task, refused_reflection)
