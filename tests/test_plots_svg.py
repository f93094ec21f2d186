"""The run's plots as SVG (the default): what each shape says, checked by reading the markup back.

The PNG writer draws the same shapes (test_progress_plots.py checks it writes real PNGs); here the
shapes themselves are checked: one marker per candidate with its tooltip, the running-best line,
the improvements ringed, the frontier and the best marked, an edge per parent, and the compile's
choice of format, none of it importing matplotlib.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.engine.frontier import pareto_front_members
from dspy_turbogepa.engine.records import RunSnapshot
from dspy_turbogepa.errors import ConfigurationError
from dspy_turbogepa.testing import make_reflection_lm
from dspy_turbogepa.tracking.drawing import Drawing, nice_ticks, tick_label, viridis
from dspy_turbogepa.tracking.live_plots import LivePlots
from dspy_turbogepa.tracking.mlflow_tracking import MlflowRunTracker
from dspy_turbogepa.tracking.plots import plot_best_over_time, plot_lineage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_progress_plots import make_record, synthetic_records

ROOT = Path(__file__).resolve().parents[1]
NS = "{http://www.w3.org/2000/svg}"


def read(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text(encoding="utf-8"))  # our own file: well-formed XML or this fails


def with_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if name in (e.get("class") or "").split()]


def points(element: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in element.get("points", "").split()]  # type: ignore[misc]


def running_best_improvements(scores_in_order: list[float]) -> int:
    best, count = -1.0, 0
    for s in scores_in_order:
        if s > best + 1e-12:
            best, count = s, count + 1
    return count


# ---------------------------------------------------------------------------------------- best over time
@pytest.mark.parametrize("n", [1, 9, 40])
def test_best_over_time_has_a_marker_with_a_tooltip_per_candidate_in_each_panel(tmp_path: Path, n: int) -> None:
    records = synthetic_records(n)
    root = read(plot_best_over_time(records, tmp_path / "best.svg", budget=2000, total_metric_calls=2100))
    markers = with_class(root, "candidate")
    assert len(markers) == 2 * n  # wall clock and metric calls
    for record in records:
        tips = [m.find(f"{NS}title").text for m in markers if m.find(f"{NS}title").text.startswith(f"#{record.index} ")]
        assert len(tips) == 2 and f"{record.aggregate:.3f}" in tips[0], tips
        assert f"{record.discovery_metric_calls} metric calls" in tips[0]
    kinds = {k for m in markers for k in m.get("class").split() if k != "candidate"}
    assert kinds == {r.candidate.kind for r in records}
    # the improvements are ringed, in each panel; the best is labelled with its score
    in_time = [r.aggregate for r in sorted(records, key=lambda r: (r.discovery_seconds, r.index))]
    in_calls = [r.aggregate for r in sorted(records, key=lambda r: (r.discovery_metric_calls, r.index))]
    rings = running_best_improvements(in_time) + running_best_improvements(in_calls)
    assert len(with_class(root, "improvement")) == rings
    labels = [e.text for e in with_class(root, "best-label")]
    assert labels == [f"{max(r.aggregate for r in records):.3f}"] * 2
    assert len(with_class(root, "budget")) == 1  # drawn on the metric-calls panel only


def test_the_running_best_line_only_rises_and_runs_on_to_the_end_of_the_run(tmp_path: Path) -> None:
    records = synthetic_records(25)
    root = read(plot_best_over_time(records, tmp_path / "best.svg", total_seconds=500.0, total_metric_calls=5000))
    lines = with_class(root, "best-line")
    assert len(lines) == 2
    for line in lines:
        pts = points(line)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        assert xs == sorted(xs)  # left to right
        assert ys == sorted(ys, reverse=True)  # pixels grow downwards: the score never falls
    # the end of the run is the right end of both lines, past every candidate
    for line, kind in zip(lines, ("time", "calls")):
        last_x = points(line)[-1][0]
        assert all(last_x > c for c in (points(line)[i][0] for i in range(len(points(line)) - 1))), kind


def test_without_timings_there_is_one_panel(tmp_path: Path) -> None:
    """A plain dspy.GEPA result has no discovery times: only the metric-calls panel."""
    result = SimpleNamespace(val_aggregate_scores=[0.2, 0.5, 0.4], parents=[[None], [0], [1]],
                             discovery_eval_counts=[0, 10, 20], val_subscores=[{0: 0.2}, {0: 0.5}, {0: 0.4}],
                             per_val_instance_best_candidates={0: {1}})
    root = read(plot_best_over_time(result, tmp_path / "best.svg"))
    assert len(with_class(root, "best-line")) == 1 and len(with_class(root, "candidate")) == 3
    assert float(root.get("width")) < 700


def test_user_text_is_escaped(tmp_path: Path) -> None:
    title = 'scores <b>&</b> "quotes"'
    root = read(plot_best_over_time(synthetic_records(3), tmp_path / "best.svg", title=title))
    assert title in [e.text for e in root.iter(f"{NS}text")]
    root = read(plot_lineage(synthetic_records(3), None, tmp_path / "lineage.svg", title=title))
    assert title in [e.text for e in root.iter(f"{NS}text")]


@pytest.mark.parametrize("name", ["best.jpg", "best", "best.svg.txt"])
def test_a_name_that_is_neither_svg_nor_png_is_refused_before_drawing(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"path=.*\.svg.*\.png"):
        plot_best_over_time(synthetic_records(3), tmp_path / name)
    with pytest.raises(ValueError, match=r"path=.*\.svg.*\.png"):
        plot_lineage(synthetic_records(3), None, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- lineage
def test_lineage_marks_every_candidate_the_frontier_the_best_and_every_parent(tmp_path: Path) -> None:
    records = synthetic_records(30)
    fronts: dict[int, set[int]] = {}
    best: dict[int, float] = {}
    for r in records:
        for vid, s in r.val_scores.items():
            if vid not in best or s > best[vid] + 1e-9:
                best[vid], fronts[vid] = s, {r.index}
            elif abs(s - best[vid]) <= 1e-9:
                fronts[vid].add(r.index)
    members = pareto_front_members(fronts, {r.index: r.aggregate for r in records})
    root = read(plot_lineage(records, fronts, tmp_path / "lineage.svg"))
    nodes = with_class(root, "node")
    assert len(nodes) == 30
    index_of = {int(re.match(r"#(\d+) ", n.find(f"{NS}title").text).group(1)): n for n in nodes}
    assert sorted(index_of) == list(range(30))
    assert {i for i, n in index_of.items() if "front" in n.get("class").split()} == members
    for i in members:
        assert index_of[i].get("stroke") == "#d62728"
    # colour = score: the best is the top of the scale, the worst the bottom
    top = max(r.aggregate for r in records)
    low = min(r.aggregate for r in records)
    assert {index_of[r.index].get("fill") for r in records if r.aggregate == top} == {viridis(1.0)}
    assert {index_of[r.index].get("fill") for r in records if r.aggregate == low} == {viridis(0.0)}
    assert len(with_class(root, "best-halo")) == 1 and len(with_class(root, "colour-bar")) == 1
    # one edge per parent, dashed for a merge's second parent
    n_parents = sum(len([p for p in r.parent_indices if p is not None]) for r in records)
    merges = [r for r in records if len([p for p in r.parent_indices if p is not None]) == 2]
    assert merges and len(with_class(root, "edge")) == n_parents
    assert len(with_class(root, "merge-parent")) == len(merges)
    assert all(e.get("stroke-dasharray") for e in with_class(root, "merge-parent"))
    markers = list(root.iter(f"{NS}marker"))
    assert len(markers) == 2  # one arrowhead per edge colour, shared by every edge


def test_a_child_is_drawn_right_of_its_parents(tmp_path: Path) -> None:
    records = synthetic_records(20)
    root = read(plot_lineage(records, None, tmp_path / "lineage.svg"))

    def centre(e: ET.Element) -> float:
        if e.tag == f"{NS}circle":
            return float(e.get("cx"))
        xs = [p[0] for p in points(e)]
        return (min(xs) + max(xs)) / 2

    x_of = {int(re.match(r"#(\d+) ", n.find(f"{NS}title").text).group(1)): centre(n) for n in with_class(root, "node")}
    for r in records:
        for p in r.parent_indices:
            if p is not None:
                assert x_of[r.index] > x_of[p]


def test_one_score_for_all_has_no_colour_scale(tmp_path: Path) -> None:
    records = [make_record(i, {0: 0.5}, parents=[0] if i else [None], kind="seed" if i == 0 else "reflection")
               for i in range(3)]
    root = read(plot_lineage(records, None, tmp_path / "lineage.svg"))
    assert with_class(root, "colour-bar") == [] and len(with_class(root, "node")) == 3


# ---------------------------------------------------------------------------------------- building blocks
def test_ticks_are_round_and_labels_carry_the_decimals_they_need() -> None:
    assert nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.31, 0.87, 5) == [0.4, 0.6, 0.8]
    assert nice_ticks(0.31, 0.87, 10) == [0.4, 0.5, 0.6, 0.7, 0.8]  # never more than the target asks
    assert nice_ticks(0, 830, 6) == [0, 200, 400, 600, 800]
    assert nice_ticks(1.0, 1.0) == [1.0] and nice_ticks(float("nan"), 1.0) == []
    assert [tick_label(t, [0.25, 0.5]) for t in (0.25, 0.5)] == ["0.25", "0.50"]
    assert tick_label(400.0, [0, 200, 400]) == "400"
    assert viridis(0.0) == "#440154" and viridis(1.0) == "#fde725" and viridis(2.0) == "#fde725"


def test_an_unknown_marker_shape_is_an_error_not_a_silent_dot() -> None:
    with pytest.raises(ValueError, match="unknown marker shape"):
        Drawing(10, 10).marker("x", 1, 1, 1)


# ---------------------------------------------------------------------------------------- the compile's choice
def test_plot_format_is_checked_at_construction(monkeypatch) -> None:
    metric = lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0  # noqa: E731
    kw = {"max_metric_calls": 10, "reflection_lm": make_reflection_lm(seed=0)}
    with pytest.raises(ConfigurationError, match=r"plot_format='jpg'.*'svg'.*'png'.*None"):
        TurboGEPA(metric, **kw, plot_format="jpg")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ConfigurationError, match=r"plot_format='png' needs matplotlib.*dspy-turbogepa\[plots\]"):
        TurboGEPA(metric, **kw, plot_format="png")
    assert TurboGEPA(metric, **kw).plot_format == "svg"
    assert TurboGEPA(metric, **kw, plot_format=None).plot_format is None


_COMPILE = """
import json, os, sys
import dspy
from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
task = TASKS["routing"]
splits = task.splits(data_seed=0, n_train=12, n_val=8, n_test=0)
fmt = json.loads(sys.argv[2])
opt = TurboGEPA(task.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                log_dir=sys.argv[1], verbose=False, plot_format=fmt)
with dspy.context(lm=make_student_lm(seed=0)):
    opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
