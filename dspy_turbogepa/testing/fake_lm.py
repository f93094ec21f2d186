"""In-process simulated LMs behind DSPy 3.4's custom-engine API.

``dspy.LM(model, engine=SimEngine(...), async_engine=AsyncSimEngine(...))`` runs the
same :class:`~dspy_turbogepa.testing.responder.Responder` as the HTTP simulator but
without sockets, so unit tests are fast and need no server. DSPy owns retries, caching
and n-fan-out; an engine answers exactly one request per ``complete`` call.

Test hooks: ``before_call(request)`` runs before every sync call (e.g. a
``threading.Event`` gate, or raising ``dspy.lm15.RateLimitError`` to simulate a 429),
``async_before_call(request)`` is awaited before every async call (e.g. an
``asyncio.Event`` gate). Engines can also be subclassed: override ``_respond``.
Counters (``calls``, ``calls_by_kind``, token totals) are thread-safe.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import dspy
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from dspy_turbogepa.testing.responder import Completion, Responder, ResponderConfig, Role
from dspy_turbogepa.testing.tasks import get_task

__all__ = [
    "AsyncSimEngine",
    "SimEngine",
    "make_reflection_lm",
    "make_student_lm",
    "sim_engine",
]

BeforeCall = Callable[[Request], None]
AsyncBeforeCall = Callable[[Request], Awaitable[None] | None]


def request_messages(request: Request) -> list[dict[str, str]]:
    """A canonical lm15 request as OpenAI-style ``{role, content}`` messages."""
    messages: list[dict[str, str]] = []
    if request.system is not None:
        system = (
            request.system
            if isinstance(request.system, str)
            else "".join(getattr(p, "text", "") or "" for p in request.system)
        )
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        text = message.text
        if text is None:  # non-text parts (images, tool calls): keep what text there is
            text = "".join(getattr(p, "text", "") or "" for p in message.parts)
        messages.append({"role": message.role, "content": text})
    return messages


class SimEngine:
    """Synchronous custom engine answering with the simulated ``role``.

    Safe to share between threads: the responder is immutable and the counters are
    guarded by a lock. ``copy.deepcopy`` returns the engine itself, because DSPy may
    deep-copy programs that hold an LM and the counters must stay shared.
    """

    def __init__(
        self,
        role: Role = "student",
        *,
        seed: int = 0,
        config: ResponderConfig | None = None,
        tasks: Sequence[str] | None = None,
        model_name: str | None = None,
        before_call: BeforeCall | None = None,
    ) -> None:
        self.role: Role = role
        self.seed = seed
        self.config = config or ResponderConfig()
        self.task_names = tuple(tasks) if tasks is not None else None
        self.model_name = model_name or f"sim-{role}"
        self.before_call = before_call
        task_objs = [get_task(t) for t in self.task_names] if self.task_names is not None else None
        self.responder = Responder(self.config, seed=seed, tasks=task_objs)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls = 0
        self._by_kind: Counter[str] = Counter()
        self._prompt_tokens = 0
        self._completion_tokens = 0

    # ---- counters -----------------------------------------------------------------

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def calls_by_kind(self) -> dict[str, int]:
        """Calls answered as "student", "reflector" or "fallback" (unrecognised prompt)."""
        with self._lock:
            return dict(self._by_kind)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._calls,
                "by_kind": dict(self._by_kind),
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._calls = 0
            self._by_kind.clear()
            self._prompt_tokens = self._completion_tokens = 0

    # ---- engine protocol ----------------------------------------------------------

    def complete(self, request: Request) -> Response:
        validate_request(request)
        if self.before_call is not None:
            self.before_call(request)
        return self._respond(request)

    def _respond(self, request: Request) -> Response:
        """Compute the answer and count it; subclasses may override."""
        params: dict[str, Any] = {
            "response_format": request.config.response_format,
            "temperature": request.config.temperature,
        }
        completion: Completion = self.responder.respond(self.role, request_messages(request), params)
        with self._lock:
            self._calls += 1
            self._by_kind[completion.kind] += 1
            self._prompt_tokens += completion.prompt_tokens
            self._completion_tokens += completion.completion_tokens
            call_id = f"sim-{self.role}-{next(self._ids)}"
        return Response(
            id=call_id,
            model=self.model_name,
            message=Message.assistant([TextPart(completion.text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        """Nothing to release (no sockets); present for the engine protocol."""

    def __deepcopy__(self, memo: dict[int, Any]) -> SimEngine:
        return self

    # ---- dspy.LM save/load support -----------------------------------------------

    def dump_state(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "seed": self.seed,
            "config": asdict(self.config),
            "tasks": list(self.task_names) if self.task_names is not None else None,
            "model_name": self.model_name,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> SimEngine:
        return cls(
            state["role"],
            seed=state["seed"],
            config=ResponderConfig.from_dict(state["config"]),
            tasks=state.get("tasks"),
            model_name=state.get("model_name"),
        )


class AsyncSimEngine:
    """Async counterpart of :class:`SimEngine`; shares its responder and counters."""

    def __init__(self, sync: SimEngine, *, before_call: AsyncBeforeCall | None = None) -> None:
        self.sync = sync
        self.before_call = before_call

    async def complete(self, request: Request) -> Response:
        validate_request(request)
        if self.before_call is not None:
            result = self.before_call(request)
            if inspect.isawaitable(result):
                await result
        return self.sync._respond(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release; present for the engine protocol."""

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncSimEngine:
        return self

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncSimEngine:
        return cls(SimEngine.load_state(state))


def _make_lm(engine: SimEngine, async_before_call: AsyncBeforeCall | None, lm_kwargs: dict[str, Any]) -> dspy.LM:
    lm_kwargs.setdefault("cache", False)
    return dspy.LM(
        f"sim/{engine.model_name}",
        engine=engine,
        async_engine=AsyncSimEngine(engine, before_call=async_before_call),
        **lm_kwargs,
    )


def make_student_lm(
    task: str | None = None,
    seed: int = 0,
    noise: float | None = 0.0,
    *,
    config: ResponderConfig | None = None,
    before_call: BeforeCall | None = None,
    async_before_call: AsyncBeforeCall | None = None,
    **lm_kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` (cache off) answering as the simulated student.

    ``task`` restricts recognition to one task (None = all). ``noise`` overrides the
    responder config's noise (0.0 = exact answers, None = each task's default).
    Extra keyword arguments go to ``dspy.LM`` (e.g. ``temperature``). The engine is
    ``lm.engine`` (see :func:`sim_engine`) for counters.
    """
    config = config or ResponderConfig()
    if noise != config.noise:
        config = ResponderConfig.from_dict({**asdict(config), "noise": noise})
    engine = SimEngine("student", seed=seed, config=config, tasks=[task] if task else None, before_call=before_call)
    return _make_lm(engine, async_before_call, lm_kwargs)


def make_reflection_lm(
    seed: int = 0,
    *,
    config: ResponderConfig | None = None,
    before_call: BeforeCall | None = None,
    async_before_call: AsyncBeforeCall | None = None,
    **lm_kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` (cache off) answering as the simulated reflector."""
    engine = SimEngine("reflector", seed=seed, config=config, before_call=before_call)
    return _make_lm(engine, async_before_call, lm_kwargs)


def sim_engine(lm: dspy.LM) -> SimEngine:
    """The :class:`SimEngine` behind an LM made by this module (for counters and hooks)."""
    engine = lm.engine
    if not isinstance(engine, SimEngine):
        raise TypeError(f"{lm!r} is not backed by a SimEngine (engine={engine!r})")
    return engine
