"""Which LMs a compile will call, and the credentials they hold.

Found by looking, never by calling: the student's predictors, the configured and the reflection LM,
the configured adapter's, and those one step away from the program's modules, the metric and the
proposer (attributes, closure cells, globals their code names). Their keys are masked wherever a text
could quote them (run_secrets), and a dollar cap names the ones it cannot price.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dspy
from dspy.clients.base_lm import BaseLM

from dspy_turbogepa.adapter.introspect import is_a
from dspy_turbogepa.adapter.lm_copies import lm_api_base, model_is_priced
from dspy_turbogepa.adapter.program import all_named_predictors
from dspy_turbogepa.redaction import (
    MIN_ENV_SECRET_LENGTH,
    credential_header_values,
    is_placeholder_key,
    is_sensitive_key,
    url_basic_credentials,
    url_credentials,
    url_key_material,
)

__all__ = ["compile_lms", "lm_api_keys", "warn_unpriced"]

logger = logging.getLogger("dspy_turbogepa.teleprompter")


def compile_lms(student: dspy.Module, reflection_lm: Any, *others: Any) -> list[Any]:
    """The LM objects this compile will call, each once: the program's predictors', the configured and
    the reflection LM, those the configured adapter holds, and those found one step away from the
    program's modules and from ``others`` (the metric, the instruction proposer): an LM the module holds
    and runs with ``dspy.context(lm=...)``, a judge metric's or a proposer's own LM, as an attribute, a
    closure cell or a global the function names."""
    lms = [getattr(p, "lm", None) for _, p in student.named_predictors()]
    lms += [dspy.settings.lm, reflection_lm]
    lms += _held_lms(dspy.settings.adapter)  # TwoStepAdapter's extraction model answers every rollout
    lms += [lm for _, module in student.named_sub_modules() for lm in _held_lms(module)]
    lms += [lm for obj in others for lm in _held_lms(obj)]
    # by identity: an LM class that defines __eq__ without __hash__ is unhashable
    return list({id(lm): lm for lm in lms if lm is not None}.values())


def warn_unpriced(lms: Sequence[Any], price_table: Mapping[str, tuple[float, float]], cap: float) -> None:
    """Before the first call: name each LM the dollar cap cannot price (not in ``price_table``, not in
    DSPy's model table). Its calls count $0, so the cap would hold while the bill grows; the run-time
    warning catches only a run whose every call is unpriced."""
    unpriced = sorted({model for lm in lms if isinstance(model := getattr(lm, "model", None), str)
                       and not model_is_priced(model, price_table)})
    if unpriced:
        logger.warning(
            "cost_budget_usd=%s: no price is known for %s (not in price_table, not in DSPy's model table): "
            "its calls count $0 toward the cap. Pass price_table={model: (usd per 1M prompt tokens, usd per 1M "
            "completion tokens)}, or a token_budget.", cap, ", ".join(unpriced))


def lm_api_keys(student: dspy.Module, reflection_lm: Any, *others: Any) -> list[str]:
    """Credentials held by the LMs this compile will call (:func:`compile_lms`), so that any text
    quoting them (an error body echoing the key it was given) is masked exactly: every credential-named
    argument (``api_key``, ``aws_secret_access_key``, ``aws_session_token``, ...), the password in an
    ``api_base`` URL and its path or query parts that look like key material, and the values of
    credential headers (``Authorization``, ``x-api-key``, ``x-portkey-virtual-key``, ...), nested
    settings included (``extra_body``); a credential-named string attribute of the LM object (a subclass
    that keeps its own key); and keys set on the client libraries (``litellm.api_key``). Placeholders
    ("anything", "lm-studio") are not keys."""
    keys = _client_globals()
    for lm in compile_lms(student, reflection_lm, *others):
        # an LM subclass may keep its own key (self._vault_key) and pass it per call
        candidates: list[Any] = [value for name, value in getattr(lm, "__dict__", {}).items()
                                 if isinstance(value, str) and (is_sensitive_key(name.strip("_"))
                                                                or name.lower().endswith(("key", "token", "secret")))]
        kwargs = getattr(lm, "kwargs", None)
        if isinstance(kwargs, dict):
            candidates += _credentials_in(kwargs)
        keys += [k.strip() for k in candidates if isinstance(k, str) and _looks_like_a_key(k.strip())]
        url = lm_api_base(lm)
        if url:
            # a URL's password is never a placeholder word (run_secrets drops short values); a token
            # given as the only userinfo (http://TOKEN@host) is one when it looks like key material
            keys += url_credentials(url, username_if=_looks_like_a_key)
            keys += url_basic_credentials(url)  # what a client sends for that userinfo, echoed by a gateway
            keys += url_key_material(url)  # a gateway's key in the path (.../gw/<token>/v1) or the query
    return list(dict.fromkeys(keys))  # each once, in the order found


_HEADER_FIELDS = frozenset({"headers", "extra_headers", "default_headers"})


def _credentials_in(settings: Mapping[Any, Any], depth: int = 0, headers: bool = False) -> list[Any]:
    """Credential values in an LM's settings, nested ones too (``extra_body={"api_key": ...}``): under
    credential names, and in a headers dict the values of credential headers (a header named "...key"
    is one: x-portkey-virtual-key, x-goog-api-key; elsewhere "sort_key" is not), with the token of
    "Bearer <token>" on its own."""
    found: list[Any] = []
    for name, value in settings.items():
        if headers:
            found += credential_header_values(name, value)
        elif isinstance(value, str) and is_sensitive_key(name):
            found += [value, value.split(None, 1)[-1]]
        if isinstance(value, Mapping) and depth < 4:
            found += _credentials_in(value, depth + 1, headers=name in _HEADER_FIELDS)
    return found


def _client_globals() -> list[str]:
    """Keys set on the client libraries themselves (``litellm.api_key = ...``, ``openai.api_key``,
    litellm's per-provider ``*_key`` globals), which an LM uses without holding them: read only from a
    library already imported."""
    import sys

    keys: list[str] = []
    for module_name in ("litellm", "openai"):
        module = sys.modules.get(module_name)
        namespace = getattr(module, "__dict__", None) or {}
        # type(), not isinstance(): isinstance reads __class__, which loads openai's lazy module proxies
        # (a second of imports and a client built); list(): litellm adds names lazily
        keys += [value.strip() for name, value in list(namespace.items())
                 if type(value) is str and (name == "api_key" or name.endswith("_key"))
                 and _looks_like_a_key(value.strip())]
    return keys


def _held_lms(obj: Any) -> list[Any]:
    """The LMs ``obj`` holds one step away: its attributes (and the predictors of a module metric), for
    a function its closure cells, default arguments and the globals its code names, for a
    ``functools.partial`` its bound arguments and its function's. Only a look, never a call."""
    if obj is None:
        return []
    if isinstance(obj, BaseLM):
        return [obj]
    values: list[Any] = []
    if isinstance(obj, functools.partial):  # partial(judge_metric, judge=dspy.LM(...))
        values += [*obj.args, *obj.keywords.values()]
        return [v for v in values if is_a(v, BaseLM)] + _held_lms(obj.func)
    fn = getattr(obj, "__func__", obj)  # a bound method: its function (and its object, below)
    code = getattr(fn, "__code__", None)
    if code is not None:
        values += _named_by(fn)
    owner = getattr(obj, "__self__", None) if code is not None else obj
    if owner is not None and not isinstance(owner, type):
        values += list(getattr(owner, "__dict__", {}).values())
        if isinstance(owner, dspy.Module):
            values += [getattr(p, "lm", None) for _, p in all_named_predictors(owner)]
        if code is None:
            # a callable object or a dspy.Module judge: what its __call__ / forward name too (a module-level
            # JUDGE_LM run with dspy.context), read from the class, so nothing of the instance is called
            for name in ("__call__", "forward", "aforward"):
                method = getattr(type(owner), name, None)
                if getattr(method, "__code__", None) is not None:
                    values += _named_by(method)
    return [v for v in values if is_a(v, BaseLM)]


def _named_by(fn: Any) -> list[Any]:
    """What a function reaches without being called: its closure cells, default arguments and the
    globals its code names."""
    from dspy_turbogepa.adapter.run_identity import global_names

    values = [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ()) if _cell_is_set(cell)]
    values += [*(getattr(fn, "__defaults__", None) or ()), *(getattr(fn, "__kwdefaults__", None) or {}).values()]
    namespace = getattr(fn, "__globals__", {})
    values += [namespace[name] for name in global_names(fn.__code__) if name in namespace]
    return values


def _cell_is_set(cell: Any) -> bool:
    try:
        cell.cell_contents  # an empty cell raises ValueError
    except ValueError:
        return False
    return True




def _looks_like_a_key(value: str) -> bool:
    """Key material, not a placeholder: local servers and proxies are often given words such as
    "anything", "lm-studio" or "sk-no-key-required", which must not mask those words in instructions
    (:func:`~dspy_turbogepa.redaction.is_placeholder_key`: also any lowercase words joined by ``-``,
    ``_`` or ``.``, so a passphrase of that form is not masked either). Anything else given as a key
    is one: a random key may have no digit, or be mixed case and short. As short as the environment's secrets
    (8 characters): a gateway key of 11 was written unmasked into the run store when an error message
    echoed it. Called with the stripped value (a key read from a file may carry a space)."""
    return (len(value) >= MIN_ENV_SECRET_LENGTH and not any(c.isspace() for c in value)
            and any(c.isalnum() for c in value) and not is_placeholder_key(value))