print(json.dumps({"files": sorted(os.listdir(sys.argv[1])), "matplotlib": "matplotlib" in sys.modules}))
"""


@pytest.mark.parametrize("fmt", ["svg", "png", None])
def test_the_compile_writes_the_plots_in_the_format_asked_and_svg_needs_no_matplotlib(tmp_path: Path, fmt) -> None:
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path / "run"), json.dumps(fmt)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    plots = sorted(f for f in out["files"] if f.startswith(("best_over_time", "lineage")))
    assert "summary.json" in out["files"]
    if fmt is None:
        assert plots == [] and out["matplotlib"] is False
    else:
        assert plots == [f"best_over_time.{fmt}", f"lineage.{fmt}"]
        assert out["matplotlib"] is (fmt == "png")  # the default report never imports matplotlib
        head = (tmp_path / "run" / plots[0]).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if fmt == "png" else head.startswith(b"<svg ")


def test_the_mlflow_tracker_checks_its_plot_path_and_names_its_temporary_plot(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"plot_path=.*best\.jpg.*\.svg or \.png"):
        MlflowRunTracker({"seed": 0}, plot_path=tmp_path / "best.jpg")
    with pytest.raises(ValueError, match=r"plot_format='gif'"):
        MlflowRunTracker({"seed": 0}, plot_path=True, plot_format="gif")
    for fmt in ("svg", "png"):
        tracker = MlflowRunTracker({"seed": 0}, plot_path=True, plot_format=fmt)
        try:
            assert tracker._plot_path is not None and tracker._plot_path.name == f"best_over_time.{fmt}"
        finally:
            tracker.abort(None)


# ---------------------------------------------------------------------------------------- hostile input, edges
def test_control_characters_and_lone_surrogates_leave_the_file_readable(tmp_path: Path) -> None:
    """XML forbids them even escaped: a kind or title holding one made the whole SVG unreadable."""
    records = synthetic_records(6)
    records[3] = make_record(3, records[3].val_scores, records[3].parent_indices, kind="odd\x07kind \x1b[1m")
    title = "ansi \x1b[1mbold\x1b[0m and \ud800"
    for draw in (lambda p: plot_best_over_time(records, p, title=title),
                 lambda p: plot_lineage(records, None, p, title=title)):
        root = read(draw(tmp_path / "plot.svg"))
        assert "ansi \ufffd[1mbold\ufffd[0m and \ufffd" in [e.text for e in root.iter(f"{NS}text")]


def test_a_kind_the_plots_do_not_know_is_drawn_and_named_in_the_legend(tmp_path: Path) -> None:
    records = synthetic_records(6, merges=False)
    records[2] = make_record(2, records[2].val_scores, records[2].parent_indices, kind="my kind")
    for draw in (lambda p: plot_best_over_time(records, p), lambda p: plot_lineage(records, None, p)):
        root = read(draw(tmp_path / "plot.svg"))
        assert "other (my kind)" in [e.text for e in root.iter(f"{NS}text")]
        assert with_class(root, "my-kind")  # one class name, not "my" and "kind"
    assert len(with_class(read(plot_lineage(records, None, tmp_path / "l.svg")), "node")) == 6


def test_non_finite_run_totals_do_not_reach_the_coordinates(tmp_path: Path) -> None:
    text = plot_best_over_time(synthetic_records(5), tmp_path / "best.svg", total_seconds=float("nan"),
                               total_metric_calls=float("inf")).read_text()
    assert "nan" not in text.lower() and "inf" not in text.lower()


def test_the_best_score_label_stays_on_the_canvas(tmp_path: Path) -> None:
    records = [make_record(0, {0: 0.1}, kind="seed", seconds=0.0, calls=0),
               make_record(1, {0: 100.0}, parents=[0], seconds=9.0, calls=900)]
    root = read(plot_best_over_time(records, tmp_path / "best.svg", total_seconds=9.0, total_metric_calls=900))
    width = float(root.get("width"))
    for label in with_class(root, "best-label"):
        x, size = float(label.get("x")), float(label.get("font-size"))
        start = x - len(label.text) * size * 0.55 if label.get("text-anchor") == "end" else x
        assert start >= 0 and start + len(label.text) * size * 0.55 <= width


def test_a_merges_curve_never_crosses_the_generation_axis(tmp_path: Path) -> None:
    """A one-row chain whose last candidate merges the first: the curve bent below the row, through the axis."""
    records = [make_record(0, {0: 0.1}, kind="seed"), make_record(1, {0: 0.2}, parents=[0]),
               make_record(2, {0: 0.3}, parents=[1]), make_record(3, {0: 0.4}, parents=[0, 2], kind="merge")]
    root = read(plot_lineage(records, None, tmp_path / "lineage.svg"))
    horizontal = [e for e in root.iter(f"{NS}line") if e.get("y1") == e.get("y2")]
    axis = max(horizontal, key=lambda e: float(e.get("x2")) - float(e.get("x1")))  # not the legend's short line
    axis_y = float(axis.get("y1"))
    title_y = min(float(e.get("y")) for e in root.iter(f"{NS}text"))
    (curve,) = with_class(root, "merge-parent")
    _, sy, _, cy, _, ey = map(float, re.findall(r"-?\d+(?:\.\d+)?", curve.get("d")))  # M sx,sy Q cx,cy,ex,ey
    extreme = (sy + 2 * cy + ey) / 4  # a quadratic curve's furthest point between equal ends
    assert title_y < extreme < axis_y


# ---------------------------------------------------------------------------------------- PNG from the same shapes
def test_the_png_has_the_colours_the_svg_says(tmp_path: Path) -> None:
    """Each node's fill and the colour bar, read back from the PNG's pixels at the SVG's coordinates."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    records = synthetic_records(12)
    root = read(plot_lineage(records, None, tmp_path / "lineage.svg"))
    pixels = imread(plot_lineage(records, None, tmp_path / "lineage.png"))

    def colour_at(x: float, y: float) -> tuple[int, ...]:
        return tuple(round(float(c) * 255) for c in pixels[int(round(y)), int(round(x))][:3])

    def rgb(hex_colour: str) -> tuple[int, ...]:
        return tuple(int(hex_colour[k:k + 2], 16) for k in (1, 3, 5))

    for node in with_class(root, "node"):
        if node.tag == f"{NS}circle":
            cx, cy, r = float(node.get("cx")), float(node.get("cy")), float(node.get("r"))
        else:
            pts = points(node)
            cx, cy = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
            r = (max(p[0] for p in pts) - min(p[0] for p in pts)) / 2
        got, want = colour_at(cx - 0.6 * r, cy), rgb(node.get("fill"))  # left of the index label
        assert max(abs(a - b) for a, b in zip(got, want)) <= 12, (node.find(f"{NS}title").text, got, want)
    (bar,) = with_class(root, "colour-bar")
    x, y, h = float(bar.get("x")) + 6, float(bar.get("y")), float(bar.get("height"))
    for at, want in ((y + 2, viridis(1.0)), (y + h - 2, viridis(0.0))):
        assert max(abs(a - b) for a, b in zip(colour_at(x, at), rgb(want))) <= 12


