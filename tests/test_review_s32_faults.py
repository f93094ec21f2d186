"""Session-32 review: fault handling through the loopback simulator (both client engines).

The fault proxy, its fixtures and the shortened retry policies are tests/test_http_faults.py's.
"""
# ruff: noqa: F811 - the imported fixtures are redefined as test parameters, as pytest means them to be

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import dspy
import pytest
from test_http_faults import (  # noqa: F401 - fixtures
    ENGINES,
    KEY,
    REVOKED,
    compile_through,
    error_body,
    fast_runs,
    on,
    proxy,
    rows,
)

from dspy_turbogepa import SystemicFailureError

pytestmark = pytest.mark.http


def _texts(dr: Any) -> list[dict[str, str]]:
    return [{name: pred.signature.instructions for name, pred in c.named_predictors()} for c in dr.candidates]


@pytest.mark.parametrize("engine", [ENGINES[1]])
def test_ctrl_c_during_a_reflection_then_rerun_pays_nothing_twice_and_ends_as_an_uninterrupted_run(
        proxy, routing, engine, tmp_path):
    """Ctrl-C lands as the reflection LM's 2nd call arrives (litellm path): the run returns interrupted; the
    rerun with the same log_dir asks the server for no answer the first session got, and the two sessions
    together ask for exactly what an uninterrupted run asks, ending with its candidates and scores."""
    proxy.reset()
    ref = compile_through(proxy, routing, engine, threads=2, budget=40, log_dir=tmp_path / "ref")
    ref_served = list(proxy.served)

    fired = threading.Event()

    def plan(model, n, body, headers):
        if "reflector" in model and n == 2 and not fired.is_set():
            fired.set()
            os.kill(os.getpid(), signal.SIGINT)
        return None

    proxy.reset(plan)
    first = compile_through(proxy, routing, engine, threads=2, budget=40, log_dir=tmp_path / "run")
    assert first.stop_reason == "interrupted"
    paid = list(proxy.served)
    proxy.reset()
    second = compile_through(proxy, routing, engine, threads=2, budget=40, log_dir=tmp_path / "run")
    again = set(paid) & set(proxy.served)
    assert not again, (len(again), len(paid), len(proxy.served))
    assert second.val_aggregate_scores == ref.val_aggregate_scores
    assert _texts(second) == _texts(ref)
    assert sorted(set(paid) | set(proxy.served)) == sorted(set(ref_served))


JUDGE_KEY = "judge-key-77AA11"


def _judge_plan(answer):
    """Requests carrying the judge's key: the k-th (from 1) gets ``answer(k)``, forwarded when that is None."""
    seen = {"n": 0}
    lock = threading.Lock()

    def plan(model, n, body, headers):
        if JUDGE_KEY not in headers.get("Authorization", ""):
            return None
        with lock:
            seen["n"] += 1
            k = seen["n"]
        return answer(k)

    return plan, seen


def _judge_metric(task, judge, on_feedback_only: bool):
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None or not on_feedback_only:
            judge(messages=[{"role": "user", "content": "Judge this answer: " + str(gold.ticket)[:40]}])
        return task.metric(gold, pred, trace, pred_name, pred_trace)
    return metric


@pytest.mark.parametrize("engine", ENGINES)
def test_a_judge_key_revoked_mid_run_on_the_feedback_call_stops_the_run(proxy, routing, engine, tmp_path):
    """An LLM judge asked only for feedback (pred_name set), its key revoked after 6 calls: a bad key "stops
    the run at once" (errors.md: authentication error, any LM of the run, a judge's included). Seen: 78 more
    401s, 26 proposals skipped as feedback_error, the run returned (stop_reason no_progress_possible)."""
    judge = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=JUDGE_KEY, cache=False, num_retries=0,
                    **engine)
    plan, seen = _judge_plan(lambda k: ("status", 401, REVOKED[401], {}) if k > 6 else None)
    proxy.reset(plan)
    with pytest.raises(SystemicFailureError) as info:
        _compile_with_metric(proxy, routing, engine, _judge_metric(routing, judge, on_feedback_only=True), tmp_path)
    assert "LMAuthError" in str(info.value) or "AuthenticationError" in str(info.value)
    assert seen["n"] <= 6 + 4 + 8  # stopped soon after the key went bad


