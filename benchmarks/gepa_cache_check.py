"""Why the benchmark does not run dspy.GEPA with gepa's evaluation cache (``cache_evaluation=True``).

gepa (0.1.4) keys that cache by (candidate, example index) without telling the training set from the
validation set, whose indices both start at 0; under dspy.GEPA, with separate trainset and valset, a
candidate's validation score can then be read from its minibatch results on *training* examples.
This script compiles the same program with the cache off and on, re-evaluates every candidate on
the valset, and prints how many reported validation scores are wrong (offline, a few seconds)::

    python benchmarks/gepa_cache_check.py
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no model-metadata download


def main() -> None:
    import dspy

    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

    logging.disable(logging.WARNING)
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=30, n_val=16, n_test=0)
    student = make_student_lm(seed=0, noise=0.0)
    dspy.configure(lm=student)
    for cache in (False, True):
        opt = dspy.GEPA(task.metric, max_metric_calls=200, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                        track_stats=True, seed=0, gepa_kwargs={"cache_evaluation": cache})
        dr = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val).detailed_results
        true_val = [task.evaluate(c, splits.val, lm=student, num_threads=4) for c in dr.candidates]
        wrong = [(i, round(r, 3), round(t, 3)) for i, (r, t) in enumerate(zip(dr.val_aggregate_scores, true_val))
                 if abs(r - t) > 1e-9]
        print(f"cache_evaluation={cache}: {len(true_val)} candidates; reported != re-evaluated validation score "
              f"on {len(wrong)}: {wrong}")


if __name__ == "__main__":
    main()
