"""Program <-> candidate: which predictors are components, and how a candidate becomes a program.

Only instructions change. Demos, per-predictor LMs, field prefixes and descriptions are carried over
from the student by ``deepcopy`` exactly as dspy.GEPA's ``build_program`` does, and the student itself
is never touched.
"""

from __future__ import annotations

import copy
import logging
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MethodType
from typing import Any

import dspy
from dspy.primitives.base_module import BaseModule

from dspy_turbogepa.adapter.lm_copies import RunHistoryEntry

logger = logging.getLogger(__name__)


def all_named_predictors(program: dspy.Module) -> list[tuple[str, Any]]:
    """Every predictor the program holds: ``named_predictors()`` first (the components, under dspy's
    names), then those it skips, under their path (``frozen.predict``): those in a submodule marked
    compiled (``_compiled = True``), and those in a container nested in a container (a list of lists),
    which ``named_parameters()`` does not walk.

    Why: such a predictor is not a component (dspy.GEPA leaves it alone too), but it still runs. Its
    LM is called through our retry-less copy like every student LM, its state is part of the run key
    (a changed frozen submodule must not replay the old one's scores), and its trace steps keep their
    predictor object when a resumed run rebuilds them (a metric reads ``trace[i][0]``)."""
    found = list(program.named_predictors())
    seen = {id(pred) for _, pred in found}
    for path, pred in program.named_sub_modules(dspy.Predict):
        if id(pred) not in seen:
            seen.add(id(pred))
            found.append((path.removeprefix("self."), pred))
    return found


class PredictorNames:
    """Which of a program's predictors made a trace step.

    By object identity first, which is exact and free. Modules such as ``dspy.BestOfN`` and
    ``dspy.Refine`` deep-copy the module they wrap on every call, so their trace steps hold copies no
    id matches; those fall back to signature equality, the rule dspy.GEPA applies to every step
    (``signature.equals``: same fields and instructions). A copy of one of several predictors with an
    equal signature cannot be told apart: the step goes to each of them, as dspy.GEPA gives it.
    """

    def __init__(self, program: dspy.Module) -> None:
        self._predictors = list(program.named_predictors())
        # frozen predictors by identity too: their steps are theirs, not a component's with an equal signature
        self._all = all_named_predictors(program)
        self._by_id = {id(pred): name for name, pred in self._all}

    def of_copy(self, memo: Mapping[int, Any]) -> PredictorNames:
        """The names of a ``copy.deepcopy`` of the program, read from the copy's ``memo`` (no walk of the
        copy): its predictors are matched by identity as the original's are. Matching them by
        signature instead gave two predictors sharing a signature each other's calls."""
        names = copy.copy(self)
        names._by_id = {id(memo.get(id(pred), pred)): name for name, pred in self._all}
        return names

    @property
    def all_predictors(self) -> list[tuple[str, Any]]:
        """Every predictor the program holds, the components first (:func:`all_named_predictors`)."""
        return self._all

    @property
    def predictors(self) -> list[tuple[str, Any]]:
        """The program's named predictors, as found once (walking a module is not free: it looks into
        every list and dict the program holds)."""
        return self._predictors

    def names_of(self, predictor: Any) -> list[str]:
        hit = self._by_id.get(id(predictor))
        if hit is not None:
            return [hit]
        return self._equal_signatures(getattr(predictor, "signature", None)) or ["?"]

    def _equal_signatures(self, signature: Any) -> list[str]:
        if signature is None:
            return []
        names = []
        for name, pred in self._predictors:
            try:
                if pred.signature.equals(signature):
                    names.append(name)
            except (AttributeError, TypeError):  # not a dspy Signature: no match by signature
                continue
        return names

    def raised_in(self, error: BaseException) -> str | None:
        """The predictor ``error`` was raised inside: the innermost frame of its traceback that is a
        method of one of the program's predictors. None when it was raised in the program's own code
        between predictor calls (or in a predictor several could be, a copy of one of equal signatures).

        Why: a program error becomes reflective feedback, and only the predictor that raised it (or the
        one whose output the failing code was using) can learn from it; a predictor that never ran on
        the example, or never runs at all, must not be told to prevent it."""
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:  # ``raise X from e``: where ``e`` was raised
            seen.add(id(current))
            try:
                found = self._innermost_predictor(current)
            except Exception as exc:  # noqa: BLE001 - a frame's objects are the user's: attribution is optional
                logger.debug("Could not tell which predictor raised %s: %r", type(error).__name__, exc)
                return None
            if found is not None:
                return found or None
            # ``raise X from e``, or ``raise X`` while handling ``e``: where ``e`` was raised
            current = current.__cause__ or current.__context__
        return None

    def _innermost_predictor(self, error: BaseException) -> str | None:
        """The innermost predictor frame of ``error``'s own traceback: its name, "" when it is not one
        name (a copy of one of several equal signatures, a predictor the program does not hold), None
        when no frame is a predictor's."""
        found: str | None = None
        for frame, _ in traceback.walk_tb(error.__traceback__):
            owner = frame.f_locals.get("self")
            # type(), not isinstance(): a lazy proxy's __class__ runs the user's code (Django's LazyObject)
            if owner is not None and issubclass(type(owner), dspy.Predict):
                names = self.names_of(owner)
                found = names[0] if len(names) == 1 and names[0] != "?" else ""
        return found

    def signature_owner(self, signature: Any) -> str | None:
        """The one predictor whose signature equals ``signature`` (fields and instructions), else None.

        A parse failure names the signature it could not parse, not the predictor: two predictors with
        the same fields but other instructions must not both be blamed for it."""
        owners = self._equal_signatures(signature)
        return owners[0] if len(owners) == 1 else None


