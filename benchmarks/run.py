"""Side-by-side benchmark: dspy_turbogepa.TurboGEPA vs dspy.GEPA on the bundled simulator.

Every (optimizer, task, budget, seed) cell runs in a fresh subprocess, one after another
(never in parallel), each with its own in-process SimServer. Results: one JSON per cell in
<out-dir>/runs/, plus <out-dir>/table.md and <out-dir>/best_val_vs_time.png.

    python benchmarks/run.py --optimizers turbo,gepa --tasks routing,pipeline,pricing \
        --budgets 300,800 --seeds 0,1,2,3,4 --threads 16 --time-scale 1.0 --out-dir benchmarks/results
    python benchmarks/run.py --smoke --out-dir /tmp/bench_smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------
# one cell (runs inside the child process)
# ---------------------------------------------------------------------------------------


def _cand_key(module) -> str:
    blob = "\x1d".join(f"{n}\x1e{p.signature.instructions}" for n, p in module.named_predictors())
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _instrument(program) -> None:
    """Tag every prediction with the hash of the instructions of the module that made it
    (the class is swapped for a subclass, so copies made by any optimizer keep the tag)."""
    base = type(program)

    def forward(self, *args, **kwargs):
        pred = base.forward(self, *args, **kwargs)
        try:
            object.__setattr__(pred, "_bench_ck", _cand_key(self))
        except Exception:
            pass
        return pred

    ns = {"forward": forward}
    if hasattr(base, "aforward"):

        async def aforward(self, *args, **kwargs):
            pred = await base.aforward(self, *args, **kwargs)
            try:
                object.__setattr__(pred, "_bench_ck", _cand_key(self))
            except Exception:
                pass
            return pred

        ns["aforward"] = aforward
    program.__class__ = type(base.__name__, (base,), ns)


def _ex_key(ex) -> str:
    return repr(sorted((k, str(v)) for k, v in ex.inputs().items()))


def _thread_cpu(native_id) -> float:
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except Exception:
        return 0.0


def run_cell(cfg: dict) -> dict:
    import resource

    import dspy

    from dspy_turbogepa.testing import TASKS, SimServer

    task = TASKS[cfg["task"]]
    train, val, test = task.splits(data_seed=0, n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"])
    val_idx = {_ex_key(ex): i for i, ex in enumerate(val)}
    n_val = len(val)

    events: list[tuple[float, str, int, float]] = []  # (t since compile start, cand, val idx, score)
    lock = threading.Lock()
    counters = {"metric_calls": 0, "feedback_calls": 0}
    t0_box = [time.monotonic()]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        out = task.metric(gold, pred, trace, pred_name, pred_trace)
        with lock:
            counters["metric_calls" if pred_name is None else "feedback_calls"] += 1
        if pred_name is None:  # a whole-program evaluation, not per-predictor feedback
            ck = getattr(pred, "_bench_ck", None)
            i = val_idx.get(_ex_key(gold))
            if ck is not None and i is not None:
                s = float(out.score if hasattr(out, "score") else out)
                with lock:
                    events.append((time.monotonic() - t0_box[0], ck, i, s))
        return out

    with SimServer("benchmark", seed=cfg["seed"], time_scale=cfg["time_scale"]) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="sim", cache=False, temperature=0.0)
        reflector = dspy.LM(
            "openai/sim-reflector", api_base=srv.base_url, api_key="sim", cache=False, temperature=1.0, max_tokens=4000
        )
        dspy.configure(lm=student)
        program = task.make_program()
        _instrument(program)
        seed_test = task.evaluate(program, test, lm=student, num_threads=cfg["threads"])

        common = dict(
            max_metric_calls=cfg["budget"], reflection_lm=reflector, num_threads=cfg["threads"],
            track_stats=True, seed=cfg["seed"],
        )
        opt = cfg["optimizer"]
        if opt == "turbo":
            from dspy_turbogepa import TurboGEPA

            optimizer = TurboGEPA(metric, **common)
        elif opt == "gepa":
            optimizer = dspy.GEPA(metric, **common)
        elif opt == "gepa4":
            from gepa.strategies.proposal_sampling import IndependentSampling

            optimizer = dspy.GEPA(metric, gepa_kwargs={"sampling_strategy": IndependentSampling(4)}, **common)
        else:
            raise SystemExit(f"unknown optimizer {opt!r}")

        def lm_calls() -> tuple[int, int]:
            m = srv.stats()["models"]
            return m.get("sim-student", {}).get("requests", 0), m.get("sim-reflector", {}).get("requests", 0)

        # LM-call timeline (polled), so "LM calls to target" can be read off later
        base_calls = lm_calls()
        timeline: list[tuple[float, int, int]] = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                s, r = lm_calls()
                timeline.append((time.monotonic() - t0_box[0], s - base_calls[0], r - base_calls[1]))
                stop.wait(0.05)

        srv_tid = srv._thread.native_id if getattr(srv, "_thread", None) else None
        cpu0, srv_cpu0 = sum(os.times()[:2]), _thread_cpu(srv_tid)
        t0_box[0] = time.monotonic()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        optimized = optimizer.compile(program, trainset=train, valset=val)
        wall = time.monotonic() - t0_box[0]
        stop.set()
        poller.join()
        cpu = sum(os.times()[:2]) - cpu0 - (_thread_cpu(srv_tid) - srv_cpu0)
        s_calls, r_calls = lm_calls()
        s_calls, r_calls = s_calls - base_calls[0], r_calls - base_calls[1]
        timeline.append((wall, s_calls, r_calls))
        metric_calls = counters["metric_calls"]

        final_val = None
        dr = getattr(optimized, "detailed_results", None)
        if dr is not None:
            try:
                final_val = float(dr.val_aggregate_scores[dr.best_idx])
            except Exception:
                final_val = None
        final_test = task.evaluate(optimized, test, lm=student, num_threads=cfg["threads"])

    # when did each candidate's full-valset score become known; best-so-far curve
    seen: dict[str, dict[int, float]] = {}
    curve: list[tuple[float, float]] = []
    best = -1.0
    for t, ck, i, s in sorted(events):
        d = seen.setdefault(ck, {})
        if i in d:
            continue
        d[i] = s
        if len(d) == n_val:
            v = sum(d.values()) / n_val
            if v > best + 1e-12:
                best = v
                curve.append((round(t, 4), v))
    return {
        **cfg,
        "seed_test": seed_test,
        "final_test": final_test,
        "final_val": final_val if final_val is not None else (best if curve else None),
        "compile_wall_s": wall,
        "harness_cpu_s": cpu,
        "metric_calls": metric_calls,  # whole-program rollouts scored (pred_name is None)
        "feedback_metric_calls": counters["feedback_calls"],  # per-predictor feedback calls
        "lm_calls_student": s_calls,
        "lm_calls_reflector": r_calls,
        "full_val_candidates": sum(1 for d in seen.values() if len(d) == n_val),
        "best_val_curve": curve,
        "lm_timeline": timeline[:: max(1, len(timeline) // 400)] + [timeline[-1]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


# ---------------------------------------------------------------------------------------
# orchestration and aggregation (parent process)
# ---------------------------------------------------------------------------------------


def _calls_at(run: dict, t: float) -> int:
    for tt, s, r in run["lm_timeline"]:
        if tt >= t:
            return s + r
    return run["lm_calls_student"] + run["lm_calls_reflector"]


def _fmt(vals: list[float], nd: int = 3) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{nd}f}"
    return f"{med:.{nd}f} [{min(vals):.{nd}f}, {max(vals):.{nd}f}]"


def aggregate(runs: list[dict], out_dir: Path) -> None:
    groups: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["budget"]), {}).setdefault(r["optimizer"], []).append(r)

    lines = [
        "# TurboGEPA vs dspy.GEPA (simulator)",
        "",
        "Median [min, max] over seeds. Target = dspy.GEPA's median final validation score for the"
        " task/budget (task.target_val if gepa was not run); runs that never reach it count their"
        " whole compile time / all their LM calls. CPU = process CPU minus the simulator thread.",
        "",
        "| task | budget | optimizer | n | seed test | final test | final val | target | reached | time to target s"
        " | LM calls to target | compile wall s | harness CPU s | metric calls | LM calls student | LM calls reflector"
        " | peak RSS MB |",
        "|" + "---|" * 17,
    ]
    from dspy_turbogepa.testing import TASKS

    for (task, budget), by_opt in sorted(groups.items()):
        gepa_vals = [r["final_val"] for r in by_opt.get("gepa", []) if r["final_val"] is not None]
        target = statistics.median(gepa_vals) if gepa_vals else TASKS[task].target_val
        for opt, rs in sorted(by_opt.items()):
            ttt, ctt, reached = [], [], 0
            for r in rs:
                hit = next((t for t, v in r["best_val_curve"] if v >= target - 1e-9), None)
                if hit is None:
                    ttt.append(r["compile_wall_s"])
                    ctt.append(r["lm_calls_student"] + r["lm_calls_reflector"])
                else:
                    reached += 1
                    ttt.append(hit)
                    ctt.append(_calls_at(r, hit))
                r["target"], r["time_to_target_s"], r["reached_target"] = target, ttt[-1], hit is not None
            col = lambda k, nd=3: _fmt([r[k] for r in rs], nd)  # noqa: E731
            lines.append(
                f"| {task} | {budget} | {opt} | {len(rs)} | {col('seed_test')} | {col('final_test')} | {col('final_val')}"
                f" | {target:.3f} | {reached}/{len(rs)} | {_fmt(ttt, 1)} | {_fmt(ctt, 0)} | {col('compile_wall_s', 1)}"
                f" | {col('harness_cpu_s', 1)} | {col('metric_calls', 0)} | {col('lm_calls_student', 0)}"
                f" | {col('lm_calls_reflector', 0)} | {col('peak_rss_mb', 0)} |"
            )
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(runs, indent=1, default=str))
    _plot(groups, out_dir / "best_val_vs_time.png")


def _plot(groups, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for opt, rs in sorted(groups[key].items()):
            tmax = max(r["compile_wall_s"] for r in rs)
            grid = [tmax * k / 200 for k in range(201)]
            curves = []
            for r in rs:
                c = r["best_val_curve"]
                curves.append([max([v for t, v in c if t <= g], default=float("nan")) for g in grid])
            med = []
            for j in range(len(grid)):
                col = [c[j] for c in curves if c[j] == c[j]]
                med.append(statistics.median(col) if col else float("nan"))
            (line,) = ax.step(grid, med, where="post", label=f"{opt} (median of {len(rs)})")
            for c in curves:
                ax.step(grid, c, where="post", color=line.get_color(), alpha=0.2, lw=0.8)
        ax.set_title(f"{key[0]}, budget {key[1]}")
        ax.set_xlabel("compile wall-clock (s)")
        ax.set_ylabel("best full-val score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="turbo,gepa", help="comma list of turbo, gepa, gepa4")
    p.add_argument("--tasks", default="routing,pipeline,pricing")
    p.add_argument("--budgets", default="300,800")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--n-train", type=int, default=80)
    p.add_argument("--n-val", type=int, default=40)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="routing, budget 60, seed 0, time-scale 0.02, n_val 12")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-cell timeout (s)")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, JSON config
    a = p.parse_args(argv)

    if a.cell:
        cfg = json.loads(a.cell)
        res = run_cell(cfg)
        Path(cfg["out"]).write_text(json.dumps(res, indent=1))
        return 0

    if a.smoke:
        a.tasks, a.budgets, a.seeds, a.time_scale = "routing", "60", "0", 0.02
        a.n_train, a.n_val, a.n_test = 24, 12, 40
    out_dir = Path(a.out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    runs, failed = [], 0
    for task in a.tasks.split(","):
        for budget in map(int, a.budgets.split(",")):
            for seed in map(int, a.seeds.split(",")):
                for opt in a.optimizers.split(","):
                    out = out_dir / "runs" / f"{opt}_{task}_b{budget}_s{seed}.json"
                    cfg = dict(
                        optimizer=opt, task=task, budget=budget, seed=seed, threads=a.threads,
                        time_scale=a.time_scale, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, out=str(out),
                    )
                    t = time.monotonic()
                    with open(out.with_suffix(".log"), "w") as log:
                        proc = subprocess.run(
                            [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout,
                        )
                    if proc.returncode != 0 or not out.exists():
                        failed += 1
                        print(f"FAILED {out.name} (rc={proc.returncode}); see {out.with_suffix('.log')}", file=sys.stderr, flush=True)
                        continue
                    r = json.loads(out.read_text())
                    runs.append(r)
                    print(
                        f"{opt:6s} {task:9s} b={budget} s={seed}: test {r['seed_test']:.3f}->{r['final_test']:.3f}"
                        f" val {r['final_val']} wall {r['compile_wall_s']:.1f}s [{time.monotonic() - t:.1f}s]",
                        flush=True,
                    )
    if runs:
        aggregate(runs, out_dir)
        print((out_dir / "table.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