def _compile_with_metric(proxy, task, engine, metric, log_dir, budget=60, threads=2, student=None, reflector=None):
    import dspy_turbogepa.teleprompter as tp

    from helpers import small_splits
    student = student or dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=KEY, cache=False,
                                 num_retries=0, temperature=0.0, **engine)
    reflector = reflector or dspy.LM("openai/sim-reflector", api_base=proxy.base_url, api_key=KEY, cache=False,
                                     num_retries=0, temperature=1.0, max_tokens=4000, **engine)
    splits = small_splits(task, n_train=8, n_val=6, n_test=0)
    opt = tp.TurboGEPA(metric, max_metric_calls=budget, reflection_lm=reflector, num_threads=threads,
                       track_stats=True, verbose=False, log_dir=str(log_dir))
    with dspy.context(lm=student):
        return opt.compile(task.make_program(), trainset=splits.train, valset=splits.val).detailed_results


@pytest.mark.parametrize("engine", [ENGINES[1]])
def test_every_answer_the_server_billed_is_one_stored_evaluation_and_counted_once(proxy, routing, engine, tmp_path):
    """Every 4th student call a 503, every 7th a 429 (Retry-After 10 ms): no evaluation is dropped or
    counted twice: the student answers billed equal the stored evaluations, which equal
    metric_calls_executed, and the retries add up to the refusals."""
    limited = error_body("rate_limit_exceeded", "Rate limit reached for requests", "requests")
    busy = error_body("overloaded", "The server is overloaded", "server_error")
    refused: set[str] = set()

    def plan(model, n, body, headers):
        if "student" not in model:
            return None
        # each request is refused at most once: with 4 threads sharing the counter, one request's retries
        # could otherwise all land on refused turns and exhaust the test's 3-retry policy (seen once in CI)
        request = json.dumps(body, sort_keys=True, default=str)
        if request in refused:
            return None
        if n % 7 == 0:
            refused.add(request)
            return ("status", 429, limited, {"Retry-After": "0.01"})
        if n % 4 == 0:
            refused.add(request)
            return ("status", 503, busy, {})
        return None

    proxy.reset(plan)
    dr = compile_through(proxy, routing, engine, threads=4, budget=50, log_dir=tmp_path)
    stats = dr.run_stats
    billed = sum(1 for model, _ in proxy.served if "student" in model)
    stored = rows(tmp_path, "select count(*) from evaluations")[0][0]
    assert stats["failures"] == {}
    assert billed == stored == stats["metric_calls_executed"]
    limits = stats["rate_limits"]
    assert limits["rate_limited"] + limits["transient_errors"] == proxy.counts["sim-student"] - billed


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", ["student-unknown-model", "reflector-unknown-model", "student-refused",
                                  "reflector-refused"])
def test_a_setup_error_from_the_start_stops_the_run_at_once_on_either_engine(proxy, routing, engine, case, tmp_path):
    closed = f"http://127.0.0.1:{_free_port()}/v1"
    role = case.split("-")[0]
    if case.endswith("unknown-model"):
        proxy.reset()
        base, model = proxy.base_url, "openai/no-such-model"
    else:
        base, model = closed, f"openai/sim-{role}"
    lm = dspy.LM(model, api_base=base, api_key=KEY, cache=False, num_retries=0, **engine)
    started = time.monotonic()
    with pytest.raises(SystemicFailureError) as info:
        if role == "student":
            _compile_with_metric(proxy, routing, engine, routing.metric, tmp_path, student=lm)
        else:
            _compile_with_metric(proxy, routing, engine, routing.metric, tmp_path, reflector=lm)
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert ("no-such-model" in message) if case.endswith("unknown-model") else ("Connection" in message)
    assert ("reflection_lm" in message) == (role == "reflector"), message


ENV_SECRET = "EnvQ7w3Rz9Lk2Mx"
HDR_SECRET = "HdrB5n8Tc1Vp4Yd"


