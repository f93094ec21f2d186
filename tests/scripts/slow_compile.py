"""A compile that runs long enough to be interrupted or killed by a test (fake LMs with latency).

Usage: python slow_compile.py OUT_JSON [LOG_DIR] [BUDGET] [NOISE] [asyncio]
(asyncio: compile is called from a coroutine run by asyncio.run, which holds SIGINT. NOISE > 0: some
student answers are wrong whatever the instruction, so the run never runs out of work before its budget;
with 0 a fast engine may solve the task and stop early, "no_progress_possible".)
Prints READY once the seed evaluation is done; writes the outcome to OUT_JSON when compile returns.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time

import dspy

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

# Ctrl-C as in a terminal: a parent that started us in the background (nohup, `cmd &` in a script)
# leaves SIGINT ignored, and Python then never raises KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)

out = sys.argv[1]
log_dir = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
budget = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
noise = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
under_asyncio_run = len(sys.argv) > 5 and sys.argv[5] == "asyncio"
task = TASKS["routing"]
splits = task.splits(data_seed=0, n_train=40, n_val=16, n_test=0)
calls = {"n": 0}
lock = threading.Lock()


def slow(request) -> None:
    with lock:
        calls["n"] += 1
        if calls["n"] == len(splits.val):
            print("READY", flush=True)
    time.sleep(0.02)


student = make_student_lm(seed=0, noise=noise, before_call=slow)
opt = TurboGEPA(task.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                track_stats=True, log_dir=log_dir)


def optimize() -> dspy.Module:
    with dspy.context(lm=student):
        return opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)


async def main() -> dspy.Module:
    program = optimize()
    await asyncio.sleep(0)  # a cancellation delivered once compile returned would land here
    return program


optimized = asyncio.run(main()) if under_asyncio_run else optimize()
dr = optimized.detailed_results
with open(out, "w") as f:
    json.dump({"stop_reason": dr.stop_reason, "metric_calls": dr.total_metric_calls, "student_calls": calls["n"],
               "best": dr.val_aggregate_scores[dr.best_idx], "candidates": len(dr.candidates),
               "instructions": {n: p.signature.instructions for n, p in optimized.named_predictors()}}, f)
print("DONE", flush=True)
