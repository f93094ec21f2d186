"""``log_dir/summary.json``: the outcome of a run, readable by anything (strict JSON, no pickle).

Contents: ``result`` is ``detailed_results.to_dict()`` (candidates as their instruction texts), and on
top of it what one wants at a glance — stop reason, best candidate and its instructions, counts,
timings and budgets. ``extra`` (from the caller: wall-clock timings, budgets, config, ...) is merged
in at the top level, dict into dict, after :func:`dspy_turbogepa.redaction.redact` (credentials
under sensitive keys, or shaped like keys, or equal to a secret environment variable, are masked).
Strings of the result (instructions, outputs) are masked the same way.

Strict JSON: NaN and infinities become null, sets become sorted lists, tuples lists, non-string
keys strings, objects with ``toDict()`` / ``model_dump()`` (DSPy predictions, pydantic) plain dicts,
anything else its ``repr``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dspy_turbogepa.redaction import mask_text, redact

__all__ = ["SUMMARY_FILENAME", "build_summary", "to_strict_json", "write_summary"]

SUMMARY_FILENAME = "summary.json"
SCHEMA = "dspy_turbogepa.summary/1"


def to_strict_json(obj: Any, _depth: int = 0) -> Any:
    """A copy of ``obj`` made only of JSON types, with no NaN or infinity (see the module docstring)."""
    if _depth > 64:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_key(k): to_strict_json(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v, _depth + 1) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_strict_json(v, _depth + 1) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if hasattr(obj, "item") and callable(obj.item) and type(obj).__module__ == "numpy":  # numpy scalar
        return to_strict_json(obj.item(), _depth + 1)
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # numpy array
        return to_strict_json(obj.tolist(), _depth + 1)
    for method in ("toDict", "model_dump"):
        fn = getattr(obj, method, None)
        if callable(fn):
            try:
                return to_strict_json(fn(), _depth + 1)
            except Exception:  # noqa: BLE001 - fall through to repr
                break
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, float) and not math.isfinite(k):
        return str(k)
    if isinstance(k, (bool, int, float)) or k is None:
        return json.dumps(k)
    return str(k)


def _mask_strings(obj: Any) -> Any:
    if isinstance(obj, str):
        return mask_text(obj)
    if isinstance(obj, dict):
        return {mask_text(k): _mask_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_strings(v) for v in obj]
    return obj


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_summary(detailed_results: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary as a JSON-ready dict (what :func:`write_summary` writes)."""
    from dspy_turbogepa.engine.frontier import pareto_front_members

    result = _mask_strings(to_strict_json(detailed_results.to_dict())) if detailed_results is not None else None
    summary: dict[str, Any] = {"schema": SCHEMA, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if detailed_results is not None:
        scores = list(detailed_results.val_aggregate_scores)
        best = detailed_results.best_idx
        seconds = list(getattr(detailed_results, "discovery_seconds", None) or [])
        calls = list(detailed_results.discovery_eval_counts or [])
        kinds = list(getattr(detailed_results, "candidate_kinds", None) or [])
        fronts = detailed_results.per_val_instance_best_candidates or {}
        run_stats = getattr(detailed_results, "run_stats", None) or {}
        by_kind: dict[str, int] = {}
        for k in kinds:
            by_kind[k] = by_kind.get(k, 0) + 1
        summary.update(
            stop_reason=getattr(detailed_results, "stop_reason", None),
            best={
                "index": best,
                "val_score": scores[best],
                "seed_val_score": scores[0] if scores else None,
                "kind": kinds[best] if best < len(kinds) else None,
                "discovered_at_seconds": seconds[best] if best < len(seconds) else None,
                "discovered_at_metric_calls": calls[best] if best < len(calls) else None,
                "instructions": result["candidates"][best] if result and result.get("candidates") else None,
            },
            counts={
                "candidates": len(scores),
                "candidates_by_kind": by_kind,
                "val_size": len(fronts),
                "pareto_frontier": len(pareto_front_members(fronts, dict(enumerate(scores)))),
                "total_metric_calls": detailed_results.total_metric_calls,
                "num_full_val_evals": detailed_results.num_full_val_evals,
                "mutations": dict(run_stats.get("mutations", {})),
                "reflection_calls": run_stats.get("reflection_calls"),
                "cache_hits": run_stats.get("cache_hits"),
                "rate_limit_retries": run_stats.get("rate_limit_retries"),
            },
            timings={
                "best_found_seconds": seconds[best] if best < len(seconds) else None,
                "last_candidate_seconds": max(seconds) if seconds else None,
            },
            budgets={"metric_calls_used": detailed_results.total_metric_calls},
        )
    summary["result"] = result
    if extra:
        summary = _merge(summary, to_strict_json(redact(dict(extra))))
    return to_strict_json(summary)


def write_summary(
    log_dir: str | os.PathLike[str], detailed_results: Any, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``log_dir/summary.json`` atomically (temp file + rename); returns its path.

    ``detailed_results``: a ``TurboGEPAResult`` / ``DspyGEPAResult`` (or None when the run produced
    none). ``extra``: anything worth keeping — ``{"timings": {"wall_seconds": ...}, "budgets":
    {"max_metric_calls": ..., "time_budget_seconds": ...}, "config": {...}}``; redacted.
    """
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    summary = build_summary(detailed_results, extra)
    path = directory / SUMMARY_FILENAME
    # created with the process umask, like the store and the plots beside it (mkstemp would make it 0600)
    tmp = str(directory / f".summary.{os.getpid()}.{threading.get_ident()}.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        # backslashreplace: a lone surrogate (text decoded with surrogateescape) is written as its JSON
        # escape, which every JSON reader loads back as the same character
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            # streamed: with every candidate's texts (long instructions, many predictors) the file can be
            # ~100 MB, and one string of it plus its copy with the newline tripled the run's peak memory
            json.dump(summary, f, indent=2, ensure_ascii=False, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the temporary file may not exist any more
            os.unlink(tmp)
        raise
    return path