@pytest.mark.parametrize("engine", ENGINES)
def test_keys_from_the_environment_and_a_header_echoed_in_errors_reach_no_log_store_summary_or_mlflow(
        proxy, routing, engine, tmp_path, caplog, monkeypatch, template_db):
    """The student's key comes from OPENAI_API_KEY (no api_key given), the reflection LM's from an
    ``x-api-key`` header; the server echoes both headers in 400s for some student calls and the first
    reflection. Neither key appears in any log record (DEBUG), any file under log_dir (store,
    summary.json), the MLflow file store, or detailed_results."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("OPENAI_API_KEY", ENV_SECRET)
    import shutil
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = template_db.parent / "mlruns"  # the template's artifact root (fixed at its creation)
    before = set(artifacts.rglob("*")) if artifacts.exists() else set()

    def plan(model, n, body, headers):
        if ("student" in model and n % 3 == 0) or ("reflector" in model and n == 1):
            echoed = f"Authorization: {headers.get('Authorization', '')}; x-api-key: {headers.get('x-api-key', '')}"
            return ("status", 400, error_body("rejected", f"Request rejected ({echoed})"), {})
        return None

    proxy.reset(plan)
    student = dspy.LM("openai/sim-student", api_base=proxy.base_url, cache=False, num_retries=0, temperature=0.0,
                      **engine)
    reflector = dspy.LM("openai/sim-reflector", api_base=proxy.base_url, api_key="anything", cache=False,
                        num_retries=0, temperature=1.0, max_tokens=4000, headers={"x-api-key": HDR_SECRET}, **engine)
    import dspy_turbogepa.teleprompter as tp

    from helpers import small_splits
    splits = small_splits(routing, n_train=8, n_val=6, n_test=0)
    opt = tp.TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=reflector, num_threads=4, track_stats=True,
                       verbose=False, log_dir=str(tmp_path / "run"), use_mlflow=True)
    with caplog.at_level(logging.DEBUG), dspy.context(lm=student):
        dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    assert dr.run_stats["failures"].get("program_error", 0) > 0  # the echoing errors happened
    seen = rows(tmp_path / "run", "select message from evaluations where failure is not null")
    assert seen and all("***REDACTED***" in m for (m,) in seen), seen
    # the HTTP SDKs' own DEBUG request dumps (openai._base_client prints custom headers) are theirs, as under
    # dspy.GEPA; every other record, the package's and DSPy's included, must hold no key
    ours = "\n".join(r.getMessage() for r in caplog.records
                      if not r.name.startswith(("openai", "httpx", "httpcore", "LiteLLM")))
    texts = [ours, repr(vars(dr)), json.dumps(dr.run_stats, default=str)]
    for secret in (ENV_SECRET, HDR_SECRET):
        for text in texts:
            i = text.find(secret)
            assert i < 0, text[max(0, i - 700):i + 100]
        new_artifacts = [p for p in artifacts.rglob("*") if p not in before] if artifacts.exists() else []
        for path in (p for p in [*tmp_path.rglob("*"), *new_artifacts] if p.is_file()):
            assert secret.encode() not in path.read_bytes(), path
    assert new_artifacts and (tmp_path / "run" / "summary.json").exists()
    import sqlite3
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("select count(*) from metrics").fetchone()[0] > 0


def test_a_reflection_lm_that_goes_down_for_good_mid_run_stops_the_run(proxy, routing, tmp_path, monkeypatch):
    from dspy_turbogepa.engine import systemic
    monkeypatch.setattr(systemic, "OUTAGE_MIN_SECONDS", 0.0)  # as the student-outage test: time is not the point
    down = error_body("unavailable", "Service Unavailable", "server_error")
    proxy.reset(on("reflector", ("status", 503, down, {}), lambda n: n > 2))
    with pytest.raises(SystemicFailureError) as info:
        compile_through(proxy, routing, {}, threads=2, budget=150, log_dir=tmp_path)
    assert "LMServerError" in str(info.value) or "503" in str(info.value)


def test_a_metric_that_starts_raising_on_every_call_mid_run_stops_the_run():
    from dspy_turbogepa.testing import TASKS

    from helpers import quick_compile

    task = TASKS["routing"]
    lock, calls = threading.Lock(), [0]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            calls[0] += 1
            k = calls[0]
        if k > 30:  # the seed's validation (8) and a few mutations went through
            raise RuntimeError("the scoring service's connection pool is closed")
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    with pytest.raises(SystemicFailureError) as info:
        quick_compile(metric, budget=300)
    assert "RuntimeError" in str(info.value)


def test_a_crash_in_the_metric_keeps_what_finished_and_the_rerun_pays_nothing_twice(proxy, routing, tmp_path):
    """The metric calls sys.exit() (SystemExit, not an Exception) on its 25th call: the compile ends with it;
    every evaluation that finished is in the store, the session is closed, and a rerun with the same log_dir
    (the metric fixed through state the run key does not see) pays for no answer the first session got."""
    state = {"crash_at": 25, "calls": 0}
    lock = threading.Lock()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            state["calls"] += 1
            crash = state["calls"] == state["crash_at"]
        if crash:
            raise SystemExit("metric gave up")
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    proxy.reset()
    with pytest.raises(BaseException) as info:
        _compile_with_metric(proxy, routing, {}, metric, tmp_path, budget=50)
    assert isinstance(info.value, SystemExit), repr(info.value)
    paid = set(proxy.served)
    stored = rows(tmp_path, "select count(*) from evaluations")[0][0]
    assert stored >= 20
    assert rows(tmp_path, "select count(*) from sessions where closed_at is null") == [(0,)]
    state["crash_at"] = -1
    proxy.reset()
    ref = _compile_with_metric(proxy, routing, {}, metric, tmp_path / "ref", budget=50)
    proxy.reset()
    dr = _compile_with_metric(proxy, routing, {}, metric, tmp_path, budget=50)
    again = paid & set(proxy.served)
    # at most the answers whose scoring was under way when the crash happened (2 threads) are asked again
    assert len(again) <= 2, (len(again), len(paid))
    assert dr.run_stats["metric_calls_replayed"] >= stored
    assert _texts(dr) == _texts(ref) and dr.val_aggregate_scores == ref.val_aggregate_scores


def test_ctrl_c_while_a_reflection_waits_out_a_429_ends_at_once_and_the_rerun_asks_it_again(proxy, routing, tmp_path):
    """The reflection LM answers its 2nd call with 429 + Retry-After 20 s; Ctrl-C lands while that
    reflection waits: the compile returns well before the 20 s (the waiting reflection gives up at once),
    the skipped reflection is not replayed by the rerun (asked again), and the rerun's result equals an
    uninterrupted run's."""
    limited = error_body("rate_limit_exceeded", "Rate limit reached for requests", "requests")
    proxy.reset()
    ref = compile_through(proxy, routing, {}, threads=2, budget=40, log_dir=tmp_path / "ref")

    def plan(model, n, body, headers):
        if "reflector" in model and n == 2:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            return ("status", 429, limited, {"Retry-After": "20"})
        return None

    proxy.reset(plan)
    started = time.monotonic()
    first = compile_through(proxy, routing, {}, threads=2, budget=40, log_dir=tmp_path / "run")
    assert time.monotonic() - started < 12
    assert first.stop_reason == "interrupted"
    paid = set(proxy.served)
    proxy.reset()
    second = compile_through(proxy, routing, {}, threads=2, budget=40, log_dir=tmp_path / "run")
    assert not paid & set(proxy.served)
    assert proxy.counts.get("sim-reflector", 0) >= 1  # the reflection that gave up was asked again
    assert _texts(second) == _texts(ref) and second.val_aggregate_scores == ref.val_aggregate_scores


