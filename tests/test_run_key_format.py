"""The run key's computation is pinned: a change to it must bump RUN_KEY_FORMAT.

Why: a log_dir whose key was computed another way is refused as "written by another version" only
when the format differs; with the same format every stored run of an unchanged program was refused
as "student changed", and users went looking for an edit they never made (this happened once).
"""

from __future__ import annotations

import sys

import dspy
import pytest
import run_key_fixture as fixture

from dspy_turbogepa.adapter.run_identity import RUN_KEY_FORMAT, run_key

#: Bytecode and DSPy's dump_state() enter the key: it is pinned for the versions CI installs.
PINNED_FOR = ((3, 11), "3.4.1")
PINNED_KEY = {
    "key_format": "11",
    "trainset": "d7d64eaf9ff2bda2811504a6d13dee23",
    "valset": "d723978c8038960eee84b2f0793a78c7",
    "student": "032e21b2bbcaa0f553b2926f025ef105",
    "seed": "0",
    "metric": "a6d0e9890534c1384760f4f89ad990b4",
    "failure_score": "0.0",
    "task_lm": "5eb18502e29650e7dcdb0270d40f65d6",
    "reflection": "2aaf2cc10277816b9bfc084cdd05a295",
}


def test_the_run_key_is_computed_the_way_its_format_says() -> None:
    if (sys.version_info[:2], dspy.__version__) != PINNED_FOR:
        pytest.skip(f"the key is pinned for Python {PINNED_FOR[0]} and dspy {PINNED_FOR[1]}")
    lm = dspy.LM("openai/some-model", api_base="http://127.0.0.1:9/v1", api_key="x", cache=False, top_k=5)
    reflector = dspy.LM("openai/reflector", api_base="http://127.0.0.1:9/v1", api_key="x", cache=False)
    key = run_key(fixture.Pipeline(), fixture.data(6), fixture.data(4, 100), 0, metric=fixture.metric,
                  context_lm=lm, reflection_lm=reflector)
    changed = sorted(k for k in PINNED_KEY if key.get(k) != PINNED_KEY[k])
    assert key["key_format"] == RUN_KEY_FORMAT
    assert not changed or changed == ["key_format"], (
        f"run_key() now computes {changed} differently. If that is intended, bump RUN_KEY_FORMAT in "
        "adapter/run_identity.py (stores keyed the old way are then refused as written by another version, "
        "not as a changed program), say so in docs/run_store.md, and pin the new values here."
    )
    assert changed == [], "RUN_KEY_FORMAT was bumped: pin the new format and values here"