#: DSPy modules that keep per-call state on themselves: ``dspy.BestOfN`` and ``dspy.Refine`` lower
#: ``self.fail_count`` on every failed attempt and raise once it runs out.
_STATEFUL_MODULES: tuple[type, ...] = (dspy.BestOfN, dspy.Refine)


@dataclass(frozen=True)
class BuiltProgram:
    """A candidate's program, built once, and what each call runs."""

    #: the built program (its predictors' LMs are our retry-less copies, see the evaluator)
    program: dspy.Module
    #: which of its predictors made a trace step
    names: PredictorNames
    #: for a program holding a module that keeps per-call state: what its per-call copies share with
    #: it (``id -> object``, see :func:`_shared_values`); None: every call runs the built program
    shared: dict[int, Any] | None = None
    #: told once per run when the per-call copy fails (the codec's)
    on_uncopyable: Callable[[str, BaseException], None] | None = None

    def for_call(self) -> tuple[dspy.Module, PredictorNames]:
        """The program one evaluation runs and which of its predictors made a trace step: the shared
        built program, or for a program holding ``dspy.BestOfN`` / ``dspy.Refine`` a copy of its modules.

        dspy.GEPA builds a fresh program per evaluation batch, so ``fail_count`` starts over every
        batch; one program for the whole run let it run out, and then every call whose first attempt
        failed raised (a solved seed looked broken). The copy is of the structure only — modules, methods
        bound to them (a tool made of the module's own method follows the copy), and containers holding
        those —; LMs and every other value (an index, a corpus, a client, a retriever, a lock) are shared.
        Other programs keep sharing one object (a lazily loaded index, large data held by it)."""
        if self.shared is None:
            return self.program, self.names
        memo = dict(self.shared)
        for _, pred in self.names.all_predictors:  # their LMs as they are now (the evaluator's copies)
            lm = getattr(pred, "lm", None)
            if lm is not None:
                memo[id(lm)] = lm
        try:
            program = copy.deepcopy(self.program, memo)
        except Exception as exc:  # noqa: BLE001 - an uncopyable structure runs shared, as before; said once
            if self.on_uncopyable is not None:
                self.on_uncopyable(type(self.program).__name__, exc)
            return self.program, self.names
        return program, self.names.of_copy(memo)


