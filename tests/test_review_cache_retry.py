"""Review of commit 2f5d0ba: an empty answer (``choices: []``) served from DSPy's response cache is asked
again of the service with ``cache=False`` (``_CachedNoChoices`` in ``adapter/lm_copies.py``).

The review's two false retries (a copy with caching off, a legacy custom LM DSPy never caches) are fixed
and pinned here; its strict xfails left are known limitations (docs/errors.md; each assertion says what one
would want); plain tests pin behaviour that was checked and holds. The LM copies are called directly
(``LMCopies().get``) over
tests/test_http_faults.py's loopback fault proxy, plus a few whole compiles reusing
tests/test_fault_edge_cases.py's helpers. Every test gets its own in-memory DSPy cache; nothing leaves
127.0.0.1 and no test sleeps.
"""

# ruff: noqa: F811
from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace
from typing import Any

import dspy
import pytest
from dspy.clients.cache import Cache
from dspy.utils.exceptions import LMProviderError
from test_fault_edge_cases import _compile, _student

# the fault proxy's fixtures (proxy, and the autouse fast_runs) come from test_http_faults
from test_http_faults import KEY, FaultProxy, _no_choices, fast_runs, on, proxy  # noqa: F401

from dspy_turbogepa import SystemicFailureError
from dspy_turbogepa.adapter.lm_copies import LMCopies, rollout_usage
from dspy_turbogepa.adapter.ratelimit import FATAL_ERROR_TYPES, classify

ENGINES = [pytest.param({}, id="native"), pytest.param({"engine": "litellm"}, id="litellm")]


@pytest.fixture(autouse=True)
def own_cache(monkeypatch):
    """A fresh in-memory response cache per test (DSPy's disk cache is never touched)."""
    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True,
                                             disk_cache_dir=None, memory_max_entries=10_000))


def _no_choices_no_usage(data: dict[str, Any]) -> dict[str, Any]:
    """An empty answer that reports no usage (some gateways omit it when they have nothing to bill)."""
    data["choices"] = []
    data.pop("usage", None)
    return data


def _lm(proxy: FaultProxy, engine: dict[str, Any], cache: bool = True) -> dspy.LM:
    return dspy.LM("openai/sim-student", api_base=proxy.base_url, api_key=KEY, num_retries=0, temperature=0.0,
                   cache=cache, **engine)


def _cache_an_empty_answer(proxy: FaultProxy, call: Any) -> None:
    """The outage: the service answers ``choices: []`` (with usage), which DSPy caches; then it recovers."""
    proxy.reset(on("student", ("mutate", _no_choices)))
    with pytest.raises(LMProviderError):
        call()
    assert proxy.counts == {"sim-student": 1}
    proxy.reset()


def _paid(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("usage")]


# ------------------------------------------------------------------ verified: the retry of a cache hit


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_cached_empty_answer_is_asked_again_once_and_paid_once(proxy, engine):
    lm = _lm(proxy, engine)
    copy = LMCopies().get(lm)
    prompt = "q-sync"
    _cache_an_empty_answer(proxy, lambda: copy(prompt))
    before = len(lm.history)
    with rollout_usage() as box:
        outputs = copy(prompt)
    assert outputs and outputs[0]
    assert proxy.counts == {"sim-student": 1}  # the cache hit, then one call to the service
    new = lm.history[before:]
    paid = _paid(new)
    assert len(new) == 2 and len(paid) == 1  # the cached empty answer (no usage) and the live answer
    assert box.calls == 1
    assert box.prompt_tokens == paid[0]["usage"]["prompt_tokens"]
    assert box.completion_tokens == paid[0]["usage"]["completion_tokens"]


