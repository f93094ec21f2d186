"""Our own copies of the user's LMs (DSPy's retries off), endpoint keys, and per-rollout LM usage.

The evaluator owns rate-limit handling, so the LMs it runs rollouts with must not retry (and sleep)
on their own. It never touches the user's objects: each LM gets one copy (``lm.copy()``, which shares
the engines and connection pools with the original) with ``num_retries = 0``. The copy also shares the
original's ``history`` list, so ``lm.history`` / ``dspy.inspect_history()`` and the common
``sum(x["cost"] for x in lm.history)`` idiom keep seeing the optimization's calls, as with dspy.GEPA.

Usage of one rollout: a call through one of our copies is counted from the history entry DSPy
records for it (tokens, and ``entry["cost"]``: litellm's or DSPy's own price, None when the model's
price is unknown; cache hits, which carry no usage, are not charged), on whatever thread it ran. Calls
through an LM we did not copy (an LLM judge inside the metric, a ``dspy.context(lm=other)`` inside
``forward``) leave no entry we see: they are what DSPy's own contextvar-based usage tracker holds beyond
our copies' calls, counted at the rollout's end and priced from DSPy's model metadata, so
``cost_budget_usd`` counts them too. That tracker is nested as ``dspy.track_usage`` nests them, so an
outer tracker of the user's still receives everything, and ``dspy.Parallel``'s workers share it
instead of each getting a copy that is never merged back.
"""

from __future__ import annotations

import copy as _copy
import functools
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import LMProviderError
from dspy.utils.usage_tracker import UsageTracker

from dspy_turbogepa.log_once import FirstOfKind
from dspy_turbogepa.redaction import endpoint_url, exception_chain

logger = logging.getLogger(__name__)

__all__ = ["LMCopies", "RolloutUsage", "adapter_lms", "endpoint_key", "judge_usage_attached", "rollout_usage"]


@dataclass
class RolloutUsage:
    """LM usage of one rollout (all its attempts), in a form that adds up."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    #: LM calls with usage (one entry each in DSPy's tracker).
    calls: int = 0
    tracker: UsageTracker | None = None
    #: model -> (dollars per 1M prompt tokens, dollars per 1M completion tokens); overrides reported cost.
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: model -> [prompt, completion, calls] of our copies' calls, counted from their history entries.
    from_entries: dict[str, list[int]] = field(default_factory=dict)
    #: models with a call the service answered without token usage (DSPy's cache hits are not among them)
    unreported: set[str] = field(default_factory=set)
    #: endpoint keys of our LM copies that answered a call of this rollout (the outage rule's per endpoint)
    answered: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_entry(self, prompt: int, completion: int, model: str, cost: Any) -> None:
        """One call through our copies, from its history entry; the tracker's count of ``model`` at
        the rollout's end leaves it out (see :func:`rollout_usage`)."""
        self.add_tokens(prompt, completion, model)
        self.add_cost(cost, model)
        with self._lock:
            seen = self.from_entries.setdefault(model, [0, 0, 0])
            seen[0] += prompt
            seen[1] += completion
            seen[2] += 1

    def add_cost(self, value: Any, model: str | None = None) -> None:
        if model is not None and _price_for(self.prices, model) is not None:
            return  # priced from the table at the end of the rollout instead
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            with self._lock:
                self.cost += float(value)

    def add_tokens(self, prompt: int, completion: int, model: str, calls: int = 1) -> None:
        """``calls`` LM calls of ``model``; priced here when the price table lists the model."""
        price = _price_for(self.prices, model)
        with self._lock:
            self.calls += calls
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            if price is not None:
                self.cost += (prompt * price[0] + completion * price[1]) / 1e6

    def add(self, other: RolloutUsage) -> None:
        with self._lock:
            self.answered |= other.answered
            self.calls += other.calls
            self.prompt_tokens += other.prompt_tokens
            self.completion_tokens += other.completion_tokens
            self.cost += other.cost


