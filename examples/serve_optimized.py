"""Serving an optimized program the way a production service does, fully offline.

Optimization happens once, offline; the service only loads the result:

1. ``optimized.save("program.json")`` after ``TurboGEPA(...).compile(...)`` writes DSPy's own JSON
   state (the optimized instructions per predictor; no pickle, nothing executable).
2. At service start-up: build the program class fresh, ``.load("program.json")`` once, and bind ONE
   shared ``dspy.LM`` to it (``program.set_lm(lm)``: no global ``dspy.configure`` state, so one process
   can serve several programs on different models).
3. Per request: ``await program.acall(**inputs)``. Many requests run concurrently on one event loop;
   a semaphore caps the calls in flight to what the provider allows.

    python examples/serve_optimized.py                         # optimize a little first, then serve
    python examples/serve_optimized.py --program program.json  # serve a saved program
    python examples/serve_optimized.py --task pipeline --requests 200 --concurrency 32

The LM here is dspy_turbogepa's simulator (an OpenAI-compatible server on 127.0.0.1, no API key).
For a real model, replace the ``dspy.LM(...)`` line in ``make_lm`` with your provider's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no cost-map download

import dspy

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, SimServer


def make_lm(server: SimServer, model: str = "sim-student", **kwargs: Any) -> dspy.LM:
    # A real deployment: dspy.LM("openai/gpt-4.1-mini", api_key=os.environ["OPENAI_API_KEY"], cache=False)
    return dspy.LM(f"openai/{model}", api_base=server.base_url, api_key="sim", cache=False, **kwargs)


def optimize(task: Any, server: SimServer, out: Path, budget: int, threads: int, seed: int) -> Path:
    """The offline step: a small TurboGEPA run, saved as JSON."""
    student_lm = make_lm(server, temperature=0.0)
    reflection_lm = make_lm(server, "sim-reflector", temperature=1.0, max_tokens=4000)
    splits = task.splits(data_seed=0, n_train=30, n_val=16, n_test=0)
    optimizer = TurboGEPA(task.metric, max_metric_calls=budget, reflection_lm=reflection_lm,
                          num_threads=threads, seed=seed)
    start = time.perf_counter()
    with dspy.context(lm=student_lm):  # scoped: nothing global is left behind
        optimized = optimizer.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    optimized.save(str(out))
    print(f"optimized in {time.perf_counter() - start:.1f}s ({budget} metric calls max); saved to {out}")
    return out


def load_program(task: Any, path: Path, lm: dspy.LM) -> dspy.Module:
    """Service start-up: a fresh program (with an async forward, so ``acall`` works), loaded once."""
    program = task.make_program(async_forward=True)
    program.load(str(path))
    program.set_lm(lm)
    return program


async def serve(program: dspy.Module, requests: list[dspy.Example], concurrency: int) -> dict[str, Any]:
    """Answer every request concurrently on this event loop, as an async web handler would."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def handle(example: dspy.Example) -> Any:
        async with gate:
            t0 = time.perf_counter()
            try:
                return await program.acall(**example.inputs())
            finally:
                latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    predictions = await asyncio.gather(*(handle(ex) for ex in requests), return_exceptions=True)
    elapsed = time.perf_counter() - start
    failures = [p for p in predictions if isinstance(p, BaseException)]
    latencies.sort()
    return {
        "predictions": predictions,
        "failures": len(failures),
        "first_failure": repr(failures[0]) if failures else None,
        "elapsed": elapsed,
        "throughput": len(requests) / elapsed if elapsed > 0 else float("inf"),
        "latency_p50": statistics.median(latencies) if latencies else 0.0,
        "latency_p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0,
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="routing", choices=sorted(TASKS))
    parser.add_argument("--program", default=None, help="a saved optimized program (JSON); default: optimize first")
    parser.add_argument("--requests", type=int, default=50, help="requests to serve concurrently")
    parser.add_argument("--concurrency", type=int, default=50, help="calls in flight at most")
    parser.add_argument("--budget", type=int, default=200, help="max_metric_calls of the optimization step")
    parser.add_argument("--threads", type=int, default=16, help="num_threads of the optimization step")
    parser.add_argument("--time-scale", type=float, default=0.2, help="scales the simulated latencies")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    task = TASKS[args.task]
    requests = task.splits(data_seed=0, n_train=0, n_val=0, n_test=args.requests).test  # unseen inputs
    with SimServer("benchmark", seed=args.seed, time_scale=args.time_scale) as server:
        print(f"LM simulator on {server.base_url} (offline, no API key needed)")
        if args.program:
            path = Path(args.program)
        else:
            path = optimize(task, server, Path(tempfile.mkdtemp()) / "program.json", args.budget, args.threads,
                            args.seed)

        lm = make_lm(server, temperature=0.0)  # ONE LM instance, shared by every request
        program = load_program(task, path, lm)
        baseline = task.make_program(async_forward=True)  # the unoptimized program, for comparison
        baseline.set_lm(lm)

        report = asyncio.run(serve(program, requests, args.concurrency))
        base_report = asyncio.run(serve(baseline, requests, args.concurrency))

    for name, rep in (("optimized", report), ("seed", base_report)):
        scores = [0.0 if isinstance(p, BaseException) else task.score(ex, p)
                  for ex, p in zip(requests, rep["predictions"])]
        rep["accuracy"] = sum(scores) / len(scores) if scores else 0.0
        print(f"{name:>9} program: {len(requests)} requests in {rep['elapsed']:.2f}s = {rep['throughput']:.1f} req/s "
              f"(p50 {1000 * rep['latency_p50']:.0f} ms, p95 {1000 * rep['latency_p95']:.0f} ms), "
              f"accuracy {rep['accuracy']:.3f}, failures {rep['failures']}")
        if rep["first_failure"]:
            print(f"          first failure: {rep['first_failure']}")
    return {"optimized": report, "seed": base_report, "program_path": str(path)}


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    return 0 if result["optimized"]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