def _shared_values(program: dspy.Module) -> dict[int, Any]:
    """What a per-call copy of ``program`` shares with it: every value its modules hold that is data,
    not structure (see :meth:`BuiltProgram.for_call`). Computed once per candidate; the predictors'
    LMs are added per call (the evaluator swaps in its copies after the build)."""
    shared: dict[int, Any] = {}
    verdicts: dict[int, bool] = {}
    for _, module in program.named_sub_modules():
        for value in getattr(module, "__dict__", {}).values():
            if not _structural(value, verdicts):
                shared[id(value)] = value
    return shared


def _structural(value: Any, verdicts: dict[int, bool]) -> bool:
    """A module, a method bound to one (a tool made of the module's own method must follow the copy),
    a ``dspy.Tool`` wrapping such a method, or a container holding one. Any other callable (a
    retriever object, a partial, a function) is data: shared, with what it holds (a corpus, a lock).
    ``verdicts``: per container, so that one two modules hold is judged the same both times (and a
    container inside itself adds nothing while it is being judged)."""
    if isinstance(value, BaseModule):
        return True
    if isinstance(value, MethodType):
        return isinstance(value.__self__, BaseModule)
    if isinstance(value, dspy.Tool):
        return _structural(value.func, verdicts)
    if type(value) in (list, tuple, dict, set, frozenset):
        key = id(value)
        if key not in verdicts:
            verdicts[key] = False
            verdicts[key] = any(_structural(v, verdicts) for v in (value.values() if type(value) is dict else value))
        return verdicts[key]
    return False


class _NoHistory(list[Any]):
    """A module ``history`` that keeps nothing, for the programs the search evaluates.

    Why: DSPy appends every LM call's entry (prompt, response, usage) to the ``history`` of each module
    on the call's stack, up to 10,000 per module; the cached candidate programs (and the evaluator's
    prepared ones) would hold that many per predictor: 45 KB per metric call at 10 predictors, about
    1 GB over a 20,000-call run. These programs are private; the LM's own history and DSPy's global
    one still record every call, and the program returned to the user is built apart, with its own."""

    def append(self, entry: Any) -> None:
        return None


