"""HTTP-level faults from a real loopback server, through both of dspy 3.4's client engines.

A small fault proxy (stdlib ``http.server``) sits in front of the package's ``SimServer``: it forwards
each chat request to the simulator unless its plan says otherwise for that model's N-th request, and
then answers what a real provider or gateway sometimes does — a body that is not JSON, ``choices``
empty, ``content: null``, an output cut at ``max_tokens``, a 5xx (JSON or a gateway's HTML page), a
connection reset before or in the middle of the body, a stall past the LM's timeout, 429s with and
without Retry-After (seconds or an HTTP-date), a key that goes bad mid-run, an error body that echoes
the ``Authorization`` header. What the compile returns or raises, what the run store keeps, and what a
rerun with the same ``log_dir`` pays for again are checked on the native client and on
``engine="litellm"``.

Retry policies are shortened (as tests/test_ratelimit.py does) so that the faults cost milliseconds;
the decisions — retry, give up, stop — are the policies' own.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import logging
import math
import re
import socket
import sqlite3
import struct
import threading
import time
import traceback
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import dspy
import pytest

import dspy_turbogepa.teleprompter as teleprompter_module
from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.adapter.evaluator import DspyEvaluator
from dspy_turbogepa.adapter.ratelimit import RetryPolicy
from dspy_turbogepa.engine import systemic
from dspy_turbogepa.proposers.reflection import ReflectiveProposer
from dspy_turbogepa.testing import SimServer

from helpers import small_splits

pytestmark = pytest.mark.http

KEY = "sk-test-SECRET123"
SECRET = "SECRET123"

FAST_RL = RetryPolicy(max_retries=10, max_elapsed_s=30.0, base_s=0.005, cap_s=0.05)
FAST_TR = RetryPolicy(max_retries=3, max_elapsed_s=30.0, base_s=0.005, cap_s=0.05)

ENGINES = [pytest.param({}, id="native"), pytest.param({"engine": "litellm"}, id="litellm")]

Action = tuple[Any, ...] | None
Plan = Callable[[str, int, dict[str, Any], dict[str, str]], Action]


# --------------------------------------------------------------------------- the fault proxy
class FaultProxy:
    """An OpenAI-compatible endpoint on 127.0.0.1 that forwards to ``upstream`` (a SimServer) unless
    ``plan(model, n, body, headers)`` returns an action for that model's ``n``-th request (1-based):

    - ``("status", code, payload, headers)``: answer ``code`` with the JSON ``payload``;
    - ``("raw", code, data, content_type)``: answer ``code`` with ``data`` as it is;
    - ``("mutate", fn)``: forward, then answer ``fn(json_body)`` (only for a 200);
    - ``("reset",)``: reset the connection (RST) without answering;
    - ``("cut",)``: send a 200's headers and part of its body, then reset;
    - ``("stall", seconds)``: wait, then forward.

    ``served`` lists ``(model, sha1 of the request body)`` of every request the simulator answered
    with 200 and whose answer was sent on (what a provider bills); ``counts`` the requests per model.
    """

    def __init__(self, upstream: SimServer) -> None:
        self.upstream_port = upstream.port
        self.plan: Plan = lambda model, n, body, headers: None
        self.counts: dict[str, int] = {}
        self.served: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                model = str(body.get("model", "")).rsplit("/", 1)[-1]
                with proxy.lock:
                    n = proxy.counts[model] = proxy.counts.get(model, 0) + 1
                action = proxy.plan(model, n, body, dict(self.headers))
                kind = None if action is None else action[0]
                if kind is None:
                    self._forward(model, raw)
                elif kind == "status":
                    _, code, payload, headers = action
                    self._send(code, json.dumps(payload).encode(), "application/json", headers)
                elif kind == "raw":
                    _, code, data, content_type = action
                    self._send(code, data, content_type, {})
                elif kind == "mutate":
                    status, data = self._upstream(raw)
                    if status == 200:
                        data = json.dumps(action[1](json.loads(data))).encode()
                        self._bill(model, raw)
                    self._send(status, data, "application/json", {})
                elif kind == "reset":
                    self._reset()
                elif kind == "cut":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "400")
                    self.end_headers()
                    self.wfile.write(b'{"id": "chatcmpl-cut", "choices": [{"index": 0, "mess')
                    self.wfile.flush()
                    self._reset()
                elif kind == "stall":
                    if proxy.closed.wait(action[1]):  # the test has ended: nothing to answer, nobody to count
                        return
                    self._forward(model, raw)
                else:  # pragma: no cover - a typo in a plan
                    raise AssertionError(f"unknown action {action!r}")

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _upstream(self, raw: bytes) -> tuple[int, bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "content-length", "connection")}
                    conn.request("POST", self.path, body=raw, headers=headers)
                    response = conn.getresponse()
                    return response.status, response.read()
                finally:
                    conn.close()

            def _bill(self, model: str, raw: bytes) -> None:
                with proxy.lock:
                    proxy.served.append((model, hashlib.sha1(raw).hexdigest()))

            def _forward(self, model: str, raw: bytes) -> None:
                status, data = self._upstream(raw)
                if status == 200:
                    self._bill(model, raw)
                self._send(status, data, "application/json", {})

            def _send(self, code: int, data: bytes, content_type: str, headers: dict[str, str]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out or a connection we reset on purpose

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def reset(self, plan: Plan | None = None) -> None:
        self.plan = plan or (lambda model, n, body, headers: None)
        with self.lock:
            self.counts.clear()
            self.served.clear()

    def close(self) -> None:
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy():
    with SimServer("test", seed=0) as srv:
        px = FaultProxy(srv)
        try:
            yield px
        finally:
            px.close()


@pytest.fixture(autouse=True)
def fast_runs(monkeypatch):
    """The evaluator's and the reflections' retry policies, with millisecond backoffs."""
    class FastEvaluator(DspyEvaluator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("rate_limit_policy", FAST_RL)
            kwargs.setdefault("transient_policy", FAST_TR)
            super().__init__(*args, **kwargs)

    class FastReflections(ReflectiveProposer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, rate_limit_policy=FAST_RL, transient_policy=FAST_TR, **kwargs)

    monkeypatch.setattr(teleprompter_module, "DspyEvaluator", FastEvaluator)
    monkeypatch.setattr(teleprompter_module, "ReflectiveProposer", FastReflections)


def compile_through(proxy: FaultProxy, task: Any, engine: dict[str, Any], *, budget: int = 40, n_train: int = 8,
                    n_val: int = 6, threads: int = 4, log_dir: Path | None = None,
                    student_kw: dict[str, Any] | None = None, reflector_kw: dict[str, Any] | None = None,
                    **kwargs: Any) -> Any:
    """A compile whose student and reflection LMs both talk to ``proxy`` (DSPy's own retries off, as
    the brief asks for tests not about them); its ``detailed_results``."""
    student = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=KEY, cache=False, num_retries=0,
                      temperature=0.0, **engine, **(student_kw or {}))
    reflector = dspy.LM("openai/sim-reflector", api_base=proxy.base_url, api_key=KEY, cache=False, num_retries=0,
                        temperature=1.0, max_tokens=4000, **engine, **(reflector_kw or {}))
    splits = small_splits(task, n_train=n_train, n_val=n_val, n_test=0)
    opt = TurboGEPA(task.metric, max_metric_calls=budget, reflection_lm=reflector, num_threads=threads,
                    track_stats=True, verbose=False, log_dir=str(log_dir) if log_dir is not None else None, **kwargs)
    with dspy.context(lm=student):
        return opt.compile(task.make_program(), trainset=splits.train, valset=splits.val).detailed_results


def rows(log_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(log_dir / "run.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def error_body(code: str, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def on(role: str, action: Action, when: Callable[[int], bool] = lambda n: True) -> Plan:
    """A plan: ``action`` for the requests of the model whose name holds ``role`` when ``when(n)``."""
    return lambda model, n, body, headers: action if role in model and when(n) else None


def _set_content(value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(data: dict[str, Any]) -> dict[str, Any]:
        data["choices"][0]["message"]["content"] = value
        return data

    return mutate


def _no_choices(data: dict[str, Any]) -> dict[str, Any]:
    data["choices"] = []
    return data


def _truncated(data: dict[str, Any]) -> dict[str, Any]:
    choice = data["choices"][0]
    choice["finish_reason"] = "length"
    choice["message"]["content"] = choice["message"]["content"][:20]  # "[[ ## queue ## ]]\nge"
    return data


# --------------------------------------------------------------------------- answers the stack cannot use
UNUSABLE = {
    # a gateway cut the body: not JSON
    "malformed-json": (("raw", 200, b'{"id": "chatcmpl-x", "choices": [ {', "application/json"),
                       "Expecting property name"),
    "content-null": (("mutate", _set_content(None)), "empty or null response"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("role", ["student", "reflector"])
@pytest.mark.parametrize("fault", sorted(UNUSABLE))
def test_an_endpoint_whose_every_answer_is_unusable_stops_the_run_with_its_cause(proxy, routing, engine, role,
                                                                                 fault, tmp_path):
    """Every answer of one LM is a malformed JSON body or a ``content: null`` message: the run stops
    with SystemicFailureError naming the cause (for the reflection LM after its first reflections all
    failed), never returns the seed, and the run store keeps the failures."""
    action, cause = UNUSABLE[fault]
    proxy.reset(on(role, action))
    with pytest.raises(SystemicFailureError) as info:
        compile_through(proxy, routing, engine, log_dir=tmp_path)
    message = str(info.value)
    assert cause in message, message
    if role == "reflector":
        assert info.value.failure == "proposer_error" and "reflections all failed" in message
        assert rows(tmp_path, "select count(*) from proposals where skipped = 'proposer_error'")[0][0] >= 1
        assert rows(tmp_path, "select count(*) from evaluations where failure is not null") == [(0,)]
    else:
        assert re.search(r"evaluations (on the \w+ )?all failed", message), message
        stored = rows(tmp_path, "select failure, service_failure from evaluations")
        assert stored and all(failure is not None for failure, _ in stored)
        if fault == "malformed-json":  # the LM service's failure: never replayed as the program's score
            assert all(service for _, service in stored)
    assert rows(tmp_path, "select count(*) from events where kind = 'systemic_failure'") == [(1,)]


@pytest.mark.parametrize("engine", [
    pytest.param({}, id="native"),
    pytest.param({"engine": "litellm"}, id="litellm"),
])
def test_answers_with_no_choices_are_a_failure_not_the_programs_answer(proxy, routing, engine, tmp_path):
    """Every student answer is a 200 with ``"choices": []``: no answer at all, on either client path a
    failure of the LM service to be recorded as such (and, being every answer, a systemic stop)."""
    proxy.reset(on("student", ("mutate", _no_choices)))
    with pytest.raises(SystemicFailureError):
        compile_through(proxy, routing, engine, log_dir=tmp_path)
    assert rows(tmp_path, "select count(*) from evaluations where failure is null") == [(0,)]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_truncated_answer_is_parsed_and_scored_as_dspy_does(proxy, routing, engine):
    """``finish_reason: "length"`` is not an LM error in DSPy (it logs a warning and parses what came):
    the evaluation is scored on that partial answer, as under dspy.GEPA, not counted as a failure."""
    proxy.reset(on("student", ("mutate", _truncated)))
    dr = compile_through(proxy, routing, engine)
    assert dr.run_stats["failures"] == {} and dr.stop_reason == "max_metric_calls"
    assert max(dr.val_aggregate_scores) == 0.0  # "ge" is never a queue label


# --------------------------------------------------------------------------- transient faults
@pytest.mark.parametrize("engine", ENGINES)
def test_intermittent_server_faults_are_retried_and_lose_nothing(proxy, routing, engine, tmp_path):
    """A 503, a gateway's HTML 502, a reset before the answer, a body cut mid-way and a stall past the
    LM's timeout, each once on the student, and a reset on the reflection LM's first call: all retried
    (never more than 3 in a row for one rollout, so none gives up), none scored, none stored as failed,
    and the search goes on as without them."""
    student_faults = {
        3: ("status", 503, error_body("overloaded", "The server is overloaded", "server_error"), {}),
        7: ("raw", 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
        11: ("reset",),
        15: ("cut",),
        19: ("stall", 4.5),
    }

    def plan(model: str, n: int, body: dict[str, Any], headers: dict[str, str]) -> Action:
        if "student" in model:
            return student_faults.get(n)
        return ("reset",) if n == 1 else None

    proxy.reset(plan)
    dr = compile_through(proxy, routing, engine, log_dir=tmp_path, student_kw={"timeout": 2.0},
                         reflector_kw={"timeout": 5})
    stats = dr.run_stats
    assert stats["failures"] == {} and not stats.get("proposal_skips")
    # each fault retried (more only if a loaded machine made another call outlast the 2 s timeout)
    assert stats["rate_limits"]["transient_retries"] >= len(student_faults)
    assert stats["rate_limits"]["transient_gave_up"] == 0
    assert stats["rate_limits"]["reflection"]["transient_retries"] >= 1
    assert max(dr.val_aggregate_scores) > dr.val_aggregate_scores[0]
    assert rows(tmp_path, "select count(*) from evaluations where failure is not null") == [(0,)]


# --------------------------------------------------------------------------- 429s
@pytest.mark.parametrize("engine", ENGINES)
def test_429s_without_retry_after_or_with_an_http_date_are_waited_out(proxy, routing, engine):
    """No Retry-After (exponential backoff) and a Retry-After given as an HTTP-date a couple of seconds
    ahead (RFC 9110's other form, which the existing tests only parse): waited out, never scored."""
    limited = error_body("rate_limit_exceeded", "Rate limit reached for requests", "requests")

    def plan(model: str, n: int, body: dict[str, Any], headers: dict[str, str]) -> Action:
        if "student" in model and n == 3:
            return ("status", 429, limited, {})
        if "student" in model and n == 5:
            # whole seconds on the wire: 2 to 3 s ahead, so a slow client still has over 1 s left to wait
            return ("status", 429, limited, {"Retry-After": formatdate(math.ceil(time.time()) + 2, usegmt=True)})
        if "reflector" in model and n == 1:
            return ("status", 429, limited, {})
        return None

    proxy.reset(plan)
    dr = compile_through(proxy, routing, engine)
    limits = dr.run_stats["rate_limits"]
    assert dr.run_stats["failures"] == {} and not dr.run_stats.get("proposal_skips")
    assert limits["rate_limited"] == 2 and limits["rate_limit_gave_up"] == 0
    assert limits["backoff_seconds"] >= 0.8  # the date was honoured (whole seconds: 2 to 3 s ahead when sent)
    assert limits["reflection"]["rate_limited"] == 1 and limits["reflection"]["rate_limit_retries"] == 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("role, retry_after", [
    ("student", "date"), ("student", "seconds"), ("reflector", "date"),
], ids=["student-http-date", "student-3600s", "reflector-http-date"])
def test_a_retry_after_of_an_hour_stops_the_run_at_once_and_says_to_resume(proxy, routing, engine, role,
                                                                           retry_after, tmp_path):
    """A used-up quota answered with ``Retry-After: 3600`` alone (no ``retry-after-ms``, which the
    simulator always adds) or with an HTTP-date an hour ahead: the run stops at the first such answer,
    asks for a rerun with the same log_dir, and stores the refused evaluation as the service's failure
    (run again on resume)."""
    def header() -> dict[str, str]:
        return {"Retry-After": formatdate(time.time() + 3600, usegmt=True) if retry_after == "date" else "3600"}

    quota = error_body("rate_limit_exceeded", "Rate limit reached for requests per day", "requests")
    proxy.reset(lambda model, n, body, headers: ("status", 429, quota, header())
                if role in model and n >= 2 else None)
    started = time.monotonic()
    with pytest.raises(SystemicFailureError) as info:
        compile_through(proxy, routing, engine, log_dir=tmp_path)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "same log_dir" in message, message
    if role == "student":
        assert info.value.failure == "rate_limited"
        stored = rows(tmp_path, "select failure, service_failure from evaluations where failure is not null")
        assert stored and all(failure == "rate_limited" and service for failure, service in stored)
    else:
        assert info.value.failure == "proposer_error" and "instruction proposer" in message
    assert proxy.counts["sim-" + role] <= 1 + 8  # one answered, then one refusal per slot at most


# --------------------------------------------------------------------------- a key that goes bad mid-run
REVOKED = {
    401: error_body("invalid_api_key", "Incorrect API key provided: sk-test-****T123."),
    404: error_body("model_not_found", "The model `sim-reflector` does not exist or you do not have access to it."),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("role, status, after", [("student", 401, 20), ("reflector", 401, 2), ("reflector", 404, 2)],
                         ids=["student-401", "reflector-401", "reflector-404"])
def test_a_key_revoked_mid_run_stops_at_once_and_the_rerun_pays_nothing_twice(proxy, routing, engine, role, status,
                                                                             after, tmp_path):
    """After ``after`` good calls the provider answers 401 (or 404 for the reflection model only): the
    run stops at the first refusal naming the LM to check, the store records it, and a rerun on the same
    log_dir once the key works again replays every stored success (none re-executed) and reruns the
    refused work."""
    proxy.reset(on(role, ("status", status, REVOKED[status], {}), lambda n: n > after))
    with pytest.raises(SystemicFailureError) as info:
        compile_through(proxy, routing, engine, threads=2, log_dir=tmp_path)
    message = str(info.value)
    assert proxy.counts["sim-" + role] <= after + 4  # stopped at once: the refusals in flight, no window
    if role == "student":
        assert info.value.failure == "program_error" and info.value.error_type == "LMAuthError"
        assert "Check the LM" in message
        failed = rows(tmp_path, "select error_type, service_failure from evaluations where failure is not null")
        assert failed and all(service for _, service in failed)
    else:
        assert info.value.failure == "proposer_error" and "reflection_lm" in message
        assert rows(tmp_path, "select count(*) from proposals where skipped = 'proposer_error'") == [(1,)]
    assert [kind for (kind,) in rows(tmp_path, "select kind from events where kind like '%fail%' order by seq")] == [
        "systemic_failure", "run_failed"]
    good_evals = rows(tmp_path, "select count(*) from evaluations where failure is null")[0][0]
    good_proposals = rows(tmp_path, "select count(*) from proposals where skipped is null")[0][0]
    assert good_evals > 0

    proxy.reset()  # the key works again
    dr = compile_through(proxy, routing, engine, threads=2, log_dir=tmp_path)
    assert dr.run_stats["failures"] == {}
    # nothing stored as a success by the first session was executed (and re-recorded) by the second
    assert rows(tmp_path, "select count(*) from evaluations where session = 1 and failure is null") == [(good_evals,)]
    assert rows(tmp_path, "select count(*) from proposals where session = 1 and skipped is null") == [
        (good_proposals,)]
    # the refused work was asked again, not replayed
    assert rows(tmp_path, "select count(*) from evaluations where failure is not null") == [(0,)]
    assert rows(tmp_path, "select count(*) from proposals where skipped = 'proposer_error' and session = 1") == [(0,)]


# --------------------------------------------------------------------------- keys echoed by the server
def echoing(plan: Callable[[str, int], int | None]) -> Plan:
    """Answer ``plan(model, n)`` (a status) with an error body quoting the request's Authorization header."""
    def inner(model: str, n: int, body: dict[str, Any], headers: dict[str, str]) -> Action:
        status = plan(model, n)
        if status is None:
            return None
        auth = headers.get("Authorization", "")
        return ("status", status, error_body("rejected", f"Request rejected. Authorization: {auth} (key "
                                                         f"{auth[7:]}) is not valid for this deployment"), {})
    return inner


def _assert_no_key(caplog: pytest.LogCaptureFixture, log_dir: Path, *texts: str) -> None:
    assert SECRET not in caplog.text
    for text in texts:
        assert SECRET not in text
    for path in (p for p in log_dir.rglob("*") if p.is_file()):
        assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scenario", ["student-401", "reflector-401", "student-and-reflector-400"])
def test_an_api_key_the_server_echoes_reaches_no_log_error_store_or_result(proxy, routing, engine, scenario, tmp_path,
                                                                          caplog):
    """Error bodies quoting ``Authorization: Bearer sk-test-SECRET123`` (a key of no known shape: too
    short for the ``sk-`` pattern, so only the run's own key list can mask it): not in any log record
    (every logger, DEBUG), the raised error and its traceback, any file under log_dir, or
    detailed_results."""
    plans = {
        "student-401": lambda model, n: 401 if "student" in model and n > 3 else None,
        "reflector-401": lambda model, n: 401 if "reflector" in model else None,
        # ordinary failures: stored with their message, the reflection skipped, the run goes on
        "student-and-reflector-400": lambda model, n: 400 if ("student" in model and n % 3 == 0)
        or ("reflector" in model and n == 1) else None,
    }
    proxy.reset(echoing(plans[scenario]))
    with caplog.at_level(logging.DEBUG):
        if scenario == "student-and-reflector-400":
            dr = compile_through(proxy, routing, engine, log_dir=tmp_path)
            assert dr.run_stats["failures"].get("program_error", 0) > 0
            assert dr.run_stats["proposal_skips"].get("proposer_error") == 1
            stored = rows(tmp_path, "select message from evaluations where failure is not null")
            assert stored and all("Authorization" in m and "***REDACTED***" in m for (m,) in stored)
            texts = [repr(vars(dr)), json.dumps(dr.run_stats, default=str)]
        else:
            with pytest.raises(SystemicFailureError) as info:
                compile_through(proxy, routing, engine, log_dir=tmp_path)
            assert "***REDACTED***" in str(info.value)
            texts = [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    _assert_no_key(caplog, tmp_path, *texts)


# --------------------------------------------------------------------------- bugs
def test_an_outage_right_after_the_seed_is_not_blamed_on_the_trainsets_fields(proxy, routing):
    """The endpoint starts answering 503 once the seed's validation (6 calls) is done: the per-split
    rule stops the run on the trainset's first 8 failures — right to stop, but its message says the
    trainset's examples break the program and to compare their fields and with_inputs(...)."""
    proxy.reset(on("student", ("status", 503, error_body("unavailable", "Service Unavailable", "server_error"), {}),
                   lambda n: n > 6))
    with pytest.raises(SystemicFailureError) as info:
        compile_through(proxy, routing, {})
    message = str(info.value)
    assert "LMServerError" in message  # the cause is named ...
    assert "with_inputs" not in message and "trainset's examples" not in message, message  # ... and not blamed


def test_an_endpoint_that_goes_down_for_good_mid_run_stops_the_run(proxy, routing, tmp_path, monkeypatch):
    """The student endpoint answers 503 to everything from its 26th request on (a provider outage, a
    gateway gone): scored failure_score, every later evaluation would be wrong data and reflections would
    still be paid. The run stops once two waves of evaluations (2 x 4 threads, at least the 8 of the
    first-N rule) failed in a row on the service, naming it; a rerun once it answers runs the failed
    evaluations again and pays for no finished one."""
    monkeypatch.setattr(systemic, "OUTAGE_MIN_SECONDS", 0.0)  # the minimum time is the engine tests' (fake clock)
    proxy.reset(on("student", ("status", 503, error_body("unavailable", "Service Unavailable", "server_error"), {}),
                   lambda n: n > 25))
    with pytest.raises(SystemicFailureError, match="LM service") as info:
        compile_through(proxy, routing, {}, log_dir=tmp_path, budget=80)
    assert "last 8 evaluations" in str(info.value) and "same log_dir" in str(info.value)
    failed = rows(tmp_path, "select count(*) from evaluations where failure is not null")[0][0]
    assert 8 <= failed <= 8 + 4  # the streak, and at most one wave still in flight
    paid = set(proxy.served)
    proxy.reset()
    compile_through(proxy, routing, {}, log_dir=tmp_path, budget=80)
    assert not paid & set(proxy.served)  # nothing answered before is asked again
    # the outage's failures were not replayed as scores: what the rerun needed of them it ran again
    assert rows(tmp_path, "select count(*) from evaluations where failure is not null and session = 2") == [(0,)]
    assert rows(tmp_path, "select count(*) from evaluations where failure is not null")[0][0] < failed


@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMITATION (docs/errors.md, left as is: a systemic stop stops at once, at the cost of at most one "
    "call per evaluation slot): a rollout whose LM call is on the wire when another rollout stops the run "
    "(here a 401) is "
    "cancelled (engine/errors.py, all_of) and the evaluator is closed (adapter/evaluator.py:326-330, "
    "631-632): the answer arrives and is paid, but is never scored or stored, so the rerun with the same "
    "log_dir pays for it again"))
def test_an_answer_paid_while_a_systemic_stop_happens_is_not_paid_again_on_the_rerun(proxy, routing, tmp_path):
    """Two seed evaluations in flight: one call is answered after 3 s, the other is refused with a 401
    at once and stops the run. The slow answer is billed, then thrown away, and billed again on the rerun."""
    refused = threading.Event()

    def plan(model: str, n: int, body: dict[str, Any], headers: dict[str, str]) -> Action:
        if "student" not in model:
            return None
        if n == 1:  # answered (200) 3 s after the 401 went out, whatever the machine's load (the stop
            refused.wait(10)  # must have cancelled it first, or the xfail would pass by chance)
            time.sleep(3.0)
            return None
        if n == 2:
            refused.set()
            return ("status", 401, REVOKED[401], {})
        return None

    proxy.reset(plan)
    with pytest.raises(SystemicFailureError):
        compile_through(proxy, routing, {}, budget=20, n_train=4, n_val=2, threads=2, log_dir=tmp_path)
    deadline = time.monotonic() + 10
    while not proxy.served and time.monotonic() < deadline:
        time.sleep(0.05)
    paid = set(proxy.served)
    assert len(paid) == 1  # the stalled call was answered
    proxy.reset()
    compile_through(proxy, routing, {}, budget=20, n_train=4, n_val=2, threads=2, log_dir=tmp_path)
    assert not paid & set(proxy.served)


def test_negative_usage_from_the_server_is_not_counted(proxy, routing):
    """Every student answer reports ``usage`` with negative token counts (litellm path, priced through
    ``price_table``)."""
    def negative(data: dict[str, Any]) -> dict[str, Any]:
        data["usage"] = {"prompt_tokens": -100000, "completion_tokens": -5, "total_tokens": -100005}
        return data

    proxy.reset(on("student", ("mutate", negative)))
    dr = compile_through(proxy, routing, {"engine": "litellm"}, price_table={"openai/sim-student": (1.0, 2.0)})
    stats = dr.run_stats
    assert stats["task_tokens"]["prompt"] >= 0 and stats["task_tokens"]["completion"] >= 0
    assert stats["cost"]["task"] >= 0
