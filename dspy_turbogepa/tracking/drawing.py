"""A drawing of a run's plot as data (shapes and text in pixels), written out as SVG or PNG.

Why a drawing of our own: matplotlib's first import and two figures cost 0.7-1.2 s of CPU at the end
of every compile with a ``log_dir`` — more than the whole search's own overhead on an 800-call run —
and pulled in numpy when nothing had. Two plots of a few hundred shapes need none of that: the layout
is done once here, in milliseconds; :meth:`Drawing.to_svg` writes it with no dependency, and
``tracking.png`` hands the same shapes to matplotlib for a PNG when one is asked for. SVG stays sharp
at any zoom and carries a hover tooltip per candidate; browsers, notebooks (``IPython.display.SVG``),
GitHub and MLflow's artifact viewer show it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = ["Drawing", "Element", "Scale", "nice_ticks", "text_width", "tick_label", "viridis", "viridis_stops"]

#: matplotlib's viridis at nine evenly spaced points; interpolated linearly in RGB in between.
_VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")

#: Average advance of a sans-serif glyph in units of the font size, for laying out legends.
CHAR_WIDTH = 0.55

FONT_FAMILY = "DejaVu Sans, Helvetica, Arial, sans-serif"

#: Characters XML 1.0 forbids even escaped (control characters, lone surrogates, U+FFFE/U+FFFF): a
#: candidate kind or a title holding one would make the whole file unreadable.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

#: One path segment: ("M", x, y) move, ("V", y) / ("H", x) vertical / horizontal line, ("Q", cx, cy, x, y)
#: quadratic curve.
Segment = tuple[Any, ...]


@dataclass(frozen=True)
class Element:
    """One shape. ``geometry`` by ``kind``: line (x1, y1, x2, y2); polyline and polygon (points...);
    path (segments...); rect (x, y, w, h); circle (x, y, r); text (x, y). ``style`` holds SVG presentation
    attributes with ``_`` for ``-`` (``stroke_width``), plus ``arrow`` (colour of an arrowhead at a
    path's end), ``gradient`` (a rect's vertical colour stops, bottom to top) and ``cls`` (the SVG class)."""

    kind: str
    geometry: tuple[Any, ...]
    style: dict[str, Any]
    text: str | None = None
    tooltip: str | None = None


def _num(v: float) -> str:
    """Coordinates to 0.1 px: enough for the eye, and a 5,000-call run's plot stays small."""
    text = f"{v:.1f}"
    if text == "-0.0":
        return "0"
    return text[:-2] if text.endswith(".0") else text


def text_width(text: str, size: float) -> float:
    return len(text) * size * CHAR_WIDTH


@dataclass
class Drawing:
    """Shapes in drawing order (later ones on top) on a ``width`` x ``height`` pixel canvas, y down."""

    width: float
    height: float
    elements: list[Element] = field(default_factory=list)

    def _add(self, kind: str, geometry: Iterable[Any], style: dict[str, Any], text: str | None = None,
             tooltip: str | None = None) -> None:
        self.elements.append(Element(kind, tuple(geometry), {k: v for k, v in style.items() if v is not None},
                                     text, tooltip))

    def line(self, x1: float, y1: float, x2: float, y2: float, **style: Any) -> None:
        self._add("line", (x1, y1, x2, y2), style)

    def polyline(self, points: Iterable[tuple[float, float]], **style: Any) -> None:
        self._add("polyline", points, style)

    def path(self, segments: Sequence[Segment], **style: Any) -> None:
        self._add("path", segments, style)

    def rect(self, x: float, y: float, w: float, h: float, **style: Any) -> None:
        self._add("rect", (x, y, w, h), style)

    def circle(self, x: float, y: float, r: float, *, tooltip: str | None = None, **style: Any) -> None:
        self._add("circle", (x, y, r), style, tooltip=tooltip)

    def marker(self, shape: str, x: float, y: float, r: float, *, tooltip: str | None = None, **style: Any) -> None:
        """A scatter marker of about radius ``r``: ``o`` circle, ``s`` square, ``D`` diamond, ``h`` hexagon."""
        if shape == "o":
            self.circle(x, y, r, tooltip=tooltip, **style)
            return
        corners: list[tuple[float, float]]
        if shape == "s":
            corners, scale = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)], r * 0.86
        elif shape == "D":
            corners, scale = [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)], r * 1.15
        elif shape == "h":
            corners = [(math.cos(math.pi / 6 + k * math.pi / 3), math.sin(math.pi / 6 + k * math.pi / 3))
                       for k in range(6)]
            scale = r * 1.05
        else:
            raise ValueError(f"unknown marker shape {shape!r}")
        self._add("polygon", [(x + cx * scale, y + cy * scale) for cx, cy in corners], style, tooltip=tooltip)

    def text(self, x: float, y: float, text: str, *, size: float = 11.0, anchor: str = "start",
             rotate: float | None = None, **style: Any) -> None:
        """``y`` is the baseline unless ``dominant_baseline="central"``; ``rotate`` in degrees, clockwise."""
        self._add("text", (x, y), {"font_size": size, "text_anchor": anchor, "rotate": rotate, **style}, text=text)

    # ------------------------------------------------------------------ SVG
    def to_svg(self) -> str:
        defs: dict[str, tuple[str, str]] = {}  # what a definition stands for -> (its id, its markup)
        body = [_svg_element(e, defs) for e in self.elements]
        w, h = _num(self.width), _num(self.height)
        return "\n".join([
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'font-family="{FONT_FAMILY}">',
            f"<defs>{''.join(markup for _, markup in defs.values())}</defs>" if defs else "",
            f'<rect width="{w}" height="{h}" fill="white"/>',  # dark-mode viewers must not show a black plot
            *body, "</svg>", "",
        ])


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def _svg_attrs(attrs: dict[str, Any]) -> str:
    return " ".join(f"{key.replace('_', '-')}={quoteattr(_num(v) if isinstance(v, float) else _xml_text(str(v)))}"
                    for key, v in attrs.items())