class ProgramCodec:
    """Builds (and caches) one program object per candidate fingerprint.

    A built program is shared by every concurrent evaluation of that candidate; DSPy predictors keep
    no per-call state on the module (traces go to a context variable), as ``dspy.Evaluate`` relies on.
    A program holding a module that does (``dspy.BestOfN``, ``dspy.Refine``) runs each call on a fresh
    copy (:meth:`BuiltProgram.for_call`).
    """

    def __init__(self, student: dspy.Module, cache_size: int = 64) -> None:
        self._student = student
        # What programs are built from: the student, less the ``detailed_results`` an earlier compile
        # left on it (re-optimizing an optimized program). Deep-copied into every candidate's program
        # (all of that run's candidate programs, once per build), it is the old run's result, wrong on
        # the new program. A shallow copy: the student itself keeps its attribute.
        self._template = student
        if "detailed_results" in vars(student):
            # not copy.copy: dspy's __getstate__ would drop the module's callbacks and history, which a
            # student that deepcopy cannot copy (dspy then copies attribute by attribute) keeps
            self._template = object.__new__(type(student))
            self._template.__dict__.update({k: v for k, v in vars(student).items() if k != "detailed_results"})
        self.component_names: list[str] = [name for name, _ in student.named_predictors()]
        self._student_predictors = dict(all_named_predictors(student))
        #: A predictor's own LM, as it was when compile began: the search calls copies of it that share
        #: its ``history`` (so ``lm.history`` sees the run, documented), and every program built from the
        #: student deep-copied that growing list, up to DSPy's 10,000 entries: the returned program and
        #: each candidate held every prompt and answer of the run (the training data's text, in a file
        #: saved for production), and each build cost more as the run went on (750 ms at 5,000 entries).
        #: Built programs get this snapshot, as dspy.GEPA's fresh deep copies have theirs, without the calls an
        #: earlier compile's copies recorded there (dspy.GEPA's own never reach the user's LM).
        self._lm_histories: dict[int, tuple[list[Any], list[Any]]] = {}
        for _, pred in self._student_predictors.items():
            history = getattr(getattr(pred, "lm", None), "history", None)
            if isinstance(history, list) and id(history) not in self._lm_histories:
                # the list itself: its id stays its own
                self._lm_histories[id(history)] = (history, _before_runs(history))
        #: the LMs the student holds: the user's, never given a snapshot (a user's deepcopy() may share them)
        self._student_lms = {id(p.lm) for p in self._student_predictors.values() if getattr(p, "lm", None)}
        self._cache: OrderedDict[str, BuiltProgram] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._warned_uncopyable = False

    def _uncopyable(self, name: str, exc: BaseException) -> None:
        with self._lock:
            first, self._warned_uncopyable = not self._warned_uncopyable, True
        logger.log(logging.WARNING if first else logging.DEBUG,
                   "%s holds dspy.BestOfN / dspy.Refine but cannot be copied per evaluation (%s: %s): its "
                   "evaluations share one program, and fail_count may run out across them.",
                   name, type(exc).__name__, exc)

    @property
    def student(self) -> dspy.Module:
        return self._student

    def seed_texts(self) -> dict[str, str]:
        return {name: pred.signature.instructions for name, pred in self._student.named_predictors()}

    def student_predictor(self, name: str) -> dspy.Predict:
        """The original student's predictor (a component's, which dspy.GEPA passes in ``pred_trace`` to the
        metric, or a frozen one's: :func:`all_named_predictors`)."""
        return self._student_predictors[name]

    def build(self, texts: Mapping[str, str]) -> dspy.Module:
        """A fresh program carrying ``texts`` (never cached; callers may mutate it)."""
        program = _deepcopy_module(self._template, self._history_memo)
        # what the memo could not reach: an LM copied by a user's deepcopy(), or shallow-copied because it
        # cannot be deep-copied (its history is the shared list then)
        self._reset_histories(program)
        for name, pred in program.named_predictors():
            if name in texts:
                pred.signature = pred.signature.with_instructions(texts[name])
        return program

    def _history_memo(self) -> dict[int, Any]:
        """A deepcopy memo giving each predictor LM's shared history a fresh copy of its snapshot."""
        return _HistoryMemo({key: snapshot for key, (_, snapshot) in self._lm_histories.items()})

    def _reset_histories(self, program: dspy.Module) -> None:
        """A copied predictor LM still holding the run's history gets the snapshot: the shared list itself
        (an LM shallow-copied because it cannot be deep-copied), or a copy of it made by a user's
        deepcopy(). Matched by the history, not the predictor's name (a copy may rename or alias
        predictors): the shared list by identity, a copied one by the longest snapshot it starts with
        (DSPy's entries carry a uuid). An LM the student holds is the user's and left alone."""
        for _, pred in all_named_predictors(program):
            lm = getattr(pred, "lm", None)
            history = getattr(lm, "history", None)
            if lm is None or id(lm) in self._student_lms or not isinstance(history, list):
                continue
            shared = self._lm_histories.get(id(history))  # the lists are kept alive: an id is theirs alone
            if shared is not None:
                lm.history = _fresh(shared[1])
                continue
            # grown past the snapshot by the run's entries (our copies'), or by others after them
            before_runs = _before_runs(history)
            grown = [snapshot for _, snapshot in self._lm_histories.values()
                     if len(history) > len(snapshot) and len(before_runs) >= len(snapshot)
                     and all(map(_same_entry, before_runs, snapshot))]
            if grown:
                lm.history = _fresh(max(grown, key=len))

    def get(self, fingerprint: str, texts: Mapping[str, str]) -> BuiltProgram:
        """The shared program for a candidate, and which of its predictors made a trace step."""
        with self._lock:
            hit = self._cache.get(fingerprint)
            if hit is not None:
                self._cache.move_to_end(fingerprint)
                return hit
        program = self.build(texts)
        for _, module in program.named_sub_modules():
            module.history = _NoHistory()
        stateful = any(isinstance(m, _STATEFUL_MODULES) for _, m in program.named_sub_modules())
        entry = BuiltProgram(program, PredictorNames(program), _shared_values(program) if stateful else None,
                             self._uncopyable)
        with self._lock:
            self._cache[fingerprint] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry


def _before_runs(history: list[Any]) -> list[Any]:
    """A predictor LM's history without the entries our LM copies recorded in it (an earlier compile's)."""
    return [entry for entry in history if not isinstance(entry, RunHistoryEntry)]


def _same_entry(copied: Any, original: Any) -> bool:
    """Whether a copied history entry is ``original``: by DSPy's uuid where both have one (a copied
    response object need not compare equal), else by equality."""
    if isinstance(copied, dict) and isinstance(original, dict) and "uuid" in copied and "uuid" in original:
        return bool(copied["uuid"] == original["uuid"])
    try:
        return bool(copied == original)
    except Exception:  # noqa: BLE001 - an entry that cannot be compared is not known to be the same
        return False


def _fresh(snapshot: list[Any]) -> list[Any]:
    """A history snapshot with entries of its own, as a deep copy of the LM would have."""
    try:
        return copy.deepcopy(snapshot)
    except Exception:  # noqa: BLE001 - an entry that cannot be copied: shared (history entries are not mutated)
        return list(snapshot)


class _HistoryMemo(dict[int, Any]):
    """A deepcopy memo that hands out a fresh copy of a history snapshot only when the copy meets that
    history (``copy.deepcopy`` asks its memo with ``get``): built attribute by attribute, a program asks
    for one memo per attribute, and copying every snapshot each time cost a second a build."""

    def __init__(self, snapshots: Mapping[int, list[Any]]) -> None:
        super().__init__()
        self._snapshots = snapshots

    def get(self, key: int, default: Any = None) -> Any:
        if key in self._snapshots and not dict.__contains__(self, key):
            self[key] = _fresh(self._snapshots[key])
        return dict.get(self, key, default)


def _deepcopy_module(module: BaseModule, fresh_memo: Callable[[], dict[int, Any]]) -> Any:
    """``Module.deepcopy()`` with a memo (``fresh_memo()`` for each copy): the user's own ``deepcopy()``
    where the class defines one (one sharing a large index, say: dspy.GEPA calls it too); else the
    whole module at once, or, when something in it cannot be copied (a client, a lock), attribute by
    attribute as DSPy's fallback does, keeping what cannot be copied by reference."""
    if type(module).deepcopy is not BaseModule.deepcopy:
        return module.deepcopy()
    try:
        return copy.deepcopy(module, fresh_memo())
    except Exception:  # noqa: BLE001 - DSPy's own fallback, below, with the memo
        logger.debug("%s cannot be deep-copied whole; copying it attribute by attribute", type(module).__name__)
    new = module.__class__.__new__(module.__class__)
    for attr, value in module.__dict__.items():
        if isinstance(value, BaseModule):
            setattr(new, attr, _deepcopy_module(value, fresh_memo))
            continue
        try:
            setattr(new, attr, copy.deepcopy(value, fresh_memo()))
        except Exception as exc:  # noqa: BLE001 - as DSPy: a shallow copy, else the object itself
            logger.debug("%s.%s cannot be deep-copied (%s); copied shallowly", type(module).__name__, attr,
                         type(exc).__name__)
            try:
                setattr(new, attr, copy.copy(value))
            except Exception:  # noqa: BLE001
                setattr(new, attr, value)
    return new


def valid_unicode(text: str) -> bool:
    """Whether ``text`` can be an instruction: a lone surrogate (a cut ``"\\ud83d"`` JSON escape) cannot
    be encoded, so no signature, prompt or saved program can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