def test_a_very_long_drawing_is_rasterised_smaller_not_refused(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from dspy_turbogepa.tracking.png import MAX_SIDE_PX, write_png

    drawing = Drawing(300, 70000)  # matplotlib refuses an image 2**16 px long
    drawing.rect(10, 10, 100, 69000, fill="#21918c")
    write_png(drawing, tmp_path / "long.png")
    head = (tmp_path / "long.png").read_bytes()[:24]
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert height <= MAX_SIDE_PX and abs(width / height - 300 / 70000) < 0.01


# ---------------------------------------------------------------------------------------- live plots
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def snapshot_of(records: list) -> RunSnapshot:
    return RunSnapshot(list(records), {}, float(len(records)), 10 * len(records))


def test_live_plots_wait_an_interval_and_draw_only_what_is_new(tmp_path: Path) -> None:
    records = synthetic_records(6)
    found = records[:2]
    clock = FakeClock()
    live = LivePlots(tmp_path, budget=100, interval=30.0, clock=clock)
    live.on_candidate(records[0])  # not bound yet: nothing to read
    live.bind(lambda: snapshot_of(found))
    live.on_candidate(records[1])
    assert live.draws == 0 and list(tmp_path.iterdir()) == []  # inside the first interval
    clock.now = 31.0
    live.on_candidate(records[1])
    assert live.draws == 1
    assert len(with_class(read(tmp_path / "lineage.svg"), "node")) == 2
    assert len(with_class(read(tmp_path / "best_over_time.svg"), "budget")) == 1
    clock.now = 50.0
    found = records[:5]
    live.on_candidate(records[4])
    assert live.draws == 1  # 19 s after the last drawing
    clock.now = 62.0
    live.on_mutation(None, "accepted")  # type: ignore[arg-type]  # the wait is over: the new ones are drawn
    assert live.draws == 2 and len(with_class(read(tmp_path / "lineage.svg"), "node")) == 5
    clock.now = 200.0
    live.on_mutation(None, "rejected")  # type: ignore[arg-type]
    assert live.draws == 2  # nothing new since


def test_a_slow_drawing_stretches_the_interval(tmp_path: Path, monkeypatch) -> None:
    records = synthetic_records(4)
    clock = FakeClock()
    live = LivePlots(tmp_path, interval=30.0, clock=clock)
    live.bind(lambda: snapshot_of(records[: 1 + live.draws]))

    def slow(run) -> None:
        clock.now += 2.0  # a drawing of 2 s: at most 1% of the time, so 200 s apart

    monkeypatch.setattr(live, "_draw", slow)
    clock.now = 30.0
    live.on_candidate(records[0])
    assert live.draws == 1 and clock.now == 32.0
    clock.now = 200.0
    live.on_candidate(records[1])
    assert live.draws == 1
    clock.now = 233.0
    live.on_candidate(records[1])
    assert live.draws == 2


def test_nothing_new_takes_no_snapshot_and_a_big_first_drawing_waits_longer(tmp_path: Path, monkeypatch) -> None:
    """Late in a run most mutations add nothing: copying the frontier for each cost 4-120 ms at
    700-3,000 candidates. And the first drawing of a big (resumed) run is spaced out by its size."""
    clock = FakeClock()
    calls: list[int] = []
    live = LivePlots(tmp_path, interval=30.0, clock=clock)
    monkeypatch.setattr(live, "_draw", lambda run: None)

    def source() -> RunSnapshot:
        calls.append(1)
        return snapshot_of([])

    live.bind(source)
    for _ in range(3000):  # a resumed run replaying its candidates
        live.on_candidate(None)  # type: ignore[arg-type]
    clock.now = 31.0
    live.on_mutation(None, "rejected")  # type: ignore[arg-type]
    assert calls == []  # 3,000 candidates: about 0.75 s to draw, so not before 75 s
    clock.now = 76.0
    live.on_mutation(None, "rejected")  # type: ignore[arg-type]
    assert len(calls) == 1 and live.draws == 1
    clock.now = 1000.0
    for _ in range(50):
        live.on_mutation(None, "rejected")  # type: ignore[arg-type]
    assert len(calls) == 1  # nothing new: no snapshot


def test_a_live_plot_says_it_is_one(tmp_path: Path) -> None:
    clock = FakeClock()
    live = LivePlots(tmp_path, interval=30.0, clock=clock)
    records = synthetic_records(3)
    live.bind(lambda: RunSnapshot(records, {}, 42.4, 30))  # the run's own clock: 42.4 s
    clock.now = 31.0
    live.on_candidate(None)  # type: ignore[arg-type]
    for name in ("best_over_time.svg", "lineage.svg"):
        titles = [e.text for e in read(tmp_path / name).iter(f"{NS}text")]
        assert any(t.endswith("(live, 42 s into the run)") for t in titles), titles


def test_a_failing_live_plot_warns_once_and_stays_off(tmp_path: Path, caplog) -> None:
    clock = FakeClock()
    live = LivePlots(tmp_path / "a-file", interval=0.0, clock=clock)
    (tmp_path / "a-file").write_text("not a directory")
    live.bind(lambda: snapshot_of(synthetic_records(3)))
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        for _ in range(3):
            clock.now += 1.0
            live.on_candidate(None)  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if "Live plots" in r.getMessage()]
    assert len(warnings) == 1 and "end-of-run plots are still drawn" in warnings[0].getMessage()
    assert live.draws == 0


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_a_compile_redraws_its_svg_plots_while_it_runs(tmp_path: Path, monkeypatch, fmt: str) -> None:
    import dspy

    from dspy_turbogepa import teleprompter
    from dspy_turbogepa.testing import TASKS, make_student_lm
    from dspy_turbogepa.tracking import live_plots

    monkeypatch.setattr(live_plots, "LIVE_PLOT_INTERVAL", 0.0)
    monkeypatch.setattr(live_plots, "_MAX_SHARE", 1e9)  # draw at every chance
    monkeypatch.setattr(live_plots, "_SECONDS_PER_CANDIDATE", 0.0)
    seen: list[tuple[int, int, int]] = []
    snapshots: list[tuple[RunSnapshot, int]] = []
    made: list[LivePlots] = []

    class Watched(LivePlots):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def _draw(self, run) -> None:
            super()._draw(run)
            snapshots.append((run, len(run.records)))
            seen.append((self._candidates, len(run.records), len(with_class(read(tmp_path / "lineage.svg"), "node"))))

    monkeypatch.setattr(teleprompter, "LivePlots", Watched)
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=16, n_val=8, n_test=0)
    opt = TurboGEPA(task.metric, max_metric_calls=120, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    log_dir=str(tmp_path), track_stats=True, verbose=False, plot_format=fmt)
    with dspy.context(lm=make_student_lm(seed=0)):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    final = len(program.detailed_results.candidates)
    if fmt == "png":  # a PNG holds the loop for about a second: drawn at the end only
        assert made == [] and seen == []
        return
    assert len(made) == 1 and final > 2 and seen, "the plots were never drawn during the run"
    assert max(n for n, _, _ in seen) > 1  # not only the seed
    assert all(found == snap == drawn for found, snap, drawn in seen)  # every candidate found by then, drawn
    assert [n for n, _, _ in seen] == sorted({n for n, _, _ in seen}) and seen[-1][0] <= final
    assert all(len(run.records) == n for run, n in snapshots)  # copies: later candidates did not reach them
    # the metric-calls panel runs on to the calls made so far, past every candidate's own count
    assert all(run.total_metric_calls >= max(r.discovery_metric_calls for r in run.records) for run, _ in snapshots)
    assert len(with_class(read(tmp_path / "lineage.svg"), "node")) == final  # the end-of-run plots came last


