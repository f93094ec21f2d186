"""PNG plots of a run: the best score over time, and the lineage of the candidates.

matplotlib is an optional dependency (``pip install dspy-turbogepa[plots]``); it is imported inside
the functions, so importing this module costs nothing. The figures are bare ``matplotlib.figure.Figure``
objects rendered straight to PNG, never pyplot: a compile in a notebook must not switch the user's
backend or add to pyplot's list of open figures, and pyplot's global state is not thread-safe
(compiles may run in threads). It works on a headless server.

Both functions take the engine's ``list[CandidateRecord]`` (``EngineResult.records``), an
``EngineResult``, or the ``detailed_results`` of a compiled program (``TurboGEPAResult`` /
``DspyGEPAResult``), so a user can plot a finished run::

    plot_best_over_time(optimized.detailed_results, "best.png")
    plot_lineage(optimized.detailed_results, None, "lineage.png")
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["plot_best_over_time", "plot_lineage"]

#: Marker and legend label per proposal kind.
_KIND_STYLE: dict[str, tuple[str, str]] = {
    "seed": ("s", "seed"),
    "reflection": ("o", "reflection (one component)"),
    "reflection_all": ("D", "reflection (all components)"),
    "merge": ("h", "merge"),
}
_KIND_COLOR = {"seed": "#4d4d4d", "reflection": "#1f77b4", "reflection_all": "#2ca02c", "merge": "#9467bd"}
_FRONT_COLOR = "#d62728"
_BEST_COLOR = "#ff7f0e"


@dataclass(frozen=True)
class _Node:
    index: int
    kind: str
    score: float
    parents: tuple[int, ...]
    seconds: float | None
    calls: int | None
    val_scores: Mapping[Any, float] | None = None


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _nodes(run: Any) -> list[_Node]:
    """Normalise records / EngineResult / detailed_results into nodes ordered by index."""
    if hasattr(run, "records") and not isinstance(run, Sequence):
        run = run.records  # EngineResult
    if hasattr(run, "val_aggregate_scores"):  # DspyGEPAResult / TurboGEPAResult
        scores = list(run.val_aggregate_scores)
        n = len(scores)
        kinds = list(getattr(run, "candidate_kinds", None) or [])
        secs = list(getattr(run, "discovery_seconds", None) or [])
        calls = list(getattr(run, "discovery_eval_counts", None) or [])
        parents = list(getattr(run, "parents", None) or [])
        subs = list(getattr(run, "val_subscores", None) or [])
        out = []
        for i in range(n):
            ps = tuple(p for p in (parents[i] if i < len(parents) and parents[i] else []) if p is not None)
            kind = kinds[i] if i < len(kinds) else ("seed" if not ps else "merge" if len(ps) > 1 else "reflection")
            out.append(_Node(i, str(kind), _finite(scores[i]), ps,
                             _finite(secs[i]) if i < len(secs) else None,
                             int(calls[i]) if i < len(calls) and calls[i] is not None else None,
                             subs[i] if i < len(subs) else None))
        return out
    out = []
    for pos, r in enumerate(run):
        cand = getattr(r, "candidate", None)
        kind = getattr(cand, "kind", None) or getattr(r, "kind", None) or "reflection"
        ps = tuple(p for p in (getattr(r, "parent_indices", None) or []) if p is not None)
        out.append(_Node(
            int(getattr(r, "index", pos)), str(kind), _finite(r.aggregate), ps,
            (_finite(getattr(r, "discovery_seconds", None))
             if getattr(r, "discovery_seconds", None) is not None else None),
            int(r.discovery_metric_calls) if getattr(r, "discovery_metric_calls", None) is not None else None,
            getattr(r, "val_scores", None),
        ))
    out.sort(key=lambda n: n.index)
    return out


def _frontier_members(run: Any, nodes: Sequence[_Node], fronts: Any) -> set[int]:
    """Members of GEPA's Pareto frontier (non-dominated per-instance front members)."""
    from dspy_turbogepa.engine.frontier import pareto_front_members

    aggregates = {n.index: n.score for n in nodes}
    if fronts is None:
        fronts = getattr(run, "per_val_instance_best_candidates", None) or getattr(run, "fronts", None)
    if fronts is None:  # compute the per-instance fronts from the records' scores
        best: dict[Any, float] = {}
        fronts = {}
        for node in nodes:
            for vid, s in (node.val_scores or {}).items():
                if vid not in best or s > best[vid] + 1e-9:
                    best[vid], fronts[vid] = s, {node.index}
                elif abs(s - best[vid]) <= 1e-9:
                    fronts[vid].add(node.index)
    if isinstance(fronts, Mapping):
        return pareto_front_members({k: {int(i) for i in v} for k, v in fronts.items()}, aggregates)
    return {int(i) for i in fronts}  # already a set of members


