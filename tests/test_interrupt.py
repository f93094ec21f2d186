"""Ctrl-C during compile: stop launching, finish or cancel in-flight work, return the best so far."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "slow_compile.py"


def test_sigint_returns_best_program_so_far(tmp_path):
    out = tmp_path / "out.json"
    log_dir = tmp_path / "run"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    # noise: the run must still have work when the signal lands (a noiseless task can be solved first)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(log_dir), "5000", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if line.startswith("READY"):
                break
            assert time.time() < deadline
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "DONE" in stdout
    data = json.loads(out.read_text())
    assert data["stop_reason"] == "interrupted"
    assert data["metric_calls"] < 5000
    assert "Interrupted" in stderr and "best program found so far" in stderr
    # the run store is consistent and was closed properly
    with sqlite3.connect(log_dir / "run.sqlite3") as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from evaluations").fetchone()[0] >= data["metric_calls"] - 4
        assert db.execute("select count(*) from sessions where closed_at is null").fetchone()[0] == 0
