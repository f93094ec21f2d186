"""Telling rate limits and transient LM failures apart from real failures, and how long to back off.

A rollout that failed because the provider said "429, not now" says nothing about the candidate, so
the evaluator re-runs it instead of scoring it. What DSPy 3.4 raises (checked against dspy 3.4.1 and
litellm 1.106 through the loopback simulator):

- native client (``engine="auto"``/``"lm15"``): ``dspy.utils.exceptions.LMRateLimitError`` from
  ``dspy.lm15.RateLimitError``; Retry-After is parsed into ``retry_after`` (seconds) on both;
- ``engine="litellm"``: the same ``LMRateLimitError``, caused by ``litellm.RateLimitError`` caused by
  ``openai.RateLimitError``; there ``retry_after`` is None and the header is only in
  ``litellm.RateLimitError.litellm_response_headers``, ``OpenAIError.headers`` and
  ``openai.RateLimitError.response.headers``;
- transient (retried a few times, then scored as a program failure): ``LMTimeoutError``,
  ``LMServerError`` (5xx), ``LMTransportError`` (connection reset, ...) and their lm15/litellm/openai
  causes; but one that carries a Retry-After, or a 529, is an overloaded server pacing its clients, and
  is handled as a rate limit;
- systemic (never retried: the engine must stop at once): whatever is in the fatal set, checked first,
  when the LM stack raised it (``LM_STACK_PACKAGES``; a user's own ``NotFoundError`` is not systemic).
  A refused connection is systemic only until the endpoints have answered once; after that the
  evaluator leaves it out of the fatal set and it is retried as transient (a server restarting).
  A refused connection is ``LMTransportError`` <- ``ConnectError`` <- ``ConnectionRefusedError`` on the
  native client and ``LMServerError`` (!) <- ``litellm.InternalServerError`` <-
  ``openai.APIConnectionError`` <- ``ConnectionRefusedError`` on litellm, so it must be recognised by
  its cause, before any transient class is. An OpenAI ``insufficient_quota`` 429 arrives as
  ``LMBillingError`` and is systemic, not a rate limit.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from dspy_turbogepa.redaction import error_attr, exception_chain

RetryKind = Literal["rate_limited", "transient"]

#: Exception class names that mean "rate limited, try again later".
RATE_LIMIT_TYPES = frozenset(
    {
        "LMRateLimitError",  # dspy.utils.exceptions
        "RateLimitError",  # dspy.lm15, litellm, openai, anthropic
        "RouterRateLimitError",  # litellm router
        "TooManyRequests",
        "TooManyRequestsError",
    }
)

#: Exception class names that mean "this configuration cannot work", from litellm, openai and dspy
#: (counted only when the LM stack raised them, see ``fatal_error_name``).
FATAL_ERROR_TYPES = frozenset(
    {
        "AuthenticationError",
        "AuthError",
        "PermissionDeniedError",
        "NotFoundError",
        "UnknownModelError",
        "UnsupportedModelError",
        "MissingCredentialError",
        "BillingError",
        "UnknownProviderError",  # not a class: litellm's BadRequestError for a model string it cannot route
        "ConnectionRefusedError",
        "LMAuthError",
        "LMBillingError",
        "LMUnsupportedModelError",
        "LMNotConfiguredError",
        "LMConfigurationError",
    }
)

#: The fatal set once the endpoint has answered: a refused connection now means a restart, not a
#: wrong api_base, and is retried as transient.
FATAL_ONCE_ANSWERED = FATAL_ERROR_TYPES - {"ConnectionRefusedError"}

#: Top-level packages whose exceptions are the LM stack's. The fatal names are common words: a
#: retrieval step's ``elasticsearch.NotFoundError`` or a user's own ``NotFoundError`` is an ordinary
#: failure of one example, not a reason to stop the run.
LM_STACK_PACKAGES = frozenset(
    {"builtins", "dspy", "litellm", "openai", "anthropic", "httpx", "httpcore", "requests", "urllib3", "aiohttp"}
)

#: Exception class names of transient failures: timeouts, 5xx, dropped connections.
TRANSIENT_TYPES = frozenset(
    {
        "LMTimeoutError",
        "LMServerError",
        "LMTransportError",
        "LMLockTimeoutError",
        # dspy.lm15 / vendored lm15
        "ServerError",
        "TransportError",
        "LockTimeoutError",
        # litellm / openai / httpx
        "Timeout",
        "APITimeoutError",
        "ServiceUnavailableError",
        "InternalServerError",
        "BadGatewayError",
        "ReadTimeout",
        "WriteTimeout",
        "ConnectTimeout",
        "PoolTimeout",
        "RemoteProtocolError",
        "ReadError",
        # builtins (LM timeouts always arrive wrapped as LMTimeoutError, so a bare TimeoutError is the
        # user's own and is not retried)
        "ConnectionResetError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        # only once the endpoint has answered (before that a refused connection is fatal): a server
        # that served a run for an hour and refuses now is restarting, not misconfigured
        "ConnectionRefusedError",
    }
)

#: Exception class names (exact: their subclasses say more) of an answer the LM stack could not use —
#: a gateway's HTML page with status 200, a body that is not the API's shape. Not retried (a malformed
#: answer may be the endpoint's every answer, and retries are paid), but the LM service's failure, not the
#: program's: kept out of reflection, and run again on resume.
SERVICE_ERROR_TYPES = frozenset(
    {
        "LMProviderError",  # dspy: "the provider returned an error response" (no more specific class)
        "LMUnexpectedError",  # dspy: an unexpected failure at the provider boundary
        "LMStreamAssemblyError",
        "APIResponseValidationError",  # openai, litellm: the response did not match the API's schema
    }
)

#: Exception class names of a prompt longer than the model's context window: dspy's public
#: ``ContextWindowExceededError`` (raised by the native client and, from litellm's error of the same name,
#: by ``engine="litellm"``) and ``dspy.lm15.ContextLengthError`` (a custom engine's). Not retryable as it
#: is; only a shorter prompt gets through (see ``proposers/reflection.py``).
CONTEXT_WINDOW_TYPES = frozenset({"ContextWindowExceededError", "ContextLengthError"})


_TRANSIENT_STATUS = frozenset({408, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class Verdict:
    """What to do about a failed rollout's exception."""

    kind: RetryKind | None  # None: not retryable (an ordinary or a systemic failure)
    retry_after: float | None = None
    #: The model named by the LM error, to charge the 429 to the right endpoint (None: unknown).
    model: str | None = None
    error_type: str | None = None
    #: A systemic failure (bad key, unknown model...): never retried, and it stops the run.
    fatal: bool = False
    #: The LM stack could not use the answer (``SERVICE_ERROR_TYPES``): not retried, not the program's fault.
    unusable_answer: bool = False

    @property
    def service_failure(self) -> bool:
        """The LM service failed, not the program: nothing for a reflection to learn, and a resumed run
        runs the rollout again instead of replaying the failure."""
        return self.fatal or self.kind is not None or self.unusable_answer


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        value = error_attr(exc, attr)
        if isinstance(value, str) and value.isdecimal():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        value = float(value)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _header(headers: Any, name: str) -> Any:
    if headers is None:
        return None
    try:
        items = headers.items() if hasattr(headers, "items") else headers
        for key, value in items:
            if str(key).lower() == name:
                return value
    except Exception:  # an exotic headers object: no hint rather than a crash  # noqa: BLE001
        return None
    return None


