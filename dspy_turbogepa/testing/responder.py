"""The simulated LMs' brains: pure functions from chat messages to completion text.

Shared by the HTTP simulator (``server.py``) and the in-process fake LMs
(``fake_lm.py``) so both behave identically. Two roles:

* **student** - parses DSPy's ChatAdapter/JSONAdapter prompt (system message with the
  field lists and ``your objective is: <instruction>``, last user message with
  ``[[ ## field ## ]]`` sections), identifies the (task, predictor) from the field
  names, applies the rules the instruction knows (``Task.simulate``) and answers in the
  format DSPy asked for. Optional deterministic noise and a length penalty.
* **reflector** - reads a reflection prompt (dspy 3.4.1's ``InstructionProposer``
  signature call, gepa's ``` template, or anything with a field containing
  "instruction"), collects rubric hints and ``Expected 'X' but got 'Y'`` pairs, and
  writes a new instruction: opening sentence + known rules kept + hinted/inferred rules
  added with some probability + filler.

Randomness is keyed by content (sim seed, instruction/prompt hash, example) and never
by arrival order, so identical requests get identical answers even when an optimizer
issues them concurrently. That is what makes optimizer runs reproducible.

Also here: the configuration objects (``ResponderConfig``, ``ModelConfig``,
``SimConfig`` with presets) and ``SimLMError`` (404 unknown model, 401 bad key,
429 rate limit, 500 injected fault), because server and fake LM share them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from dspy_turbogepa.testing.tasks import (
    TASKS,
    PredictorSpec,
    Rule,
    Task,
    normalize_text,
    stable_hash,
    text_digest,
    unit_random,
    word_count,
)

__all__ = [
    "Completion",
    "ModelConfig",
    "ParsedPrompt",
    "Responder",
    "ResponderConfig",
    "Role",
    "SimConfig",
    "SimLMError",
    "format_outputs",
    "parse_prompt",
]

logger = logging.getLogger(__name__)

Role = Literal["student", "reflector"]
ROLES: tuple[str, ...] = ("student", "reflector")

_FILLERS = (
    "Read the whole input before answering.",
    "Be precise and consistent.",
    "Check which policies apply before you answer.",
    "Use exactly the output format that is asked for.",
    "Do not add commentary to the answer.",
    "Double-check the details in the input.",
    "Keep the answer short.",
    "When several policies apply, apply all of them.",
)
_GENERIC_OPENING = "Solve the task for the given input."
_FIELD_LINE_RE = re.compile(r"^\s*\d+\.\s+`([^`]+)`\s*(?:\((.*?)\))?\s*:", re.MULTILINE)
_SECTION_RE = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_PAIR_RE = re.compile(r"expected '([^'\n]*)' but got '([^'\n]*)'", re.IGNORECASE)
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[])")
_RESPOND_TAIL_RE = re.compile(
    r"\n\s*\n\s*Respond with (?:the corresponding output fields|a JSON object).*\Z", re.DOTALL
)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponderConfig:
    """Behaviour knobs of the simulated student and reflector.

    ``noise``: per-predictor-call probability of a corrupted answer; ``None`` uses each
    task's default (2-3 %, for benchmarks), ``0.0`` makes the student exact (tests).
    ``bloat_words``: instructions longer than this many words make the student forget
    each known rule per example with probability
    ``min(bloat_max_forget, 0.05 + 0.2 * (words - bloat_words) / bloat_words)``, so
    instruction bloat costs accuracy as it does with real models; ``None`` disables it.
    Reflector: keep each known rule with ``p_keep``, add each hinted rule with
    ``p_hint``, add a rule inferable from k expected/got pairs with
    ``1 - (1 - p_infer) ** k``, plus ``fillers`` = (min, max) filler sentences.
    """

    noise: float | None = None
    bloat_words: int | None = 250
    bloat_max_forget: float = 0.5
    p_keep: float = 0.97
    p_hint: float = 0.8
    p_infer: float = 0.3
    fillers: tuple[int, int] = (1, 2)
    reasoning: str = "I checked which of the policies in my instructions apply to this input and applied them."

    def __post_init__(self) -> None:
        for name in ("p_keep", "p_hint", "p_infer", "bloat_max_forget"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ResponderConfig.{name} must be in [0, 1]")
        if self.noise is not None and not 0.0 <= self.noise <= 1.0:
            raise ValueError("ResponderConfig.noise must be None or in [0, 1]")
        lo, hi = self.fillers
        if not 0 <= lo <= hi <= len(_FILLERS):
            raise ValueError(f"ResponderConfig.fillers must satisfy 0 <= min <= max <= {len(_FILLERS)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResponderConfig:
        data = dict(data)
        if "fillers" in data:
            data["fillers"] = tuple(data["fillers"])
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """One simulated model: its role, latency distribution and provider-side caps.

    Latency per request is ``(median_s * exp(sigma * N(0,1)) + per_token_s *
    completion_tokens) * time_scale``. Over ``rpm`` (sliding window of 60 s x
    time_scale) a request gets an immediate 429; over ``max_concurrency`` it waits in a
    FIFO queue up to ``queue_timeout_s`` (default 4 x median; scaled) and then gets a
    429. ``fault_rate`` injects HTTP 500s. ``context_window`` (prompt tokens, counted as the
    responder counts them, ~chars/4) refuses a longer prompt with a 400: OpenAI's body (code
    ``context_length_exceeded``), or with ``context_error="message"`` one whose code is just 400 and
    only the message says why (as vLLM's OpenAI-compatible server answers).
    """

    name: str
    role: Role = "student"
    median_s: float = 0.0
    sigma: float = 0.0
    per_token_s: float = 0.0
    max_concurrency: int | None = None
    rpm: int | None = None
    queue_timeout_s: float | None = None
    fault_rate: float = 0.0
    context_window: int | None = None
    context_error: Literal["openai", "message"] = "openai"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"ModelConfig.role must be one of {ROLES}, got {self.role!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("ModelConfig.max_concurrency must be >= 1 or None")
        if self.rpm is not None and self.rpm < 1:
            raise ValueError("ModelConfig.rpm must be >= 1 or None")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("ModelConfig.fault_rate must be in [0, 1]")
        if self.context_window is not None and self.context_window < 1:
            raise ValueError("ModelConfig.context_window must be >= 1 or None")
        if self.context_error not in ("openai", "message"):
            raise ValueError(f"ModelConfig.context_error must be 'openai' or 'message', got {self.context_error!r}")
        if min(self.median_s, self.sigma, self.per_token_s) < 0:
            raise ValueError("ModelConfig latency parameters must be >= 0")

    @property
    def effective_queue_timeout_s(self) -> float:
        """Unscaled provider-side queue timeout."""
        return self.queue_timeout_s if self.queue_timeout_s is not None else 4.0 * self.median_s


@dataclass(frozen=True)
class SimConfig:
    """Whole-simulator configuration (models, responder, global options).

    ``time_scale`` multiplies every latency, queue timeout and the RPM window, so a
    benchmark can run "the same provider" faster. ``api_key``: if set, requests must
    carry it (``Authorization: Bearer <key>``) or get a 401. ``tasks`` restricts which
    tasks the student recognises (None = all).
    """

    models: tuple[ModelConfig, ...] = ()
    responder: ResponderConfig = field(default_factory=ResponderConfig)
    time_scale: float = 1.0
    api_key: str | None = None
    integer_retry_after: bool = False
    log_path: str | None = None
    tasks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in SimConfig: {names}")
        if self.time_scale < 0:
            raise ValueError("SimConfig.time_scale must be >= 0")
        for t in self.tasks or ():
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r} in SimConfig.tasks; known: {sorted(TASKS)}")

    # ---- lookups ------------------------------------------------------------------

    def model(self, name: str) -> ModelConfig:
        """The model called ``name`` (an ``openai/`` prefix is ignored); 404 otherwise."""
        bare = name.split("/", 1)[1] if name.startswith("openai/") else name
        for m in self.models:
            if m.name == bare:
                return m
        raise SimLMError(
            404,
            f"The model `{name}` does not exist. Available: {[m.name for m in self.models]}",
            err_type="invalid_request_error",
            code="model_not_found",
        )

    def check_api_key(self, presented: str | None) -> None:
        """Raise a 401 ``SimLMError`` unless the required key (if any) was presented."""
        if self.api_key is None:
            return
        if presented != self.api_key:
            raise SimLMError(
                401, "Incorrect API key provided.", err_type="invalid_request_error", code="invalid_api_key"
            )

    def task_objects(self) -> tuple[Task, ...]:
        return tuple(TASKS[t] for t in self.tasks) if self.tasks is not None else tuple(TASKS.values())

    # ---- construction -------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> SimConfig:
        """``"test"``: zero latency, no caps, no noise. ``"benchmark"``: realistic
        latencies (student median 0.15 s, reflector 0.6 s), reflector capped at 8
        concurrent / 300 rpm, each task's default noise. ``"overhead"``: the benchmark
        noise without latency or caps, to measure an optimizer's own cost."""
        if name == "test":
            return cls(
                models=(ModelConfig("sim-student", "student"), ModelConfig("sim-reflector", "reflector")),
                responder=ResponderConfig(noise=0.0),
            )
        if name == "benchmark":
            return cls(
                models=(
                    ModelConfig(
                        "sim-student",
                        "student",
                        median_s=0.15,
                        sigma=0.35,
                        per_token_s=0.002,
                        max_concurrency=64,
                        rpm=6000,
                    ),
                    ModelConfig(
                        "sim-reflector",
                        "reflector",
                        median_s=0.6,
                        sigma=0.3,
                        per_token_s=0.005,
                        max_concurrency=8,
                        rpm=300,
                    ),
                )
            )
        if name == "overhead":
            return cls(models=(ModelConfig("sim-student", "student"), ModelConfig("sim-reflector", "reflector")))
        raise ValueError(f"unknown preset {name!r}; known: test, benchmark, overhead")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimConfig:
        """Inverse of :meth:`to_dict`. ``models`` may be a list of dicts with ``name``
        or a mapping ``name -> dict``; ``"preset"`` starts from a preset."""
        data = dict(data)
        base = cls.preset(data.pop("preset")) if "preset" in data else cls()
        models_raw = data.pop("models", None)
        if models_raw is None:
            models = base.models
        elif isinstance(models_raw, Mapping):
            models = tuple(ModelConfig(name=k, **v) for k, v in models_raw.items())
        else:
            models = tuple(ModelConfig(**m) for m in models_raw)
        responder = base.responder
        if "responder" in data:
            responder = ResponderConfig.from_dict({**asdict(base.responder), **data.pop("responder")})
        if "tasks" in data and data["tasks"] is not None:
            data["tasks"] = tuple(data["tasks"])
        return replace(base, models=models, responder=responder, **data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["models"] = {m.pop("name"): m for m in out["models"]}
        return out

    @classmethod
    def load(cls, path: str | Path) -> SimConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


class SimLMError(Exception):
    """An OpenAI-style API error: HTTP ``status`` plus the error body fields.

    The HTTP server turns it into a JSON error response (with ``Retry-After`` for a 429). The
    in-process fake LM engines do not translate it: raised in one, it reaches DSPy as an
    unexpected error, so a test of rate limits goes through the HTTP server.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str = "api_error",
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": None, "code": self.code}}


# --------------------------------------------------------------------------------------
# prompt parsing and output formatting
# --------------------------------------------------------------------------------------


def message_text(content: Any) -> str:
    """Text of an OpenAI message ``content`` (a string or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return str(content)


@dataclass(frozen=True)
class ParsedPrompt:
    """What the simulator understands of a chat request."""

    full_text: str
    system: str
    last_user: str
    input_fields: tuple[tuple[str, str], ...]
    output_fields: tuple[tuple[str, str], ...]
    instruction: str
    sections: Mapping[str, str]
    wants_json: bool

    @property
    def is_dspy(self) -> bool:
        return bool(self.output_fields)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.input_fields)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.output_fields)


def _parse_field_list(system: str, header: str, stop: str) -> tuple[tuple[str, str], ...]:
    """``(name, type)`` pairs of DSPy's numbered field list after ``header``."""
    start = system.find(header)
    if start < 0:
        return ()
    block = system[start + len(header) :]
    # Up to the next section; without it, the list ends at the first blank line.
    block = block[: block.index(stop)] if stop in block else block.split("\n\n", 1)[0]
    return tuple((m.group(1), (m.group(2) or "").strip()) for m in _FIELD_LINE_RE.finditer(block))


def parse_sections(text: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` sections of a DSPy message, without DSPy's trailing request."""
    parts = _SECTION_RE.split(text)
    sections: dict[str, str] = {}
    for i in range(1, len(parts) - 1, 2):
        value = _RESPOND_TAIL_RE.sub("", parts[i + 1])
        sections[parts[i]] = value.strip("\n")
    return sections


def parse_prompt(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None) -> ParsedPrompt:
    """Parse chat messages as sent by DSPy (or anything else, best effort)."""
    params = params or {}
    texts = [(str(m.get("role", "")), message_text(m.get("content"))) for m in messages]
    system = "\n\n".join(t for r, t in texts if r in ("system", "developer"))
    last_user = next((t for r, t in reversed(texts) if r == "user"), "")
    full_text = "\n\n".join(f"{r}: {t}" for r, t in texts)
    inputs = _parse_field_list(system, "Your input fields are:", "Your output fields are:")
    outputs = _parse_field_list(system, "Your output fields are:", "All interactions will be structured")
    instruction = ""
    marker = "your objective is:"
    idx = system.find(marker)
    if idx >= 0:
        instruction = textwrap.dedent(system[idx + len(marker) :].lstrip(" ").lstrip("\n")).strip()
    elif system and not outputs:
        instruction = system.strip()
    response_format = params.get("response_format")
    wants_json = (
        bool(response_format) or "Outputs will be a JSON object" in system or "Respond with a JSON object" in last_user
    )
    return ParsedPrompt(
        full_text, system, last_user, inputs, outputs, instruction, parse_sections(last_user), wants_json
    )


def _json_value(value: str, type_name: str) -> Any:
    """Numbers go out as JSON numbers for numeric fields, so typed parsing is exercised."""
    if type_name in ("int", "float"):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if type_name == "int" and number.is_integer() else number
    return value


def format_outputs(values: Mapping[str, str], output_fields: Sequence[tuple[str, str]], as_json: bool) -> str:
    """Answer in DSPy's ChatAdapter format, or as the JSON object JSONAdapter expects."""
    if as_json:
        return json.dumps({name: _json_value(values.get(name, ""), type_name) for name, type_name in output_fields})
    body = "".join(f"[[ ## {name} ## ]]\n{values.get(name, '')}\n\n" for name, _ in output_fields)
    return body + "[[ ## completed ## ]]"


# --------------------------------------------------------------------------------------
# responder
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One generated answer: text, usage (~chars/4) and diagnostics for logs/stats."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    kind: str
    meta: Mapping[str, Any] = field(default_factory=dict)


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """A request's prompt tokens as the responder counts them (its usage and ``context_window``)."""
    return _tokens(sum(len(message_text(m.get("content"))) for m in messages))


class Responder:
    """Immutable dispatcher: ``respond(role, messages, params) -> Completion``.

    Thread-safe and lock-free (no mutable state), so the server's event loop and any
    number of fake-LM threads can share one instance.
    """

    def __init__(
        self, config: ResponderConfig | None = None, *, seed: int = 0, tasks: Iterable[Task] | None = None
    ) -> None:
        self.config = config or ResponderConfig()
        self.seed = seed
        self.tasks: tuple[Task, ...] = tuple(tasks) if tasks is not None else tuple(TASKS.values())
        self.rules: tuple[Rule, ...] = tuple(r for t in self.tasks for r in t.rules)
        index: dict[tuple[frozenset[str], frozenset[str]], tuple[Task, PredictorSpec]] = {}
        for task in self.tasks:
            for spec in task.predictors:
                index[(frozenset(spec.inputs), frozenset(spec.outputs))] = (task, spec)
        self._index = index

    # ---- dispatch -----------------------------------------------------------------

    def identify(self, prompt: ParsedPrompt) -> tuple[Task, PredictorSpec] | None:
        """The (task, predictor) whose field names the prompt uses, if any."""
        if not prompt.is_dspy:
            return None
        outputs = frozenset(n for n in prompt.output_names if n != "reasoning")
        return self._index.get((frozenset(prompt.input_names), outputs))

    @staticmethod
    def looks_like_reflection(prompt: ParsedPrompt) -> bool:
        if prompt.is_dspy:
            return any("instruction" in n.lower() for n in prompt.input_names) and any(
                "instruction" in n.lower() for n in prompt.output_names
            )
        return bool(_FENCE_RE.search(prompt.full_text)) and "instruction" in prompt.full_text.lower()

    def respond(
        self,
        role: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any] | None = None,
        *,
        choice_index: int = 0,
    ) -> Completion:
        """Answer one chat request as ``role`` ("student" or "reflector").

        A student that receives a reflection prompt (e.g. a custom proposer running on
        the task LM) reflects, and a reflector that receives a task prompt answers it,
        so misrouted calls still get sensible answers.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        prompt = parse_prompt(messages, params)
        target = self.identify(prompt)
        if role == "student":
            if target is not None:
                text, meta = self._student(prompt, *target, choice_index)
                kind = "student"
            elif self.looks_like_reflection(prompt):
                text, meta = self._reflect(prompt, choice_index)
                kind = "reflector"
            else:
                text, meta = self._fallback(prompt)
                kind = "fallback"
        elif self.looks_like_reflection(prompt) or target is None:
            text, meta = self._reflect(prompt, choice_index)
            kind = "reflector"
        else:
            text, meta = self._student(prompt, *target, choice_index)
            kind = "student"
        return Completion(text, count_prompt_tokens(messages), _tokens(len(text)), kind, meta)

    # ---- student ------------------------------------------------------------------

    def _forget_probability(self, instruction: str) -> float:
        limit = self.config.bloat_words
        words = word_count(instruction)
        if limit is None or words <= limit:
            return 0.0
        return min(self.config.bloat_max_forget, 0.05 + 0.2 * (words - limit) / limit)

    def _student(
        self, prompt: ParsedPrompt, task: Task, spec: PredictorSpec, choice_index: int
    ) -> tuple[str, dict[str, Any]]:
        instruction = prompt.instruction
        instr_key = text_digest(normalize_text(instruction))
        inputs = {name: prompt.sections.get(name, "") for name in spec.inputs}
        example_key = text_digest("\x1f".join(inputs[n] for n in spec.inputs))
        known = task.known_rules(instruction, spec.name)
        forget = self._forget_probability(instruction)
        applied = {
            rid
            for rid in known
            if forget == 0.0 or unit_random("bloat", self.seed, instr_key, example_key, rid) >= forget
        }
        outputs = task.simulate(spec.name, inputs, applied)
        noise = task.noise if self.config.noise is None else self.config.noise
        rng = random.Random(stable_hash("noise", self.seed, instr_key, spec.name, example_key, choice_index))
        corrupted = rng.random() < noise
        if corrupted:
            outputs = task.corrupt(spec.name, outputs, rng)
        values = dict(outputs)
        if "reasoning" in prompt.output_names:
            values["reasoning"] = self.config.reasoning
        text = format_outputs(values, prompt.output_fields, prompt.wants_json)
        meta = {
            "task": task.name,
            "predictor": spec.name,
            "instr_hash": instr_key,
            "example": example_key,
            "n_known": len(known),
            "n_applied": len(applied),
            "noise": corrupted,
        }
        return text, meta

    def _fallback(self, prompt: ParsedPrompt) -> tuple[str, dict[str, Any]]:
        logger.debug("simulator: unrecognised prompt (inputs=%s, outputs=%s)", prompt.input_names, prompt.output_names)
        if prompt.is_dspy:
            values = {n: (self.config.reasoning if n == "reasoning" else "N/A") for n in prompt.output_names}
            return format_outputs(values, prompt.output_fields, prompt.wants_json), {"unrecognised": True}
        return "I cannot help with that request.", {"unrecognised": True}

    # ---- reflector ----------------------------------------------------------------

    @staticmethod
    def current_instruction(prompt: ParsedPrompt) -> str:
        """The instruction being improved: a DSPy input field named like
        ``*instruction*`` (``current_instruction`` preferred), else the first ``` block."""
        if prompt.is_dspy:
            names = [n for n in prompt.input_names if "instruction" in n.lower()]
            if "current_instruction" in names:
                names.insert(0, "current_instruction")
            for name in names:
                if name in prompt.sections:
                    return prompt.sections[name].strip()
        match = _FENCE_RE.search(prompt.full_text)
        return match.group(1).strip() if match else ""

    def _reflect(self, prompt: ParsedPrompt, choice_index: int) -> tuple[str, dict[str, Any]]:
        cfg = self.config
        current = self.current_instruction(prompt)
        prompt_key = text_digest(prompt.full_text)
        rng = random.Random(stable_hash("reflect", self.seed, prompt_key, choice_index))
        # DSPy serialises examples_with_feedback as JSON: undo the escapes we could meet.
        scan = prompt.full_text.replace("\\n", " ").replace('\\"', '"')
        scan_norm = normalize_text(scan)
        known = {r.id for r in self.rules if r.known_by(normalize_text(current))}
        hinted = {r.id for r in self.rules if r.explicit and normalize_text(r.hint) in scan_norm}
        inferred: Counter[str] = Counter()
        for expected, got in sorted(set(_PAIR_RE.findall(scan))):
            for task in self.tasks:
                inferred.update(task.infer_rules(expected, got))
        chosen: list[Rule] = []
        for rule in self.rules:  # fixed order: the RNG stream depends on the prompt only
            draw = rng.random()
            if rule.id in known:
                take = draw < cfg.p_keep
            elif rule.id in hinted:
                take = draw < cfg.p_hint
            else:
                take = draw < 1.0 - (1.0 - cfg.p_infer) ** inferred[rule.id]
            if take:
                chosen.append(rule)

        sentences = _SENTENCE_SPLIT_RE.split(current.strip()) if current.strip() else []
        opening = sentences[0].strip() if sentences else _GENERIC_OPENING
        opening_norm = normalize_text(opening)
        body = [r for r in chosen if not r.known_by(opening_norm)]
        rng.shuffle(body)
        parts = [opening] + [rule.sentence(rng.randrange(len(rule.phrases))) for rule in body]
        lo, hi = cfg.fillers
        for filler in rng.sample(_FILLERS, rng.randint(lo, hi)):
            parts.insert(rng.randint(1, len(parts)), filler)
        new_instruction = " ".join(parts)

        meta = {
            "instr_hash": text_digest(normalize_text(current)),
            "new_hash": text_digest(normalize_text(new_instruction)),
            "n_known": len(known),
            "n_hinted": len(hinted),
            "n_inferred": len(inferred),
            "added": sorted({r.id for r in chosen} - known),
            "dropped": sorted(known - {r.id for r in chosen}),
        }
        if prompt.is_dspy:
            values = {}
            for name in prompt.output_names:
                if "instruction" in name.lower():
                    values[name] = new_instruction
                elif name == "reasoning":
                    values[name] = "The feedback points to policies the current instruction does not state."
                else:
                    values[name] = "N/A"
            return format_outputs(values, prompt.output_fields, prompt.wants_json), meta
        return f"Here is the improved instruction:\n```\n{new_instruction}\n```", meta