@pytest.mark.http
def test_the_cached_attempts_cost_is_not_counted(proxy, monkeypatch):
    """A cache hit keeps the cost recorded when the answer was cached; only the live retry is charged."""
    import dspy.clients.costs as costs

    monkeypatch.setattr(costs, "estimate_cost", lambda response, **kwargs: (0.25, {"kind": "test"}))
    lm = _lm(proxy, {})
    copy = LMCopies().get(lm)
    prompt = "q-cost"
    _cache_an_empty_answer(proxy, lambda: copy(prompt))
    before = len(lm.history)
    with rollout_usage() as box:
        copy(prompt)
    cached, live = lm.history[before:]
    assert not cached["usage"] and cached["cost"] == 0.25  # DSPy keeps the cached cost on a cache hit
    assert live["usage"] and live["cost"] == 0.25
    assert box.cost == pytest.approx(0.25)


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_cached_empty_answer_is_asked_again_through_acall(proxy, engine):
    copy = LMCopies().get(_lm(proxy, engine))
    prompt = "q-async"
    _cache_an_empty_answer(proxy, lambda: asyncio.run(copy.acall(prompt)))
    assert asyncio.run(copy.acall(prompt))[0]
    assert proxy.counts == {"sim-student": 1}


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_best_of_n_copy_asks_again_with_its_own_rollout_id(proxy, engine):
    """dspy.BestOfN / dspy.Refine call ``lm.copy(rollout_id=..., temperature=1.0)`` of our copy."""
    copy = LMCopies().get(_lm(proxy, engine))
    sample = copy.copy(rollout_id=3, temperature=1.0)
    prompt = "q-best-of-n"
    _cache_an_empty_answer(proxy, lambda: sample(prompt))
    assert sample(prompt)[0]
    assert proxy.counts == {"sim-student": 1}
    assert sample.history == []  # entries go to the user's LM's history, as for every call of the copy


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_with_track_usage_the_retry_is_counted_once(proxy, engine):
    lm = _lm(proxy, engine)
    copy = LMCopies().get(lm)
    prompt = "q-track"
    with dspy.context(track_usage=True):
        _cache_an_empty_answer(proxy, lambda: copy(prompt))
        with rollout_usage() as box:
            assert copy(prompt)[0]
    assert proxy.counts == {"sim-student": 1} and box.calls == 1


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_service_still_answering_empty_gets_one_more_call_and_the_plain_provider_error(proxy, engine):
    copy = LMCopies().get(_lm(proxy, engine))
    prompt = "q-still-down"
    _cache_an_empty_answer(proxy, lambda: copy(prompt))
    proxy.reset(on("student", ("mutate", _no_choices)))
    with pytest.raises(LMProviderError) as info:
        copy(prompt)
    assert type(info.value) is LMProviderError  # not the private _CachedNoChoices
    assert proxy.counts == {"sim-student": 1}
    verdict = classify(info.value, FATAL_ERROR_TYPES)
    assert verdict.unusable_answer and verdict.kind is None and not verdict.fatal


@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_rerun_while_the_outage_goes_on_stops_again_and_asks_the_service(proxy, tmp_path, engine):
    student = _student(proxy, cache=True, **engine)
    proxy.reset(on("student", ("mutate", _no_choices), lambda n: n > 6))  # after the seed's validation
    with pytest.raises(SystemicFailureError, match="LM service"):
        _compile(proxy, student, log_dir=tmp_path, engine=engine)
    proxy.reset(on("student", ("mutate", _no_choices)))  # still down
    with pytest.raises(SystemicFailureError, match="LM service"):
        _compile(proxy, student, log_dir=tmp_path, engine=engine)
    assert proxy.counts.get("sim-student", 0) > 0



@pytest.mark.http
def test_an_outage_of_empty_answers_without_usage_still_stops_the_run_with_caching_on(proxy, tmp_path):
    """The native client's usage-less empty answers are each asked twice (see the xfail below), and the
    second, with cache=False, raises the plain provider error: the outage rule still stops the run."""
    student = _student(proxy, cache=True)
    proxy.reset(on("student", ("mutate", _no_choices_no_usage), lambda n: n > 6))
    with pytest.raises(SystemicFailureError, match="LM service"):
        _compile(proxy, student, log_dir=tmp_path)

@pytest.mark.http
@pytest.mark.parametrize("engine", ENGINES)
def test_a_rerun_counts_each_paid_call_once_and_no_cache_hit(proxy, tmp_path, engine):
    student = _student(proxy, cache=True, **engine)
    proxy.reset(on("student", ("mutate", _no_choices), lambda n: n > 6))
    with pytest.raises(SystemicFailureError, match="LM service"):
        _compile(proxy, student, log_dir=tmp_path, engine=engine)
    before = len(student.history)
    proxy.reset()
    dr = _compile(proxy, student, log_dir=tmp_path, engine=engine)
    new = student.history[before:]
    assert any(not e["usage"] for e in new)  # some cached empty answers were met and asked again
    served = [h for model, h in proxy.served if model == "sim-student"]
    assert len(_paid(new)) == len(served)  # every paid answer is in the history once
    paid = sum(int(e["usage"].get("prompt_tokens") or 0) + int(e["usage"].get("completion_tokens") or 0)
               for e in _paid(student.history))  # both sessions (a resumed run counts what earlier ones paid)
    assert sum(dr.run_stats["task_tokens"].values()) == paid
    assert not dr.run_stats["failures"]


# ------------------------------------------------------------------ a live empty answer, asked for once


_LIVE_TWICE = pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMITATION (docs/errors.md; left as is): "
    "lm_copies.py:_make_copy.update_history takes 'no usage' for 'served from the cache', but DSPy's "
    "native client records usage {} for a LIVE answer whose body has no usage: a cache miss with cache=True "
    "raises _CachedNoChoices and ErrorNoting.__call__ asks the service a second time (2 requests per call "
    "during an outage of such answers; the first empty answer is cached all the same)"))


