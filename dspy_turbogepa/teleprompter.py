"""``TurboGEPA``: dspy.GEPA's constructor and ``compile()``, on the streaming engine.

Everything a dspy.GEPA user passes keeps its name and default, and its meaning except where
docs/deviations.md says otherwise (mostly errors raised earlier, and a wider search). Arguments are
validated in the constructor, and data in ``compile()`` before the first LM call, so a mistake costs
nothing.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
import math
import numbers
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import dspy
from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from dspy.teleprompt.teleprompt import Teleprompter

from dspy_turbogepa.adapter.data import (
    as_examples,
    check_examples,
    check_predictor_lms,
    compiled_submodules,
    flex_submodules,
    same_examples,
)
from dspy_turbogepa.adapter.evaluator import DspyEvaluator, ManagedEvaluator
from dspy_turbogepa.adapter.lm_discovery import compile_lms, lm_api_keys, warn_unpriced
from dspy_turbogepa.adapter.metric import check_metric_signature
from dspy_turbogepa.adapter.persistence import (
    PLAN_BUDGETS_EVENT,
    earlier_budgets,
    last_committed_mutation,
    stored_usage,
)
from dspy_turbogepa.adapter.program import ProgramCodec
from dspy_turbogepa.adapter.protocols import check_call_protocol, check_inputs_reach
from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder, is_builtin_proposer, with_trace_data
from dspy_turbogepa.adapter.results import build_result
from dspy_turbogepa.adapter.run_identity import REFLECTION_PART
from dspy_turbogepa.adapter.runner import RAISED_IN_RUN, run_coroutine_in_thread, sigint_raises_keyboard_interrupt
from dspy_turbogepa.engine import Candidate, EngineConfig, Orchestrator, RunInterruptedError
from dspy_turbogepa.engine.budget import mutation_worst_case
from dspy_turbogepa.engine.config import (
    CANDIDATE_SELECTIONS,
    MINIBATCH_SAMPLINGS,
    default_mutations_in_flight,
    default_reflections_in_flight,
    default_rung_fractions,
    validate_rung_fractions,
)
from dspy_turbogepa.engine.records import EngineResult, RunStats
from dspy_turbogepa.engine.systemic import MAX_PROPOSAL_WINDOW, NO_STORE_ADVICE, RESUME_ADVICE
from dspy_turbogepa.engine.types import Split
from dspy_turbogepa.errors import ConfigurationError, SystemicFailureError
from dspy_turbogepa.gepa_kwargs import GepaKwargsReader, MappedGepaKwargs
from dspy_turbogepa.proposers.reflection import ReflectiveProposer
from dspy_turbogepa.redaction import (
    run_secrets,
)
from dspy_turbogepa.tracking import CompileThreadCallbackPump, MlflowRunTracker, register_with_mlflow_autolog
from dspy_turbogepa.tracking.console_logs import visible_logs
from dspy_turbogepa.tracking.imports import ctrl_c_held, drop_cut_short_imports
from dspy_turbogepa.tracking.live_plots import LivePlots
from dspy_turbogepa.tracking.progress import OrchestratorSource, ProgressDisplay

logger = logging.getLogger(__name__)

#: The file dspy.GEPA (gepa) keeps its resumable state in, under its run_dir (our log_dir).
DSPY_GEPA_CHECKPOINT = "gepa_state.bin"


#: ``log_dir`` as this compile resolved it (per context: two compiles of one optimizer may run at once).
_LOG_PATH: ContextVar[Path | None] = ContextVar("turbogepa_log_path", default=None)


class _DefaultSelector(str):
    """The default ``component_selector`` ("round_robin", equal to it in every way) — but recognisable,
    so operator credit may adapt the mix only when the user did not choose a selector explicitly."""


DEFAULT_COMPONENT_SELECTOR = _DefaultSelector("round_robin")


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one in all but type: a numpy integer, or a float such as ``1e3``
    (dspy.GEPA takes both, so code written for it must keep working); None otherwise. A bool is not
    a count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    number = _as_int(value)
    if number is None:
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}.")
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return number


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number of any type (a NumPy scalar, a Decimal; not a bool),
    else None: a budget or price computed with NumPy was refused as "not a positive number"."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):  # a signaling NaN, an int too large for a float: not finite
        return math.nan


def _positive_real(name: str, value: Any) -> float | None:
    """A budget in dollars or seconds: positive; ``inf`` is no limit."""
    if value is None:
        return None
    number = _real(value)
    if number is None or math.isnan(number) or number <= 0:
        raise ValueError(f"{name} must be a positive number or None (no limit), got {value!r}.")
    return number


def _count(name: str, value: Any, feature: str) -> int:
    """An integer >= 0 where 0 turns ``feature`` off (a bool is refused: ``True`` is not a count)."""
    number = _as_int(value)
    if number is None or number < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 turns {feature} off), got {value!r}.")
    return number


class TurboGEPA(dspy.GEPA, Teleprompter):
    """Drop-in replacement for ``dspy.GEPA`` that keeps every allowed LM slot busy.

    Subclasses ``dspy.GEPA`` so ``isinstance(opt, dspy.GEPA)`` holds, and lists ``Teleprompter`` as a
    direct base so ``mlflow.dspy.autolog()`` (which patches only direct subclasses) records compiles.

    dspy.GEPA's arguments keep their names and defaults; the differences (docs/deviations.md has them
    all) are mostly checks made in the constructor instead of mid-run: ``perfect_score=None`` needs
    ``skip_perfect_score=False``; ``candidate_selection_strategy`` also takes ``"epsilon_greedy"`` and
    ``"top_k_pareto"`` but not a gepa ``CandidateSelector`` object; ``use_wandb=True`` raises
    ``NotImplementedError`` (``code_proposer`` has no effect: a student with ``dspy.Flex`` submodules is
    refused by ``compile``); ``seed=None`` runs as seed 0;
    ``max_merge_invocations=None`` means no limit; ``gepa_kwargs`` keys are mapped, refused or ignored
    with a warning (``dspy_turbogepa.gepa_kwargs``).

    Parameters beyond dspy.GEPA's (all keyword-only, all optional):
        max_mutations_in_flight: the most mutations running at once; the engine adapts the number
            between 1 and this bound to the share of reflections that succeed and the budget left, and
            speculative chaining may run one more (default ``max(2, n // 2)``, n = ``num_threads``, else
            ``dspy.settings.num_threads``, else 8).
        max_reflections_in_flight: reflection LM calls at once (default ``ceil(num_threads / 4)``, at most 8
            and at most ``max_mutations_in_flight``).
        rung_fractions: validation shard fractions for successive halving, increasing, ending at 1.0
            (default: a geometric ladder from ``reduction_factor``, shards under 8 examples dropped, so a
            valset under 24 examples gets ``(1.0,)``: no halving).
        reduction_factor: ratio between consecutive validation shards when ``rung_fractions`` is not set
            (default 3.0).
        deterministic: commit results in launch order so the same seed, ``num_threads`` and in-flight
            limits with a deterministic LM give the same program (default True; False commits in
            completion order).
        token_budget, cost_budget_usd, time_budget_seconds: budgets on top of dspy.GEPA's metric-call
            budget (LM tokens of the program, an LLM-judge metric's and reflection's; dollars as
            dspy/litellm report them — calls through LMs the optimizer does not hold, an LLM-judge
            metric's own, priced from DSPy's model metadata —; wall clock from the start of the search,
            after compile's checks and set-up). With ``track_stats=True`` ``detailed_results.stop_reason``
            names the one that stopped the run. Tokens and dollars are caps on the whole run, every
            session of a ``log_dir``: once the total reaches one, every evaluation or reflection that
            would be paid for is refused, in the mutations already running too (they end as
            ``budget_stopped``), so the run passes the cap only by the work already on the wire (and by
            the seed program's validation, which always runs); stored work is replayed for free. At the
            time budget nothing new is launched and the work in flight finishes.
        strict_budget: never pass ``max_metric_calls``: a mutation starts only if its worst case fits,
            so the run may stop up to one mutation's cost below the limit (default False: dspy.GEPA's
            rule, the budget is checked before each mutation starts and the last one may finish,
            overshooting by less than ``2 * reflection_minibatch_size + len(valset)`` calls).
        verbose: show live progress (a tqdm bar on a terminal or in Jupyter; otherwise an INFO line on
            a new best, at most one a second, and every 5-60 s while something changes). Logs go
            to the ``dspy_turbogepa`` logger; in a process that configured no logging at all, it gets a
            stderr handler at INFO for the compile (dspy does the same for its own logger at import).
        plot_format: the plots a compile writes into ``log_dir`` (``best_over_time`` and ``lineage``),
            and the best-score plot it draws for MLflow without a ``log_dir``: ``"svg"`` (default:
            milliseconds, no dependency, a hover tooltip per candidate; also redrawn while the run goes,
            at most every 30 s, docs/run_store.md), ``"png"`` (matplotlib, at the end only;
            the ``plots`` extra: about a second of CPU for tens of candidates, most of it matplotlib's
            import, several seconds for hundreds), or None (no plots; summary.json is still written).
        price_table: ``{model: ($ per 1M prompt tokens, $ per 1M completion tokens)}`` for models whose
            price dspy/litellm do not know (every LM call of the program, the metric and reflection; a key
            matches ``"provider/model"`` or ``"model"``, and an LM named without a provider matches a key
            with one; it overrides the reported cost).
        adaptive_proposal_mix: when ``component_selector`` is left at its default, let operator credit
            choose between rewriting one component and all of them, shifting toward whichever makes new
            best candidates in this run (default True; an explicit ``component_selector`` always wins;
            False keeps dspy.GEPA's round robin). Per-kind credit is reported either way.
        minibatch_sampling: ``"failure_first"`` (default) draws the training examples the parent's
            lineage failed (or was never tried on) before the ones it already solves, so fewer mutations
            end as skipped all-perfect minibatches; an example is drawn again only after half an epoch of
            draws. ``"epoch"``: dspy.GEPA's plain epoch-shuffled minibatches, and no scouting (the
            scouts are drawn in failure-first order; ``reflection_scouts`` is not used).
        max_sibling_reflections: best-of-k. While most reflections fail to beat their parent on the
            minibatch, draw up to this many at once on the same parent and minibatch (each reading the
            examples in another order) and send only the child that does best there on to validation,
            so a failed reflection no longer costs a whole round-trip. k is ``floor(1 / p)`` for the
            recent share ``p`` of children that beat their parent, so it stays 1 while most succeed
            (default 4, at most ``max_reflections_in_flight``; 1 = dspy.GEPA's one reflection per step).
        reflection_feedback_reuse: besides its minibatch, a reflection also reads up to this many of the
            parent's own failures on other training examples, from evaluations already paid for (the
            minibatch that created the parent, earlier minibatches it was reflected on). More feedback
            per reflection means more fixed in one step; no rollout is re-run or charged to the budget
            (the metric is asked for ``pred_name`` feedback on them, as on the minibatch); the acceptance
            test stays on the minibatch alone. Default 3; 0 = dspy.GEPA's reflection on the minibatch only.
        reflection_scouts: each reflection also evaluates its parent on up to this many more training
            examples it has no score on (failure-first order), in the same wave as its minibatch, and
            reads their failures. With ``num_threads`` slots a minibatch of 3 leaves most of a wave
            idle, so this costs metric calls but no round-trip; a reflection that reads more failures
            fixes more in one step, and steps (reflect, then validate) are what a run waits for. The
            acceptance test stays on the minibatch; scouts are only paid for where the budget has room.
            At most ``num_threads - reflection_minibatch_size`` (none when ``num_threads`` is not larger
            than the minibatch). Needs ``minibatch_sampling="failure_first"``. Default 5; 0 = dspy.GEPA's
            minibatch alone.
        speculative_chaining: while the search runs one mutation at a time, start the next reflection
            from the newest child as soon as it beats its parent on the minibatch, while its validation
            runs, instead of after it. Its work is kept only if that child joins the pool as a parent
            ``candidate_selection_strategy`` could pick; otherwise its reflection and evaluations were
            spent for nothing (``run_stats["chaining"]["orphaned"]``). Default True; False = dspy.GEPA's
            order, each reflection from a committed parent.
    """

    def __init__(
        self,
        metric: Any,
        *,
        auto: Literal["light", "medium", "heavy"] | None = None,
        max_full_evals: int | None = None,
        max_metric_calls: int | None = None,
        reflection_minibatch_size: int | None = 3,
        candidate_selection_strategy: Literal["pareto", "current_best", "epsilon_greedy", "top_k_pareto"] = "pareto",
        reflection_lm: dspy.LM | None = None,
        skip_perfect_score: bool = True,
        add_format_failure_as_feedback: bool = False,
        instruction_proposer: Any = None,
        code_proposer: Any = None,
        component_selector: Any = DEFAULT_COMPONENT_SELECTOR,
        use_merge: bool = True,
        max_merge_invocations: int | None = 5,
        num_threads: int | None = None,
        failure_score: float = 0.0,
        perfect_score: float | None = 1.0,
        log_dir: str | None = None,
        track_stats: bool = False,
        use_wandb: bool = False,
        wandb_api_key: str | None = None,
        wandb_init_kwargs: dict[str, Any] | None = None,
        track_best_outputs: bool = False,
        warn_on_score_mismatch: bool = True,
        use_mlflow: bool = False,
        seed: int | None = 0,
        gepa_kwargs: dict | None = None,
        # ---- TurboGEPA's own engine knobs
        max_mutations_in_flight: int | None = None,
        max_reflections_in_flight: int | None = None,
        rung_fractions: Sequence[float] | None = None,
        reduction_factor: float = 3.0,
        deterministic: bool = True,
        adaptive_proposal_mix: bool = True,
        minibatch_sampling: Literal["failure_first", "epoch"] = "failure_first",
        max_sibling_reflections: int = 4,
        reflection_feedback_reuse: int = 3,
        reflection_scouts: int = 5,
        speculative_chaining: bool = True,
        strict_budget: bool = False,
        token_budget: int | None = None,
        cost_budget_usd: float | None = None,
        time_budget_seconds: float | None = None,
        price_table: dict[str, tuple[float, float]] | None = None,
        plot_format: Literal["svg", "png"] | None = "svg",
        verbose: bool = True,
    ) -> None:
        check_metric_signature(metric)
        n_budgets = (max_metric_calls is not None) + (max_full_evals is not None) + (auto is not None)
        if n_budgets != 1:
            raise ConfigurationError(
                "Exactly one of max_metric_calls, max_full_evals, auto must be set. You set "
                f"max_metric_calls={max_metric_calls}, max_full_evals={max_full_evals}, auto={auto}. "
                "For example: TurboGEPA(metric, auto='light', ...) or TurboGEPA(metric, max_metric_calls=500, ...)."
            )
        if auto is not None and (not isinstance(auto, str) or auto not in AUTO_RUN_SETTINGS):
            raise ValueError(f"auto must be one of {sorted(AUTO_RUN_SETTINGS)}, got {auto!r}.")
        max_metric_calls = _positive_int("max_metric_calls", max_metric_calls)
        max_full_evals = _positive_int("max_full_evals", max_full_evals)
        # None: gepa's own default (``reflection_minibatch_size or 3``), and what a custom batch_sampler needs
        minibatch_size_given = reflection_minibatch_size is not None
        reflection_minibatch_size = _positive_int(
            "reflection_minibatch_size", 3 if reflection_minibatch_size is None else reflection_minibatch_size,
            allow_none=False)
        num_threads = _positive_int("num_threads", num_threads)
        max_mutations_in_flight = _positive_int("max_mutations_in_flight", max_mutations_in_flight)
        max_reflections_in_flight = _positive_int("max_reflections_in_flight", max_reflections_in_flight)
        max_sibling_reflections = _positive_int(
            "max_sibling_reflections", max_sibling_reflections, allow_none=False)  # type: ignore[assignment]
        reflection_feedback_reuse = _count("reflection_feedback_reuse", reflection_feedback_reuse, "feedback reuse")
        reflection_scouts = _count("reflection_scouts", reflection_scouts, "scouting")
        if max_merge_invocations is not None:  # 0: merging on, never invoked (as in dspy.GEPA)
            max_merge_invocations = _count("max_merge_invocations", max_merge_invocations, "merging")
        token_budget = _positive_int("token_budget", token_budget)
        cost_budget_usd = _positive_real("cost_budget_usd", cost_budget_usd)
        time_budget_seconds = _positive_real("time_budget_seconds", time_budget_seconds)
        if price_table is not None and (not isinstance(price_table, dict) or not all(
            isinstance(k, str) and isinstance(v, (tuple, list)) and len(v) == 2
            and all((x := _real(rate)) is not None and math.isfinite(x) and x >= 0 for rate in v)
            for k, v in price_table.items()
        )):
            raise ValueError(
                "price_table must map model names to (dollars per 1M prompt tokens, dollars per 1M completion "
                "tokens), finite and non-negative, e.g. {'openai/my-finetune': (0.15, 0.6)}."
            )
        if reflection_lm is None and instruction_proposer is None:
            raise ConfigurationError(
                "GEPA requires a reflection language model, or custom instruction proposer to be provided. "
                "Pass reflection_lm=dspy.LM('openai/gpt-5', temperature=1.0, max_tokens=32000) (a strong model "
                "helps), or instruction_proposer=<your ProposalFn>."
            )
        if reflection_lm is not None and not isinstance(reflection_lm, dspy.BaseLM):
            if isinstance(reflection_lm, str):
                hint = f" Wrap the model name: reflection_lm=dspy.LM({reflection_lm!r})."
            elif callable(reflection_lm):  # a function that calls a model: GEPA's ProposalFn is its place
                hint = (" To write the new instructions with your own function, pass it as instruction_proposer="
                        "(called with candidate, reflective_dataset, components_to_update; returns {name: text}); "
                        "to call a model DSPy has no client for, subclass dspy.BaseLM.")
            else:
                hint = ""
            raise TypeError(
                f"reflection_lm must be a dspy.LM (or dspy.BaseLM), got {type(reflection_lm).__name__}.{hint}")
        if instruction_proposer is not None and not callable(instruction_proposer):
            raise TypeError(
                "instruction_proposer must be callable as (candidate, reflective_dataset, components_to_update)."
            )
        if instruction_proposer is not None:  # called with keywords, as gepa calls a ProposalFn
            check_call_protocol(instruction_proposer, "instruction_proposer",
                                "proposer(candidate=..., reflective_dataset=..., components_to_update=...)",
                                kwargs=dict.fromkeys(("candidate", "reflective_dataset", "components_to_update")))
        if track_best_outputs and not track_stats:
            raise ConfigurationError("track_stats must be True if track_best_outputs is True.")
        if candidate_selection_strategy not in CANDIDATE_SELECTIONS:
            raise ValueError(
                f"candidate_selection_strategy must be one of {list(CANDIDATE_SELECTIONS)} (a gepa CandidateSelector "
                "object is not supported), "
                f"got {candidate_selection_strategy!r}."
            )
        if not callable(component_selector) and component_selector not in ("round_robin", "all"):
            raise ConfigurationError(
                f"Unknown module_selector strategy: component_selector={component_selector!r}. "
                "Use 'round_robin', 'all', or a callable (state, trajectories, subsample_scores, candidate_idx, "
                "candidate) -> list[str]."
            )
        if callable(component_selector):  # called positionally, as gepa calls a ReflectionComponentSelector
            check_call_protocol(component_selector, "component_selector",
                                "selector(state, trajectories, subsample_scores, candidate_idx, candidate)",
                                args=(None,) * 5)
        if use_wandb:
            raise NotImplementedError("use_wandb=True is not supported by TurboGEPA yet; use use_mlflow or log_dir.")
        if code_proposer is not None:  # dspy.GEPA uses it only for dspy.Flex submodules, which compile() refuses
            logger.warning("code_proposer is used only to evolve dspy.Flex submodules, which TurboGEPA does not "
                           "optimize yet (compile() refuses a student that has one): it has no effect here.")
        failure_score = _check_score(
            "failure_score", failure_score, "a failed example needs a score (dspy.GEPA's default is 0.0)")
        if perfect_score is None:  # dspy.GEPA accepts it for metrics without a maximum
            if skip_perfect_score:
                raise ConfigurationError(
                    "perfect_score=None with skip_perfect_score=True: without a perfect score no minibatch can "
                    "be skipped as solved. Pass skip_perfect_score=False, or the metric's maximum as perfect_score."
                )
        else:
            perfect_score = _check_score(  # inf: a threshold no score reaches, as dspy.GEPA reads it
                "perfect_score", perfect_score, "pass the metric's maximum (default 1.0), or None", allow_inf=True)
            if skip_perfect_score and failure_score >= perfect_score:
                # every failed example would count as solved: minibatches of failures skipped, never reflected on
                raise ConfigurationError(
                    f"failure_score={failure_score!r} is not below perfect_score={perfect_score!r}: with "
                    "skip_perfect_score=True a failed example would count as solved and never be reflected on. "
                    "Give failure_score the metric's worst score (default 0.0).")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a str or os.PathLike (a directory path), got {type(log_dir).__name__}.")
        if log_dir is not None and os.fspath(log_dir) == "":
            log_dir = "."  # dspy.GEPA joins file names onto it: its files go to the current directory
        if seed is not None:
            number = _as_int(seed)
            if number is None:
                raise TypeError(f"seed must be an int or None, got {seed!r}.")
            seed = number
        if (isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float))
                or not 1 < reduction_factor < math.inf):  # NaN fails the comparison too
            raise ValueError(f"reduction_factor must be a finite number > 1, got {reduction_factor!r}.")
        if rung_fractions is not None:
            validate_rung_fractions(rung_fractions)
        if minibatch_sampling not in MINIBATCH_SAMPLINGS:
            raise ValueError(
                f"minibatch_sampling must be one of {list(MINIBATCH_SAMPLINGS)}, got {minibatch_sampling!r}."
            )
        if gepa_kwargs is not None and not isinstance(gepa_kwargs, dict):
            raise TypeError(f"gepa_kwargs must be a dict or None, got {type(gepa_kwargs).__name__}.")
        self._gepa_kwargs_reader = GepaKwargsReader(minibatch_size_given=minibatch_size_given)
        mapped = self._gepa_kwargs_reader.read(gepa_kwargs or {})
        if (mapped.mlflow_tracking_uri or mapped.mlflow_experiment_name) and not use_mlflow:
            logger.warning("gepa_kwargs['mlflow_tracking_uri'] / ['mlflow_experiment_name'] apply with use_mlflow=True "
                           "(as in gepa); with use_mlflow=False they have no effect.")

        # dspy.GEPA's attribute names: get_params() consumers (MLflow autolog) read them.
        self.metric_fn = metric
        self.auto = auto
        self.max_full_evals = max_full_evals
        self.max_metric_calls = max_metric_calls
        self.reflection_minibatch_size = reflection_minibatch_size
        self.candidate_selection_strategy = candidate_selection_strategy
        self.reflection_lm = reflection_lm
        self.skip_perfect_score = skip_perfect_score
        self.add_format_failure_as_feedback = add_format_failure_as_feedback
        self.use_merge = use_merge
        self.max_merge_invocations = max_merge_invocations
        self.num_threads = num_threads
        self.failure_score = failure_score
        self.perfect_score = perfect_score
        self.log_dir = log_dir
        self.track_stats = track_stats
        self.use_wandb = use_wandb
        self.wandb_api_key = wandb_api_key
        self.wandb_init_kwargs = wandb_init_kwargs
        self.warn_on_score_mismatch = warn_on_score_mismatch
        self.use_mlflow = use_mlflow
        self.track_best_outputs = track_best_outputs
        self.seed = seed
        self.custom_instruction_proposer = instruction_proposer
        self.custom_code_proposer = code_proposer
        self.component_selector = component_selector
        self.gepa_kwargs = gepa_kwargs or {}
        self.max_mutations_in_flight = max_mutations_in_flight
        self.max_reflections_in_flight = max_reflections_in_flight
        self.rung_fractions = tuple(rung_fractions) if rung_fractions is not None else None
        self.reduction_factor = float(reduction_factor)
        self.deterministic = deterministic
        self.adaptive_proposal_mix = bool(adaptive_proposal_mix)
        self.minibatch_sampling = minibatch_sampling
        self.max_sibling_reflections = max_sibling_reflections
        self.reflection_feedback_reuse = reflection_feedback_reuse
        self.reflection_scouts = reflection_scouts
        self.speculative_chaining = bool(speculative_chaining)
        self.strict_budget = bool(strict_budget)
        self.token_budget = token_budget
        self.cost_budget_usd = cost_budget_usd
        self.time_budget_seconds = time_budget_seconds
        self.plot_format = _checked_plot_format(plot_format)
        self.verbose = bool(verbose)
        self.price_table = {k: (float(v[0]), float(v[1])) for k, v in (price_table or {}).items()}

    def get_params(self) -> dict[str, Any]:
        """A copy: MLflow's autolog updates the returned dict, which must not leak into this object."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ compile
    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
    ) -> dspy.Module:
        """Optimize ``student``'s instructions; returns a new program (the student is not modified)."""
        trainset = as_examples("trainset", trainset)
        valset = as_examples("valset", valset)
        if trainset is None or len(trainset) == 0:
            raise ConfigurationError("Trainset must be provided and non-empty: compile(student, trainset=[...]).")
        if teacher is not None:
            raise ConfigurationError("Teacher is not supported in DspyGEPA yet (nor in TurboGEPA): pass teacher=None.")
        if not isinstance(student, dspy.Module):
            raise TypeError(f"student must be a dspy.Module, got {type(student).__name__}.")
        if valset is not None and len(valset) == 0:
            raise ConfigurationError(
                "valset is empty. Pass valset=None to validate on the trainset (as dspy.GEPA does), "
                "or a non-empty list."
            )
        check_examples("trainset", trainset)
        if valset is not None:
            check_examples("valset", valset)
        # valset=None and valset=trainset (or an equal copy) are the same run: one evaluation serves both
        # (decided once: for a large dataset it hashes every example)
        shared = valset is None or same_examples(trainset, valset)
        # examples that will fail whatever the instructions say: left out of the systemic-failure check (the
        # same examples are checked, and warned about, once)
        expected: dict[str, list[int]] = {"val": check_inputs_reach(student, "trainset", trainset)} if shared else {
            "train": check_inputs_reach(student, "trainset", trainset),
            "val": check_inputs_reach(student, "valset", valset)}
        flex = flex_submodules(student)
        if flex:
            raise NotImplementedError(
                f"The student has dspy.Flex submodules ({', '.join(sorted(flex))}): dspy.GEPA evolves their "
                "code, which TurboGEPA does not support yet (it would optimize only the other predictors' "
                "instructions). Use dspy.GEPA for this program."
            )
        predictors = list(student.named_predictors())
        if not predictors:
            hidden = compiled_submodules(student)
            raise ValueError(
                "The student program has no predictors (dspy.Predict and friends) to optimize."
                + (f" DSPy hides the predictors of a submodule marked compiled ({', '.join(hidden)}: a "
                   f"compile() by another optimizer marks its result so): set its _compiled = False to "
                   f"optimize it." if hidden else ""))
        check_predictor_lms(predictors)
        self._gepa_settings()  # gepa_kwargs changed since the constructor: checked before any LM call
        # dspy's own proposer itself (a subclass may bring its LM): it writes with the configured LM
        if (self.reflection_lm is None and type(self.custom_instruction_proposer) is InstructionProposer
                and dspy.settings.lm is None):
            raise ConfigurationError(
                "No reflection LM: reflection_lm is None and no LM is configured (dspy.configure(lm=...)), so "
                "instruction_proposer=InstructionProposer() has no model to write instructions with. Pass "
                "reflection_lm=dspy.LM(...), or configure an LM.")

        budget = self._resolve_budget(len(predictors), trainset, valset)
        if valset is None:
            logger.warning(
                "No valset provided; using the trainset as valset. The optimized prompt will fit the trainset; "
                "pass a separate valset to select for generalization."
            )
        val = list(valset) if valset is not None else list(trainset)
        train = list(trainset)
        if budget == len(val):
            logger.warning(
                "The budget (%d metric calls) covers only the seed's validation on the valset (%d examples): "
                "nothing is left for the search, and the seed program will be returned. Raise max_metric_calls "
                "(or max_full_evals, or use auto=...).", budget, len(val))
        minibatch = min(self.reflection_minibatch_size or 3, len(train))  # the engine's sampler draws no more
        mutation = mutation_worst_case(minibatch, len(val))
        if self.strict_budget and len(val) < budget < len(val) + mutation:
            # the engine starts a mutation only when its worst case fits: here none ever can, and the run
            # ended at the budget with nothing said
            logger.warning(
                "strict_budget=True: the %d metric calls left after the seed's validation are fewer than one "
                "mutation's worst case (%d: its parent and child on a minibatch of %d, then the child on the "
                "valset of %d), so no mutation will run and the seed program will be returned. Raise "
                "max_metric_calls to at least %d, or pass strict_budget=False.",
                budget - len(val), mutation, minibatch, len(val), len(val) + mutation)
        if budget < len(val):
            raise ValueError(
                f"The budget ({budget} metric calls) does not cover one evaluation of the seed on the valset "
                f"({len(val)} examples). Raise max_metric_calls (or use auto=...)."
                + (" With valset=None the trainset is the valset: pass a smaller valset=[...] instead."
                   if valset is None else "")
            )
        num_threads = self.num_threads or dspy.settings.num_threads or 8

        codec = ProgramCodec(student)
        finished: list[dspy.Module] = []  # the optimized program, once the search has ended and it is built
        try:
            with sigint_raises_keyboard_interrupt():  # called from a coroutine under asyncio.run
                return self._compile_in(codec, student, train, val, budget, num_threads, shared, expected, finished)
        except KeyboardInterrupt:
            if not finished:
                raise
            # A Ctrl-C after the search ended, while its program was built or the run closed (the store
            # committing its last rows, threads, MLflow): what finished is stored, and the program is
            # returned as errors.md promises.
            logger.warning("Interrupted after the search ended: returning the optimized program (the run's "
                           "reports may be incomplete).")
            return finished[0]

    def _compile_in(self, codec: ProgramCodec, student: dspy.Module, train: list[Any], val: list[Any], budget: int,
                    num_threads: int, shared: bool, expected: Mapping[str, Sequence[int]],
                    finished: list[dspy.Module]) -> dspy.Module:
        """``compile`` once its arguments are checked: every thread, store and MLflow run it opens is
        released on any exit. The program is put in ``finished`` as soon as it exists."""
        with ExitStack() as cleanup:  # every thread, store and MLflow run opened below is released on any exit
            # log_dir resolved once, against the directory compile started in: a metric or program that
            # changes the working directory must not split the store, reports and stop file
            token = _LOG_PATH.set(Path(os.path.expanduser(os.fspath(self.log_dir))).absolute() if self.log_dir
                                  else None)
            cleanup.callback(_LOG_PATH.reset, token)
            # progress and result shown with no logging setup; lines named by compile when several run
            cleanup.enter_context(visible_logs(self.verbose, label=Path(self.log_dir).name if self.log_dir else None))
            # keys passed as dspy.LM(api_key=...) are masked like environment keys in the store, logs and MLflow
            reached = (student, self.reflection_lm, self.metric_fn, self.custom_instruction_proposer)
            cleanup.enter_context(run_secrets(lm_api_keys(*reached)))
            if self.cost_budget_usd is not None:
                # the configured LM is named even when every predictor holds its own: a judge metric's
                # dspy.Predict without an LM of its own would call it, and nothing shows whether one will
                warn_unpriced(compile_lms(*reached), self.price_table, self.cost_budget_usd)
            return self._run(codec, cleanup, train, val, budget, num_threads, shared_splits=shared,
                             expected_failures=expected, finished=finished)

    def _make_evaluator(self, codec: ProgramCodec, data: Mapping[Split, Sequence[dspy.Example]],
                        config: EngineConfig, num_threads: int) -> ManagedEvaluator:
        """The evaluator this compile runs its rollouts with (one per compile, closed when it ends).
        A subclass may return another :class:`ManagedEvaluator` (rollouts on Ray workers, say); the
        engine asks it only for ``evaluate``, and never more than ``num_threads`` at once."""
        return DspyEvaluator(
            codec,
            data,
            self.metric_fn,
            float(self.failure_score),
            max_workers=num_threads,
            keep_outputs=self.track_best_outputs,
            seed=self.seed,
            price_table=self.price_table,
            # two waves of evaluations, as the outage rule waits for: one candidate's minibatch and shard
            # failing is no sign the metric broke
            metric_probe_after=max(config.systemic_failure_window, 2 * num_threads),
        )

    def _run(
        self, codec: ProgramCodec, cleanup: ExitStack, train: list[dspy.Example], val: list[dspy.Example],
        budget: int, num_threads: int, shared_splits: bool = False,
        expected_failures: Mapping[str, Sequence[int]] | None = None, *, finished: list[dspy.Module],
    ) -> dspy.Module:
        """Build the engine around ``codec``'s program, run it and return the best program (also put in
        ``finished`` as soon as it is built).

        Resources are registered on ``cleanup`` as soon as they exist, so a failure anywhere (opening the
        store, building the engine, the run, the result) closes thread pools and the store and ends an
        MLflow run as FAILED instead of leaving it RUNNING.
        """
        proposer = self.custom_instruction_proposer or InstructionProposer()
        config = self._engine_config(budget, num_threads, len(val),
                                     n_examples=len(val) if shared_splits else len(val) + len(train))
        evaluator = self._make_evaluator(codec, {"train": train, "val": val}, config, num_threads)
        cleanup.callback(evaluator.close)
        builder = ReflectiveDatasetBuilder(
            codec,
            self.metric_fn,
            float(self.failure_score),
            self.add_format_failure_as_feedback,
            self.warn_on_score_mismatch,
            stringify=not is_builtin_proposer(proposer),
            metric_gate=getattr(evaluator, "metric_gate", None),
            metric_call=getattr(evaluator, "call_metric_for_feedback", None),
        )
        reflector = ReflectiveProposer(builder, proposer, self.reflection_lm,
                                       max_workers=config.max_reflections_in_flight, price_table=self.price_table,
                                       seed=self.seed,
                                       components_seen_running=getattr(evaluator, "components_seen_running", None),
                                       perfect_score=self.perfect_score,
                                       usage_noted=getattr(evaluator, "usage_noted", None))
        cleanup.callback(reflector.close)
        store, observers, known_evals, known_props, plan_budgets = self._open_store(
            codec.student, codec, train, val, cleanup, budget, config)
        if config.stop_file is not None and config.stop_file.exists():
            # gepa's rule (the file stops the run) holds, but a file left from stopping the last session
            # would otherwise end this one right after the seed with a single INFO line
            logger.warning("%s already exists: this run stops right after the seed's validation, as asked. "
                           "Delete the file to resume the search.", config.stop_file)
        display = ProgressDisplay(enabled=self.verbose, time_budget_seconds=self.time_budget_seconds,
                                  token_budget=self.token_budget, cost_budget_usd=self.cost_budget_usd)
        # MLflow: full-validation evaluations reach DSPy's callbacks on this thread (docs/mlflow.md)
        pump = CompileThreadCallbackPump(codec.build, val, instance=self) if dspy.settings.get("callbacks") else None
        tracker = None
        if self.use_mlflow:
            tracker = MlflowRunTracker(
                self._run_params(budget),
                seed_texts=codec.seed_texts(),
                trainset_size=len(train),
                valset_size=len(val),
                # with log_dir, its plots are uploaded instead
                plot_path=None if self.log_dir or self.plot_format is None else True,
                plot_format=self.plot_format or "svg",
                tracking_uri=self._gepa_settings().mlflow_tracking_uri,
                experiment_name=self._gepa_settings().mlflow_experiment_name,
            )
            cleanup.push(lambda _t, exc, _tb: tracker.abort(exc) if exc is not None else None)
        # SVG only: a PNG takes about a second to draw, too long to hold the engine's loop for
        live_plots = LivePlots(self._log_path(), budget=budget) if self.log_dir and self.plot_format == "svg" else None
        extra_observers = [o for o in (pump, tracker, live_plots) if o is not None]
        resumed = store is not None and store.resumed
        orchestrator = Orchestrator(
            config, evaluator, reflector, Candidate(codec.seed_texts()), range(len(train)), range(len(val)),
            observers=[*observers, display, *extra_observers], known_evaluations=known_evals,
            known_proposals=known_props, shared_splits=shared_splits, expected_failures=expected_failures,
            prior_usage=stored_usage(store) if resumed else None,
            replay_through=last_committed_mutation(store) if resumed else -1,
            earlier_budgets=plan_budgets or (),
        )
        if tracker is not None:
            tracker.provide_stats(lambda: live_run_stats(orchestrator, evaluator, reflector))
        if pump is not None:
            def stop_while_mlflow_answers() -> None:
                if not orchestrator.stop_requested:  # a press after the first: the runner has said it all
                    logger.warning("Interrupted: no new mutation will start; waiting for MLflow's callback under "
                                   "way to return (press Ctrl-C again to stop waiting).")
                orchestrator.request_stop("interrupted")

            pump.on_press = stop_while_mlflow_answers
        if live_plots is not None:
            live_plots.bind(orchestrator.snapshot)

        def on_tick() -> None:
            if pump is not None and pump.pending():
                with display.around_the_bar():  # autolog's "View run" lines
                    pump.drain()
            display.tick()

        display.bind(OrchestratorSource(  # stored evaluations count when replayed, as the budget counts them
            orchestrator,
            extra_backoffs=lambda: _other_retries(evaluator.rate_limit_stats(), reflector.rate_limit_stats()),
            paused=lambda: _pause_left(evaluator.rate_limit_stats()),
            reflection_paused=reflector.paused_seconds,
        ))
        logger.info(
            "TurboGEPA: budget %d metric calls; in flight at most: evaluations %d, mutations %d, reflections %d; "
            "validation rungs %s of the valset", budget, config.max_evals_in_flight, config.max_mutations_in_flight,
            config.max_reflections_in_flight, ", ".join(f"{f:.3g}" for f in config.rung_fractions),
        )
        result: EngineResult | None = None
        stopped_by = "stopped"  # what the progress display's last line says when the run raised
        try:
            result = run_coroutine_in_thread(
                orchestrator.run,
                on_interrupt=lambda: orchestrator.request_stop("interrupted"),
                on_grace_expired=orchestrator.cancel_in_flight,
                on_tick=on_tick,
            )
            # The search is over and stored: a Ctrl-C from now on must not lose its program (the run still
            # closes: the progress line, the store's last commit, up to 30 s on a slow disk, the final log
            # line). It is built at once, a press meanwhile held until it exists; compile() then returns it.
            with ctrl_c_held():
                live_run_stats(orchestrator, evaluator, reflector)  # fills result.stats: the orchestrator's own
                # every metric call the run's log_dir paid for, in all its sessions (run_stats'
                # metric_calls_replayed says how many of the stored ones this session's search used: a run
                # resumed with other search settings plans differently and may leave some unused)
                result.total_metric_calls += len(known_evals or ())
                program, detailed = self._result_program(codec, result)
                finished.append(program)
        except RunInterruptedError as exc:  # Ctrl-C before the seed was scored: nothing to return
            stopped_by = "interrupted before the seed was scored"
            raise KeyboardInterrupt(str(exc) + _kept_advice(store is not None)) from exc
        except KeyboardInterrupt as exc:  # a second Ctrl-C: the run was aborted at once
            if getattr(exc, RAISED_IN_RUN, False):  # not a press: the user's code raised it in the run
                stopped_by = "stopped by a KeyboardInterrupt raised in the run"
                if not exc.args:
                    exc.args = ("KeyboardInterrupt raised inside the run (by the program, the metric or a "
                                "callback), not by Ctrl-C: the work under way was cancelled."
                                + _kept_advice(store is not None),)
                raise
            stopped_by = "aborted by a second Ctrl-C"
            if not exc.args and not finished:  # said, as the grace period's end says it (a press held above
                # while the program was built is not this: compile returns the program)
                exc.args = ("Aborted by a second Ctrl-C: the work under way was cancelled."
                            + _kept_advice(store is not None),)
            raise
        except SystemicFailureError as exc:
            # the error's type first: "program_error" alone read as the user's program being at fault
            # when the LM refused the key
            cause = ", ".join(dict.fromkeys(c for c in (exc.error_type, exc.failure) if c)) or "systemic failure"
            stopped_by = f"stopped: {cause}, see the error below"
            if store is not None and exc.failure in _SEARCH_HOOK_FAILURES:
                # a stop callback or a component selector steers the search: not in the run key, and no
                # evaluation failed because of it (so none is marked to run again)
                exc.args = (f"{exc} Fix it and rerun with the same log_dir: the run resumes from what it stored.",)
            elif store is None and RESUME_ADVICE in str(exc):  # an outage or a quota: nothing was kept
                exc.args = (str(exc).replace(RESUME_ADVICE, NO_STORE_ADVICE),)
            elif store is not None:  # the error asks for a fix: a rerun runs these failures again (load_known)
                store.record_event("systemic_failure", {"failure": exc.failure, "error_type": exc.error_type})
                # the fix decides whether this log_dir can be reused: the run key covers the program, the
                # metric and each LM's model and endpoint, never an API key (a user who fixed the metric
                # was refused with "metric changed" and had to find out why)
                exc.args = (f"{exc} With the same log_dir, a rerun after a fix the run key does not see (an "
                            "API key, an environment variable, a file or service the metric reads) resumes this "
                            "run: what finished is not paid again, and what failed runs again. So does a "
                            "changed reflection LM or instruction proposer (new reflections ask it); any other "
                            "change (the program, the metric, the data, the task LM's model, endpoint or "
                            "settings) is another run: give it a new log_dir.",)
            raise
        except BaseException as exc:
            stopped_by = f"stopped by {type(exc).__name__}"
            raise
        finally:
            display.close(stop_reason=result.stop_reason if result is not None else stopped_by)
            if store is not None:  # closed by `cleanup`, like the pools, whatever happens next
                store.record_event("run_finished" if result is not None else "run_failed", {})
        if store is not None:
            # Committed before the reports: the writer holds up to ~50 ms of rows, and a kill -9 while the
            # reports are written lost the search's last evaluations (a review: 2 of 134, paid again).
            from dspy_turbogepa.store import RunStoreError

            try:
                store.flush(timeout=30.0)  # a stuck disk must not hold the program back (close() waits 30 s too)
            except RunStoreError as exc:  # rows the store could not write: said, as close() says them
                logger.warning("Run store: %s", exc)
            if store.gone():
                logger.warning("The run store %s was deleted or replaced during the run: nothing this session did is "
                               "kept, and a rerun with this log_dir pays for it again.", store.path)
        best = result.best
        if result.stop_reason == "interrupted":
            found = ("the seed program: nothing beat it yet" if result.best_index == 0
                     else "the best program found so far")
            advice = (f" Rerun with log_dir={str(self._log_path())!r} to resume without paying again for what finished."
                      if store is not None else " Set log_dir=... to make an interrupted run resumable.")
            logger.warning("Run interrupted: returning %s.%s", found, advice)
        stats = result.stats
        cost = stats.task_cost + stats.reflection_cost
        logger.info(
            "TurboGEPA finished (%s): best validation score %.4f (seed %.4f), %d candidates, %d metric "
            "calls%s%s%s%s",
            result.stop_reason, best.aggregate, result.records[0].aggregate, len(result.records),
            result.total_metric_calls,
            f" ({len(known_evals)} of them stored by earlier sessions)" if known_evals else "",
            f", failed evaluations {dict(stats.failures)}" if stats.failures else "",
            f", LM cost ${cost:.4g}" if cost > 0 else "",
            ("; summary.json and plots in {} (the run store was lost)" if store.gone() else
             "; run store, summary.json and plots in {}").format(self._log_path()) if store is not None else "",
        )
        modules_before = set(sys.modules)
        try:
            # a resumed session replays what earlier ones stored at its start: its plots' clock is its own
            note = "resumed: times count from this session's start" if resumed else None
            written = self._write_reports(detailed, result, budget, note=note) if self.log_dir else []
            if tracker is not None:
                # only this session's reports: an earlier session's plots left in log_dir are not this run's
                tracker.finish(result, program, detailed, artifacts=written)
        except KeyboardInterrupt as exc:
            # The search is over and its evaluations are stored: a Ctrl-C now skips the reports, never
            # the program.
            logger.warning("Interrupted while writing the run's reports (summary, plots, MLflow): they are "
                           "incomplete; returning the optimized program.")
            drop_cut_short_imports(modules_before)
            if tracker is not None:
                tracker.abort(exc)
        return program

    def _result_program(self, codec: ProgramCodec, result: EngineResult) -> tuple[dspy.Module, Any]:
        """The best candidate as a program, with ``detailed_results`` when ``track_stats``."""
        program = codec.build(result.best.candidate.texts)
        # where the files are: "~/runs/x" named a directory the user cannot open by that string, and "runs/x"
        # another one once the program (or the metric) changed the working directory
        log_dir = str(self._log_path()) if self.log_dir else None
        detailed = build_result(result, codec.build, log_dir, self.seed, self.track_best_outputs)
        if self.track_stats:
            program.detailed_results = detailed
        return program, detailed

    def _log_path(self) -> Path:
        """``log_dir`` as the run store opens it (``~`` expanded): summary.json, the plots and the stop
        file must land next to the store, not in a directory literally named ``~``."""
        assert self.log_dir is not None  # called only when a log_dir is set
        return _LOG_PATH.get() or Path(os.path.expanduser(os.fspath(self.log_dir)))

    def _write_reports(self, detailed: Any, result: EngineResult, budget: int, *,
                       note: str | None = None) -> list[Path]:
        """``log_dir/summary.json`` and the plots (``plot_format``, ``note`` added to their titles); a
        reporting failure never loses the program. Returns the files this call wrote."""
        from dspy_turbogepa.tracking.summary import write_summary

        extra = {
            "timings": {"wall_seconds": result.wall_seconds},
            "budgets": {"max_metric_calls": budget, "token_budget": self.token_budget,
                        "cost_budget_usd": self.cost_budget_usd, "time_budget_seconds": self.time_budget_seconds},
        }
        written: list[Path] = []
        try:
            written.append(Path(write_summary(self._log_path(), detailed, extra)))
        except Exception:  # a report is never worth the optimized program: log it, return the program
            logger.exception("Could not write summary.json to %s", self.log_dir)
        try:
            from dspy_turbogepa.tracking.plots import plot_best_over_time, plot_lineage

            if self.plot_format is not None:
                # the whole result, as MLflow's copy is drawn: both panels' lines run on to the end of the run
                suffix = f".{self.plot_format}"
                written.append(Path(plot_best_over_time(result, self._log_path() / f"best_over_time{suffix}",
                                                        budget=budget, note=note)))
                written.append(Path(plot_lineage(result.records, result.fronts, self._log_path() / f"lineage{suffix}",
                                                 note=note)))
        except Exception:  # plotting must never cost the user their optimized program; say why
            logger.exception("Plotting into %s failed", self.log_dir)
        return written

    # ------------------------------------------------------------------ helpers
    def _open_store(
        self, student: dspy.Module, codec: ProgramCodec, train: list[dspy.Example], val: list[dspy.Example],
        cleanup: ExitStack, budget: int, config: EngineConfig,
    ) -> tuple[Any, list[Any], dict[Any, Any] | None, dict[str, Any] | None, list[int] | None]:
        """With ``log_dir``: open (or resume) the run store; refuse a log_dir holding a different run. Also
        returns the budgets the search plans with before this one's (see ``earlier_budgets``), recorded at
        once for the next session (a session that ends before it records them is skipped by that one).

        The store is closed by ``cleanup`` from the moment it is open, so a failure while reading what
        an earlier process stored does not leave its writer thread and connection behind."""
        if not self.log_dir:
            return None, [], None, None, None
        from dspy_turbogepa.adapter.persistence import StoreObserver, load_known
        from dspy_turbogepa.adapter.run_identity import readable_lm, readable_task_lm, run_key
        from dspy_turbogepa.store import RunStore
        from dspy_turbogepa.store.sqlite_store import RUN_KEY_PYTHON, RUN_KEY_READABLE

        key = run_key(
            student, train, val, self.seed, metric=self.metric_fn, failure_score=self.failure_score,
            context_lm=dspy.settings.lm, reflection_lm=self.reflection_lm, proposer=self.custom_instruction_proposer,
            add_format_failure_as_feedback=self.add_format_failure_as_feedback, adapter=dspy.settings.adapter,
        )
        scalar = (int, float, str, bool, type(None))
        meta: dict[str, Any] = {k: list(v) if isinstance(v, (list, tuple)) else v  # rung_fractions: a list
                                for k, v in self._run_params(budget).items()
                                if (isinstance(v, scalar) or isinstance(v, (list, tuple)) and all(
                                    isinstance(x, scalar) for x in v)) and k not in ("wandb_api_key",)}
        meta[PLAN_META] = _plan_of(config)
        meta[PLAN_BUDGETS_EVENT] = True  # this session records the budgets it plans with (earlier_budgets)
        # what a refused log_dir's error can name instead of the hashes of the run key's LM parts
        meta[RUN_KEY_READABLE] = {"task_lm": readable_task_lm(dspy.settings.lm, dspy.settings.adapter),
                                  "reflection": readable_lm(self.reflection_lm),
                                  RUN_KEY_PYTHON: "{}.{}".format(*sys.version_info[:2])}
        # the reflection (LM, proposer) may change between sessions: no stored score depends on it, so a fixed
        # or swapped reflection_lm continues the run (what was stored replays; new reflections ask it)
        store = RunStore.open(self._log_path(), key, meta=meta, session_parts=(REFLECTION_PART,))
        cleanup.callback(store.close)
        if not store.resumed and (self._log_path() / DSPY_GEPA_CHECKPOINT).exists():
            # A user switching from dspy.GEPA expects its log_dir to resume; it cannot (the checkpoint is a
            # pickle, which we never load, of another engine's state), and paying again must not be silent.
            logger.warning("%s holds a dspy.GEPA checkpoint (%s); TurboGEPA cannot resume it and starts this run "
                           "from the student, with its own run store beside it. Give TurboGEPA runs a log_dir of "
                           "their own.", self.log_dir, DSPY_GEPA_CHECKPOINT)
        known_evals = known_props = None
        if store.resumed:
            same_reflection = store.sessions_sharing(REFLECTION_PART)
            sessions = store.sessions()
            _warn_changed_plan(sessions[-2].meta if len(sessions) > 1 else {}, sessions[-1].meta, self.log_dir)
            if any(s.id not in same_reflection for s in sessions):
                logger.info("The reflection (reflection_lm, its settings or the instruction_proposer) differs from "
                            "an earlier session's in %s: the run continues with it; what earlier sessions stored "
                            "replays as it was (their proposals too), and new reflections ask this one", self.log_dir)
            known_evals, known_props = load_known(
                store, codec, {"train": train, "val": val}, codec.seed_texts(), need_outputs=self.track_best_outputs
            )
            if known_evals or known_props:
                logger.info("Resuming the run in %s: %d finished evaluations and %d proposals are stored; those "
                            "the search asks for again are not paid again", self.log_dir, len(known_evals),
                            len(known_props))
            else:  # e.g. a session stopped on a systemic failure: its failures run again after the fix
                logger.info("Resuming the run in %s: nothing stored there can be replayed (failures of the LM "
                            "service or of a stopped session run again)", self.log_dir)
        store.record_event("run_started", {"resumed": store.resumed, "budget": budget})
        plan_budgets = earlier_budgets(store) if store.resumed and config.deterministic else []
        store.record_event(PLAN_BUDGETS_EVENT, {"budgets": [*plan_budgets, budget]})  # what the next replays
        return (store, [StoreObserver(store, keeps_outputs=self.track_best_outputs)], known_evals, known_props,
                plan_budgets)


    def _run_params(self, budget: int) -> dict[str, Any]:
        """``get_params()`` with this run's metric-call budget. The attribute is not read back: two compiles
        of one optimizer object at once (one resolving ``auto`` or ``max_full_evals`` for its data while
        the other sets up) would record each other's budget."""
        return {**self.get_params(), "max_metric_calls": budget}

    def _resolve_budget(self, num_preds: int, trainset: Sequence[Any], valset: Sequence[Any] | None) -> int:
        """dspy.GEPA's budget arithmetic, to the call (including overwriting ``max_metric_calls`` for auto,
        as dspy.GEPA does; this run uses the value returned)."""
        if self.auto is not None:
            budget = self.auto_budget(
                num_preds=max(num_preds, 1),
                num_candidates=AUTO_RUN_SETTINGS[self.auto]["n"],
                valset_size=len(valset) if valset is not None else len(trainset),
            )
        elif self.max_full_evals is not None:
            budget = self.max_full_evals * (len(trainset) + (len(valset) if valset is not None else 0))
        else:
            assert self.max_metric_calls is not None
            return int(self.max_metric_calls)
        self.max_metric_calls = budget
        return int(budget)

    def _gepa_settings(self) -> MappedGepaKwargs:
        """``gepa_kwargs`` as this compile reads it: dspy.GEPA reads the attribute at compile time, so a
        change made after the constructor counts (and is checked) here too."""
        return self._gepa_kwargs_reader.read(self.gepa_kwargs or {})

    def _engine_config(
        self, budget: int, num_threads: int, val_size: int, n_examples: int | None = None
    ) -> EngineConfig:
        """``n_examples``: the distinct examples the run can evaluate (valset and trainset, or one of them
        when they are the same): no more evaluations can fail when every one does."""
        mapped = self._gepa_settings()
        mutations = self.max_mutations_in_flight or default_mutations_in_flight(num_threads)
        reflections = self.max_reflections_in_flight or min(mutations, default_reflections_in_flight(num_threads))
        return EngineConfig(
            max_metric_calls=budget,
            max_evals_in_flight=num_threads,
            max_mutations_in_flight=mutations,
            max_reflections_in_flight=reflections,
            reflection_minibatch_size=self.reflection_minibatch_size or 3,  # None: gepa's default
            rung_fractions=self.rung_fractions or default_rung_fractions(val_size, self.reduction_factor),
            candidate_selection=self.candidate_selection_strategy,
            minibatch_sampling=self.minibatch_sampling,
            max_siblings=self.max_sibling_reflections,
            reflection_feedback_reuse=self.reflection_feedback_reuse,
            reflection_scouts=self.reflection_scouts,
            speculative_chaining=self.speculative_chaining,
            component_selector=str(self.component_selector) if isinstance(self.component_selector, str)
            else with_trace_data(self.component_selector),
            accept_equal_on_minibatch=mapped.accept_equal_on_minibatch,
            # by type, not identity: a deep copy or an unpickled optimizer holds another instance of it
            adaptive_components=self.adaptive_proposal_mix and isinstance(self.component_selector, _DefaultSelector),
            skip_perfect_score=self.skip_perfect_score,
            perfect_score=math.inf if self.perfect_score is None else float(self.perfect_score),
            seed=self.seed if self.seed is not None else 0,
            deterministic=self.deterministic,
            strict_budget=self.strict_budget,
            use_merge=bool(self.use_merge),
            max_merge_invocations=self.max_merge_invocations if self.max_merge_invocations is not None else 10**9,
            stop_file=self._log_path() / "gepa.stop" if self.log_dir else None,
            stop_callbacks=mapped.stop_callbacks,
            # "every evaluation fails" is judged on the seed's validation pass when it is small: its first
            # completions may all be the examples a data-dependent bug fails on (8 of 12 stopped a run)
            # (and at most every example there is: with 4 training examples and valset=None, 8 failed
            # evaluations never happen, and a run that failed every one returned the seed)
            systemic_failure_window=min(max(8, min(val_size, 32)), max(1, n_examples or 32)),
            systemic_proposal_window=MAX_PROPOSAL_WINDOW,  # reflections have nothing to do with the data size
            max_seconds=self.time_budget_seconds,
            max_tokens=self.token_budget,
            max_cost=self.cost_budget_usd,
        )


#: Systemic failures of the user's search hooks (gepa_kwargs['stop_callbacks'], component_selector).
_SEARCH_HOOK_FAILURES = frozenset({"stop_callback_error", "no_components", "selector_error"})


def _check_score(name: str, value: Any, fix: str, allow_inf: bool = False) -> float:
    """The score as a float: a NumPy number (``np.float32(0)``) is one too, as dspy.GEPA accepts it, and
    must not reach the run key or summary.json as a NumPy type. ``allow_inf``: for a threshold, which is
    compared with scores and never summed, ``+inf`` means "never reached"."""
    number = _real(value)  # dspy.GEPA takes a Decimal too
    if number is None:
        raise TypeError(f"{name} must be a number, got {value!r}: {fix}.")
    if isinstance(value, decimal.Decimal) and value.is_finite() and math.isinf(number):
        raise ValueError(f"{name} must be finite{' or inf' if allow_inf else ''}, got {value!r} (too large for a "
                         f"float): {fix}.")
    if allow_inf and number == math.inf:
        return math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite{' or inf' if allow_inf else ''}, got {value!r}: {fix}.")
    return number


def _kept_advice(stored: bool) -> str:
    """What an interrupted run that returns no program kept, and how to go on from it."""
    return (" The evaluations that finished are kept in the run store (log_dir); rerun with the same log_dir to "
            "resume without paying for them again." if stored else
            " Set log_dir=... to keep finished evaluations across an interrupted run.")


def live_run_stats(orchestrator: Orchestrator, evaluator: ManagedEvaluator, reflector: Any = None) -> RunStats:
    """The run's stats with the evaluator's (and the reflection LM's) rate-limit counters and windows as
    they are now (the engine fills them only at the end), so MLflow charts them over time."""
    limits = evaluator.rate_limit_stats()
    if reflector is not None:
        limits["reflection"] = reflector.rate_limit_stats()
        orchestrator.stats.reflective_records_skipped = Counter(reflector.skipped_records())
        orchestrator.stats.feedback_calls = reflector.feedback_calls()
    orchestrator.stats.rate_limits = limits
    return orchestrator.stats


def _other_retries(evaluator: Mapping[str, Any], reflector: Mapping[str, Any]) -> int:
    """LM retries the engine's evaluations do not count (theirs are 429 retries): the evaluator's
    transient ones, and all of the reflection LM's."""
    return int(evaluator.get("transient_retries", 0)) + sum(
        int(reflector.get(k, 0)) for k in ("rate_limit_retries", "transient_retries"))


def _pause_left(evaluator: Mapping[str, Any]) -> float:
    """The longest Retry-After pause still running on the evaluator's LM endpoints (AIMD windows)."""
    endpoints = evaluator.get("endpoints") or {}
    return max((float(e.get("cooldown_remaining_s", 0.0)) for e in endpoints.values()), default=0.0)


#: Constructor settings that shape the search's plan (what is evaluated and reflected on, in which order):
#: resuming with another value continues the run, but what the stored sessions did is mostly not asked
#: for again (run_store.md), which a user resuming to save money must hear of. Compared as the user gave
#: them only with a session stored before the resolved plan was (``PLAN_META``).
_PLAN_SETTINGS = (
    "max_metric_calls", "num_threads", "reflection_minibatch_size", "candidate_selection_strategy",
    "component_selector", "use_merge", "max_merge_invocations", "skip_perfect_score", "reflection_scouts",
    "reflection_feedback_reuse", "minibatch_sampling", "max_sibling_reflections", "adaptive_proposal_mix",
    "max_mutations_in_flight", "max_reflections_in_flight", "speculative_chaining", "deterministic",
    "rung_fractions", "reduction_factor", "perfect_score",
)
#: The session meta's key for the plan as the engine runs it (EngineConfig): ``rung_fractions=None`` and
#: the ``(1.0,)`` it resolves to on a small valset are the same plan, ``num_threads=None`` with another
#: ``dspy.settings.num_threads`` is not.
PLAN_META = "plan"
#: EngineConfig fields that do not decide what the search asks for: the seed is part of the run key (a
#: log_dir of another seed is refused), the secondary budgets and the stop rules only end the run sooner.
#: (``strict_budget`` decides which mutations launch near each budget a resumed run replays: a plan setting.)
_NOT_PLAN = frozenset({"seed", "stop_file", "stop_callbacks", "max_seconds", "max_tokens", "max_cost",
                       "max_noop_mutations", "max_paid_noop_mutations", "systemic_failure_window",
                       "systemic_proposal_window"})
#: The constructor argument a user sets each renamed EngineConfig field with, for the warning.
_PLAN_NAMES = MappingProxyType({
    "max_evals_in_flight": "num_threads", "candidate_selection": "candidate_selection_strategy",
    "max_siblings": "max_sibling_reflections", "adaptive_components": "adaptive_proposal_mix",
})


def _plan_of(config: EngineConfig) -> dict[str, Any]:
    """The plan's JSON-safe settings, by EngineConfig field (the warning names them as a user sets them,
    ``_PLAN_NAMES``); a callable component_selector is left out: it has no stored form to compare, and a
    changed one is the user's own doing."""
    plan: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _NOT_PLAN or callable(value):
            continue
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)  # perfect_score=None runs as inf, which JSON has no number for
        plan[f.name] = value
    return plan