@pytest.mark.parametrize("engine", [ENGINES[0]])
def test_a_judges_single_503_is_retried_not_scored_as_the_candidates_failure(proxy, routing, engine, tmp_path):
    """errors.md advises ``num_retries=0`` on a judge LM so that this package's policy bounds its waits; the
    judge's LM then answers one scoring call with a 503. A 5xx is retried with backoff (errors.md, "LM
    timeout, 5xx, connection reset") and never scored as the candidate's failure."""
    judge = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=JUDGE_KEY, cache=False, num_retries=0,
                    **engine)
    busy = error_body("overloaded", "The server is overloaded", "server_error")
    plan, _seen = _judge_plan(lambda k: ("status", 503, busy, {}) if k == 3 else None)
    proxy.reset(plan)
    dr = _compile_with_metric(proxy, routing, engine, _judge_metric(routing, judge, on_feedback_only=False), tmp_path,
                              budget=30)
    assert dr.run_stats["failures"] == {}, dr.run_stats["failures"]
    assert rows(tmp_path, "select count(*) from evaluations where failure is not null") == [(0,)]


@pytest.mark.parametrize("engine", [ENGINES[0]])
def test_malformed_reflections_are_recorded_skipped_and_counted_as_the_server_served_them(proxy, routing, engine,
                                                                                          tmp_path):
    """The reflection LM's 1st and 3rd answers are prose the reflection cannot parse: each is a skipped
    proposal in run_stats and in the store, the run goes on, and the reflection calls the store records add
    up to what the server answered."""
    def prose(data):
        data["choices"][0]["message"]["content"] = "I am sorry, I cannot help with rewriting instructions."
        return data

    proxy.reset(lambda model, n, body, headers: ("mutate", prose) if "reflector" in model and n in (1, 3) else None)
    dr = compile_through(proxy, routing, engine, threads=2, budget=40, log_dir=tmp_path)
    skips = dr.run_stats.get("proposal_skips", {})
    stored_skips = rows(tmp_path, "select skipped, count(*) from proposals where skipped is not null group by skipped")
    assert sum(skips.values()) == 2 and dict(stored_skips) == skips
    billed = sum(1 for model, _ in proxy.served if "reflector" in model)
    assert rows(tmp_path, "select sum(reflection_calls) from proposals")[0][0] == billed
    assert max(dr.val_aggregate_scores) > dr.val_aggregate_scores[0]


