"""Review: capped runs (``token_budget``, ``cost_budget_usd`` with a ``price_table``) killed at chosen
moments and resumed on the same ``log_dir`` (commits 13120d8 .. cf05f9b: whole-run caps checked at each
paid LM call, a resumed run's usage from every stored row and the replaced-usage triggers,
``replay_through``).

Found with a fuzzer over ~600 kill-and-resume trials (a child process compiling on the fake LMs, killed
with SIGKILL / SIGTERM / SIGINT at the n-th LM call, at the first refusal or at a mutation's commit, then
resumed in this process); each test here kills at a chosen point through a hook, so it is deterministic.
What the child's fake LMs bill is appended to a file by the engine itself (``SimEngine._respond``), so a
killed session's bill is known. Verified behaviour is pinned by plain tests; the bug found (a proposal the
store refused lost its usage) is fixed, and the limitation found is a strict xfail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import dspy
import pytest
from test_review_caps import _mutation_1_reflects_after_mutation_2_finished

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm, sim_engine

#: $ per 1M tokens: a few hundred calls reach a couple of dollars.
PRICES = {"sim/sim-student": (100.0, 100.0), "sim/sim-reflector": (100.0, 100.0)}
REPO = Path(__file__).resolve().parents[1]
#: The last commit before the whole-run caps (its store has no replaced-usage triggers).
BEFORE_CAPS = "3beb2de"

# ------------------------------------------------------------------ the child: one compile, killed at a hook

_CHILD = textwrap.dedent("""
    import json, os, signal, sys, threading
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy
    import dspy_turbogepa
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.engine import Orchestrator
    from dspy_turbogepa.store import RunStore
    from dspy_turbogepa.testing import TASKS
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm, sim_engine

    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a parent started in the background ignores it
    bill = os.open(cfg["bill"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def billing(engine):  # every call the LM bills, written before its answer is handed back
        respond = engine._respond

        def _respond(request):
            out = respond(request)
            os.write(bill, f"{engine.model_name} {out.usage.input_tokens} {out.usage.output_tokens}\\n".encode())
            return out

        engine._respond = _respond  # on the instance: the class's code is part of the run key

    stores = []
    opened = RunStore.open.__func__

    def _open(cls, *args, **kw):
        stores.append(opened(cls, *args, **kw))
        return stores[-1]

    RunStore.open = classmethod(_open)
    lock, fired = threading.Lock(), []

    def kill(where):
        with lock:
            if fired:
                return
            fired.append(where)
        if cfg["flush"] and stores:
            stores[-1].flush()  # what was recorded so far is on disk: the kill loses only the calls on the wire
        os.kill(os.getpid(), getattr(signal, cfg["signal"]))

    calls = [0]

    def before_call(_request):
        with lock:
            calls[0] += 1
            n = calls[0]
        if cfg["at"] == "call" and n == cfg["n"]:
            kill(f"call {n}")

    if cfg["at"] == "refusal":
        refusal = Orchestrator._paid_call_refusal

        def _refusal(self):
            reason = refusal(self)
            if reason is not None:
                kill("refusal")
            return reason

        Orchestrator._paid_call_refusal = _refusal
    if cfg["at"] == "commit":
        commit = Orchestrator._commit

        def _commit(self, result):
            commit(self, result)
            if result.plan.seq == cfg["n"]:
                kill(f"commit {result.plan.seq}")

        Orchestrator._commit = _commit

    task = TASKS[cfg["task"]]
    splits = task.splits(data_seed=0, n_train=16, n_val=8, n_test=0)
    lm = make_student_lm(seed=0, noise=None, before_call=before_call)
    refl = make_reflection_lm(seed=0, before_call=before_call)
    billing(sim_engine(lm))
    billing(sim_engine(refl))
    opt = TurboGEPA(task.metric, reflection_lm=refl, track_stats=True, verbose=False, log_dir=cfg["log_dir"],
                    **cfg["kw"])
    with dspy.context(lm=lm):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    dr = program.detailed_results
    print(json.dumps({"stop": dr.stop_reason, "fired": fired, "package": dspy_turbogepa.__file__,
                      "best": dr.val_aggregate_scores[dr.best_idx],
                      "program": sorted([n, p.signature.instructions] for n, p in program.named_predictors())}))
""")


def _child(tmp_path: Path, log_dir: Path, task: str, kw: dict, at: str = "never", n=None, sig: str = "SIGKILL",
           flush: bool = True, pythonpath: str | None = None) -> dict:
    """One compile in a child process, killed with ``sig`` at the hook ``at``; what its LMs billed."""
    bill = tmp_path / f"bill-{len(list(tmp_path.glob('bill-*')))}"
    cfg = {"task": task, "log_dir": str(log_dir), "kw": kw, "at": at, "n": n, "signal": sig, "flush": flush,
           "bill": str(bill)}
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # run from tmp_path: ``python -c`` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    lines = [line.split() for line in bill.read_text().splitlines()] if bill.exists() else []
    prices = kw.get("price_table") or {}
    rates = [prices.get(f"sim/{model}", (0.0, 0.0)) for model, _, _ in lines]
    return {
        "rc": proc.returncode, "stderr": proc.stderr[-3000:],
        "result": json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else None,
        "tokens": sum(int(p) + int(c) for _, p, c in lines),
        "cost": sum((int(p) * r[0] + int(c) * r[1]) / 1e6 for (_, p, c), r in zip(lines, rates)),
        "largest": {model: max(int(p) + int(c) for m, p, c in lines if m == model)
                    for model in {m for m, _, _ in lines}},
    }


def _killed(run: dict, sig: str) -> None:
    if sig == "SIGINT":  # Ctrl-C: the run stops launching, finishes what is under way and returns
        assert run["rc"] == 0, run["stderr"]
    else:
        assert run["rc"] == -getattr(signal, sig), run["stderr"]


# ------------------------------------------------------------------ in-process sessions


def _call_tokens(usage: dict) -> int:
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


def _instructions(program) -> list[list[str]]:
    return sorted([n, p.signature.instructions] for n, p in program.named_predictors())


def _session(task_name: str, log_dir: Path | None = None, **kw) -> dict:
    """One compile in this process on fresh fake LMs: what it returned, counted and billed."""
    task = TASKS[task_name]
    splits = task.splits(data_seed=0, n_train=16, n_val=8, n_test=0)
    lm, refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    opt = TurboGEPA(task.metric, reflection_lm=refl, track_stats=True, verbose=False,
                    log_dir=str(log_dir) if log_dir else None, **kw)
    with dspy.context(lm=lm):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    dr = program.detailed_results
    rs = dr.run_stats
    stats = {name: sim_engine(x).stats() for name, x in (("student", lm), ("reflector", refl))}
    prices = kw.get("price_table") or {}
    cost = sum((s["prompt_tokens"] * prices.get(f"sim/sim-{n}", (0, 0))[0]
                + s["completion_tokens"] * prices.get(f"sim/sim-{n}", (0, 0))[1]) / 1e6 for n, s in stats.items())
    largest = {f"sim-{n}": max((_call_tokens(e["usage"]) for e in x.history if e.get("usage")), default=0)
               for n, x in (("student", lm), ("reflector", refl))}
    return {
        "program": _instructions(program), "best": dr.val_aggregate_scores[dr.best_idx], "stop": dr.stop_reason,
        "calls": sum(s["calls"] for s in stats.values()), "reflections": stats["reflector"]["calls"],
        "tokens": sum(s["prompt_tokens"] + s["completion_tokens"] for s in stats.values()), "cost": cost,
        "counted": sum(rs["task_tokens"].values()) + sum(rs["reflection_tokens"].values()),
        "counted_cost": rs["cost"]["task"] + rs["cost"]["reflection"], "largest": largest,
    }


def _on_the_wire(task_name: str, *runs: dict) -> int:
    """What one thread's calls on the wire can bill at most: one evaluation (one student call per
    predictor) and one reflection (a reflection on every predictor makes one call each)."""
    predictors = len(list(TASKS[task_name].make_program().named_predictors()))
    largest = {m: max(r["largest"].get(m, 0) for r in runs) for m in ("sim-student", "sim-reflector")}
    return predictors * (largest["sim-student"] + largest["sim-reflector"])


def _accepted_scores(log_dir: Path) -> list[float]:
    """The validation scores of the candidates a session accepted, read from its store."""
    con = sqlite3.connect(f"file:{log_dir / 'run.sqlite3'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT payload_json FROM events WHERE kind = 'candidate_accepted'").fetchall()
    finally:
        con.close()
    return [json.loads(p)["aggregate"] for (p,) in rows]


# ------------------------------------------------------------------ 1. killed, resumed with the same settings

ROUTING_CAP = {"max_metric_calls": 200, "num_threads": 1, "token_budget": 15000}
PIPELINE_CAP = {"max_metric_calls": 200, "num_threads": 1, "cost_budget_usd": 2.5, "price_table": PRICES}


@pytest.mark.parametrize("task_name,kw,sig,at,n", [
    ("routing", ROUTING_CAP, "SIGKILL", "refusal", None),
    ("routing", ROUTING_CAP, "SIGKILL", "commit", 1),
    ("routing", ROUTING_CAP, "SIGTERM", "call", 20),
    ("routing", ROUTING_CAP, "SIGINT", "call", 10),
    ("pipeline", PIPELINE_CAP, "SIGKILL", "call", 30),
    ("pipeline", PIPELINE_CAP, "SIGINT", "commit", 0),
], ids=["tokens-kill-at-refusal", "tokens-kill-at-commit", "tokens-term-at-call", "tokens-ctrl-c",
        "dollars-kill-at-call", "dollars-ctrl-c-at-commit"])
def test_a_killed_capped_run_resumes_to_what_the_uninterrupted_run_returns(tmp_path, task_name, kw, sig, at, n):
    """Killed (what it had recorded flushed first) or Ctrl-C'd, then resumed with the same settings: the
    uninterrupted run's program and score; a third session pays nothing; the run passes its cap only by
    the calls on the wire; run_stats count every stored call, so they miss only what a hard kill lost on
    the wire (and nothing after a Ctrl-C, which lets the calls under way finish and be stored).
    Checked over ~600 fuzzed trials (1, 4, 16 threads; caps from 4,000 to 35,000 tokens and $0.4 to $3.5;
    merges, best-of-k, epoch sampling, strict budgets)."""
    reference = _session(task_name, **kw)
    log_dir = tmp_path / "run"
    first = _child(tmp_path, log_dir, task_name, kw, at, n, sig)
    _killed(first, sig)
    second = _session(task_name, log_dir, **kw)
    third = _session(task_name, log_dir, **kw)

    assert (second["program"], second["best"], second["stop"]) == (
        reference["program"], reference["best"], reference["stop"])
    assert second["stop"] in ("token_budget", "cost_budget")
    assert third["calls"] == 0 and third["program"] == second["program"] and third["counted"] == second["counted"]
    billed = first["tokens"] + second["tokens"]
    wire = _on_the_wire(task_name, first, second, reference)
    lost = billed - second["counted"]
    assert 0 <= lost <= wire
    if sig == "SIGINT":
        assert lost == 0
        assert second["counted_cost"] == pytest.approx(first["cost"] + second["cost"], abs=1e-9)
    if "token_budget" in kw:
        assert kw["token_budget"] <= second["counted"] <= kw["token_budget"] + wire
    else:
        per_token = PRICES["sim/sim-student"][0] / 1e6
        assert kw["cost_budget_usd"] <= second["counted_cost"] <= kw["cost_budget_usd"] + wire * per_token


def test_a_capped_run_on_many_threads_killed_at_its_refusal_keeps_what_it_found(tmp_path):
    """16 threads (which call the cap refuses first depends on timing): the resumed run returns at least the
    best candidate the killed session had accepted, and a rerun pays nothing and returns the same."""
    kw = {"max_metric_calls": 200, "num_threads": 16, "token_budget": 15000}
    log_dir = tmp_path / "run"
    first = _child(tmp_path, log_dir, "routing", kw, "refusal")
    _killed(first, "SIGKILL")
    found = _accepted_scores(log_dir)
    second = _session("routing", log_dir, **kw)
    third = _session("routing", log_dir, **kw)
    assert second["best"] >= max(found, default=0.0)
    assert second["stop"] == "token_budget"
    assert (third["calls"], third["program"], third["counted"]) == (0, second["program"], second["counted"])


# ------------------------------------------------------------------ 2. resumed with a raised cap, or none


def test_a_killed_capped_run_resumed_with_a_raised_or_no_cap_finishes_as_an_uninterrupted_run(tmp_path):
    kw = {"max_metric_calls": 200, "num_threads": 1}
    killed = tmp_path / "killed"
    first = _child(tmp_path, killed, "routing", {**kw, "token_budget": 9000}, "refusal")
    _killed(first, "SIGKILL")
    raised_dir, open_dir = tmp_path / "raised", tmp_path / "open"
    shutil.copytree(killed, raised_dir)  # the dead process's files: database, WAL and all
    shutil.copytree(killed, open_dir)

    raised = _session("routing", raised_dir, **kw, token_budget=15000)
    reference = _session("routing", **kw, token_budget=15000)
    wire = _on_the_wire("routing", first, raised, reference)
    assert (raised["program"], raised["best"], raised["stop"]) == (
        reference["program"], reference["best"], "token_budget")
    assert 15000 <= raised["counted"] <= 15000 + wire  # the new cap is the whole run's, not added to the old
    assert 0 <= first["tokens"] + raised["tokens"] - raised["counted"] <= wire

    uncapped = _session("routing", open_dir, **kw)
    reference = _session("routing", **kw)
    assert (uncapped["program"], uncapped["best"], uncapped["stop"]) == (
        reference["program"], reference["best"], "max_metric_calls")
    assert 0 <= first["tokens"] + uncapped["tokens"] - reference["tokens"] <= wire  # nothing paid twice
    assert uncapped["counted"] == reference["tokens"]


# ------------------------------------------------------------------ 3. a store written before the caps


@pytest.fixture
def code_before_the_caps(tmp_path) -> str:
    """The package as of BEFORE_CAPS, extracted from git (no worktree to clean up), for PYTHONPATH."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{BEFORE_CAPS}^{{commit}}"],
                                     capture_output=True).returncode != 0:
        pytest.skip(f"commit {BEFORE_CAPS} is not in this checkout")
    archive = tmp_path / "old.tar"
    subprocess.run([git, "-C", str(REPO), "archive", "-o", str(archive), BEFORE_CAPS, "dspy_turbogepa"], check=True)
    old = tmp_path / "old"
    with tarfile.open(archive) as tar:
        tar.extractall(old, filter="data")
    return str(old)


