"""Session 43's review of rate limiting: an overloaded server's pacing (a 503 with Retry-After, a 529) is a
rate limit; the reflection LM's retry clock runs from its first failure; no retry waits out an endpoint's
cool-down past its policy; a 429 is charged to the endpoint that answered it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dspy
import pytest
from dspy import lm15

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.adapter.evaluator import DspyEvaluator
from dspy_turbogepa.adapter.lm_copies import endpoint_model
from dspy_turbogepa.adapter.ratelimit import FATAL_ERROR_TYPES, RetryPolicy, classify
from dspy_turbogepa.proposers.reflection import ReflectiveProposer
from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer
from dspy_turbogepa.testing.fake_lm import make_student_lm

from helpers import make_evaluator, small_splits


def _evaluate_seed(ev, codec, n: int) -> list:
    """The seed on validation examples 0..n-1, all at once; the evaluator closed after."""
    async def main():
        return await asyncio.gather(*(ev.evaluate(codec.seed_texts(), "seed", "val", i, False) for i in range(n)))

    try:
        return asyncio.run(main())
    finally:
        ev.close()


def test_an_overloaded_server_pacing_its_clients_is_a_rate_limit():
    paced = classify(lm15.ServerError("maintenance", status=503, retry_after=2.0), FATAL_ERROR_TYPES)
    assert (paced.kind, paced.retry_after) == ("rate_limited", 2.0)
    assert classify(lm15.ServerError("overloaded", status=529), FATAL_ERROR_TYPES).kind == "rate_limited"
    assert classify(lm15.ServerError("bad gateway", status=503), FATAL_ERROR_TYPES).kind == "transient"


class _GoesDown:
    """Forwards the first ``ok`` requests to the simulator, then answers 503 with ``Retry-After: 3600``
    (a maintenance window) to every request."""

    def __init__(self, upstream: str, ok: int) -> None:
        self.count = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    outer.count += 1
                    n = outer.count
                if n <= ok:
                    request = urllib.request.Request(upstream + "/chat/completions", data=raw,
                                                     headers={"content-type": "application/json"})
                    data, status = urllib.request.urlopen(request).read(), 200
                else:
                    data, status = json.dumps({"error": {"message": "down for maintenance",
                                                         "type": "server_error"}}).encode(), 503
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "3600")
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_maintenance_window_mid_run_stops_the_compile_instead_of_ending_it_as_no_progress(routing):
    """Before: each rollout gave the 503 up at once (the wait was past the 5xx policy), scored it
    failure_score, and the search ended as "no progress" returning a program chosen on failures."""
    splits = small_splits(routing, n_train=24, n_val=24, n_test=0)
    models = (ModelConfig("sim-student", "student", median_s=0.0), ModelConfig("sim-reflector", "reflector",
                                                                                median_s=0.0))
    with SimServer(SimConfig(models=models), seed=0) as sim:
        proxy = _GoesDown(sim.base_url, ok=60)
        try:
            student = dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key="x", cache=False)
            reflector = dspy.LM("openai/sim-reflector", api_base=sim.base_url, api_key="x", cache=False,
                                temperature=1.0, max_tokens=4000)
            opt = TurboGEPA(routing.metric, max_metric_calls=3000, reflection_lm=reflector, num_threads=8,
                            verbose=False)
            with dspy.context(lm=student), pytest.raises(SystemicFailureError) as info:
                opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        finally:
            proxy.close()
    assert info.value.failure == "rate_limited"
    assert "3600" in str(info.value) and "maintenance" in str(info.value)
    assert proxy.count < 60 + 3 * 8  # stopped at the first rollout told so, not after the search gave up


def test_the_reflection_lms_retry_clock_starts_at_its_first_failure():
    """A reflection call that took longer than the whole policy and then failed was never asked again."""
    policy = RetryPolicy(max_retries=3, max_elapsed_s=0.3, base_s=0.01, cap_s=0.02)
    for error in (lm15.ServerError("overloaded", status=503), lm15.RateLimitError("slow down", status=429)):
        calls = {"n": 0}

        def proposer(candidate, reflective_dataset, components_to_update, error=error):
            calls["n"] += 1
            time.sleep(0.4)  # a slow reflection call, then the failure
            if calls["n"] == 1:
                raise error
            return {c: "a new instruction for " + c for c in components_to_update}

        reflector = ReflectiveProposer(builder=None, proposal_fn=proposer, reflection_lm=None, max_workers=1,
                                       rate_limit_policy=policy, transient_policy=policy)
        try:
            outcome = reflector._propose({"p": "old"}, {"p": [(0, {"x": 1})]}, [0.0], ["p"])
        finally:
            reflector.close()
        assert calls["n"] == 2 and outcome.skipped is None, (type(error).__name__, outcome)


def test_no_retry_waits_out_an_endpoint_cool_down_past_its_policy(routing):
    """Every call answers 429 with Retry-After 0.3 s under a 0.4 s policy: a rollout's own backoff plus the
    endpoint cool-downs it waits out after its first 429 stay within the policy (before: up to 0.7 s)."""
    policy = RetryPolicy(max_retries=10, max_elapsed_s=0.4, base_s=0.01, cap_s=0.05)

    sent = []

    def always_429(request):
        sent.append(1)
        raise lm15.RateLimitError("slow down", status=429, retry_after=0.3)

    ev, codec = make_evaluator(routing, n=12, max_workers=12, rate_limit_policy=policy)
    spent: dict[object, float] = {}
    acquire_all, sleep = ev._windows.acquire_all, ev._sleep

    async def timed_acquire(keys, max_cooldown_s=None):
        tickets = await (acquire_all(keys) if max_cooldown_s is None else acquire_all(keys, max_cooldown_s))
        task = asyncio.current_task()
        if task in spent:  # a retry: the cool-down it waited out counts
            spent[task] += sum(t.cooldown_s for t in tickets)
        else:
            spent[task] = 0.0
        return tickets

    async def timed_sleep(delay):
        spent[asyncio.current_task()] += delay
        await sleep(delay)

    ev._windows.acquire_all, ev._sleep = timed_acquire, timed_sleep
    lm = make_student_lm(before_call=always_429, async_before_call=always_429)

    with dspy.context(lm=lm):
        outcomes = _evaluate_seed(ev, codec, 12)
    assert {o.failure for o in outcomes} == {"rate_limited"}
    assert max(spent.values()) <= policy.max_elapsed_s + 0.05, sorted(spent.values())
    # a retry given up before it was sent is not counted as one
    retries_sent = len(sent) - 12
    assert sum(o.rate_limit_retries for o in outcomes) == retries_sent
    assert ev.rate_limit_stats()["rate_limit_retries"] == retries_sent


def test_a_429_is_charged_to_the_endpoint_that_answered_it(pipeline):
    """Two servers with the same model name: only the capped one's window shrinks."""
    capped = SimConfig(models=(ModelConfig("sim-student", "student", median_s=0.05, max_concurrency=2,
                                           queue_timeout_s=0),))
    free = SimConfig(models=(ModelConfig("sim-student", "student", median_s=0.05),))
    fast = RetryPolicy(max_retries=10, max_elapsed_s=30.0, base_s=0.005, cap_s=0.05)
    with SimServer(capped, seed=0) as a, SimServer(free, seed=0) as b:
        program = pipeline.make_program()
        program.extract.lm = dspy.LM("openai/sim-student", api_base=a.base_url, api_key="x", cache=False)
        program.render.lm = dspy.LM("openai/sim-student", api_base=b.base_url, api_key="x", cache=False)
        ev, codec = make_evaluator(pipeline, program, n=16, max_workers=16, rate_limit_policy=fast,
                                   transient_policy=fast)
        outcomes = _evaluate_seed(ev, codec, 16)
        assert a.stats()["models"]["sim-student"]["http_429"] > 0
        assert b.stats()["models"]["sim-student"]["http_429"] == 0
    assert not [o for o in outcomes if o.failure]
    windows = {key.rsplit("@", 1)[1]: stats for key, stats in ev.rate_limit_stats()["endpoints"].items()}
    assert windows[a.base_url]["rate_limited"] > 0
    assert windows[b.base_url]["rate_limited"] == 0 and windows[b.base_url]["decreases"] == 0


def test_a_model_name_with_an_at_sign_is_its_own_endpoint():
    vertex = "vertex_ai/claude-3-5-sonnet@20240620"
    other = "openai/gpt-4o-mini@https://api.openai.com/v1"
    assert endpoint_model(vertex) == vertex and endpoint_model(other) == "openai/gpt-4o-mini"
    assert DspyEvaluator._keys_of(vertex, {vertex, other}) == {vertex}


def test_noting_the_endpoint_on_an_error_never_replaces_the_error():
    from dspy_turbogepa.adapter.lm_copies import _tag_endpoint

    class Guarded(Exception):
        def __setattr__(self, name, value):
            raise RuntimeError("read-only error")

    error = Guarded("429 from the provider")
    _tag_endpoint(error, dspy.LM("openai/x", api_base="http://127.0.0.1:9/v1"))  # does not raise
    plain = ValueError("x")
    _tag_endpoint(plain, dspy.LM("openai/x", api_base="http://127.0.0.1:9/v1"))
    assert plain._turbogepa_endpoint == "openai/x@http://127.0.0.1:9/v1"