def test_ctrl_c_during_the_seed_validation_keeps_its_finished_evaluations_for_the_rerun(proxy, routing, tmp_path,
                                                                                       monkeypatch):
    """Six seed evaluations start at once; three are answered at once, three stall 3 s. Ctrl-C lands
    meanwhile (grace period shortened): KeyboardInterrupt, and the rerun with the same log_dir asks again
    for none of the three answers the first session had got and scored."""
    import _thread
    import functools

    import dspy_turbogepa.teleprompter as tp
    from dspy_turbogepa.adapter.runner import run_coroutine_in_thread

    # grace 1 s: an answer served just before the press is still scored and stored; the stalled ones
    # (3 s) are not answered within it
    monkeypatch.setattr(tp, "run_coroutine_in_thread", functools.partial(run_coroutine_in_thread, grace_seconds=1.0))
    snapshot: list[set] = []

    def interrupt():
        deadline = time.monotonic() + 20
        while len(proxy.served) < 3 and time.monotonic() < deadline:  # not a fixed delay: a loaded machine
            time.sleep(0.02)
        time.sleep(0.3)
        snapshot.append(set(proxy.served))
        _thread.interrupt_main()

    def plan(model, n, body, headers):
        if "student" in model and n == 4:
            threading.Thread(target=interrupt, daemon=True).start()
        if "student" in model and n >= 4:
            return ("stall", 3.0)
        return None

    proxy.reset(plan)
    with pytest.raises(KeyboardInterrupt):
        compile_through(proxy, routing, {}, threads=6, n_val=6, budget=30, log_dir=tmp_path)
    scored = snapshot[0]
    assert len(scored) == 3
    assert rows(tmp_path, "select count(*) from evaluations")[0][0] == 3
    time.sleep(3.0)  # the stalled calls end (answered after the interrupt: not stored, the known limit)
    proxy.reset()
    compile_through(proxy, routing, {}, threads=6, n_val=6, budget=30, log_dir=tmp_path)
    assert not scored & set(proxy.served)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_429_on_a_student_lm_with_dspys_default_retries_is_waited_out_by_our_policy(proxy, routing, engine):
    """The user's student LM keeps DSPy's default ``num_retries``: our copies turn DSPy's retries off, so
    a 429 (Retry-After 1 s) is seen, counted and waited out by this package's policy, once."""
    limited = error_body("rate_limit_exceeded", "Rate limit reached for requests", "requests")
    proxy.reset(lambda model, n, body, headers: ("status", 429, limited, {"Retry-After": "1"})
                if "student" in model and n == 3 else None)
    import dspy_turbogepa.teleprompter as tp

    from helpers import small_splits
    student = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=KEY, cache=False, temperature=0.0,
                      **engine)
    reflector = dspy.LM("openai/sim-reflector", api_base=proxy.base_url, api_key=KEY, cache=False, num_retries=0,
                        temperature=1.0, max_tokens=4000, **engine)
    splits = small_splits(routing, n_train=8, n_val=6, n_test=0)
    opt = tp.TurboGEPA(routing.metric, max_metric_calls=20, reflection_lm=reflector, num_threads=2,
                       track_stats=True, verbose=False)
    with dspy.context(lm=student):
        dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    limits = dr.run_stats["rate_limits"]
    assert dr.run_stats["failures"] == {}
    assert limits["rate_limited"] == 1 and limits["rate_limit_retries"] == 1 and limits["backoff_seconds"] >= 0.9


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("role", ["student"])
def test_an_account_out_of_credit_mid_run_stops_at_once_not_after_rate_limit_retries(proxy, routing, engine, role,
                                                                                    tmp_path):
    """OpenAI answers an account out of credit with a 429 whose code is ``insufficient_quota`` and no
    Retry-After: not a rate limit to wait out (DSPy reads it as a billing error on both client paths): the run
    stops at the first one, with no retry, naming the LM to check."""
    quota = error_body("insufficient_quota", "You exceeded your current quota, please check your plan and billing "
                                             "details.", "insufficient_quota")
    after = 12 if role == "student" else 2
    proxy.reset(on(role, ("status", 429, quota, {}), lambda n: n > after))
    with pytest.raises(SystemicFailureError) as info:
        compile_through(proxy, routing, engine, threads=2, budget=60, log_dir=tmp_path)
    assert proxy.counts["sim-" + role] <= after + 4  # the refusals in flight (as the key-revoked test), no retry
    assert "quota" in str(info.value)