def _load_matplotlib() -> None:
    """matplotlib's first import (about 0.4 s), every part the plots use, with Ctrl-C held."""
    from dspy_turbogepa.tracking.imports import import_in_one_piece

    import_in_one_piece("matplotlib.figure", "matplotlib.backends.backend_agg")  # savefig's PNG writer


def _figure(width: float, height: float) -> Any:
    _load_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _best_index(nodes: Sequence[_Node]) -> int:
    # Highest score, lowest index on ties (the seed wins ties, as in dspy.GEPA).
    return min(nodes, key=lambda n: (-n.score, n.index)).index


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    """Written to a temporary file and renamed, as summary.json is: a full disk or a Ctrl-C leaves the
    previous plot (or none), never a truncated PNG that MLflow would then upload."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": "dspy_turbogepa"})  # Agg, picked by format
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------- best over time
def plot_best_over_time(
    records: Any,
    path: str | Path,
    *,
    total_seconds: float | None = None,
    total_metric_calls: int | None = None,
    budget: int | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Best full-validation score so far vs wall-clock seconds (left) and vs metric calls (right).

    Step lines of the running best, every candidate as a dot (colour = how it was proposed). The
    lines run on to ``total_seconds`` / ``total_metric_calls`` (the end of the run) when given;
    ``budget`` draws the metric-call limit. Returns the path written.
    """
    nodes = _nodes(records)
    if not nodes:
        raise ValueError("no candidates to plot")
    if total_seconds is None and hasattr(records, "wall_seconds"):
        total_seconds = records.wall_seconds
    if total_metric_calls is None and getattr(records, "total_metric_calls", None) is not None:
        total_metric_calls = records.total_metric_calls
    has_time = any(n.seconds is not None for n in nodes)  # a plain dspy.GEPA result has no timings
    fig = _figure(10.5 if has_time else 5.8, 3.9)
    axes = fig.subplots(1, 2 if has_time else 1, sharey=True, squeeze=False)
    axes = list(axes[0])
    calls_ax = axes[-1]
    panels = []
    if has_time:
        secs = [n.seconds if n.seconds is not None else 0.0 for n in nodes]
        minutes = max([*secs, total_seconds or 0.0]) > 600
        scale = 60.0 if minutes else 1.0
        panels.append((axes[0], [s / scale for s in secs], None if total_seconds is None else total_seconds / scale,
                       f"wall-clock {'minutes' if minutes else 'seconds'} since compile start",
                       "vs. wall-clock time"))
    panels.append((calls_ax, [float(n.calls or 0) for n in nodes],
                   None if total_metric_calls is None else float(total_metric_calls),
                   "metric calls", "vs. metric calls"))
    for ax, xs, x_end, xlabel, sub in panels:
        order = sorted(range(len(nodes)), key=lambda i: (xs[i], nodes[i].index))
        bx, by, best = [], [], -math.inf
        improvements = []
        for i in order:
            if nodes[i].score > best + 1e-12:
                best = nodes[i].score
                improvements.append(i)
            bx.append(xs[i])
            by.append(best)
        end = max(bx[-1], x_end if x_end is not None else bx[-1])
        ax.step(bx + [end], by + [by[-1]], where="post", color=_BEST_COLOR, lw=2.2, zorder=2,
                label="best so far")
        for kind, (marker, label) in _KIND_STYLE.items():
            idx = [i for i in range(len(nodes)) if nodes[i].kind == kind]
            if idx:
                ax.scatter([xs[i] for i in idx], [nodes[i].score for i in idx], s=48 if kind == "merge" else 30,
                           marker=marker, color=_KIND_COLOR[kind], alpha=0.75, edgecolors="white",
                           linewidths=0.5, zorder=3, label=label)
        ax.scatter([xs[i] for i in improvements], [nodes[i].score for i in improvements], s=70,
                   facecolors="none", edgecolors=_BEST_COLOR, linewidths=1.6, zorder=4)
        if ax is calls_ax and budget:
            ax.axvline(budget, color="0.45", ls="--", lw=1)
            ax.annotate("budget", (budget, 0.5), xycoords=("data", "axes fraction"), rotation=90,
                        ha="right", va="center", fontsize=8, color="0.35")
        last = improvements[-1]
        ax.annotate(f"{nodes[last].score:.3f}", (xs[last], nodes[last].score), textcoords="offset points",
                    xytext=(4, 6), fontsize=8.5, color="#b35900", fontweight="bold")
        ax.set_xlabel(xlabel)
        ax.set_title(sub, fontsize=10)
        ax.grid(True, alpha=0.3, lw=0.6)
        right = max(end, max(xs), float(budget) if (ax is calls_ax and budget) else 0.0)
        ax.set_xlim(left=min(0.0, min(xs)), right=(right or 1.0) * 1.04)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    lo = min(n.score for n in nodes)
    hi = max(n.score for n in nodes)
    pad = max(0.02, 0.08 * (hi - lo))
    axes[0].set_ylim(lo - pad, hi + pad)
    axes[0].set_ylabel("validation score (full valset)")
    axes[0].legend(loc="lower right", fontsize=8, frameon=False)
    seed = next((n for n in nodes if n.index == 0), nodes[0])
    fig.suptitle(title or f"Best validation score: {seed.score:.3f} (seed) \u2192 {max(n.score for n in nodes):.3f}"
                 f" over {len(nodes)} candidate{'s' if len(nodes) != 1 else ''}", fontsize=11)
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------------------------- lineage
def _primary_parent(node: _Node, gen: Mapping[int, int]) -> int | None:
    """The parent a node hangs under in the tree: the deepest one (one generation up), lowest index on
    ties; a merge's other parent gets a dashed edge."""
    ps = [p for p in node.parents if p in gen and p < node.index]
    return min(ps, key=lambda p: (-gen[p], p)) if ps else None