# ---------------------------------------------------------------------------------------- from a user's walkthrough
def test_a_long_title_widens_the_plot_instead_of_being_cut(tmp_path: Path) -> None:
    from dspy_turbogepa.tracking.drawing import text_width

    note = ("live, 3600 s into the run, on a machine with a rather long description, a title longer than "
            "the widest default canvas")
    for draw in (lambda p: plot_best_over_time(synthetic_records(2), p, note=note),
                 lambda p: plot_lineage(synthetic_records(2), None, p, note=note)):
        root = read(draw(tmp_path / "plot.svg"))
        (title,) = [e for e in root.iter(f"{NS}text") if (e.text or "").endswith(f"({note})")]
        size = float(title.get("font-size"))
        assert text_width(title.text, size) + 20 <= float(root.get("width"))


def test_the_colour_bar_ends_above_the_legend_of_a_one_row_lineage(tmp_path: Path) -> None:
    records = [make_record(0, {0: 0.1}, kind="seed"), make_record(1, {0: 0.5}, parents=[0])]
    root = read(plot_lineage(records, None, tmp_path / "lineage.svg"))
    (bar,) = with_class(root, "colour-bar")
    bar_bottom = float(bar.get("y")) + float(bar.get("height"))
    legend_y = min(float(e.get("y")) for e in root.iter(f"{NS}text") if e.text == "on the Pareto frontier")
    assert bar_bottom + 10 < legend_y < float(root.get("height"))