def _warn_changed_plan(before: Mapping[str, Any], now: Mapping[str, Any], log_dir: Any) -> None:
    """Warn when this session plans its search with other settings than the last one (their stored
    values, as the run store keeps them in each session's meta)."""
    if isinstance(before.get(PLAN_META), Mapping) and isinstance(now.get(PLAN_META), Mapping):
        was, plan = before[PLAN_META], now[PLAN_META]
        # a setting an earlier version did not record (strict_budget) is not a change
        changed = [f"{_PLAN_NAMES.get(name, name)} {was.get(name)!r} -> {plan.get(name)!r}"
                   for name in sorted(set(was) & set(plan)) if was.get(name) != plan.get(name)]
    else:
        changed = [f"{name} {before[name]!r} -> {now.get(name)!r}" for name in _PLAN_SETTINGS
                   if name in before and before[name] != now.get(name)]
    budget = f"max_metric_calls {before.get('max_metric_calls')!r} -> {now.get('max_metric_calls')!r}"
    plan_now = now.get(PLAN_META)
    if changed == [budget] and (not isinstance(plan_now, Mapping) or plan_now.get("deterministic", True)):
        # a deterministic run plans with the earlier budgets in turn (the engine's PlanLimits): nothing
        # stored goes unused for a new budget alone
        changed.remove(budget)
        larger = (now.get("max_metric_calls") or 0) > (before.get("max_metric_calls") or 0)
        logger.info("Resuming the run in %s with %s: the search replays what earlier sessions did under their "
                    "budgets, then %s", log_dir, budget,
                    "goes on with this one" if larger else "stops at this one's limit")
    if changed:
        logger.warning("Resuming the run in %s with other search settings than its last session (%s): the search "
                       "may plan differently from there on, so stored work it no longer asks for goes unused and new "
                       "work is paid instead (docs/run_store.md). Resume with the same settings to replay it.",
                       log_dir, ", ".join(changed))


def _checked_plot_format(plot_format: Any) -> Literal["svg", "png"] | None:
    """Refused at construction: a PNG without matplotlib would otherwise fail only after the paid search."""
    if isinstance(plot_format, str):
        plot_format = plot_format.lower()  # as file names' suffixes are read
    if plot_format not in ("svg", "png", None):
        raise ConfigurationError(f"plot_format={plot_format!r}: use 'svg' (default, no dependency), 'png' "
                                 "(needs matplotlib) or None (no plots).")
    if plot_format == "png":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigurationError("plot_format='png' needs matplotlib, which is not installed: "
                                     "pip install 'dspy-turbogepa[plots]', or use plot_format='svg'.")
    return plot_format


register_with_mlflow_autolog(TurboGEPA)  # autolog turned on before this import still records compile

__all__ = ["TurboGEPA"]
