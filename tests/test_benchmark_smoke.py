"""`benchmarks/run.py --smoke` end to end: both optimizers, tiny budget, fast simulator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - t0 < 40

    table = (tmp_path / "table.md").read_text()
    assert "| routing | 60 | turbo |" in table and "| routing | 60 | gepa |" in table
    assert (tmp_path / "best_val_vs_time.png").stat().st_size > 1000

    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert {p.name for p in runs} == {"turbo_routing_b60_s0.json", "gepa_routing_b60_s0.json"}
    for p in runs:
        r = json.loads(p.read_text())
        for key in ("seed_test", "final_test", "final_val"):
            assert 0.0 <= r[key] <= 1.0, (p.name, key, r[key])
        assert 0 < r["compile_wall_s"] < 30
        assert r["harness_cpu_s"] >= 0
        assert 0 < r["metric_calls"]
        if r["optimizer"] == "turbo":  # dspy.GEPA's budget rule: only the last mutation may finish past it
            assert r["metric_calls"] < 60 + 2 * 3 + 12  # n_val 12 in --smoke
        assert r["lm_calls_student"] > 0 and r["lm_calls_reflector"] > 0
        assert r["peak_rss_mb"] > 10
        curve = r["best_val_curve"]
        assert curve, "no candidate's full-valset score was observed"
        times = [t for t, _ in curve]
        vals = [v for _, v in curve]
        assert times == sorted(times) and vals == sorted(vals)
        assert r["time_to_target_s"] <= r["compile_wall_s"] + 1e-6 if "time_to_target_s" in r else True
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary) == 2 and all("time_to_target_s" in r for r in summary)
