"""Plots of a run: the best score over time, and the lineage of the candidates, as SVG or PNG.

Each plot is laid out once as a :class:`~dspy_turbogepa.tracking.drawing.Drawing` and written by the
file name's suffix: ``.svg`` with no dependency and in milliseconds, each candidate's marker with a
hover tooltip (index, kind, score, parents, when it was found); ``.png`` by matplotlib
(:mod:`dspy_turbogepa.tracking.png`), which drew every plot here before and cost 0.7-1.2 s of CPU at
the end of every compile. Nothing global is touched, so a compile in a notebook or in a thread leaves
the user's matplotlib, if any, alone.

Both functions take the engine's ``list[CandidateRecord]`` (``EngineResult.records``), an
``EngineResult``, or the ``detailed_results`` of a compiled program (``TurboGEPAResult`` /
``DspyGEPAResult``), so a user can plot a finished run::

    plot_best_over_time(optimized.detailed_results, "best.svg")
    plot_lineage(optimized.detailed_results, None, "lineage.svg")
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy_turbogepa.tracking.drawing import Drawing, Scale, nice_ticks, text_width, tick_label, viridis, viridis_stops

__all__ = ["plot_best_over_time", "plot_lineage"]

#: Marker and legend label per proposal kind.
_KIND_STYLE: dict[str, tuple[str, str]] = {
    "seed": ("s", "seed"),
    "reflection": ("o", "reflection (one component)"),
    "reflection_all": ("D", "reflection (all components)"),
    "merge": ("h", "merge"),
}
_KIND_COLOR = {"seed": "#4d4d4d", "reflection": "#1f77b4", "reflection_all": "#2ca02c", "merge": "#9467bd"}
_OTHER_COLOR = "#7f7f7f"
_FRONT_COLOR = "#d62728"
_BEST_COLOR = "#ff7f0e"
_EDGE_COLOR = "#8c8c8c"


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
    if run is None or hasattr(run, "named_predictors"):
        raise TypeError(f"cannot plot {type(run).__name__}: pass the compiled program's detailed_results (compile "
                        "with track_stats=True to get them), an EngineResult or a list of CandidateRecord")
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


def _kind_style(kind: str) -> tuple[str, str, str]:
    """(marker shape, legend label, colour); a kind this module does not know is drawn as a grey dot."""
    if kind in _KIND_STYLE:
        return (*_KIND_STYLE[kind], _KIND_COLOR[kind])
    return "o", f"other ({kind})", _OTHER_COLOR


def _kinds_present(nodes: Sequence[_Node]) -> list[str]:
    """The kinds to put in a legend: the known ones in their usual order, then any others."""
    known = [k for k in _KIND_STYLE if any(n.kind == k for n in nodes)]
    return known + sorted({n.kind for n in nodes} - set(_KIND_STYLE))


def _css_class(kind: str) -> str:
    """A kind as one class name (``"my kind"`` would otherwise be two)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", kind) or "-"


def _best_index(nodes: Sequence[_Node]) -> int:
    # Highest score, lowest index on ties (the seed wins ties, as in dspy.GEPA).
    return min(nodes, key=lambda n: (-n.score, n.index)).index


#: The file types a plot can be written as, by the path's suffix.
PLOT_FORMATS = (".svg", ".png")