def _svg_element(e: Element, defs: dict[str, tuple[str, str]]) -> str:
    style = dict(e.style)
    arrow, gradient, cls = style.pop("arrow", None), style.pop("gradient", None), style.pop("cls", None)
    g = e.geometry
    if e.kind == "line":
        attrs: dict[str, Any] = {"x1": g[0], "y1": g[1], "x2": g[2], "y2": g[3]}
    elif e.kind in ("polyline", "polygon"):
        attrs = {"points": " ".join(f"{_num(x)},{_num(y)}" for x, y in g)}
        if e.kind == "polyline":
            attrs["fill"] = "none"
    elif e.kind == "path":
        attrs = {"d": " ".join(seg[0] + ",".join(_num(v) for v in seg[1:]) for seg in g), "fill": "none"}
    elif e.kind == "rect":
        attrs = {"x": g[0], "y": g[1], "width": g[2], "height": g[3]}
    elif e.kind == "circle":
        attrs = {"cx": g[0], "cy": g[1], "r": g[2]}
    elif e.kind == "text":
        attrs = {"x": g[0], "y": g[1]}
        rotate = style.pop("rotate", None)
        if rotate:
            attrs["transform"] = f"rotate({_num(rotate)} {_num(g[0])} {_num(g[1])})"
    else:
        raise ValueError(f"unknown element kind {e.kind!r}")
    if arrow:
        key = f"arrow {arrow}"
        if key not in defs:
            ident = f"arrow-{len(defs)}"
            defs[key] = (ident, f'<marker id="{ident}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
                                f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" '
                                f"fill={quoteattr(arrow)}/></marker>")
        attrs["marker_end"] = f"url(#{defs[key][0]})"
    if gradient:
        key = f"gradient {gradient}"
        if key not in defs:
            ident = f"gradient-{len(defs)}"
            defs[key] = (ident, f'<linearGradient id="{ident}" x1="0" y1="1" x2="0" y2="0">' + "".join(
                f'<stop offset="{t:.3f}" stop-color={quoteattr(c)}/>' for t, c in gradient) + "</linearGradient>")
        attrs["fill"] = f"url(#{defs[key][0]})"
    if cls:
        attrs["class"] = cls
    attrs.update(style)
    inner = ((f"<title>{escape(_xml_text(e.tooltip))}</title>" if e.tooltip else "")
             + (escape(_xml_text(e.text)) if e.text else ""))
    return f"<{e.kind} {_svg_attrs(attrs)}>{inner}</{e.kind}>" if inner else f"<{e.kind} {_svg_attrs(attrs)}/>"


# ---------------------------------------------------------------------------------------- scales and colours
@dataclass(frozen=True)
class Scale:
    """A linear map from data ``[d0, d1]`` to pixels ``[p0, p1]`` (``p1 < p0`` for a y axis)."""

    d0: float
    d1: float
    p0: float
    p1: float

    def __call__(self, v: float) -> float:
        span = self.d1 - self.d0
        return self.p0 + (v - self.d0) / span * (self.p1 - self.p0) if span else (self.p0 + self.p1) / 2


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) within ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, target)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + k * step, 12) for k in range(count)]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """As many decimals as the step between ticks needs, and no more."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    decimals = next((d for d in range(7) if abs(step * 10**d - round(step * 10**d)) < 1e-6 * 10**d), 6)
    return f"{value:.{decimals}f}"


def viridis(t: float) -> str:
    """The colour at ``t`` in [0, 1] (clipped) as ``#rrggbb``."""
    t = min(1.0, max(0.0, t if math.isfinite(t) else 0.0)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    frac = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    rgb = (round(int(a[k:k + 2], 16) * (1 - frac) + int(b[k:k + 2], 16) * frac) for k in (1, 3, 5))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def viridis_stops() -> list[tuple[float, str]]:
    """The colour map's anchors, bottom (0) to top (1), for a colour bar."""
    return [(k / (len(_VIRIDIS) - 1), c) for k, c in enumerate(_VIRIDIS)]