def _mark_current_key_format(log_dir: Path, task_name: str = "routing") -> None:
    """The run key's format has changed since BEFORE_CAPS (9: LM settings, decorated functions, the
    module constants a metric reads — the simulated tasks' metrics read some; 10: a custom engine, which
    the simulated LMs are), which refuses that version's stores as a whole. The store is given this
    version's format, metric and task LM parts; every other part must still match as that version
    computed it (else the reopen below is refused): what is tested here is how a store of that schema is
    upgraded when reopened."""
    from dspy_turbogepa.adapter.run_identity import RUN_KEY_FORMAT, _hashable, callable_identity, lm_identity
    from dspy_turbogepa.store import stable_hash

    metric = stable_hash([callable_identity(TASKS[task_name].metric)])
    task_lm = stable_hash(_hashable(lm_identity(make_student_lm(seed=0, noise=None))))
    con = sqlite3.connect(str(log_dir / "run.sqlite3"))
    try:
        with con:
            con.execute("UPDATE run_key SET value = ? WHERE component = 'key_format'", (RUN_KEY_FORMAT,))
            con.execute("UPDATE run_key SET value = ? WHERE component = 'metric'", (metric,))
            con.execute("UPDATE run_key SET value = ? WHERE component = 'task_lm'", (task_lm,))
    finally:
        con.close()


