"""A :class:`~dspy_turbogepa.tracking.drawing.Drawing` rendered to PNG by matplotlib (the ``plots`` extra).

Only for a plot asked for by a ``.png`` name (``TurboGEPA(plot_format="png")``): the SVG writer
needs no dependency and costs milliseconds; this one costs about a second of CPU for a run of tens
of candidates (most of it importing matplotlib) and several seconds for hundreds, since every shape
is a matplotlib artist. The shapes are laid out already, so this only places them, in pixels, on an
axes that fills a bare ``Figure`` of the drawing's size at 100 dpi; a drawing longer than
``MAX_SIDE_PX`` (the lineage of a long run grows a row per leaf) is rasterised at a lower resolution
instead, so that the file stays a few MB and within matplotlib's size limit. Never pyplot: a compile in a notebook must
not switch the user's backend or add to pyplot's list of open figures, and pyplot's global state is
not thread-safe (compiles may run in threads). It works on a headless server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dspy_turbogepa.tracking.drawing import Drawing, Element

__all__ = ["write_png"]

_DPI = 100.0
MAX_SIDE_PX = 8000.0
_PT = 72.0 / _DPI  # points per pixel: matplotlib sizes lines and fonts in points
_ANCHOR = {"start": "left", "middle": "center", "end": "right"}


def load_matplotlib() -> None:
    """matplotlib's first import (about 0.4-0.7 s), every part used here, with Ctrl-C held: it pulls
    numpy in, whose C core cannot load twice if an import is cut short."""
    from dspy_turbogepa.tracking.imports import import_in_one_piece

    try:
        import_in_one_piece("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.patches",
                            "matplotlib.path", "matplotlib.colors")
    except ImportError as exc:
        raise ImportError(f"a PNG plot needs matplotlib ({exc}): pip install 'dspy-turbogepa[plots]', or name the "
                          "file .svg") from exc


def write_png(drawing: Drawing, path: str | Path) -> None:
    load_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(drawing.width / _DPI, drawing.height / _DPI), dpi=_DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, drawing.width)  # explicit limits turn autoscaling off: the colour bar's image keeps them
    ax.set_ylim(drawing.height, 0)
    ax.axis("off")
    for z, element in enumerate(drawing.elements):
        _draw(ax, element, z)
    scale = min(1.0, MAX_SIDE_PX / max(drawing.width, drawing.height))  # sizes are in inches: all shrink alike
    fig.savefig(path, dpi=_DPI * scale, format="png", facecolor="white", metadata={"Software": "dspy_turbogepa"})


def _stroke(style: dict[str, Any]) -> dict[str, Any]:
    """SVG stroke attributes as matplotlib keyword arguments (dashes scale with the line width there)."""
    width = float(style.get("stroke_width", 1.0)) * _PT
    out: dict[str, Any] = {"linewidth": width if style.get("stroke", "none") != "none" else 0.0}
    dashes = style.get("stroke_dasharray")
    if dashes:
        out["linestyle"] = (0, tuple(float(d) * _PT / max(width, 1e-6) for d in str(dashes).split()))
    if style.get("stroke_linejoin"):
        out["joinstyle"] = style["stroke_linejoin"]
    return out


def _rgba(color: str | None, opacity: Any = None) -> Any:
    from matplotlib.colors import to_rgba

    if color is None or color == "none":
        return "none"
    return to_rgba(color, float(opacity) if opacity is not None else None)


def _draw(ax: Any, e: Element, z: int) -> None:
    from matplotlib import patches
    from matplotlib.path import Path as MplPath

    s, g = e.style, e.geometry
    edge = _rgba(s.get("stroke"))
    if e.kind in ("line", "polyline"):
        xs, ys = ((g[0], g[2]), (g[1], g[3])) if e.kind == "line" else zip(*g)
        ax.plot(xs, ys, color=edge, zorder=z, solid_joinstyle=s.get("stroke_linejoin", "miter"),
                **{k: v for k, v in _stroke(s).items() if k != "joinstyle"})
        return
    if e.kind == "text":
        rotate = s.get("rotate") or 0.0
        ax.text(g[0], g[1], e.text or "", fontsize=float(s.get("font_size", 11.0)) * _PT,
                ha=_ANCHOR.get(s.get("text_anchor", "start"), "left"),
                va="center" if s.get("dominant_baseline") == "central" else "baseline",
                rotation=-float(rotate), rotation_mode="anchor", color=s.get("fill", "black"),
                fontweight=s.get("font_weight", "normal"), zorder=z)
        return
    face = _rgba(s.get("fill", "black"), s.get("fill_opacity"))
    common = {"facecolor": face, "edgecolor": edge, "zorder": z, **_stroke(s)}
    if e.kind == "rect" and s.get("gradient"):
        from matplotlib.colors import LinearSegmentedColormap

        x, y, w, h = g
        cmap = LinearSegmentedColormap.from_list("bar", list(s["gradient"]))
        ax.imshow([[v / 99.0] for v in range(99, -1, -1)], cmap=cmap, extent=(x, x + w, y + h, y), aspect="auto",
                  zorder=z, interpolation="bilinear")
        ax.add_patch(patches.Rectangle((x, y), w, h, **{**common, "facecolor": "none"}))
    elif e.kind == "rect":
        ax.add_patch(patches.Rectangle((g[0], g[1]), g[2], g[3], **common))
    elif e.kind == "circle":
        ax.add_patch(patches.Circle((g[0], g[1]), g[2], **common))
    elif e.kind == "polygon":
        ax.add_patch(patches.Polygon(list(g), closed=True, **common))
    elif e.kind == "path":
        vertices, codes, x, y = [], [], 0.0, 0.0
        prev = (0.0, 0.0)
        for seg in g:
            prev = (x, y)
            if seg[0] == "M":
                x, y = seg[1], seg[2]
                vertices.append((x, y))
                codes.append(MplPath.MOVETO)
            elif seg[0] in ("H", "V"):
                x, y = (seg[1], y) if seg[0] == "H" else (x, seg[1])
                vertices.append((x, y))
                codes.append(MplPath.LINETO)
            elif seg[0] == "Q":
                prev = (seg[1], seg[2])
                x, y = seg[3], seg[4]
                vertices += [prev, (x, y)]
                codes += [MplPath.CURVE3, MplPath.CURVE3]
        ax.add_patch(patches.PathPatch(MplPath(vertices, codes), **{**common, "facecolor": "none"}))
        if s.get("arrow"):  # a filled triangle at the end, pointing along the last segment
            angle = math.atan2(y - prev[1], x - prev[0])
            tip, back, half = (x, y), 7.0, 3.5
            bx, by = x - back * math.cos(angle), y - back * math.sin(angle)
            ax.add_patch(patches.Polygon(
                [tip, (bx - half * math.sin(angle), by + half * math.cos(angle)),
                 (bx + half * math.sin(angle), by - half * math.cos(angle))],
                closed=True, facecolor=_rgba(s["arrow"]), edgecolor="none", zorder=z))
    else:
        raise ValueError(f"unknown element kind {e.kind!r}")