_CURRENT: ContextVar[RolloutUsage | None] = ContextVar("turbogepa_rollout_usage", default=None)


def _number(value: Any) -> float:
    """A summable usage count (as DSPy's tracker sums them), else 0. A negative count (a misbehaving
    gateway; litellm passes it through) is 0 too: summed, it would lower the spend the token and cost
    budgets check."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return value if ok else 0


@functools.lru_cache(maxsize=128)
def _metadata_rates(model: str) -> tuple[float, float] | None:
    """Dollars per prompt and per completion token of ``model`` ("provider/name") from DSPy's model
    metadata (what DSPy prices its own calls with), or None when it does not list the model."""
    from dspy.clients.model_metadata import model_info

    provider, _, name = model.partition("/")
    # a bare name ("gpt-4o", which DSPy accepts and prices) names no provider: ask the common ones
    candidates = [(provider, name)] if name else [(p, model) for p in _BARE_NAME_PROVIDERS]
    for provider, name in candidates:
        try:
            info = model_info(provider, name) or {}
        except Exception as exc:  # noqa: BLE001 - pricing is advisory: an unknown or odd model is unpriced
            logger.debug("no price for %s (%s)", model, type(exc).__name__)
            continue
        rates = info.get("input_cost_per_token"), info.get("output_cost_per_token")
        if all(isinstance(r, (int, float)) and math.isfinite(r) for r in rates):
            return float(rates[0]), float(rates[1])  # type: ignore[arg-type]
    return None


#: Providers asked for a model named without one, in order.
_BARE_NAME_PROVIDERS = ("openai", "anthropic", "gemini", "mistral", "deepseek", "xai", "groq")


def _metadata_cost(model: str, prompt: int, completion: int) -> float:
    if prompt <= 0 and completion <= 0:
        return 0.0
    rates = _metadata_rates(model)
    return 0.0 if rates is None else max(prompt, 0) * rates[0] + max(completion, 0) * rates[1]


def model_is_priced(model: str, prices: Mapping[str, tuple[float, float]] | None) -> bool:
    """Whether the dollar budget can price ``model``'s calls: ``price_table`` or DSPy's model table."""
    return _price_for(prices or {}, model) is not None or _metadata_rates(model) is not None


def _price_for(prices: Mapping[str, tuple[float, float]], model: str) -> tuple[float, float] | None:
    """``model``'s rates in ``price_table``: its own key, else its name without the provider, else, for a
    model named without a provider (``dspy.LM("gpt-4o-mini")``, which DSPy accepts), a key naming it with
    one (``"openai/gpt-4o-mini"``: that key was ignored, and the call priced at another rate or $0). Of
    several such keys, each rate the dearest: a cap that counts too much stops early, one that counts too
    little lets the bill pass it."""
    if not prices:
        return None
    found = prices.get(model) or prices.get(model.split("/", 1)[-1])
    if found is None and "/" not in model:
        named = [rates for key, rates in prices.items() if key.split("/", 1)[-1] == model]
        if named:  # each rate the dearest of them
            found = (max(r[0] for r in named), max(r[1] for r in named))
    return found


class _SharedTracker(UsageTracker):
    """A usage tracker shared with the worker threads of a ``dspy.Parallel`` inside its scope.

    Why: ``dspy.Parallel`` gives each worker a deep copy of the active tracker and never merges it
    back, so the calls of an LM the program (or a judge) holds itself, made in a parallel branch,
    reached no one (our copies' calls are seen through their history entries, the program's own LMs'
    only here): ``token_budget`` and ``cost_budget_usd`` missed them. Appending to one list from
    several threads is safe under the GIL."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedTracker:
        return self

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        """DSPy calls this for every LM call its cache did not answer, usage or not: a call that reported
        no tokens here was answered without usage (DSPy's own tracker drops it silently, and its history
        entry looks like a cache hit's), so the token and dollar counts miss it."""
        usage = usage_entry or {}
        if not _number(usage.get("prompt_tokens")) and not _number(usage.get("completion_tokens")):
            box = _CURRENT.get() or dspy.settings.get(ROLLOUT_USAGE)
            if isinstance(box, RolloutUsage):
                box.unreported.add(str(lm))
        super().add_usage(lm, usage_entry)