def _plot_path(path: str | Path) -> Path:
    """Checked before anything is drawn, so a typo'd name costs nothing."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"path={str(path)!r}: a plot is written as SVG or PNG, by the file name; give a name "
                         "ending in .svg (no dependency) or .png (needs matplotlib: pip install "
                         "'dspy-turbogepa[plots]')")
    return path


def _save(drawing: Drawing, path: Path) -> Path:
    """Written to a temporary file and renamed, as summary.json is: a full disk or a Ctrl-C leaves the
    previous plot (or none), never a truncated file that MLflow would then upload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if path.suffix.lower() == ".png":
            from dspy_turbogepa.tracking.png import write_png

            write_png(drawing, tmp)
        else:
            tmp.write_text(drawing.to_svg(), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _tooltip(node: _Node) -> str:
    found = []
    if node.seconds is not None:
        found.append(f"{node.seconds:.1f} s")
    if node.calls is not None:
        found.append(f"{node.calls} metric calls")
    parents = f", from {', '.join(f'#{p}' for p in node.parents)}" if node.parents else ""
    return (f"#{node.index} {_kind_style(node.kind)[1]}: {node.score:.3f}{parents}"
            + (f" (found after {', '.join(found)})" if found else ""))


_Entry = tuple[str, dict[str, Any], str]  # (swatch: a marker shape or "line", its style, label)


def _entry_width(entry: _Entry, size: float) -> float:
    return (22.0 if entry[0] == "line" else 15.0) + text_width(entry[2], size) + 14.0


def _legend_rows(entries: Sequence[_Entry], max_width: float, size: float = 10.0) -> list[list[_Entry]]:
    """Entries side by side, wrapped onto a new row where the next one would pass ``max_width``."""
    rows: list[list[_Entry]] = [[]]
    used = 0.0
    for entry in entries:
        w = _entry_width(entry, size)
        if rows[-1] and used + w > max_width:
            rows.append([])
            used = 0.0
        rows[-1].append(entry)
        used += w
    return rows


def _draw_legend(drawing: Drawing, x: float, y: float, rows: Sequence[Sequence[_Entry]], size: float = 10.0) -> None:
    """``rows`` from :func:`_legend_rows`, the first on baseline ``y``, each next 16 px below."""
    for k, row in enumerate(rows):
        cx, cy = x, y + 16.0 * k
        for swatch, style, label in row:
            style = dict(style)
            if swatch == "line":
                drawing.line(cx, cy - 3.5, cx + 18, cy - 3.5, **style)
                cx += 22
            else:
                drawing.marker(swatch, cx + 6, cy - 3.5, style.pop("r", 5.0), **style)
                cx += 15
            drawing.text(cx, cy, label, size=size, fill="#333333")
            cx += text_width(label, size) + 14


# ---------------------------------------------------------------------------------------- best over time
def plot_best_over_time(
    records: Any,
    path: str | Path,
    *,
    total_seconds: float | None = None,
    total_metric_calls: int | None = None,
    budget: int | None = None,
    title: str | None = None,
    note: str | None = None,
) -> Path:
    """Best full-validation score so far vs wall-clock seconds (left) and vs metric calls (right).

    Step lines of the running best, every candidate as a dot (colour = how it was proposed). The
    lines run on to ``total_seconds`` / ``total_metric_calls`` (the end of the run) when given;
    ``budget`` draws the metric-call limit. ``note`` is added to the title, in brackets. ``path`` ends
    in ``.svg`` or ``.png`` (matplotlib). Returns the path written.
    """
    path = _plot_path(path)
    nodes = _nodes(records)
    if not nodes:
        raise ValueError("no candidates to plot")
    if total_seconds is None and hasattr(records, "wall_seconds"):
        total_seconds = records.wall_seconds
    if total_metric_calls is None and getattr(records, "total_metric_calls", None) is not None:
        total_metric_calls = records.total_metric_calls
    has_time = any(n.seconds is not None for n in nodes)  # a plain dspy.GEPA result has no timings
    panels: list[tuple[list[float], float | None, str, str, bool]] = []
    if has_time:
        secs = [n.seconds if n.seconds is not None else 0.0 for n in nodes]
        minutes = max([*secs, _finite(total_seconds)]) > 600
        scale = 60.0 if minutes else 1.0
        panels.append(([s / scale for s in secs], None if total_seconds is None else _finite(total_seconds) / scale,
                       f"wall-clock {'minutes' if minutes else 'seconds'} since compile start",
                       "vs. wall-clock time", False))
    panels.append(([float(n.calls or 0) for n in nodes],
                   None if total_metric_calls is None else _finite(total_metric_calls),
                   "metric calls", "vs. metric calls", True))

    lo, hi = min(n.score for n in nodes), max(n.score for n in nodes)
    seed = next((n for n in nodes if n.index == 0), nodes[0])
    plural = "s" if len(nodes) != 1 else ""
    heading = title or (f"Best validation score: {seed.score:.3f} (seed) \u2192 {hi:.3f} "
                        f"over {len(nodes)} candidate{plural}")
    heading = f"{heading} ({note})" if note else heading
    width = max(1050.0 if has_time else 580.0, text_width(heading, 13.5) + 40)  # the title is never cut off
    height = 390.0
    left, right, top, bottom, gap = 66.0, 22.0, 58.0, height - 50.0, 30.0
    panel_w = (width - left - right - gap * (len(panels) - 1)) / len(panels)
    pad = max(0.02, 0.08 * (hi - lo))
    y = Scale(lo - pad, hi + pad, bottom, top)
    y_ticks = nice_ticks(lo - pad, hi + pad, 5)
    drawing = Drawing(width, height)
    drawing.text(width / 2, 22, heading, size=13.5, anchor="middle", fill="#111111")
    for k, (xs, x_end, xlabel, subtitle, is_calls) in enumerate(panels):
        x0 = left + k * (panel_w + gap)
        order = sorted(range(len(nodes)), key=lambda i: (xs[i], nodes[i].index))
        steps: list[tuple[float, float]] = []
        improvements: list[int] = []
        best = -math.inf
        for i in order:
            if nodes[i].score > best + 1e-12:
                best = nodes[i].score
                improvements.append(i)
            steps.append((xs[i], best))
        end = max(steps[-1][0], x_end if x_end is not None else steps[-1][0])
        budget_x = float(budget) if (is_calls and budget) else 0.0
        x_right = (max(end, max(xs), budget_x) or 1.0) * 1.04
        x = Scale(min(0.0, min(xs)), x_right, x0, x0 + panel_w)
        for t in y_ticks:  # grid under everything
            drawing.line(x0, y(t), x0 + panel_w, y(t), stroke="#e6e6e6", stroke_width=0.8)
        x_ticks = nice_ticks(x.d0, x.d1, 6)
        for t in x_ticks:
            drawing.line(x(t), top, x(t), bottom, stroke="#e6e6e6", stroke_width=0.8)
            drawing.text(x(t), bottom + 16, tick_label(t, x_ticks), size=10, anchor="middle", fill="#333333")
        drawing.line(x0, bottom, x0 + panel_w, bottom, stroke="#333333")
        drawing.line(x0, top, x0, bottom, stroke="#333333")
        if k == 0:
            for t in y_ticks:
                drawing.text(x0 - 6, y(t) + 3.5, tick_label(t, y_ticks), size=10, anchor="end", fill="#333333")
            drawing.text(17, (top + bottom) / 2, "validation score (full valset)", size=11, anchor="middle",
                         rotate=-90, fill="#222222")
        drawing.text(x0 + panel_w / 2, 46, subtitle, size=11.5, anchor="middle", fill="#222222")
        drawing.text(x0 + panel_w / 2, height - 12, xlabel, size=11, anchor="middle", fill="#222222")
        if budget_x:
            drawing.line(x(budget_x), top, x(budget_x), bottom, stroke="#737373", stroke_width=1,
                         stroke_dasharray="5 3", cls="budget")
            drawing.text(x(budget_x) - 4, (top + bottom) / 2, "budget", size=9, anchor="middle", rotate=-90,
                         fill="#595959")
        line = [(x(steps[0][0]), y(steps[0][1]))]
        for (px, py), (qx, qy) in zip(steps, steps[1:]):
            line += [(x(qx), y(py)), (x(qx), y(qy))]
        line.append((x(end), y(steps[-1][1])))
        drawing.polyline(line, stroke=_BEST_COLOR, stroke_width=2.2, stroke_linejoin="round", cls="best-line")
        for node, xv in zip(nodes, xs):
            shape, _, color = _kind_style(node.kind)
            drawing.marker(shape, x(xv), y(node.score), 6.5 if node.kind == "merge" else 5.0, fill=color,
                           fill_opacity=0.8, stroke="white", stroke_width=0.6,
                           cls=f"candidate {_css_class(node.kind)}", tooltip=_tooltip(node))
        for i in improvements:
            drawing.circle(x(xs[i]), y(nodes[i].score), 8.0, fill="none", stroke=_BEST_COLOR, stroke_width=1.6,
                           cls="improvement")
        last = improvements[-1]
        label, label_x = f"{nodes[last].score:.3f}", x(xs[last])
        near_right = label_x + 5 + text_width(label, 10) > x0 + panel_w  # ends at the point instead
        drawing.text(label_x - 5 if near_right else label_x + 5, y(nodes[last].score) - 8, label, size=10,
                     anchor="end" if near_right else "start", fill="#b35900", font_weight="bold", cls="best-label")
    # legend, lower right of the first panel
    kinds = _kinds_present(nodes)
    labels = ["best so far", "a new best", *(_kind_style(k)[1] for k in kinds)]
    lx = left + panel_w - 34 - max(text_width(t, 10) for t in labels)
    ly = bottom - 10 - 15 * (len(labels) - 1)
    drawing.rect(lx - 6, ly - 14, panel_w + left - lx, 15 * len(labels) + 6, fill="white", fill_opacity=0.85,
                 cls="legend")  # the points under it show through faintly, the labels stay readable
    drawing.line(lx, ly - 3.5, lx + 18, ly - 3.5, stroke=_BEST_COLOR, stroke_width=2.2)
    drawing.circle(lx + 9, ly + 15 - 3.5, 6.0, fill="none", stroke=_BEST_COLOR, stroke_width=1.6)
    for row, label in enumerate(labels[:2]):
        drawing.text(lx + 24, ly + 15 * row, label, size=10, fill="#333333")
    for row, kind in enumerate(kinds, start=2):
        shape, _, color = _kind_style(kind)
        drawing.marker(shape, lx + 9, ly + 15 * row - 3.5, 5.0, fill=color, stroke="white", stroke_width=0.6)
        drawing.text(lx + 24, ly + 15 * row, labels[row], size=10, fill="#333333")
    return _save(drawing, path)


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
    note: str | None = None,
) -> Path:
    """Which proposal produced what: one node per candidate (x = generation, shape = kind, colour =
    validation score, label = index and score), an edge from each parent to its child (dashed for a
    merge's second parent), GEPA's Pareto frontier ringed in red, the best haloed in orange.

    ``fronts``: ``{val_id: {candidate indices}}`` (``EngineResult.fronts``; dominated members are
    dropped as GEPA does before choosing parents), a set of member indices, or None (taken from the
    result, or computed from the records' per-instance scores). ``note`` is added to the title, in
    brackets. ``path`` ends in ``.svg`` or ``.png``. The
    plot grows with the run (a row per leaf of the tree) instead of squeezing the labels together.
    """
    path = _plot_path(path)
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
    radius, dx, dy = (9.0, 110.0, 30.0) if dense else (11.0, 125.0, 40.0)
    scores = [n.score for n in nodes]
    lo, hi = min(scores), max(scores)
    flat = hi - lo < 1e-9  # one score for all: no colour scale to show

    def shade(score: float) -> float:
        return 0.5 if flat else (score - lo) / (hi - lo)

    entries: list[_Entry] = [
        (_kind_style(k)[0], {"fill": "#bfbfbf", "stroke": "#404040", "stroke_width": 0.8}, _kind_style(k)[1])
        for k in _kinds_present(nodes)
    ]
    entries.append(("o", {"fill": "#e6e6e6", "stroke": _FRONT_COLOR, "stroke_width": 2.4},
                    "on the Pareto frontier"))
    entries.append(("o", {"r": 7.0, "fill": _BEST_COLOR, "fill_opacity": 0.45}, "best"))
    if any(n.kind == "merge" and len(n.parents) > 1 for n in nodes):
        entries.append(("line", {"stroke": _KIND_COLOR["merge"], "stroke_dasharray": "4 2", "stroke_width": 1.1},
                        "merge: 2nd parent"))

    plural = "s" if len(nodes) != 1 else ""
    heading = title or (f"Candidate lineage: {len(nodes)} candidate{plural}, {len(members)} on the Pareto frontier, "
                        f"best #{best_i} = {by_index[best_i].score:.3f}")
    heading = f"{heading} ({note})" if note else heading
    left, top = 48.0, 62.0
    plot_right = left + max((n_gen - 1) * dx + 70, 300.0)  # room for the last generation's score labels
    width = max(620.0, plot_right + (110.0 if not flat else 30.0), text_width(heading, 13) + 40)
    plot_bottom = top + (n_rows - 1) * dy + radius + 14
    bar_h = min(220.0, max(80.0, plot_bottom - top))
    legend = _legend_rows(entries, width - 2 * left)
    legend_y = plot_bottom + 60 if flat else max(plot_bottom + 60, top + bar_h + 30)  # below the colour bar
    height = legend_y - 2 + 16 * len(legend)

    first_row_y = top + radius + 4

    def xy(i: int) -> tuple[float, float]:
        return left + 14 + gen[i] * dx, first_row_y + row[i] * dy

    drawing = Drawing(width, height)
    drawing.text(width / 2, 24, heading, size=13, anchor="middle", fill="#111111")
    for g in range(n_gen):  # generation axis and grid, under everything
        gx = left + 14 + g * dx
        drawing.line(gx, top - 6, gx, plot_bottom, stroke="#ececec", stroke_width=0.8)
        drawing.text(gx, plot_bottom + 16, str(g), size=10, anchor="middle", fill="#333333")
    drawing.line(left, plot_bottom, plot_right, plot_bottom, stroke="#333333")
    drawing.text((left + plot_right) / 2, plot_bottom + 34, "generation (proposals from the seed)", size=11,
                 anchor="middle", fill="#222222")

    gap = radius + 2
    last_row_y = first_row_y + (n_rows - 1) * dy
    for n in nodes:  # edges, under the nodes
        primary = _primary_parent(n, gen)
        for p in n.parents:
            if p not in by_index or p >= n.index:
                continue
            (x0, y0), (x1, y1) = xy(p), xy(n.index)
            if p != primary:  # a merge's other parent: a dashed curve
                length = math.hypot(x1 - x0, y1 - y0) or 1.0
                ux, uy = (x1 - x0) / length, (y1 - y0) / length
                sx, sy, ex, ey = x0 + ux * gap, y0 + uy * gap, x1 - ux * gap, y1 - uy * gap
                cx, cy = (sx + ex) / 2 - uy * 0.25 * length, (sy + ey) / 2 + ux * 0.25 * length
                # a curve bulges half as far as its control point: kept within 20 px above the first row
                # and 8 px below the last, it never crosses the title or the generation axis
                cy = min(max(cy, first_row_y - 40), last_row_y + 16)
                drawing.path([("M", sx, sy), ("Q", cx, cy, ex, ey)], stroke=_KIND_COLOR["merge"], stroke_width=1.1,
                             stroke_dasharray="4 2", arrow=_KIND_COLOR["merge"], cls="edge merge-parent")
            elif abs(y0 - y1) < 1e-6:
                drawing.path([("M", x0 + gap, y0), ("H", x1 - gap)], stroke=_EDGE_COLOR, stroke_width=1.1,
                             arrow=_EDGE_COLOR, cls="edge")
            else:  # down (or up) from the parent, then across into the child
                down = 1.0 if y1 > y0 else -1.0
                drawing.path([("M", x0, y0 + down * gap), ("V", y1), ("H", x1 - gap)], stroke=_EDGE_COLOR,
                             stroke_width=1.1, stroke_linejoin="round", arrow=_EDGE_COLOR, cls="edge")
    bx, by = xy(best_i)
    drawing.circle(bx, by, radius * 1.8, fill=_BEST_COLOR, fill_opacity=0.35, cls="best-halo")
    for n in nodes:
        x, y = xy(n.index)
        on_front = n.index in members
        drawing.marker(_kind_style(n.kind)[0], x, y, radius, fill=viridis(shade(n.score)),
                       stroke=_FRONT_COLOR if on_front else "#404040", stroke_width=2.6 if on_front else 0.8,
                       cls=f"node {_css_class(n.kind)}" + (" front" if on_front else ""), tooltip=_tooltip(n))
        drawing.text(x, y, str(n.index), size=8.5 if dense else 9.5, anchor="middle", dominant_baseline="central",
                 fill="black" if shade(n.score) > 0.6 else "white", font_weight="bold")
        is_best = n.index == best_i
        drawing.text(x + radius + 3, y - radius + 1, f"{n.score:.3f}", size=9 if dense else 10,
                 fill="#b35900" if is_best else "black", font_weight="bold" if is_best else None,
                 cls="score-label")

    _draw_legend(drawing, left, legend_y, legend)
    if not flat:  # the colour bar
        bar_x = plot_right + 28
        drawing.rect(bar_x, top, 12, bar_h, gradient=viridis_stops(), stroke="#404040", stroke_width=0.5,
                     cls="colour-bar")
        bar = Scale(lo, hi, top + bar_h, top)
        ticks = nice_ticks(lo, hi, 4)
        for t in ticks:
            drawing.line(bar_x + 12, bar(t), bar_x + 15, bar(t), stroke="#404040", stroke_width=0.6)
            drawing.text(bar_x + 17, bar(t) + 3, tick_label(t, ticks), size=8.5, fill="#333333")
        drawing.text(bar_x + 62, top + bar_h / 2, "validation score", size=9, anchor="middle", rotate=-90,
                 fill="#333333")
    return _save(drawing, path)