def _layout(nodes: Sequence[_Node]) -> tuple[dict[int, int], dict[int, float]]:
    """Generation (x) and a tidy-tree row (y): leaves get consecutive rows in depth-first order, a
    parent sits at the mean of its children. A merge hangs under its deepest parent."""
    gen: dict[int, int] = {}
    for n in nodes:
        ps = [p for p in n.parents if p in gen]
        gen[n.index] = 1 + max(gen[p] for p in ps) if ps else 0
    children: dict[int | None, list[int]] = {}
    for n in nodes:
        children.setdefault(_primary_parent(n, gen), []).append(n.index)
    row: dict[int, float] = {}
    next_row = 0.0
    # Post-order walk, iterative (a long chain of improvements must not hit the recursion limit).
    stack: list[tuple[int, bool]] = [(r, False) for r in reversed(children.get(None, []))]
    while stack:
        i, expanded = stack.pop()
        kids = children.get(i, [])
        if not kids:
            row[i] = next_row
            next_row += 1
        elif expanded:
            row[i] = (row[kids[0]] + row[kids[-1]]) / 2
        else:
            stack.append((i, True))
            stack.extend((k, False) for k in reversed(kids))
    return gen, row


def plot_lineage(
    records: Any,
    fronts: Mapping[Any, Iterable[int]] | Iterable[int] | None,
    path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Which proposal produced what: one node per candidate (x = generation, shape = kind, colour =
    validation score, label = index and score), an edge from each parent to its child (dashed for a
    merge's second parent), GEPA's Pareto frontier ringed in red, the best haloed in orange.

    ``fronts``: ``{val_id: {candidate indices}}`` (``EngineResult.fronts``; dominated members are
    dropped as GEPA does before choosing parents), a set of member indices, or None (taken from the
    result, or computed from the records' per-instance scores).
    """
    nodes = _nodes(records)
    if not nodes:
        raise ValueError("no candidates to plot")
    members = _frontier_members(records, nodes, fronts)
    gen, row = _layout(nodes)
    by_index = {n.index: n for n in nodes}
    best_i = _best_index(nodes)
    n_gen = max(gen.values()) + 1
    n_rows = max(row.values()) + 1
    dense = len(nodes) > 30

    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    width = min(15.0, max(7.5, 1.25 * n_gen + 3.0))
    height = min(13.0, max(3.6, 0.42 * n_rows + 1.6))
    fig = _figure(width, height)
    ax = fig.subplots()
    scores = [n.score for n in nodes]
    lo, hi = min(scores), max(scores)
    flat = hi - lo < 1e-9  # one score for all: no colour scale to show
    norm = Normalize(vmin=lo - 0.5, vmax=hi + 0.5) if flat else Normalize(vmin=lo, vmax=hi)
    cmap = colormaps["viridis"]
    size = 260 if not dense else 190

    def xy(i: int) -> tuple[float, float]:
        return float(gen[i]), -row[i]

    # edges first, under the nodes
    for n in nodes:
        primary = _primary_parent(n, gen)
        for p in n.parents:
            if p not in by_index or p >= n.index:
                continue
            secondary = p != primary
            (x0, y0), (x1, y1) = xy(p), xy(n.index)
            ax.annotate(
                "", xy=(x1, y1), xytext=(x0, y0),
                arrowprops={
                    "arrowstyle": "-|>", "mutation_scale": 9, "lw": 1.0 if secondary else 1.1,
                    "color": _KIND_COLOR["merge"] if secondary else "0.55",
                    "ls": (0, (4, 2)) if secondary else "-",
                    "shrinkA": 9, "shrinkB": 9,
                    "connectionstyle": "arc3,rad=0" if y0 == y1 else
                    ("arc3,rad=-0.25" if secondary else "angle,angleA=90,angleB=0,rad=4"),
                },
                zorder=1,
            )
    bx, by = xy(best_i)
    ax.scatter([bx], [by], s=size * 3.2, marker="o", color=_BEST_COLOR, alpha=0.35, linewidths=0, zorder=2)
    for kind, (marker, _) in _KIND_STYLE.items():
        group = [n for n in nodes if n.kind == kind]
        if not group:
            continue
        pts = [xy(n.index) for n in group]
        on_front = [n.index in members for n in group]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=size, marker=marker,
                   c=[cmap(norm(n.score)) for n in group],
                   edgecolors=[_FRONT_COLOR if f else "0.25" for f in on_front],
                   linewidths=[2.6 if f else 0.8 for f in on_front], zorder=3)
    fs = 8 if not dense else 7
    for n in nodes:
        x, y = xy(n.index)
        light = norm(n.score) > 0.6
        ax.text(x, y, str(n.index), ha="center", va="center", fontsize=fs - 0.5,
                color="black" if light else "white", fontweight="bold", zorder=4)
        ax.text(x + 0.17, y + 0.16, f"{n.score:.3f}", ha="left", va="bottom", fontsize=fs,
                color="black" if n.index != best_i else "#b35900",
                fontweight="bold" if n.index == best_i else "normal", zorder=4)
    ax.set_xlim(-0.5, n_gen - 0.3)
    ax.set_ylim(-(n_rows - 1) - 0.7, 0.8)
    ax.set_xticks(range(n_gen))
    ax.set_xlabel("generation (proposals from the seed)")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.grid(True, axis="x", alpha=0.25, lw=0.6)

    kinds_present = [k for k in _KIND_STYLE if any(n.kind == k for n in nodes)]
    handles = [Line2D([], [], marker=_KIND_STYLE[k][0], ls="", color="0.75", markeredgecolor="0.25",
                      markersize=8, label=_KIND_STYLE[k][1]) for k in kinds_present]
    handles.append(Line2D([], [], marker="o", ls="", color="0.9", markeredgecolor=_FRONT_COLOR,
                          markeredgewidth=2.4, markersize=9, label="on the Pareto frontier"))
    handles.append(Line2D([], [], marker="o", ls="", color=_BEST_COLOR, alpha=0.45, markersize=13,
                          markeredgewidth=0, label="best"))
    if any(n.kind == "merge" and len(n.parents) > 1 for n in nodes):
        handles.append(Line2D([], [], color=_KIND_COLOR["merge"], ls=(0, (4, 2)), label="merge: 2nd parent"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False,
               handletextpad=0.3, columnspacing=1.2)
    if not flat:
        from matplotlib.cm import ScalarMappable

        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=min(0.8, 3.0 / height + 0.3),
                            pad=0.01, aspect=25, location="right")
        cbar.set_label("validation score", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    plural = "s" if len(nodes) != 1 else ""
    ax.set_title(title or f"Candidate lineage: {len(nodes)} candidate{plural}, {len(members)} on the Pareto "
                 f"frontier, best #{best_i} = {by_index[best_i].score:.3f}", fontsize=10.5)
    return _save(fig, path, dpi)