def _triggers(log_dir: Path) -> set[str]:
    con = sqlite3.connect(f"file:{log_dir / 'run.sqlite3'}?mode=ro", uri=True)
    try:
        return {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    finally:
        con.close()


def _replaced_events(log_dir: Path) -> int:
    con = sqlite3.connect(f"file:{log_dir / 'run.sqlite3'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM events WHERE kind LIKE '%_usage_replaced'").fetchone()[0]
    finally:
        con.close()


def test_a_store_written_before_the_whole_run_caps_resumes_with_them(tmp_path, code_before_the_caps):
    """Session 1 by the code before the caps (which checked them at launch only and paid past them);
    reopened by this code: no error, the triggers are added, a rerun with the same cap pays nothing and
    returns session 1's program; without the cap and with track_best_outputs=True (its validation rows
    are run again, replacing the stored ones) it finishes as an uncapped run, and every session's bill is
    counted from then on."""
    kw = {"max_metric_calls": 200, "num_threads": 1}
    log_dir = tmp_path / "run"
    old = _child(tmp_path, log_dir, "routing", {**kw, "token_budget": 9000, "track_best_outputs": False},
                 pythonpath=code_before_the_caps)
    assert old["rc"] == 0, old["stderr"]
    assert old["result"]["package"].startswith(code_before_the_caps)
    assert old["result"]["stop"] == "token_budget" and old["tokens"] > 9000  # the old overshoot
    assert _triggers(log_dir) == set()
    _mark_current_key_format(log_dir)

    rerun = _session("routing", log_dir, **kw, token_budget=9000)
    assert _triggers(log_dir) == {"evaluations_keep_replaced_usage", "proposals_keep_replaced_usage"}
    assert (rerun["calls"], rerun["program"], rerun["best"]) == (0, old["result"]["program"], old["result"]["best"])
    assert rerun["counted"] == old["tokens"]

    uncapped = _session("routing", log_dir, **kw, track_best_outputs=True)
    assert _replaced_events(log_dir) > 0  # rows stored without outputs were run again and replaced
    reference = _session("routing", **kw, track_best_outputs=True)
    assert (uncapped["program"], uncapped["stop"]) == (reference["program"], "max_metric_calls")
    assert uncapped["counted"] == old["tokens"] + uncapped["tokens"]
    again = _session("routing", log_dir, **kw, track_best_outputs=True)
    assert (again["calls"], again["counted"]) == (0, uncapped["counted"])


# ------------------------------------------------------------------ bugs


def test_a_rerun_never_pays_past_a_reached_cap_for_a_proposal_the_store_refused(tmp_path, monkeypatch):
    """The simulated reflector writes "Be precise and consistent"; with that text as an environment secret
    (a secret-scanning task's data, a key the reflection LM copied into an instruction) the store keeps no
    proposal that contains it. Session 1 reaches the cap; a rerun with the same settings must pay nothing
    (the cap is reached: run_store.md's "pays for that reflection again" cannot apply), and every session's
    bill must be counted."""
    monkeypatch.setenv("ROUTING_SECRET", "Be precise and consistent")
    kw = {"max_metric_calls": 150, "num_threads": 1, "token_budget": 6000}
    log_dir = tmp_path / "run"
    first = _session("routing", log_dir, **kw)
    con = sqlite3.connect(f"file:{log_dir / 'run.sqlite3'}?mode=ro", uri=True)
    stored = con.execute("SELECT COUNT(*) FROM proposals").fetchone()[0]
    con.close()
    if first["stop"] != "token_budget" or stored >= first["reflections"]:
        pytest.skip("no proposal was refused by the store in this setup")
    second = _session("routing", log_dir, **kw)
    third = _session("routing", log_dir, **kw)
    billed = first["tokens"] + second["tokens"] + third["tokens"]
    # measured over 12 trials: a rerun paid one reflection again past the reached cap in 11 (803 tokens in 9,
    # and in those every later rerun did too); in all 12 the run's tokens stayed below its bill (in one,
    # session 1 reported 6,960 tokens and its reruns 6,157 for the same run)
    assert (second["calls"], third["calls"]) == (0, 0)
    assert third["counted"] == billed


@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMITATION (docs/engine.md, Reproducibility; left as is): "
    "with deterministic=False a capped rerun with the same settings returns the seed where the first "
    "session found a better program, paying nothing: replay_through (orchestrator.py: "
    "Orchestrator._secondary_budget_exhausted) assumes mutation k is planned as it was, but deterministic=False "
    "commits in completion order and plans from the live commits (Orchestrator._view_commits / _plan): on the "
    "rerun the refused mutation 1 commits before the replayed mutation 0, so mutation 2's view holds other "
    "failures, its reflection reads other feedback (another proposal key), misses the store and is refused"))
def test_a_rerun_of_a_capped_fast_mode_run_returns_what_the_first_session_found(tmp_path):
    """test_review_caps' scenario for the fix of cf05f9b, with deterministic=False: session 1 accepts
    mutation 2's child (0.625) while mutation 1 waits, then the cap refuses mutation 1's reflection."""
    kw = {"max_metric_calls": 400, "num_threads": 2, "max_mutations_in_flight": 2, "deterministic": False}
    seen: dict = {}
    with _mutation_1_reflects_after_mutation_2_finished(seen):
        _session("routing", **kw)
    assert not seen.get("timeout")
    cap = seen["tokens"]
    with _mutation_1_reflects_after_mutation_2_finished({}):
        first = _session("routing", tmp_path, token_budget=cap, **kw)
    assert first["stop"] == "token_budget" and first["best"] > min(_accepted_scores(tmp_path))
    second = _session("routing", tmp_path, token_budget=cap, **kw)
    assert second["calls"] == 0
    assert (second["best"], second["program"]) == (first["best"], first["program"])