def test_a_judge_key_echoed_by_a_feedback_call_error_reaches_no_log_store_or_summary(proxy, routing, tmp_path, caplog):
    """The judge LM (held in the metric's closure) gets 400s that quote its Authorization header on some
    calls, scoring and feedback calls alike: the judge's key is in no project log record, no file under
    log_dir, and not in detailed_results."""
    judge = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=JUDGE_KEY, cache=False, num_retries=0)
    count = {"n": 0}
    lock = threading.Lock()

    def plan(model, n, body, headers):
        auth = headers.get("Authorization", "")
        if JUDGE_KEY not in auth:
            return None
        with lock:
            count["n"] += 1
            k = count["n"]
        if k % 4 == 0:
            return ("status", 400, error_body("rejected", f"Bad request for credential {auth[7:]}"), {})
        return None

    proxy.reset(plan)
    with caplog.at_level(logging.DEBUG):
        dr = _compile_with_metric(proxy, routing, {}, _judge_metric(routing, judge, on_feedback_only=False),
                                  tmp_path / "run", budget=40)
    assert dr.run_stats["failures"].get("metric_error", 0) > 0
    assert dr.run_stats["reflective_records_skipped"].get("feedback_error", 0) > 0
    secret = "77AA11"
    ours = "\n".join(r.getMessage() for r in caplog.records
                     if not r.name.startswith(("openai", "httpx", "httpcore", "LiteLLM")))
    assert secret not in ours
    assert secret not in repr(vars(dr)) and secret not in json.dumps(dr.run_stats, default=str)
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert secret.encode() not in path.read_bytes(), path