def _retry_after_from_headers(headers: Any) -> float | None:
    ms = _finite(_header(headers, "retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    raw = _header(headers, "retry-after")
    seconds = _finite(raw)
    if seconds is not None:
        return seconds
    if isinstance(raw, str):
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    return None


def retry_after_of(exc: BaseException) -> float | None:
    """The server's Retry-After hint (seconds), wherever it is in the chain; None when absent."""
    for cur in exception_chain(exc):
        value = _finite(error_attr(cur, "retry_after"))
        if value is not None:
            return value
        for holder in (
            error_attr(cur, "litellm_response_headers"),
            error_attr(cur, "headers"),
            error_attr(error_attr(cur, "response"), "headers"),
        ):
            value = _retry_after_from_headers(holder)
            if value is not None:
                return value
    return None


def fatal_error_name(exc: BaseException, fatal: frozenset[str]) -> str | None:
    """The first systemic error in the chain: a name in ``fatal`` raised by the LM stack."""
    return _first_fatal(exception_chain(exc), fatal)


def _from_lm_stack(exc: BaseException) -> bool:
    return (type(exc).__module__ or "").split(".", 1)[0] in LM_STACK_PACKAGES


#: What litellm raises, before any request, for a model string whose provider it does not know
#: (``"opneai/gpt-4o"``; DSPy hands such a string to litellm): every call will fail the same way.
_UNKNOWN_PROVIDER_MESSAGE = "llm provider not provided"


def _first_fatal(chain: Iterable[BaseException], fatal: frozenset[str]) -> str | None:
    for cur in chain:
        name = type(cur).__name__
        if not _from_lm_stack(cur):
            continue
        if name in fatal:
            return name
        if ("UnknownProviderError" in fatal and name == "BadRequestError"
                and _UNKNOWN_PROVIDER_MESSAGE in str(cur).lower()):
            return "UnknownProviderError"
    return None


#: Invalid-request errors (HTTP 400) that carry no context-window type: an OpenAI-compatible server that
#: does not send OpenAI's ``context_length_exceeded`` code (vLLM answers ``"code": 400``) reaches DSPy's
#: native client as a plain invalid request; its message still says why.
_INVALID_REQUEST_TYPES = frozenset({"LMInvalidRequestError", "InvalidRequestError", "BadRequestError"})
#: Providers' messages as litellm reads them (``ExceptionCheckers.is_error_str_context_window_exceeded`` of
#: the pinned litellm; tests/test_proposers.py keeps the two in step), plus vLLM's, which litellm's list
#: lacks. Copied, not imported: DSPy's native client never loads litellm, and importing it on a
#: reflection's first 400 costs seconds (and, without LITELLM_LOCAL_MODEL_COST_MAP, a download attempt).
_CONTEXT_WINDOW_MESSAGES = (
    "exceed context limit",
    "this model's maximum context length is",
    "string too long. expected a string with maximum length",
    "model's maximum context limit",
    "is longer than the model's context length",
    "input tokens exceed the configured limit",
    "`inputs` tokens + `max_new_tokens` must be",
    "exceeds the available context size",
    "exceeds the maximum number of tokens allowed",
    "is longer than the maximum model length",  # vLLM
)


def _says_context_window(message: str) -> bool:
    low = message.lower()
    if "string_above_max_length" in low or ("invalid 'user'" in low and "string too long" in low):
        return False  # a parameter's own length limit (OpenAI's "user"), not the prompt's
    return (any(m in low for m in _CONTEXT_WINDOW_MESSAGES)
            or ("current length is" in low and "while limit is" in low)  # Cerebras
            or ("maximum input length is" in low and "tokens" in low))


def context_window_exceeded(exc: BaseException) -> bool:
    """Whether the LM stack refused ``exc``'s request as longer than the model's context window."""
    for cur in exception_chain(exc):
        if not _from_lm_stack(cur):
            continue
        name = type(cur).__name__
        if name in CONTEXT_WINDOW_TYPES:
            return True
        if name in _INVALID_REQUEST_TYPES and _says_context_window(str(cur)):
            return True
    return False


def classify(exc: BaseException, fatal: frozenset[str]) -> Verdict:
    """Rate limited, transient, or neither. Anything systemic anywhere in the chain wins: it is
    never retried, whatever else the chain says."""
    chain = list(exception_chain(exc))
    names = [type(c).__name__ for c in chain]
    fatal_name = _first_fatal(chain, fatal)
    if fatal_name is not None:
        return Verdict(None, error_type=fatal_name, fatal=True)
    model = next((m for c in chain if isinstance(m := error_attr(c, "model"), str) and m), None)
    for cur, name in zip(chain, names):
        if name in RATE_LIMIT_TYPES or _status(cur) == 429:
            return Verdict("rate_limited", retry_after_of(exc), model, name)
    for cur, name in zip(chain, names):
        if name in TRANSIENT_TYPES or _status(cur) in _TRANSIENT_STATUS:
            retry_after = retry_after_of(exc)
            if retry_after is not None or any(_status(c) == 529 for c in chain):
                # An overloaded server pacing its clients (a 503 with Retry-After, Anthropic's 529): a 429 in
                # all but the number. Retried alone, each rollout gave up after 3 tries in seconds (every one
                # of a short outage scored failure_score), and a maintenance window's "come back in an hour"
                # was given up at once, ending the search as "no progress" instead of stopping it.
                return Verdict("rate_limited", retry_after, model, name)
            return Verdict("transient", retry_after, model, name)
    unusable = any(name in SERVICE_ERROR_TYPES and _from_lm_stack(cur) for cur, name in zip(chain, names))
    return Verdict(None, error_type=names[0], unusable_answer=unusable)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one rollout may be retried for one kind of failure.

    The delay before retry ``k`` (0-based) is ``max(retry_after, min(cap_s, base_s * 2**k))`` times a
    random factor in ``[1, 1 + jitter]``: at least what the server asked for, exponential when it asked
    nothing (or too little for a repeat offender), jittered so that rollouts rejected together do not
    come back together. A rollout gives up after ``max_retries`` retries, or once ``max_elapsed_s``
    have passed since its first failure of this kind (time queued for a slot in an endpoint's window
    not counted: that is waiting for capacity; an endpoint's cool-down after a 429 counts toward the
    rate-limit policy only), whichever comes first — and at once when the server asks it to wait past
    that (a quota that resets tomorrow): no delay outlasts the policy, so a rollout never holds its
    evaluation slot longer than ``max_elapsed_s`` in backoff.
    """

    max_retries: int
    max_elapsed_s: float
    base_s: float
    cap_s: float
    jitter: float = 0.25

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random,
              elapsed_s: float = 0.0) -> float | None:
        """The wait before retry ``attempt``, at most what is left of ``max_elapsed_s``; None when the
        retry is not worth waiting for (retries used up, time up, or a Retry-After beyond the time left)."""
        if self.exhausted(attempt, elapsed_s) or self.asks_too_long(retry_after, attempt, elapsed_s):
            return None
        exp = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        base = max(retry_after or 0.0, exp)
        return min(base * (1.0 + self.jitter * rng.random()), self.max_elapsed_s - elapsed_s)

    def exhausted(self, retries: int, elapsed_s: float) -> bool:
        return retries >= self.max_retries or elapsed_s >= self.max_elapsed_s

    def outlasted_by(self, retry_after: float | None) -> bool:
        """The server asks for a wait longer than the whole policy (a quota that resets in hours): no
        retry of anything sent there will succeed in this run, whoever sends it."""
        return retry_after is not None and retry_after > self.max_elapsed_s

    def asks_too_long(self, retry_after: float | None, retries: int, elapsed_s: float) -> bool:
        """The server's Retry-After reaches past what is left of the policy, which has not run out."""
        return (retry_after is not None and not self.exhausted(retries, elapsed_s)
                and retry_after > self.max_elapsed_s - elapsed_s)


#: 429s: generous, because they are not the candidate's fault (10 retries or 5 minutes).
RATE_LIMIT_POLICY = RetryPolicy(max_retries=10, max_elapsed_s=300.0, base_s=0.5, cap_s=30.0)
#: Timeouts, 5xx, dropped connections: a few retries (3), then the rollout is a program failure.
TRANSIENT_POLICY = RetryPolicy(max_retries=3, max_elapsed_s=120.0, base_s=1.0, cap_s=30.0)


#: RateLimitStats' counter for each kind of retried failure and event.
_COUNTERS: dict[RetryKind, dict[str, str]] = {
    "rate_limited": {"seen": "rate_limited", "retry": "rate_limit_retries", "gave_up": "rate_limit_gave_up"},
    "transient": {"seen": "transient_errors", "retry": "transient_retries", "gave_up": "transient_gave_up"},
}


class RateLimitStats:
    """Thread-safe counters for ``DspyEvaluator.rate_limit_stats()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rate_limited = 0  # 429s seen (each failed attempt counts once)
        self.rate_limit_retries = 0
        self.rate_limit_gave_up = 0
        self.transient_errors = 0
        self.transient_retries = 0
        self.transient_gave_up = 0
        self.backoff_s = 0.0  # total time rollouts slept before a retry (summed over rollouts)
        self.metric_rate_limit_retries = 0
        self.metric_transient_retries = 0  # an LLM judge's 5xx / timeouts retried inside its evaluation

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def count(self, kind: RetryKind, event: Literal["seen", "retry", "gave_up"], backoff_s: float = 0.0) -> None:
        """One failed attempt (``seen``), retry (after ``backoff_s``) or give-up of a rate limit or a
        transient failure, in that kind's counter."""
        self.add(backoff_s=backoff_s, **{_COUNTERS[kind][event]: 1})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rate_limited": self.rate_limited,
                "rate_limit_retries": self.rate_limit_retries,
                "rate_limit_gave_up": self.rate_limit_gave_up,
                "transient_errors": self.transient_errors,
                "transient_retries": self.transient_retries,
                "transient_gave_up": self.transient_gave_up,
                "metric_rate_limit_retries": self.metric_rate_limit_retries,
                "metric_transient_retries": self.metric_transient_retries,
                "backoff_seconds": round(self.backoff_s, 6),
            }


class RateLimitWaits:
    """The waits now running because a rate limit said "not now", and when each ends.

    Why: a reflection waiting out a Retry-After holds its mutation, and at a width near one the whole
    search, while nothing on the progress line moves; the evaluator's endpoints report their own pause
    (AIMD cooldowns), the reflection LM's retries are per call and had nothing to report."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ends: dict[object, float] = {}

    @contextmanager
    def waiting(self, seconds: float) -> Iterator[None]:
        """Counts as waiting for ``seconds`` from now, until the block ends (early, if the run stops)."""
        token = object()
        with self._lock:
            self._ends[token] = self._clock() + max(0.0, seconds)
        try:
            yield
        finally:
            with self._lock:
                del self._ends[token]

    def remaining(self) -> float:
        """Seconds left of the longest wait running; 0.0 when none is."""
        with self._lock:
            end = max(self._ends.values(), default=None)
        return 0.0 if end is None else max(0.0, end - self._clock())
