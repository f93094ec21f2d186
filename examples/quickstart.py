"""End-to-end TurboGEPA optimization, fully offline.

No API key and no internet: this script starts dspy_turbogepa's LM simulator — a small
OpenAI-compatible server on 127.0.0.1 (the same one the tests use) that plays a student model whose
answers depend on which rules its instruction states, and a reflection model that writes new
instructions from feedback. The program talks to it through DSPy's real client over HTTP, exactly as
it would talk to a hosted model.

    python examples/quickstart.py                     # routing task (1 predictor)
    python examples/quickstart.py --task pipeline     # two-predictor pipeline
    python examples/quickstart.py --compare           # also run dspy.GEPA on the same budget
    python examples/quickstart.py --log-dir runs/qs --port 8765   # run store, summary.json, SVG plots;
                                                                  # the same command again resumes

To use a real model instead, replace the two dspy.LM(...) lines with your provider's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no cost-map download

import dspy

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, SimServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="routing", choices=sorted(TASKS))
    parser.add_argument("--budget", type=int, default=500, help="max_metric_calls")
    parser.add_argument("--threads", type=int, default=16, help="num_threads")
    parser.add_argument("--time-scale", type=float, default=0.5,
                        help="scales the simulated latencies (1.0 = student 0.15 s, reflector 0.6 s per call)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also run dspy.GEPA with the same budget")
    parser.add_argument("--out", default=None, help="where to save the optimized program (JSON)")
    parser.add_argument("--log-dir", default=None,
                        help="run store, summary.json and plots (redrawn while the run goes); the same command "
                             "resumes it if --port is the same (the LMs' address is part of what a log_dir is for)")
    parser.add_argument("--port", type=int, default=0, help="the simulator's port (default: any free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dspy_turbogepa").setLevel(logging.INFO)

    task = TASKS[args.task]
    splits = task.splits(data_seed=0, n_train=80, n_val=40, n_test=200)
    with SimServer("benchmark", seed=args.seed, time_scale=args.time_scale, port=args.port) as server:
        print(f"LM simulator listening on {server.base_url} (offline, no API key needed)")
        student_lm = dspy.LM("openai/sim-student", api_base=server.base_url, api_key="sim", cache=False,
                             temperature=0.0)
        reflection_lm = dspy.LM("openai/sim-reflector", api_base=server.base_url, api_key="sim", cache=False,
                                temperature=1.0, max_tokens=4000)
        dspy.configure(lm=student_lm)

        program = task.make_program()
        seed_score = task.evaluate(program, splits.test, num_threads=args.threads)
        print(f"seed program: test score {seed_score:.3f}")

        optimizer = TurboGEPA(task.metric, max_metric_calls=args.budget, reflection_lm=reflection_lm,
                              num_threads=args.threads, track_stats=True, seed=args.seed, log_dir=args.log_dir)
        start = time.perf_counter()
        optimized = optimizer.compile(program, trainset=splits.train, valset=splits.val)
        elapsed = time.perf_counter() - start
        score = task.evaluate(optimized, splits.test, num_threads=args.threads)
        dr = optimized.detailed_results
        print(f"TurboGEPA: {elapsed:.1f}s, {dr.total_metric_calls} metric calls, {len(dr.candidates)} candidates, "
              f"best validation {dr.val_aggregate_scores[dr.best_idx]:.3f}")
        print(f"seed score {seed_score:.3f} -> optimized score {score:.3f} (held-out test set)")
        for name, pred in optimized.named_predictors():
            print(f"  [{name}] {pred.signature.instructions}")
        if args.log_dir:
            plots = ", ".join(str(Path(args.log_dir) / name) for name in ("best_over_time.svg", "lineage.svg"))
            print(f"plots (open in a browser): {plots}")

        out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "optimized.json"
        optimized.save(str(out))
        reloaded = task.make_program()
        reloaded.load(str(out))
        print(f"saved to {out}; reloaded program test score {task.evaluate(reloaded, splits.test):.3f}")

        if args.compare:
            gepa = dspy.GEPA(task.metric, max_metric_calls=args.budget, reflection_lm=reflection_lm,
                             num_threads=args.threads, track_stats=True, seed=args.seed)
            start = time.perf_counter()
            baseline = gepa.compile(task.make_program(), trainset=splits.train, valset=splits.val)
            gepa_elapsed = time.perf_counter() - start
            ratio = gepa_elapsed / elapsed
            faster = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
            print(f"dspy.GEPA: {gepa_elapsed:.1f}s, test score {task.evaluate(baseline, splits.test):.3f} "
                  f"(TurboGEPA was {faster})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