def _roll_up(tracker: UsageTracker, parent: UsageTracker) -> None:
    """Add ``tracker``'s entries to ``parent``'s, as ``dspy.track_usage()`` rolls a nested tracker up;
    over snapshots, since a straggling ``dspy.Parallel`` worker may still append."""
    for model, entries in list(tracker.usage_data.items()):
        parent.usage_data[model].extend(list(entries))


@contextmanager
def _rollout_tracker() -> Iterator[_SharedTracker]:
    """``dspy.track_usage()`` with a :class:`_SharedTracker`: nested in the user's tracker, rolled
    up into it on exit, as DSPy's nested trackers are."""
    tracker = _SharedTracker()
    parent = dspy.settings.usage_tracker
    with dspy.settings.context(usage_tracker=tracker):
        try:
            yield tracker
        finally:
            if parent is not None:
                _roll_up(tracker, parent)


@contextmanager
def rollout_usage(prices: Mapping[str, tuple[float, float]] | None = None,
                  noted: FirstOfKind | None = None) -> Iterator[RolloutUsage]:
    """Collect the tokens and cost of every LM call made inside the block (in this context, and in
    the worker threads of a ``dspy.Parallel`` in it).

    ``prices`` (model -> $ per 1M prompt / completion tokens) prices models that litellm and DSPy do
    not know; for a model in the table its reported cost is ignored, so nothing is counted twice.
    ``noted``: the compile's one-time warnings; a model answering without token usage is named once
    (some self-hosted servers and gateways leave it out, and token_budget / cost_budget_usd then never
    stopped the run, with nothing said).
    """
    box = RolloutUsage(prices=dict(prices or {}))
    try:
        with _collecting(box):
            yield box
    finally:
        for model in sorted(box.unreported):
            if noted is not None and noted.first(("answered_without_usage", model)):
                logger.warning(
                    "%s answered without token usage (some self-hosted servers and gateways leave out the "
                    "`usage` block): its calls count no tokens and no dollars in run_stats, token_budget or "
                    "cost_budget_usd; bound the run with max_metric_calls or time_budget_seconds.", model)


@contextmanager
def _collecting(box: RolloutUsage) -> Iterator[None]:
    token = _CURRENT.set(box)
    try:
        with _rollout_tracker() as tracker:
            box.tracker = tracker
            try:
                yield
            finally:
                # Our copies' calls were counted from their history entries (wherever they ran: a tracker
                # the program opens around a dspy.Parallel is copied into its workers and never merged
                # back); what the tracker holds beyond them is the calls of LMs the program or metric holds
                # itself. The counts are summed directly (get_total_tokens() merges every field of every
                # entry recursively), over snapshots: a dspy.Parallel worker that outlived its call
                # (DSPy does not wait for one after max_errors) may still append.
                for model, entries in list(tracker.usage_data.items()):
                    entries = list(entries)
                    seen = box.from_entries.get(model, (0, 0, 0))
                    prompt = max(0, int(sum(_number(e.get("prompt_tokens")) for e in entries)) - seen[0])
                    completion = max(0, int(sum(_number(e.get("completion_tokens")) for e in entries)) - seen[1])
                    calls = max(0, len(entries) - seen[2])
                    if calls or prompt or completion:
                        box.add_tokens(prompt, completion, model, calls=calls)
                        if _price_for(box.prices, model) is None:  # priced from DSPy's model table
                            box.add_cost(_metadata_cost(model, prompt, completion))
    finally:
        _CURRENT.reset(token)


class _JudgeTracker(_SharedTracker):
    """The usage tracker of one module call the metric makes (see :class:`_JudgeUsage`)."""