@pytest.mark.http
@pytest.mark.parametrize("make", [
    pytest.param(lambda proxy: LMCopies().get(_lm(proxy, {}, cache=False)), id="lm_without_cache"),
    # litellm reads a missing usage as zeros: not taken for a cache hit
    pytest.param(lambda proxy: LMCopies().get(_lm(proxy, {"engine": "litellm"})), id="litellm"),
    # the copy called decides, not the one our copies made (a review found the latter asked twice)
    pytest.param(lambda proxy: LMCopies().get(_lm(proxy, {})).copy(cache=False), id="copy_with_cache_off"),
    pytest.param(lambda proxy: LMCopies().get(_lm(proxy, {})), id="native_with_cache", marks=_LIVE_TWICE),
])
def test_a_live_empty_answer_without_usage_is_asked_for_once(proxy, make):
    copy = make(proxy)
    proxy.reset(on("student", ("mutate", _no_choices_no_usage)))
    with pytest.raises(LMProviderError):
        copy("q-live")
    assert proxy.counts == {"sim-student": 1}


class _LegacyEmptyLM(dspy.BaseLM):
    """A custom LM of DSPy's legacy ``forward`` interface (still supported in 3.4), which DSPy never caches
    (execution.prepare: caching only for managed LMs); it reports no usage."""

    def __init__(self) -> None:
        super().__init__("openai/legacy-empty")  # cache=True, BaseLM's default
        self.num_retries = 0
        self.calls: list[Any] = []

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return SimpleNamespace(choices=[], usage={}, model=self.model)


def test_a_legacy_custom_lm_that_dspy_never_caches_is_called_once():
    lm = _LegacyEmptyLM()
    copy = LMCopies().get(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DSPy's deprecation warning for the legacy interface
        with pytest.raises(LMProviderError):
            copy("hello")
    assert len(copy.calls) == 1  # the copy shares the list (a shallow copy)


# ------------------------------------------------------------------ bugs: the fix's gaps


@pytest.mark.http
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMITATION (docs/errors.md; left as is): "
    "with dspy's disable_history on, DSPy never calls update_history, so the cached empty answer reaches "
    "lm_copies.py:_some_output (litellm's empty list), which raises the plain LMProviderError, never "
    "_CachedNoChoices: ErrorNoting.__call__ does not ask again and the rerun after an outage is stopped by the "
    "cached empty answers, as before the change"))
def test_with_history_off_a_cached_empty_answer_is_asked_again_on_litellm(proxy):
    copy = LMCopies().get(_lm(proxy, {"engine": "litellm"}))
    prompt = "q-nohist"
    with dspy.context(disable_history=True):
        _cache_an_empty_answer(proxy, lambda: copy(prompt))
        outputs = copy(prompt)
    assert outputs and outputs[0]
    assert proxy.counts == {"sim-student": 1}


@pytest.mark.http
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMITATION (docs/errors.md; left as is): "
    "lm_copies.py:ErrorNoting.__call__ asks again with cache=False, which neither reads nor writes DSPy's "
    "cache, so the outage's empty answer stays cached for good: the user's own LM (cache on) is still served "
    "it after the optimizer's rerun got a real answer, and every later identical request is paid again "
    "(acknowledged in _CachedNoChoices' docstring; docs/errors.md dropped its 'clear DSPy's cache' advice)"))
@pytest.mark.parametrize("engine", ENGINES)
def test_after_a_successful_retry_the_cache_no_longer_serves_the_empty_answer(proxy, engine):
    lm = _lm(proxy, engine)
    copy = LMCopies().get(lm)
    prompt = "q-stale"
    _cache_an_empty_answer(proxy, lambda: copy(prompt))
    assert copy(prompt)[0]  # the retry got the service's real answer
    proxy.reset()
    outputs = lm(prompt)  # the user's LM, the same request
    assert outputs and outputs[0]


@pytest.mark.http
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMITATION (docs/errors.md; left as is): "
    "the same gap in a whole run: with disable_history on, lm_copies.py:_some_output raises the plain "
    "LMProviderError for litellm's cached empty answers, so the rerun the outage error asks for is stopped "
    "again by them without asking the service"))
def test_with_history_off_a_rerun_after_an_outage_of_empty_answers_asks_the_service_again(proxy, tmp_path):
    engine = {"engine": "litellm"}
    student = _student(proxy, cache=True, **engine)
    dspy.configure(disable_history=True)
    try:
        proxy.reset(on("student", ("mutate", _no_choices), lambda n: n > 6))
        with pytest.raises(SystemicFailureError, match="LM service"):
            _compile(proxy, student, log_dir=tmp_path, engine=engine)
        proxy.reset()  # the service answers again
        dr = _compile(proxy, student, log_dir=tmp_path, engine=engine)
    finally:
        dspy.configure(disable_history=False)
    assert dr.stop_reason in ("max_metric_calls", "completed") and not dr.run_stats["failures"]
