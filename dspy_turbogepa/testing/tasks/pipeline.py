"""Task ``pipeline``: room booking in two stages, ``extract(message -> record)`` then
``render(record -> reply)``; 4 + 4 rules.

The metric scores the final reply only, but with ``pred_name`` it explains that stage
alone (extraction: the record it produced; rendering: what it made of the record it
received), and a rule written into the wrong stage's instruction has no effect. This
is what makes per-predictor feedback routing matter. Seed instructions know
``clock`` (extract) and ``av`` (render).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import dspy

from dspy_turbogepa.testing.tasks.base import (
    PredictorSpec,
    RawExample,
    Rule,
    Task,
    get_field,
    quote_output,
)

__all__ = ["AsyncBookingPipeline", "BookingPipeline", "PipelineTask"]

# --------------------------------------------------------------------------------------
# task 2: pipeline (room booking: extract -> render)
# --------------------------------------------------------------------------------------

_P = "pipeline"
_EXTRACT, _RENDER = "extract", "render"
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
_NUMBER_WORDS: Mapping[int, str] = MappingProxyType(
    {
        2: "two",
        3: "three",
        4: "four",
        5: "five",
        6: "six",
        7: "seven",
        8: "eight",
        9: "nine",
        10: "ten",
        11: "eleven",
        12: "twelve",
        14: "fourteen",
        15: "fifteen",
        16: "sixteen",
        18: "eighteen",
        20: "twenty",
    }
)
_WORD_NUMBERS: Mapping[str, int] = MappingProxyType({w: n for n, w in _NUMBER_WORDS.items()})
_RECORD_KEYS = ("day", "start", "minutes", "people", "extras", "note")
_TAGS = (("AV", f"{_P}.av"), ("LARGE", f"{_P}.large"), ("LATE", f"{_P}.late"), ("EXEC", f"{_P}.exec"))
_MSG_RE = re.compile(
    r"book a room on (?P<day>\w+) at (?P<time>noon|\d{1,2}pm|\d{2}:\d{2}) for (?P<dur>\d+) (?P<unit>minutes|hours?) "
    r"for (?P<people>\w+) people",
    re.IGNORECASE,
)
_REPLY_RE = re.compile(r"^BOOKED (\S+) (\S+) for (\S+) min, (\S+) people((?: \[[A-Z-]+\])*)$")

_PIPELINE_RULES = (
    Rule(
        f"{_P}.clock",
        _EXTRACT,
        (
            "write start times on the 24-hour clock",
            "convert am/pm times to 24-hour hh:mm",
            "use 24-hour time for start",
        ),
        "Rubric: start must use the 24-hour HH:MM clock (3pm is 15:00).",
        True,
        0.52,
    ),
    Rule(
        f"{_P}.hours",
        _EXTRACT,
        (
            "convert durations in hours to minutes",
            "minutes must be hours times 60",
            "express hour durations as minutes",
        ),
        "Rubric: minutes must count minutes, so a duration given in hours is multiplied by 60.",
        True,
        0.20,
    ),
    Rule(
        f"{_P}.words",
        _EXTRACT,
        (
            "write spelled-out numbers as digits",
            "people must be a numeral, not a word",
            "convert number words to digits",
        ),
        "Rubric: people must be written with digits.",
        False,
        0.20,
    ),
    Rule(
        f"{_P}.noon",
        _EXTRACT,
        ("noon means 12:00", "treat noon as 12:00", "a start at noon is 12:00"),
        "Rubric: noon is 12:00.",
        False,
        0.06,
    ),
    Rule(
        f"{_P}.av",
        _RENDER,
        (
            "projector bookings get the [av] tag",
            "add [av] when a projector is requested",
            "tag projector requests with [av]",
        ),
        "Rubric: bookings with extras=projector must end with the [AV] tag.",
        True,
        0.35,
    ),
    Rule(
        f"{_P}.large",
        _RENDER,
        (
            "add [large] for 10 or more people",
            "groups of ten or more get the [large] tag",
            "tag bookings with people >= 10 as [large]",
        ),
        "Rubric: a booking for 10 or more people must carry the [LARGE] tag.",
        True,
        0.22,
    ),
    Rule(
        f"{_P}.late",
        _RENDER,
        (
            "add [late] for starts at 17:00 or later",
            "evening bookings from 17:00 get the [late] tag",
            "tag starts from 17:00 onwards with [late]",
        ),
        "Rubric: bookings starting at 17:00 or later carry the [LATE] tag.",
        False,
        0.17,
    ),
    Rule(
        f"{_P}.exec",
        _RENDER,
        ("add [exec] for board meetings", "note=board bookings get the [exec] tag", "tag board meetings with [exec]"),
        "Rubric: board meetings carry the [EXEC] tag.",
        False,
        0.07,
    ),
)


def _parse_record(text: str | None) -> dict[str, str]:
    record: dict[str, str] = {}
    for part in re.split(r"[;\n]", text or ""):
        if "=" in part:
            key, value = part.split("=", 1)
            record[key.strip().lower()] = value.strip()
    return record


def _format_record(record: Mapping[str, str]) -> str:
    return "; ".join(f"{k}={record.get(k, '')}" for k in _RECORD_KEYS)


def _as_int(value: str | None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _render_reply(record: Mapping[str, str], known: Iterable[str]) -> str:
    known = set(known)
    people, start = _as_int(record.get("people")), str(record.get("start", ""))
    hour = _as_int(start.split(":")[0]) if re.fullmatch(r"\d{1,2}:\d{2}", start) else None
    fires = {
        f"{_P}.av": record.get("extras") == "projector",
        f"{_P}.large": people is not None and people >= 10,
        f"{_P}.late": hour is not None and hour >= 17,
        f"{_P}.exec": record.get("note") == "board",
    }
    tags = "".join(f" [{tag}]" for tag, rid in _TAGS if fires[rid] and rid in known)
    return (
        f"BOOKED {record.get('day', '?')} {record.get('start', '?')} for {record.get('minutes', '?')} min, "
        f"{record.get('people', '?')} people{tags}"
    )


def _parse_reply(text: str) -> tuple[tuple[str, ...], frozenset[str]] | None:
    m = _REPLY_RE.match(re.sub(r"\s+", " ", text or "").strip())
    if not m:
        return None
    return m.groups()[:4], frozenset(re.findall(r"\[([A-Z-]+)\]", m.group(5)))


class BookingPipeline(dspy.Module):
    """``extract(message -> record)`` then ``render(record -> reply)``; returns both."""

    def __init__(self, extract_instruction: str, render_instruction: str) -> None:
        super().__init__()
        self.extract = dspy.Predict(dspy.Signature("message -> record", extract_instruction))
        self.render = dspy.Predict(dspy.Signature("record -> reply", render_instruction))

    def forward(self, message: str) -> dspy.Prediction:
        record = self.extract(message=message).record
        reply = self.render(record=record).reply
        return dspy.Prediction(record=record, reply=reply)


class AsyncBookingPipeline(BookingPipeline):
    async def aforward(self, message: str) -> dspy.Prediction:
        record = (await self.extract.acall(message=message)).record
        reply = (await self.render.acall(record=record)).reply
        return dspy.Prediction(record=record, reply=reply)


class PipelineTask(Task):
    """Two-stage room booking. The metric judges the final reply only, but with
    ``pred_name`` set it explains *that* stage: extraction is judged on the record it
    produced, rendering on what it made of the record it actually received."""

    name = _P
    description = "extract(message -> record) -> render(record -> reply); 4 + 4 rules; pred_name-routed feedback"
    predictors = (PredictorSpec(_EXTRACT, ("message",), ("record",)), PredictorSpec(_RENDER, ("record",), ("reply",)))
    rules = _PIPELINE_RULES
    input_fields = ("message",)
    noise = 0.02
    _seed_instructions = (
        (
            _EXTRACT,
            (
                "Turn the room-booking message into a record of the form day=<day>; start=<HH:MM>; "
                "minutes=<n>; people=<n>; extras=<projector|none>; note=<board|none>. "
                "Write start times on the 24-hour clock."
            ),
        ),
        (
            _RENDER,
            (
                "Write a one-line confirmation of the form BOOKED <day> <start> for <minutes> min, "
                "<people> people, followed by any tags. Projector bookings get the [AV] tag."
            ),
        ),
    )

    def make_example(self, rng: random.Random) -> RawExample:
        day = rng.choice(_DAYS)
        u = rng.random()
        if u < 0.06:
            time_text = "noon"
        elif u < 0.58:
            time_text = f"{rng.randint(1, 6)}pm"
        else:
            time_text = f"{rng.randint(8, 16):02d}:{rng.choice(('00', '30'))}"
        if rng.random() < 0.20:
            hours = rng.randint(1, 4)
            duration = f"{hours} hour" + ("s" if hours > 1 else "")
        else:
            duration = f"{rng.choice((30, 45, 60, 90))} minutes"
        people = rng.randint(10, 20) if rng.random() < 0.22 else rng.randint(2, 9)
        in_words = rng.random() < 0.20 and people in _NUMBER_WORDS
        projector, board = rng.random() < 0.35, rng.random() < 0.07
        parts = [
            rng.choice(("Hi,", "Hello,", "Good morning,", "Hey team,")),
            (
                f"could you book a room on {day.capitalize()} at {time_text} for {duration} "
                f"for {_NUMBER_WORDS[people] if in_words else people} people?"
            ),
        ]
        if projector:
            parts.append(rng.choice(("We will need a projector.", "Please make sure there is a projector.")))
        if board:
            parts.append("It is for the board meeting.")
        parts.append(f"Thanks! (ref B-{rng.randint(10000, 99999)})")
        inputs = {"message": " ".join(parts)}
        all_ids = [r.id for r in self.rules]
        record = self.simulate(_EXTRACT, inputs, all_ids)["record"]
        reply = self.simulate(_RENDER, {"record": record}, all_ids)["reply"]
        needed = self._needed(inputs["message"], record)
        return RawExample(inputs, {"record": record, "reply": reply}, needed)

    def _needed(self, message: str, gold_record: str) -> tuple[str, ...]:
        m = _MSG_RE.search(message)
        rec = _parse_record(gold_record)
        out = []
        if m and m.group("time").lower().endswith("pm"):
            out.append(f"{_P}.clock")
        if m and m.group("unit").lower().startswith("hour"):
            out.append(f"{_P}.hours")
        if m and not m.group("people").isdigit():
            out.append(f"{_P}.words")
        if m and m.group("time").lower() == "noon":
            out.append(f"{_P}.noon")
        full = _render_reply(rec, [r.id for r in self.rules])
        parsed = _parse_reply(full)
        tags = parsed[1] if parsed else frozenset()
        out += [rid for tag, rid in _TAGS if tag in tags]
        return tuple(out)

    def simulate(self, predictor: str, inputs: Mapping[str, str], known: Iterable[str]) -> dict[str, str]:
        known = set(known)
        if predictor == _RENDER:
            return {"reply": _render_reply(_parse_record(inputs.get("record")), known)}
        if predictor != _EXTRACT:
            raise KeyError(f"task {self.name!r} has no predictor {predictor!r}")
        message = str(inputs.get("message", ""))
        m = _MSG_RE.search(message)
        if not m:
            return {
                "record": _format_record(
                    {"day": "?", "start": "?", "minutes": "?", "people": "?", "extras": "none", "note": "none"}
                )
            }
        time_text = m.group("time").lower()
        if time_text == "noon":
            start = "12:00" if f"{_P}.noon" in known else "noon"
        elif time_text.endswith("pm"):
            start = f"{int(time_text[:-2]) + 12}:00" if f"{_P}.clock" in known else time_text
        else:
            start = time_text
        minutes = int(m.group("dur"))
        if m.group("unit").lower().startswith("hour") and f"{_P}.hours" in known:
            minutes *= 60
        people = m.group("people").lower()
        if not people.isdigit() and f"{_P}.words" in known:
            people = str(_WORD_NUMBERS.get(people, people))
        low = message.lower()
        return {
            "record": _format_record(
                {
                    "day": m.group("day").lower(),
                    "start": start,
                    "minutes": str(minutes),
                    "people": people,
                    "extras": "projector" if "projector" in low else "none",
                    "note": "board" if "board meeting" in low else "none",
                }
            )
        }

    def corrupt(self, predictor: str, outputs: Mapping[str, str], rng: random.Random) -> dict[str, str]:
        if predictor == _EXTRACT:
            rec = _parse_record(outputs.get("record"))
            key = rng.choice(("day", "minutes", "people"))
            if key == "day":
                rec["day"] = rng.choice([d for d in _DAYS if d != rec.get("day")])
            else:
                rec[key] = str((_as_int(rec.get(key)) or 0) + rng.choice((1, 15)))
            return {"record": _format_record(rec)}
        parsed = _parse_reply(outputs.get("reply", ""))
        if parsed is None:
            return {"reply": str(outputs.get("reply", "")) + " [X]"}
        (day, start, minutes, people), tags = parsed
        tag = rng.choice([t for t, _ in _TAGS])
        tags = tags - {tag} if tag in tags else tags | {tag}
        suffix = "".join(f" [{t}]" for t, _ in _TAGS if t in tags)
        return {"reply": f"BOOKED {day} {start} for {minutes} min, {people} people{suffix}"}

    def infer_rules(self, expected: str, got: str) -> frozenset[str]:
        out: set[str] = set()
        exp_reply, got_reply = _parse_reply(expected), _parse_reply(got)
        if exp_reply is not None:
            (_, e_start, e_min, e_people), e_tags = exp_reply
            (_, g_start, g_min, g_people), g_tags = got_reply or (("", "", "", ""), frozenset())
            out |= self._field_rules(e_start, e_min, e_people, g_start, g_min, g_people)
            out |= {rid for tag, rid in _TAGS if tag in e_tags and tag not in g_tags}
            return frozenset(out)
        exp_rec = _parse_record(expected)
        if not {"day", "start", "minutes", "people"} <= set(exp_rec):
            return frozenset()
        got_rec = _parse_record(got)
        return frozenset(
            self._field_rules(
                exp_rec["start"],
                exp_rec["minutes"],
                exp_rec["people"],
                got_rec.get("start", ""),
                got_rec.get("minutes", ""),
                got_rec.get("people", ""),
            )
        )

    @staticmethod
    def _field_rules(e_start: str, e_min: str, e_people: str, g_start: str, g_min: str, g_people: str) -> set[str]:
        out = set()
        if e_start != g_start:
            if g_start.lower() == "noon":
                out.add(f"{_P}.noon")
            elif g_start.lower().endswith(("am", "pm")):
                out.add(f"{_P}.clock")
        if e_min != g_min and g_min.isdigit() and e_min.isdigit() and int(e_min) == 60 * int(g_min):
            out.add(f"{_P}.hours")
        if e_people != g_people and g_people.isalpha():
            out.add(f"{_P}.words")
        return out

    def _build_program(self, instructions: Mapping[str, str], async_forward: bool) -> dspy.Module:
        cls = AsyncBookingPipeline if async_forward else BookingPipeline
        return cls(instructions[_EXTRACT], instructions[_RENDER])

    def _violations(
        self,
        message: str,
        produced_record: Mapping[str, str],
        reference_record: Mapping[str, str],
        produced_reply: str,
        reference_reply: str,
        stages: set[str],
    ) -> list[str]:
        """Explicit-or-not rules that this output visibly violates, in rule order."""
        m = _MSG_RE.search(message)
        out = []
        if _EXTRACT in stages and m:
            t, unit, people = m.group("time").lower(), m.group("unit").lower(), m.group("people")
            if t.endswith("pm") and produced_record.get("start") != reference_record.get("start"):
                out.append(f"{_P}.clock")
            if unit.startswith("hour") and produced_record.get("minutes") != reference_record.get("minutes"):
                out.append(f"{_P}.hours")
            if not people.isdigit() and produced_record.get("people") != reference_record.get("people"):
                out.append(f"{_P}.words")
            if t == "noon" and produced_record.get("start") != reference_record.get("start"):
                out.append(f"{_P}.noon")
        if _RENDER in stages:
            ref = _parse_reply(reference_reply)
            got = _parse_reply(produced_reply)
            ref_tags = ref[1] if ref else frozenset()
            got_tags = got[1] if got else frozenset()
            out += [rid for tag, rid in _TAGS if tag in ref_tags and tag not in got_tags]
        return out

    def _feedback(self, head: str, violated: Sequence[str], expected: str, got: str) -> str:
        hints = [self.rule(rid).hint for rid in violated if self.rule(rid).explicit]
        return " ".join([head, *hints, f"Expected '{expected}' but got '{got}'."])

    def metric(
        self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        all_ids = [r.id for r in self.rules]
        message = str(gold.message)
        gold_record = self.simulate(_EXTRACT, {"message": message}, all_ids)["record"]
        gold_reply = self.simulate(_RENDER, {"record": gold_record}, all_ids)["reply"]
        got_reply = quote_output(get_field(pred, "reply"))
        score = 1.0 if got_reply == gold_reply else 0.0

        # The trace of this predictor's call if GEPA gave us one, else the program output.
        call_inputs: Any = None
        call_outputs: Any = pred
        if pred_trace:
            _, call_inputs, call_outputs = pred_trace[0]

        if pred_name == _EXTRACT:
            got_record = quote_output(get_field(call_outputs, "record"))
            if _parse_record(got_record) == _parse_record(gold_record):
                return dspy.Prediction(score=score, feedback="Correct: the extracted record is right.")
            violated = self._violations(
                message, _parse_record(got_record), _parse_record(gold_record), "", "", {_EXTRACT}
            )
            return dspy.Prediction(
                score=score,
                feedback=self._feedback("The extracted record is wrong.", violated, gold_record, got_record),
            )

        if pred_name == _RENDER:
            received = get_field(call_inputs, "record") if call_inputs is not None else get_field(pred, "record")
            produced = quote_output(get_field(call_outputs, "reply"))
            expected = _render_reply(_parse_record(received), all_ids)
            if produced == expected:
                return dspy.Prediction(
                    score=score,
                    feedback=(
                        "Correct: the rendering is right for the record it received; "
                        + ("the final reply is right." if score else "any remaining error comes from an earlier stage.")
                    ),
                )
            violated = self._violations(message, {}, {}, produced, expected, {_RENDER})
            return dspy.Prediction(
                score=score,
                feedback=self._feedback("The rendering of the received record is wrong.", violated, expected, produced),
            )

        # No pred_name (plain scoring) or an unknown one: mixed, end-to-end feedback.
        if score:
            return dspy.Prediction(score=1.0, feedback=f"Correct: the reply '{gold_reply}' is right.")
        violated = self._violations(
            message,
            _parse_record(get_field(pred, "record")),
            _parse_record(gold_record),
            got_reply,
            gold_reply,
            {_EXTRACT, _RENDER},
        )
        return dspy.Prediction(
            score=0.0, feedback=self._feedback("The reply is wrong.", violated, gold_reply, got_reply)
        )