class _JudgeUsage(BaseCallback):
    """Gives each module the metric calls (an LLM judge) the usage of its own LM calls on its prediction.

    Why: with ``dspy.configure(track_usage=True)``, DSPy attaches usage to a module's prediction only
    when no usage tracker is active, and ours is while the metric runs (it counts the judge's tokens
    toward ``token_budget`` and ``cost_budget_usd``). Under dspy.GEPA no tracker is, so a metric may read
    ``judge_pred.get_lm_usage()``. So this does what DSPy's ``Module.__call__`` does without a tracker:
    the outermost module call (in its own thread or task: each one's settings are its own) runs under a
    tracker of its own, whose usage goes on its prediction; and, as DSPy's nested trackers do, the
    entries are then added to the tracker that was active (the rollout's), so the budgets still see them.
    Entered and left by the callbacks around the call, in the call's own thread and context."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: call id of each outermost module call open -> (its settings context, tracker, the tracker before)
        self._open: dict[str, tuple[Any, _JudgeTracker, UsageTracker]] = {}

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        outer = dspy.settings.usage_tracker
        if not isinstance(outer, UsageTracker) or isinstance(outer, _JudgeTracker):
            return  # not in a rollout, or inside a module call already tracked (DSPy attaches to the outermost)
        tracker = _JudgeTracker()
        context = dspy.settings.context(usage_tracker=tracker)
        context.__enter__()
        with self._lock:
            self._open[call_id] = (context, tracker, outer)

    def on_module_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        with self._lock:
            entry = self._open.pop(call_id, None)
        if entry is None:
            return
        context, tracker, outer = entry
        context.__exit__(None, None, None)
        _roll_up(tracker, outer)
        prediction = outputs[0] if isinstance(outputs, tuple) and outputs else outputs
        if isinstance(prediction, dspy.Prediction) and prediction.get_lm_usage() is None:
            prediction.set_lm_usage(tracker.get_total_tokens())


@contextmanager
def judge_usage_attached() -> Iterator[None]:
    """Around a metric call inside :func:`rollout_usage`: see :class:`_JudgeUsage`. Nothing is added
    unless the user turned ``track_usage`` on."""
    box = _CURRENT.get()
    if box is None or box.tracker is None or not dspy.settings.track_usage:
        yield
        return
    with dspy.context(callbacks=[*(dspy.settings.get("callbacks") or []), _JudgeUsage()]):
        yield


#: dspy settings key of the running rollout's usage box, for calls on threads the rollout's context
#: does not reach (dspy.Parallel copies the settings overrides into its workers, not context variables).
ROLLOUT_USAGE = "turbogepa_rollout_usage"


def current_rollout_usage() -> RolloutUsage | None:
    return _CURRENT.get()


def _note_history_entry(entry: Any) -> None:
    """Count a call through one of our copies: its tokens and its cost (from the entry), and note it,
    so the rollout's end counts only what the tracker holds beyond our copies' calls."""
    if not isinstance(entry, dict) or not entry.get("usage"):
        return
    # the rollout's own thread has the context variable; a dspy.Parallel worker thread only the settings
    # overrides DSPy copies into it
    box = _CURRENT.get() or dspy.settings.get(ROLLOUT_USAGE)
    if isinstance(box, RolloutUsage):
        usage = entry["usage"]
        box.add_entry(int(_number(usage.get("prompt_tokens"))), int(_number(usage.get("completion_tokens"))),
                      str(entry.get("model") or ""), entry.get("cost"))


def lm_api_base(lm: Any) -> str | None:
    """The endpoint URL an LM is configured with (``api_base`` / ``base_url``), userinfo included."""
    kwargs = getattr(lm, "kwargs", None)
    base = (kwargs.get("api_base") or kwargs.get("base_url")) if isinstance(kwargs, dict) else None
    base = base or getattr(lm, "api_base", None)
    return base if isinstance(base, str) else None


def endpoint_key(lm: Any) -> str:
    """Which provider endpoint an LM talks to: its model plus its api_base (when set), never the URL's
    userinfo, query or a path segment that could be a token (the key names the endpoint in stats,
    logs and MLflow metric names, see :func:`~dspy_turbogepa.redaction.endpoint_url`)."""
    model = getattr(lm, "model", None) or type(lm).__name__
    base = lm_api_base(lm)
    return f"{model}@{endpoint_url(base)}" if base else str(model)


def endpoint_model(key: str) -> str:
    """The model of an :func:`endpoint_key`: before its last ``@`` when a URL follows it (a model name may
    hold an ``@`` itself: Vertex's ``claude-3-5-sonnet@20240620``)."""
    model, sep, base = key.rpartition("@")
    return model if sep and ("/" in base or ":" in base) else key


#: Attribute our LM copies set on an error they raise: the endpoint key of the copy, so that a 429 is
#: charged to the endpoint that answered it, not to every endpoint serving a model of that name.
ENDPOINT_ATTR = "_turbogepa_endpoint"


def raised_by_endpoint(exc: BaseException) -> str | None:
    """The endpoint key one of our LM copies tagged ``exc`` (or an exception it wraps) with."""
    for cur in exception_chain(exc):
        key = getattr(cur, ENDPOINT_ATTR, None)
        if isinstance(key, str):
            return key
    return None


def _tag_endpoint(exc: BaseException, lm: Any) -> None:
    """Never raises: the provider's error it is called on must reach the program unchanged."""
    try:
        if getattr(exc, ENDPOINT_ATTR, None) is None:
            setattr(exc, ENDPOINT_ATTR, endpoint_key(lm))
    except Exception as err:  # noqa: BLE001 - an exception class guarding its attributes: charged by model name
        logger.debug("Could not note the endpoint on %s: %s", type(exc).__name__, err)


#: dspy settings key of the list a rollout's LM errors are noted in (dspy.Parallel copies the settings
#: overrides into its worker threads, so calls on those threads note theirs there too).
ROLLOUT_LM_ERRORS = "turbogepa_rollout_lm_errors"


class AnsweredEndpoints:
    """The endpoint keys an evaluator's LM copies saw answer in one run (a refused connection from one
    that never has is a wrong api_base, however many others answered). Held by each copy, so a call
    from any thread notes it (a thread the program starts does not see DSPy's settings); never copied,
    so a copy of a copy (``dspy.BestOfN``'s) notes into the same one."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def __copy__(self) -> AnsweredEndpoints:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AnsweredEndpoints:
        return self

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys.add(key)


_ANSWERED_ATTR = "_turbogepa_answered"
#: (model, api_base, endpoint key) of the copy's last note: the key is a regex over the URL, worked out
#: again only when the copy's model or api_base changed (``lm.copy(api_base=...)`` keeps its attributes)
_KEY_CACHE_ATTR = "_turbogepa_endpoint_key"


def _note_answered(lm: Any) -> None:
    """Note the copy's endpoint as one that answered. Never raises: the call it follows succeeded."""
    box = getattr(lm, _ANSWERED_ATTR, None)
    if not isinstance(box, AnsweredEndpoints):
        return
    try:
        model, base = getattr(lm, "model", None), lm_api_base(lm)
        cached = getattr(lm, _KEY_CACHE_ATTR, None)
        if not (isinstance(cached, tuple) and cached[0] == model and cached[1] == base):
            cached = (model, base, endpoint_key(lm))
            setattr(lm, _KEY_CACHE_ATTR, cached)
        box.add(cached[2])
        # and to the running rollout's: the outage rule's streak of this endpoint is broken by it alone
        usage = _CURRENT.get() or dspy.settings.get(ROLLOUT_USAGE)
        if isinstance(usage, RolloutUsage):
            usage.answered.add(cached[2])
    except Exception as err:  # noqa: BLE001 - an LM class guarding its attributes: its answers go unnoted
        logger.debug("Could not note that %s answered: %s", type(lm).__name__, err)


#: dspy settings key of the run's "closed" event: once set, our copies make no new call (compile has
#: returned or raised; a rollout still running must not start paid calls nobody will read).
ROLLOUT_CLOSED = "turbogepa_rollout_closed"


class EvaluatorClosedError(RuntimeError):
    """A rollout went on after its run ended (see ``DspyEvaluator.close``)."""


def _refuse_if_closed() -> None:
    closed = dspy.settings.get(ROLLOUT_CLOSED)
    if closed is not None and closed.is_set():
        raise EvaluatorClosedError("the run ended while this rollout was running; no new LM call is made")


def note_lm_error(exc: BaseException) -> None:
    box = dspy.settings.get(ROLLOUT_LM_ERRORS)
    if isinstance(box, list):
        box.append(exc)


@functools.cache
def _error_noting_class(base: type) -> type:
    """``base`` noting every error of a call in the running rollout's list before raising it.

    Why: retries are off on these copies, because the evaluator retries the whole rollout after a rate
    limit; but a module that catches a failed call itself (``dspy.Parallel`` returns None for a failed
    branch) would turn a 429 into a wrong answer, scored and never retried. The evaluator reads the
    list after the rollout and treats a swallowed rate limit as if it had been raised.
    """

    # __call__ / acall, the public entry points: overriding forward/aforward would make DSPy 3.4 treat
    # the copy as a legacy custom LM and route it through another execution path
    class ErrorNoting(base):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            _refuse_if_closed()
            try:
                try:
                    output = _some_output(self, super().__call__(*args, **kwargs))
                except _CachedNoChoices:  # see _CachedNoChoices: ask the service itself, once
                    output = _some_output(self, super().__call__(*args, **_uncached(self, kwargs, "forward")))
                _note_answered(self)
                return output
            except Exception as exc:
                _tag_endpoint(exc, self)
                note_lm_error(exc)
                raise

        async def acall(self, *args: Any, **kwargs: Any) -> Any:
            _refuse_if_closed()
            try:
                try:
                    output = _some_output(self, await super().acall(*args, **kwargs))
                except _CachedNoChoices:
                    output = _some_output(self, await super().acall(*args, **_uncached(self, kwargs, "aforward")))
                _note_answered(self)
                return output
            except Exception as exc:
                _tag_endpoint(exc, self)
                note_lm_error(exc)
                raise

    ErrorNoting.__name__, ErrorNoting.__qualname__ = base.__name__, base.__qualname__
    ErrorNoting.__module__ = base.__module__
    return ErrorNoting


def _some_output(lm: Any, outputs: Any) -> Any:
    """An answer with no choices (``"choices": []``) is the service's failure, not the program's answer.

    Why: through litellm DSPy turns it into an empty list, and ``dspy.Predict`` into a prediction with no
    fields, raising nothing, so the metric scored it as if the program had answered (stored as a success
    and replayed on resume); DSPy's native client reads it as one empty, unparsable answer (the copy's
    ``update_history`` catches that case from the response). Raised as DSPy's provider error, it is
    scored ``failure_score`` as an unusable answer, and a service that answers nothing else stops the run
    as systemic."""
    if isinstance(outputs, list) and not outputs:
        raise _no_choices_error(lm)
    return outputs


def _no_choices_error(lm: Any, cached: bool = False) -> Exception:
    message = "the LM answered with no choices (an empty `choices` list)"
    if not isinstance(lm, dspy.LM):  # DSPy reads a custom forward's None, dict or text as no choices too
        message += (f"; {type(lm).__name__} is a custom dspy.BaseLM: if its forward() answered, check that it "
                    "returns an OpenAI-style response (an object with .choices and .usage), as DSPy reads a None, "
                    "a text or a dict without 'choices' from it as no choices")
    return (_CachedNoChoices if cached else LMProviderError)(message, model=getattr(lm, "model", None))


def _uncached(lm: Any, kwargs: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The call's arguments with DSPy's cache off, to ask again for an empty answer with no usage; the
    plain provider error instead when DSPy's cache cannot have served it: caching off for the call, or
    an LM whose calls DSPy does not manage (execution.prepare: a custom ``forward`` / ``aforward`` is
    never cached)."""
    managed = (isinstance(lm, dspy.LM) and hasattr(lm, "_engine_spec") and method not in vars(lm)
               and getattr(type(lm), method) is getattr(dspy.LM, method))
    if not managed or not kwargs.get("cache", getattr(lm, "cache", False)):
        raise _no_choices_error(lm) from None
    return {**kwargs, "cache": False}


class _CachedNoChoices(LMProviderError):
    """An empty answer with no usage, which is what DSPy's response cache serves (no call was made).

    Why: DSPy caches a response before anything reads it, so the empty answers of an outage are
    cached (on disk, across processes) and the rerun the outage error asks for would be served the same
    empty answers without asking the service. The copy then asks again with ``cache=False``; what the
    service answers now is used (and not cached: DSPy cannot overwrite the stale entry through a call).
    Caught by the copy's ``__call__`` / ``acall``, which asks again only when DSPy's cache serves that
    call (:func:`_uncached`); a DSPy provider error wherever else it surfaces. Known cost: DSPy's
    native client also records no usage for a live empty answer whose body has none, so with caching on
    such an answer is asked for twice.
    """


def _answered_no_choices(entry: Any) -> bool:
    """Whether a history entry's response had an empty ``choices`` list (litellm's response object, or
    the provider's JSON the native client keeps as ``provider_data``)."""
    response = entry.get("response") if isinstance(entry, dict) else None
    if response is None:
        return False
    choices = getattr(response, "choices", None)
    if isinstance(choices, list):
        return not choices
    data = getattr(response, "provider_data", None)
    return isinstance(data, dict) and data.get("choices") == []


class RunHistoryEntry(dict):  # DSPy's entries: plain dicts of anything
    """A history entry one of our LM copies recorded: a plain dict to every reader (DSPy, a user summing
    ``entry["cost"]``), told apart only where it must be: the copies share the user's ``lm.history``, so
    a second compile of the same student found the first one's calls there and put them into the
    programs it built as their history "when compile began" (program.py): the returned program grew by
    each earlier run's prompts and answers, and each build cost more."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as the plain dict DSPy made: a user's pickled LM (or program) loads where only dspy is
        return dict, (dict(self),)

    def __deepcopy__(self, memo: dict[int, Any]) -> RunHistoryEntry:
        # copied as itself (deepcopy would use __reduce__): a copied history still tells the run's entries
        return RunHistoryEntry(_copy.deepcopy(dict(self), memo))


def _make_copy(lm: Any) -> Any:
    if not isinstance(lm, dspy.BaseLM) or not hasattr(lm, "num_retries"):
        return lm  # nothing we can switch off; its errors are still caught and retried by the evaluator
    try:
        copy = lm.copy()
    except Exception as exc:  # an exotic LM subclass: use it as it is rather than fail the run  # noqa: BLE001
        logger.warning("Could not copy %r to turn its retries off (%s: %s); using it unchanged.",
                       lm, type(exc).__name__, exc)
        return lm
    copy.num_retries = 0
    # a class, not an instance attribute: dspy.BestOfN copies the LM (deepcopy) per call, and a
    # wrapped bound method would call the original copy with its old settings
    copy.__class__ = _error_noting_class(type(copy))  # type: ignore[arg-type]  # mypy: a class is not Hashable
    copy.history = lm.history
    inner = copy.update_history

    def update_history(entry: Any) -> None:
        if type(entry) is dict:
            entry = RunHistoryEntry(entry)
        inner(entry)
        _note_history_entry(entry)
        # DSPy's native client reads it as one empty answer (and with DSPy's history off only the outputs,
        # checked in __call__ / acall, show it: litellm's empty list)
        if _answered_no_choices(entry):
            # no usage, as when DSPy's cache served it (the copy called decides whether it did; an answer
            # to the copy's own ask past the cache is the plain error)
            cache_on = (entry.get("kwargs") or {}).get("cache") is not False
            raise _no_choices_error(copy, cached=cache_on and not entry.get("usage"))

    copy.update_history = update_history
    return copy


def adapter_lms(adapter: Any) -> dict[str, Any]:
    """The LMs a configured DSPy adapter holds in its public attributes, by attribute name."""
    if adapter is None:
        return {}
    return {k: v for k, v in sorted(getattr(adapter, "__dict__", {}).items())
            if not k.startswith("_") and isinstance(v, dspy.BaseLM)}


def _still(hit: tuple[Any, Any, tuple[Any, ...]], adapter: Any, lms: tuple[Any, ...]) -> bool:
    """Whether a cached adapter copy is of this adapter holding these LMs."""
    return (hit[0] is adapter and len(hit[2]) == len(lms)
            and all(a is b for a, b in zip(hit[2], lms, strict=True)))


class LMCopies:
    """One copy per original LM object (kept alive with it, so ids are never reused): the evaluator's
    for the program's LMs, the reflector's for the reflection LM (whose retries and backoff are ours
    too, and whose history entries carry the cost DSPy records to :func:`rollout_usage`)."""

    def __init__(self, answered: AnsweredEndpoints | None = None) -> None:
        """``answered``: where the copies note the endpoints that answered them (the evaluator's)."""
        self._lock = threading.Lock()
        self._copies: dict[int, tuple[Any, Any]] = {}
        self._adapters: dict[int, tuple[Any, Any, tuple[Any, ...]]] = {}
        self._uncopyable: set[int] = set()
        self._answered = answered

    def get(self, lm: Any) -> Any:
        with self._lock:
            hit = self._copies.get(id(lm))
            if hit is not None and hit[0] is lm:
                return hit[1]
        copy = _make_copy(lm)
        if copy is not lm and self._answered is not None:
            try:
                setattr(copy, _ANSWERED_ATTR, self._answered)
            except Exception as err:  # noqa: BLE001 - an LM class guarding its attributes: answers go unnoted
                logger.debug("Could not attach the answered-endpoints record to %s: %s", type(copy).__name__, err)
        with self._lock:
            hit = self._copies.get(id(lm))
            if hit is not None and hit[0] is lm:
                return hit[1]
            self._copies[id(lm)] = (lm, copy)
        return copy

    def adapter(self, adapter: Any) -> Any:
        """``adapter``, or a shallow copy of it whose LMs (``TwoStepAdapter.extraction_model``, which reads
        every answer) are our copies: with the user's, its calls retried on DSPy's own policy (a quota's
        ``Retry-After: 900`` waited out, three times over, holding the rollout for most of an hour) and were
        still made after the run had ended. One copy per adapter object, as for LMs."""
        held = adapter_lms(adapter)
        if not held:
            return adapter
        lms = tuple(held.values())  # an adapter given another LM since is copied again
        with self._lock:
            hit = self._adapters.get(id(adapter))
            if hit is not None and _still(hit, adapter, lms):
                return hit[1]
        try:
            copied = _copy.copy(adapter)
            for name, lm in held.items():
                setattr(copied, name, self.get(lm))
        except Exception as err:  # noqa: BLE001 - an adapter that refuses copying: run on the user's, said once
            copied = adapter
            with self._lock:
                first = id(adapter) not in self._uncopyable
                self._uncopyable.add(id(adapter))
            if first:
                logger.warning("Could not copy the configured adapter %s (%s: %s): its LMs (%s) run with DSPy's own "
                               "retries, not under the optimizer's rate-limit and retry policies.",
                               type(adapter).__name__, type(err).__name__, err, ", ".join(held))
        with self._lock:
            hit = self._adapters.get(id(adapter))
            if hit is not None and _still(hit, adapter, lms):
                return hit[1]
            self._adapters[id(adapter)] = (adapter, copied, lms)
        return copied

    def originals(self) -> list[Any]:
        with self._lock:
            return [orig for orig, _ in self._copies.values()]