def test_the_new_best_rings_are_in_the_legend(tmp_path: Path) -> None:
    root = read(plot_best_over_time(synthetic_records(5), tmp_path / "best.svg"))
    assert "a new best" in [e.text for e in root.iter(f"{NS}text")] and with_class(root, "legend")


@pytest.mark.parametrize("wrong", [None, "program"])
def test_plotting_something_else_than_a_result_says_what_to_pass(tmp_path: Path, wrong) -> None:
    from dspy_turbogepa.testing import TASKS

    run = TASKS["routing"].make_program() if wrong == "program" else None
    for draw in (lambda: plot_best_over_time(run, tmp_path / "best.svg"),
                 lambda: plot_lineage(run, None, tmp_path / "lineage.svg")):
        with pytest.raises(TypeError, match=r"detailed_results \(compile with track_stats=True"):
            draw()


def test_a_png_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    from dspy_turbogepa.tracking import imports

    def missing(*modules: str) -> None:
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(imports, "import_in_one_piece", missing)
    with pytest.raises(ImportError, match=r"pip install 'dspy-turbogepa\[plots\]', or name the file \.svg"):
        plot_best_over_time(synthetic_records(3), tmp_path / "best.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_format_is_read_as_file_suffixes_are_whatever_its_case() -> None:
    metric = lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0  # noqa: E731
    opt = TurboGEPA(metric, max_metric_calls=10, reflection_lm=make_reflection_lm(seed=0), plot_format="SVG")
    assert opt.plot_format == "svg"


def test_a_resumed_sessions_plots_say_their_clock_is_its_own(tmp_path: Path) -> None:
    """A session that replays stored work finds every candidate at its start: without a word, its time
    axis (0.04 s) read as the whole run's."""
    import dspy

    from dspy_turbogepa.testing import TASKS, make_student_lm

    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=12, n_val=8, n_test=0)

    def titles() -> list[str]:
        opt = TurboGEPA(task.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                        log_dir=str(tmp_path), verbose=False)
        with dspy.context(lm=make_student_lm(seed=0)):
            opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
        return [next(read(tmp_path / name).iter(f"{NS}text")).text for name in ("best_over_time.svg", "lineage.svg")]

    note = "(resumed: times count from this session's start)"
    assert not any(t.endswith(note) for t in titles())
    assert all(t.endswith(note) for t in titles())
