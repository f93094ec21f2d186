"""Session 46's review findings: each test fails without its fix."""

from __future__ import annotations

import asyncio
import logging

import dspy

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import make_student_lm

from helpers import small_splits


def test_an_async_object_of_another_event_loop_is_explained_in_the_failure(routing, reflection_lm, caplog):
    """A program whose aforward awaits something made on the application's own event loop (a pooled async
    client warmed there) fails on the engine's loop with asyncio's "attached to a different loop", which
    names neither loop: the failure says where aforward runs and what to do."""
    app_loop = asyncio.new_event_loop()
    warmed = app_loop.create_future()  # e.g. a connection pool's waiter, made while the app served a request

    class AppBound(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = dspy.Predict(dspy.Signature("ticket -> queue", routing.seed_instructions["route"]))

        def forward(self, ticket):
            return self.route(ticket=ticket)

        async def aforward(self, ticket):
            if "refund" in ticket.lower():
                await warmed
            return await self.route.acall(ticket=ticket)

    splits = small_splits(routing, n_train=20, n_val=12, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=reflection_lm, num_threads=4,
                    track_stats=True, verbose=False)
    try:
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), \
                caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
            out = opt.compile(AppBound(), trainset=splits.train, valset=splits.val)
    finally:
        app_loop.close()
    assert out.detailed_results.run_stats["failures"].get("program_error")
    warned = [r.getMessage() for r in caplog.records if "different loop" in r.getMessage()]
    assert warned and all("TurboGEPA's own event loop" in m for m in warned), warned
