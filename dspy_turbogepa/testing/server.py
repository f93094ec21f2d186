"""An OpenAI-compatible LM simulator on 127.0.0.1, for tests and offline benchmarks.

Why an HTTP server when a fake engine exists: benchmarks must pay the real client
costs (DSPy's lm15 engine or litellm, JSON, sockets, retries honouring Retry-After)
and see provider behaviour an optimizer has to cope with: latency, concurrency caps
with a provider-side FIFO queue, requests-per-minute limits, HTTP 429s.

Stdlib only: one asyncio event loop in a background thread serves HTTP/1.1 with
keep-alive, so 64+ concurrent connections cost a coroutine each. Answers come from
:class:`~dspy_turbogepa.testing.responder.Responder` (shared with the fake LMs).

Endpoints: ``POST /v1/chat/completions`` (non-streaming, ``n`` >= 1),
``GET /v1/models``, ``GET /health``, ``GET /stats``, ``POST /stats/reset``.

Use in a test::

    with SimServer(SimConfig.preset("test"), seed=0) as srv:
        lm = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="x", cache=False)
        ...
        srv.stats()["models"]["sim-student"]["ok"]

or as a process: ``python -m dspy_turbogepa.testing.server --port 0 --preset benchmark
--seed 0`` prints ``READY <port>`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from dspy_turbogepa.testing.responder import ModelConfig, Responder, SimConfig, SimLMError, count_prompt_tokens

__all__ = ["SimServer", "main"]

logger = logging.getLogger(__name__)

_MAX_BODY_BYTES = 64 * 1024 * 1024
_MAX_CHOICES = 128  # OpenAI's own limit on n


@dataclass
class _ModelState:
    """Runtime state and counters of one model. Mutated on the event loop thread (and reset by
    :meth:`SimServer.reset_stats` under the server's lock), read by :meth:`SimServer.stats` from any
    thread under that lock."""

    config: ModelConfig
    inflight: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    window: deque[float] = field(default_factory=deque)
    t0: float = field(default_factory=time.monotonic)
    last_change: float = field(default_factory=time.monotonic)
    area: float = 0.0
    #: Time with at least one request in flight: with ``area`` it splits utilisation into "how often
    #: the model had any work" and "how much of the window that work used".
    busy_s: float = 0.0
    requests: int = 0
    ok: int = 0
    http_429: int = 0
    rate_limited_rpm: int = 0
    rate_limited_queue: int = 0
    errors: int = 0
    #: requests refused for a prompt longer than ``ModelConfig.context_window`` (counted in ``errors`` too)
    context_refused: int = 0
    peak_concurrency: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queued_s_total: float = 0.0
    latency_s_total: float = 0.0

    def set_inflight(self, value: int, now: float) -> None:
        self.area += self.inflight * (now - self.last_change)
        if self.inflight > 0:
            self.busy_s += now - self.last_change
        self.last_change = now
        self.inflight = value
        self.peak_concurrency = max(self.peak_concurrency, value)

    def reset(self, now: float) -> None:
        self.t0 = self.last_change = now
        self.area = self.busy_s = 0.0
        self.requests = self.ok = self.http_429 = self.errors = self.context_refused = 0
        self.rate_limited_rpm = self.rate_limited_queue = 0
        self.peak_concurrency = self.inflight
        self.prompt_tokens = self.completion_tokens = 0
        self.queued_s_total = self.latency_s_total = 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        elapsed = now - self.t0
        area = self.area + self.inflight * (now - self.last_change)
        busy = self.busy_s + (now - self.last_change if self.inflight > 0 else 0.0)
        return {
            "role": self.config.role,
            "requests": self.requests,
            "ok": self.ok,
            "http_429": self.http_429,
            "rate_limited_rpm": self.rate_limited_rpm,
            "rate_limited_queue": self.rate_limited_queue,
            "errors": self.errors,
            "context_refused": self.context_refused,
            "inflight": self.inflight,
            "queued": len(self.waiters),
            "peak_concurrency": self.peak_concurrency,
            "mean_concurrency": area / elapsed if elapsed > 0 else 0.0,
            "busy_s": busy,
            "mean_concurrency_while_busy": area / busy if busy > 0 else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queued_s_total": self.queued_s_total,
            "latency_s_total": self.latency_s_total,
            "elapsed_s": elapsed,
        }


class SimServer:
    """The simulator, served from a background thread.

    ``config`` is a :class:`SimConfig`, a dict for :meth:`SimConfig.from_dict`, a preset
    name (``"test"``, ``"benchmark"``, ``"overhead"``) or None (= ``"test"``). ``seed``
    seeds the responder (noise, reflector) and the latency draws. ``start()`` (or
    ``with``) binds the port; ``stop()`` closes every connection and joins the thread,
    so a test can start and stop many servers without leaking threads or ports.
    """

    def __init__(
        self,
        config: SimConfig | Mapping[str, Any] | str | None = None,
        *,
        seed: int = 0,
        port: int = 0,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        time_scale: float | None = None,
    ) -> None:
        if config is None:
            config = SimConfig.preset("test")
        elif isinstance(config, str):
            config = SimConfig.preset(config)
        elif not isinstance(config, SimConfig):
            config = SimConfig.from_dict(config)
        if time_scale is not None:
            config = replace(config, time_scale=time_scale)
        if log_path is not None:
            config = replace(config, log_path=str(log_path))
        self.config: SimConfig = config
        self.seed = seed
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._responder = Responder(config.responder, seed=seed, tasks=config.task_objects())
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._models = {m.name: _ModelState(m) for m in config.models}
        self._unknown_model = 0
        self._bad_requests = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._log: IO[str] | None = None

    # ---- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SimServer:
        """Bind and serve in a daemon thread; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("SimServer already started")
        self._ready.clear()
        self._startup_error = None
        self._loop = self._stop_event = None  # a failed earlier attempt's, if any
        if self.config.log_path:
            self._log = open(self.config.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._thread = threading.Thread(target=self._run, name=f"SimServer:{self._requested_port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("SimServer did not start in time")
        if self._startup_error is not None:
            self._thread.join(timeout)
            self._thread = None  # so start() can be retried (e.g. on another port)
            self._close_log()
            raise RuntimeError(f"SimServer failed to start: {self._startup_error}") from self._startup_error
        logger.info("SimServer listening on %s", self.base_url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and all connections, then join the thread. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have closed already
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():  # the log stays open: the thread may still write to it
            raise RuntimeError("SimServer thread did not stop in time")
        self._thread = None
        self._close_log()
        logger.info("SimServer on port %s stopped", self._port)

    def __enter__(self) -> SimServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SimServer not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (``http://127.0.0.1:PORT/v1``) for ``api_base``."""
        return f"{self.url}/v1"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()
            else:
                logger.exception("SimServer event loop crashed")
        finally:
            # A handler task left pending (one _serve's sweep did not reach, or _serve crashed) was destroyed
            # mid-read by the closed loop, and its cleanup raised "Event loop is closed" (an unraisable
            # exception in the tests using the server). Cancel and wait for what is left, as asyncio.run does.
            leftover = asyncio.all_tasks(loop)
            if leftover:
                for task in leftover:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._handle_connection, self.host, self._requested_port)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            # Stop accepting first, but close the listening socket only once the connections already
            # accepted have their handlers: one accepted after the close has no server to attach to
            # (Python 3.13.0 then leaves its socket open and fails in the transport's __del__), and a
            # handler cancelled before its first step never closes its transport. So: let them start
            # (they register in _conn_tasks), cancel what registered, and again until no other task is
            # left; then close.
            loop = asyncio.get_running_loop()
            for sock in server.sockets:
                with contextlib.suppress(NotImplementedError):  # a proactor loop (Windows): closed below
                    loop.remove_reader(sock.fileno())
            me = asyncio.current_task()
            for _ in range(100):
                await asyncio.sleep(0)
                for task in list(self._conn_tasks):
                    task.cancel()
                if self._conn_tasks:
                    await asyncio.gather(*self._conn_tasks, return_exceptions=True)
                if not any(t is not me for t in asyncio.all_tasks()):
                    break
            server.close()
            await server.wait_closed()

    # ---- stats --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """JSON-able counters: per model requests, ok, 429s, errors, peak and
        time-averaged concurrency, tokens; plus global unknown-model/bad requests."""
        now = time.monotonic()
        with self._lock:
            return {
                "models": {name: st.snapshot(now) for name, st in self._models.items()},
                "unknown_model": self._unknown_model,
                "bad_requests": self._bad_requests,
            }

    def reset_stats(self) -> None:
        """Zero the counters (in-flight requests keep running and are still counted)."""
        now = time.monotonic()
        with self._lock:
            for st in self._models.values():
                st.reset(now)
            self._unknown_model = self._bad_requests = 0

    # ---- HTTP ---------------------------------------------------------------------

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        shutting_down = False
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break  # client closed the keep-alive connection
                except asyncio.LimitOverrunError:
                    await self._write(writer, 431, {"error": {"message": "headers too large"}}, {}, False)
                    break
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    await self._write(writer, 400, {"error": {"message": "bad request line"}}, {}, False)
                    break
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, value = line.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                body = await self._read_body(reader, headers)
                if body is None:
                    await self._write(writer, 400, {"error": {"message": "bad or oversized body"}}, {}, False)
                    break
                connection = headers.get("connection", "").lower()
                keep_alive = connection != "close" if version.upper() == "HTTP/1.1" else connection == "keep-alive"
                status, payload, extra = await self._dispatch(method.upper(), target.split("?", 1)[0], headers, body)
                await self._write(writer, status, payload, extra, keep_alive)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("SimServer connection dropped: %r", exc)
        except asyncio.CancelledError:
            # Only stop() cancels connection tasks. End the task normally: asyncio's
            # start_server callback calls task.exception(), which would log a spurious
            # traceback for every open keep-alive connection of a cancelled task.
            logger.debug("SimServer closing a connection on shutdown")
            shutting_down = True
        finally:
            self._conn_tasks.discard(task)
            if shutting_down:
                # Dropped, not flushed: a client that stopped reading would keep a graceful close (and so
                # stop()) waiting for ever on the responses buffered for it.
                writer.transport.abort()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError):  # peer already gone: nothing to flush
                    await writer.wait_closed()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = await reader.readuntil(b"\r\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    return None  # a 400, not an unhandled error that drops the connection unanswered
                total += size
                if size < 0 or total > _MAX_BODY_BYTES:
                    return None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailer fields, up to the blank line that ends them
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return None
        if length < 0 or length > _MAX_BODY_BYTES:
            return None
        return await reader.readexactly(length) if length else b""

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, status: int, payload: Any, extra: Mapping[str, str], keep_alive: bool
    ) -> None:
        body = json.dumps(payload).encode("utf-8")
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        head += [f"{k}: {v}" for k, v in extra.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _dispatch(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        path = path.rstrip("/") or "/"
        if path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                return 405, {"error": {"message": "use POST"}}, {"Allow": "POST"}
            return await self._chat(headers, body)
        if method == "GET" and path == "/health":
            return 200, {"status": "ok"}, {}
        if method == "GET" and path in ("/v1/models", "/models"):
            data = [
                {"id": m.name, "object": "model", "created": 0, "owned_by": "dspy-turbogepa-sim"}
                for m in self.config.models
            ]
            return 200, {"object": "list", "data": data}, {}
        if method == "GET" and path == "/stats":
            return 200, self.stats(), {}
        if method == "POST" and path == "/stats/reset":
            self.reset_stats()
            return 200, {"status": "ok"}, {}
        return (
            404,
            {
                "error": {
                    "message": f"no route for {method} {path}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            },
            {},
        )

    # ---- chat completions ---------------------------------------------------------

    def _retry_headers(self, seconds: float) -> dict[str, str]:
        seconds = max(seconds, 0.001)
        value = str(max(1, math.ceil(seconds))) if self.config.integer_retry_after else f"{seconds:.3f}"
        return {"Retry-After": value, "retry-after-ms": str(max(1, round(seconds * 1000)))}

    async def _chat(self, headers: Mapping[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        t_wall, t_arrival = time.time(), time.monotonic()
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("body must be a JSON object with a 'messages' list")
            if not all(isinstance(m, dict) for m in body["messages"]):
                raise ValueError("each of 'messages' must be an object with 'role' and 'content'")
            n = 1 if body.get("n") is None else body["n"]
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_CHOICES:
                raise ValueError(f"n must be a whole number from 1 to {_MAX_CHOICES}")
            if body.get("stream"):
                # Answering a stream request with plain JSON makes clients read no content and no error.
                raise ValueError("streaming is not supported by the simulator; send stream=false")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            with self._lock:
                self._bad_requests += 1
            return 400, SimLMError(400, f"invalid request: {exc}", err_type="invalid_request_error").body(), {}
        auth = headers.get("authorization", "")
        presented = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("api-key")
        model_name = str(body.get("model", ""))
        try:
            model = self.config.model(model_name)
            self.config.check_api_key(presented)
        except SimLMError as err:
            with self._lock:
                self._unknown_model += err.status == 404
                self._bad_requests += err.status != 404
            return err.status, err.body(), {}

        st = self._models[model.name]
        with self._lock:
            st.requests += 1
        if model.context_window is not None:
            used = count_prompt_tokens(body["messages"])
            if used > model.context_window:  # refused before admission, as providers validate first
                with self._lock:
                    st.errors += 1
                    st.context_refused += 1
                self._log_line(t_wall, model.name, 400, t_arrival, {"reason": "context_length_exceeded"})
                message = (f"This model's maximum context length is {model.context_window} tokens. However, your "
                           f"messages resulted in {used} tokens. Please reduce the length of the messages.")
                plain = model.context_error == "message"
                return 400, SimLMError(400, message, err_type="BadRequestError" if plain else "invalid_request_error",
                                       code="400" if plain else "context_length_exceeded").body(), {}
        try:
            await self._admit(st, t_arrival)
        except SimLMError as err:
            self._log_line(t_wall, model.name, err.status, t_arrival, {"reason": err.code})
            return err.status, err.body(), self._retry_headers(err.retry_after or 0.0)

        queued_s = time.monotonic() - t_arrival
        inflight_at_start = st.inflight
        status, latency = 500, 0.0
        meta: dict[str, Any] = {}
        try:
            if model.fault_rate and self._rng.random() < model.fault_rate:
                raise SimLMError(
                    500,
                    "The server had an error while processing your request (injected fault).",
                    err_type="server_error",
                    code="injected_fault",
                )
            params = {k: body[k] for k in ("response_format", "temperature", "max_tokens") if k in body}
            completions = [
                self._responder.respond(model.role, body["messages"], params, choice_index=i) for i in range(n)
            ]
            completion_tokens = sum(c.completion_tokens for c in completions)
            prompt_tokens = completions[0].prompt_tokens
            latency = (
                model.median_s * math.exp(model.sigma * self._rng.gauss(0.0, 1.0))
                + model.per_token_s * completion_tokens
            ) * self.config.time_scale
            await asyncio.sleep(latency)
            meta = {"kind": completions[0].kind, **completions[0].meta}
            status = 200
            with self._lock:
                st.ok += 1
                st.prompt_tokens += prompt_tokens
                st.completion_tokens += completion_tokens
                st.queued_s_total += queued_s
                st.latency_s_total += latency
            payload = {
                "id": f"chatcmpl-sim-{self._rng.getrandbits(48):012x}",
                "object": "chat.completion",
                "created": int(t_wall),
                "model": model_name,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                    for i, c in enumerate(completions)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
            return 200, payload, {}
        except SimLMError as err:
            status = err.status
            with self._lock:
                st.errors += 1
            return err.status, err.body(), {}
        except Exception:
            logger.exception("SimServer failed to answer a %s request", model.name)
            with self._lock:
                st.errors += 1
            return 500, SimLMError(500, "simulator internal error", err_type="server_error").body(), {}
        finally:
            self._release(st)
            self._log_line(
                t_wall,
                model.name,
                status,
                t_arrival,
                {
                    "queued_s": round(queued_s, 6),
                    "latency_s": round(latency, 6),
                    "inflight_at_start": inflight_at_start,
                    **meta,
                },
            )

    async def _admit(self, st: _ModelState, t_arrival: float) -> None:
        """Take a concurrency slot (waiting FIFO up to the queue timeout) or raise 429."""
        cfg, scale = st.config, self.config.time_scale
        window = 60.0 * scale
        if cfg.rpm is not None and window > 0:
            while st.window and st.window[0] <= t_arrival - window:
                st.window.popleft()
            if len(st.window) >= cfg.rpm:
                with self._lock:
                    st.http_429 += 1
                    st.rate_limited_rpm += 1
                raise SimLMError(
                    429,
                    f"Rate limit reached for {cfg.name}: {cfg.rpm} requests per minute.",
                    err_type="requests",
                    code="rate_limit_exceeded",
                    retry_after=st.window[0] + window - t_arrival,
                )
            st.window.append(t_arrival)
        cap = cfg.max_concurrency
        if cap is None or (st.inflight < cap and not st.waiters):
            with self._lock:
                st.set_inflight(st.inflight + 1, time.monotonic())
            return
        timeout = cfg.effective_queue_timeout_s * scale
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.waiters.append(waiter)
        try:
            if timeout > 0:
                await asyncio.wait({waiter}, timeout=timeout)
        except asyncio.CancelledError:  # connection torn down while queued
            if waiter.done() and not waiter.cancelled():
                self._release(st)  # the slot was handed over just before the cancellation
            else:
                self._abandon(st, waiter, t_arrival)
            raise
        if waiter.done() and not waiter.cancelled():
            return  # _release handed us its slot; inflight is unchanged
        self._abandon(st, waiter, t_arrival)
        with self._lock:
            st.http_429 += 1
            st.rate_limited_queue += 1
        raise SimLMError(
            429,
            f"Too many concurrent requests for {cfg.name} (limit {cap}); please retry.",
            err_type="requests",
            code="rate_limit_exceeded",
            retry_after=max(cfg.median_s * scale, 0.05 * scale),
        )

    @staticmethod
    def _abandon(st: _ModelState, waiter: asyncio.Future[None], t_arrival: float) -> None:
        """Give up a queued request. It was never served, so it leaves the per-minute window too:
        a provider counts the requests it serves, not the ones it turned away."""
        waiter.cancel()
        with contextlib.suppress(ValueError):  # not queued any more
            st.waiters.remove(waiter)
        with contextlib.suppress(ValueError):  # no RPM cap: never entered the window
            st.window.remove(t_arrival)

    def _release(self, st: _ModelState) -> None:
        """Free a slot: hand it straight to the oldest live waiter (no barging)."""
        while st.waiters:
            waiter = st.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        with self._lock:
            st.set_inflight(st.inflight - 1, time.monotonic())

    def _log_line(self, t_wall: float, model: str, status: int, t_arrival: float, extra: Mapping[str, Any]) -> None:
        if self._log is None:
            return
        record = {
            "t_start": round(t_wall, 6),
            "t_end": round(t_wall + time.monotonic() - t_arrival, 6),
            "model": model,
            "status": status,
            **extra,
        }
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print ``READY <port>`` once listening."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible LM simulator for dspy-turbogepa")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed as READY <port>)")
    parser.add_argument("--config", help="JSON file for SimConfig.from_dict")
    parser.add_argument("--preset", default=None, help="test | benchmark | overhead (default: test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=None)
    parser.add_argument("--log", default=None, help="append one JSON line per request to this file")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.config:
        data = json.loads(Path(args.config).read_text())
        if args.preset:
            data = {"preset": args.preset, **data}
        config = SimConfig.from_dict(data)
    else:
        config = SimConfig.preset(args.preset or "test")
    server = SimServer(
        config, seed=args.seed, port=args.port, host=args.host, log_path=args.log, time_scale=args.time_scale
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    sys.stdout.write(f"READY {server.port}\n")  # the handshake a parent process waits for, on stdout
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
