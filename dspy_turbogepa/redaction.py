"""Keeping credentials out of everything a run writes: the run store, logs, summary.json, MLflow.

A leaf module (standard library only) that every layer imports. Everything the store writes goes
through one of two filters:

- :func:`redact` for structured data (run meta, event payloads): values under sensitive dict keys
  (``api_key``, ``Authorization``, ``password``, ``*_token``, ...) are replaced by :data:`REDACTED`,
  and every string is passed through :func:`mask_text`.
- :func:`mask_text` for free text (error messages, trajectories, outputs, component texts): substrings
  that look like credentials are replaced by :data:`REDACTED`. "Look like" means a well-known key
  shape (``sk-...``, ``Bearer ...``, ``AIza...``, ``ghp_...``, ``hf_...``, ``AKIA...``, ``xox?-...``,
  ``scheme://user:password@``, ``scheme://TOKEN@`` with a key-like token as the only userinfo) or the
  exact value of an environment variable whose name contains KEY, TOKEN, SECRET or PASSWORD (values of
  at least 8 characters, known placeholders such as "anything" left out; the environment is read at
  every call, so keys set after import count). An error's text is also masked for the credential
  headers of the request its chain carries (:func:`describe_error`).

Masking is best effort for text (a key with no known shape that is not in the environment cannot be
recognised), and exact for the environment: no stored byte equals such a value. The same exactness
covers keys handed to an LM object (``dspy.LM(..., api_key=...)``): ``compile()`` declares them with
:func:`run_secrets` for the duration of the run (a context variable, so concurrent compiles in one
process each mask their own keys, and nothing is left behind afterwards).
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

REDACTED = "***REDACTED***"

#: Environment variable names whose values are treated as secrets (case-insensitive substring match).
SECRET_ENV_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD")
MIN_ENV_SECRET_LENGTH = 8
#: Values given as an API key where the endpoint needs none (local servers, proxies, docs' examples): not
#: secrets, and masking them would mask those words in instructions ("do not add anything else").
KNOWN_PLACEHOLDERS = frozenset({
    "anything", "placeholder", "whatever", "sk-no-key-required", "no-key-required", "not-needed", "notneeded",
    "not-used", "no-api-key", "none-needed", "nothing", "dummy-key", "dummy_key", "fake-key", "fake_key",
    "test-key", "test_key", "lm-studio", "lmstudio", "sk-placeholder", "sk-dummy", "sk-fake", "your-api-key",
    "your_api_key", "your-key", "changeme", "change-me", "token-abc123",
})
#: Environment variables naming an endpoint, whose URL's credentials are secrets too.
URL_ENV_SUFFIXES = ("API_BASE", "BASE_URL", "API_URL", "ENDPOINT")

# Normalised key names (lowercase, letters and digits only) whose values are always dropped.
_SENSITIVE_EXACT = frozenset(
    {
        "apikey",
        "authorization",
        "proxyauthorization",
        "auth",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "cookie",
        "setcookie",
        "credentials",
        "credential",
        "privatekey",
        "clientsecret",
        "accesskey",
        "secretkey",
    }
)
# ... and normalised suffixes: "x-api-key", "OPENAI_API_KEY", "access_token", "aws_secret_access_key",
# "X-Authorization", "Ocp-Apim-Subscription-Key" (Azure API Management), "x-functions-key" (Azure
# Functions), "AccountKey" (Azure Storage), "ssh_passphrase", ... A bare "key" suffix is not among them:
# it would drop "cache_key" or "primary_key"; and "token" only matches the singular, so counters
# ("max_tokens", "prompt_tokens", "token_count") are kept.
_SENSITIVE_SUFFIXES = (
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "authorization",
    "secretkey",
    "accesskey",
    "privatekey",
    "subscriptionkey",
    "functionskey",
    "accountkey",
    "masterkey",
    "signingkey",
    "encryptionkey",
    "authkey",  # X-Auth-Key (Cloudflare)
    "auth",  # Helicone-Auth, X-Auth
    "virtualkey",  # x-portkey-virtual-key
    "credential",
    "credentials",  # vertex_credentials
)


class _BasicCredentials:
    """``Basic <base64 of user:password>``, as ``re.Pattern``'s ``search`` and ``sub`` (what
    :func:`mask_text` and :func:`contains_secret` call): a token that does not decode to printable text
    holding a ``:`` is left alone."""

    _pattern = re.compile(r"Basic(?<![A-Za-z0-9_]Basic)\s+([A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])")

    @staticmethod
    def _is_credential(token: str) -> bool:
        """Whether ``token`` (or what is left of it: a log or a gateway may cut it) decodes to a
        printable UTF-8 ``user:password`` (``u:pw`` and longer). Not Latin-1, which ``requests`` sends for
        a non-ASCII password: decoding random words that way took 10 times as many for credentials (the
        password of an ``api_base`` URL is masked exactly anyway, as a run secret)."""
        import base64
        import binascii

        usable = token.rstrip("=")
        usable = usable[: len(usable) - len(usable) % 4]
        if len(usable) < 8:
            return False
        try:
            text = base64.b64decode(usable, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return ":" in text and text.isprintable()

    def search(self, text: str) -> re.Match[str] | None:
        return next((m for m in self._pattern.finditer(text) if self._is_credential(m.group(1))), None)

    def sub(self, repl: str, text: str) -> str:
        return self._pattern.sub(lambda m: repl if self._is_credential(m.group(1)) else m.group(0), text)


def is_placeholder_key(value: str) -> bool:
    """Whether a value given as an API key is a placeholder, not key material: a known one
    (:data:`KNOWN_PLACEHOLDERS`), or lowercase words joined by ``-``, ``_`` or ``.`` with no digit
    ("lm-studio", "my-local-server"; one "word" of 20 letters or more is random material)."""
    value = value.strip()
    if value.lower() in KNOWN_PLACEHOLDERS:
        return True
    return re.fullmatch(r"[a-z]{1,19}(?:[-_.][a-z]{1,19})*", value) is not None


def _shape(prefix: str, body: str, *, min_len: int, digit: str | None) -> tuple[str, re.Pattern[str]]:
    """A key shape: a literal prefix (not preceded by a word character), then its body.

    The literal comes first so the regex engine scans for it quickly, and :func:`mask_text` only runs
    a pattern whose prefix occurs in the text at all: masking costs about a microsecond per kilobyte.
    Random key material nearly always holds a digit; requiring one (``digit``: the body's characters
    minus digits) keeps prose such as "sk-learn-compatible" or "Bearer instruments" intact.
    """
    boundary = rf"(?<![A-Za-z0-9_]{re.escape(prefix)})"
    lookahead = "" if digit is None else rf"(?={digit}*\d)"
    return prefix, re.compile(rf"{re.escape(prefix)}{boundary}{lookahead}{body}{{{min_len},}}")


# Each shape is tried only when its literal prefix occurs in the text; every prefix costs one substring
# scan per stored text, so the list stays short. Keys of other providers (Groq, xAI, ...) are masked
# through the environment, where LiteLLM reads them from.
_KEY_SHAPES: tuple[tuple[str, re.Pattern[str] | _BasicCredentials], ...] = (
    # HTTP bearer credentials
    ("Bearer", re.compile(r"Bearer(?<![A-Za-z0-9_]Bearer)\s+(?=[A-Za-z._~+/=\-]*\d)[A-Za-z0-9._~+/=\-]{16,}")),
    # HTTP basic credentials: base64 of "user:password" (what a client sends for an api_base with
    # userinfo), only when it decodes to that, so prose such as "Basic instructions" or a product name
    # ("Basic Windows10", "Basic PlayStation5") stays intact
    ("Basic", _BasicCredentials()),
    # OpenAI, Anthropic, DeepSeek, OpenRouter, ... secret keys
    _shape("sk-", r"[A-Za-z0-9_\-]", min_len=20, digit=r"[A-Za-z_\-]"),
    # Google API keys
    _shape("AIza", r"[A-Za-z0-9_\-]", min_len=30, digit=r"[A-Za-z_\-]"),
    # GitHub tokens (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_)
    ("gh", re.compile(r"gh(?<![A-Za-z0-9_]gh)[opusr]_[A-Za-z0-9]{30,}")),
    _shape("github_pat_", r"[A-Za-z0-9_]", min_len=30, digit=None),
    # Hugging Face tokens
    _shape("hf_", r"[A-Za-z0-9]", min_len=30, digit=r"[A-Za-z]"),
    # AWS access key ids
    ("AKIA", re.compile(r"AKIA(?<![A-Za-z0-9_]AKIA)[A-Z0-9]{16}(?![A-Za-z0-9_])")),
    # Slack tokens
    ("xox", re.compile(r"xox(?<![A-Za-z0-9_]xox)[abposr]-[A-Za-z0-9\-]{10,}")),
    # credentials in a URL's userinfo (an api_base, a proxy URL): scheme://user:password@host, or a token
    # as the only userinfo, scheme://TOKEN@host (GitHub-style and many proxies). A password is masked
    # whatever it looks like; a lone username only when it looks like key material (16+ characters, one
    # a digit), so "ssh://git@host" or "https://alice@host" in an instruction stays as written.
    ("://", re.compile(r"(?<=://)(?:[^/\s:@]+:[^/\s@]+|(?=[^/\s:@?#]*\d)[^/\s:@?#]{16,})(?=@)")),
)


def strip_userinfo(url: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://host/...``: a URL fit to name an endpoint."""
    return re.sub(r"(?<=://)[^/@\s]*@", "", url)


def endpoint_url(url: str) -> str:
    """A URL fit to name an endpoint in stats, logs and MLflow metric names: no userinfo, and no part
    that could be a credential — a path segment that looks like key material (gateways that take their
    key in the path, ``.../gw/<token>/v1``) and the query are replaced by a short digest of
    themselves, so two endpoints still get two names."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(strip_userinfo(url))
    except ValueError:
        return mask_text(strip_userinfo(url))
    path = "/".join(seg if _plain_segment(seg) else f"~{_digest(seg)}" for seg in parts.path.split("/"))
    query = f"~{_digest(parts.query)}" if parts.query else ""
    return mask_text(urlunsplit((parts.scheme, parts.netloc, path, query, "")))


def url_key_material(url: str) -> list[str]:
    """The key material in a URL's path and query (``.../gw/<token>/v1``, ``?key=<token>``, a SAS
    ``sig=``), as written, percent-decoded and form-decoded: a gateway that answers 404 quoting the
    path or the URL would otherwise put the token in an error message, a log and the run store.

    Stricter than :func:`endpoint_url`'s rule, since these values are masked wherever they appear: a
    value counts when it holds a run of 16+ letters and digits with both (random material), or is the
    value of a credential-named query parameter; a deployment name or an API version
    (``gpt-4o-mini-2024-07-18``, ``2024-08-01-preview``) is short words between separators and is
    left alone, so a model name quoting it is not masked in logs, MLflow or candidate texts."""
    from urllib.parse import unquote, unquote_plus, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [seg for seg in parts.path.split("/") if _key_like(seg) or _key_like(unquote(seg))]
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if value and (_key_like(value) or _key_like(unquote_plus(value)) or _credential_param(unquote_plus(name))):
            found.append(value)
    forms = [form for raw in found for form in (raw, unquote(raw), unquote_plus(raw))]
    return list(dict.fromkeys(forms))


def _key_like(value: str) -> bool:
    return any(len(run) >= 16 and not run.isdigit() and not run.isalpha()
               for run in re.findall(r"[A-Za-z0-9]+", value))


def _credential_param(name: str) -> bool:
    """A query parameter that carries a credential: ``key``, ``api_key``, ``token``, ``sig`` (Azure SAS),
    ``code`` (Azure Functions)."""
    return is_sensitive_key(name) or _normalise_key(name) in {"key", "sig", "signature", "code", "auth"}


def _plain_segment(segment: str) -> bool:
    """``v1``, ``openai``, ``chat-completions``: short, or words; not random key material (a long run
    of characters, or many digits: ``sk-proj-...``, a UUID)."""
    if len(segment) < 16:
        return True
    words = re.split(r"[-_.~]", segment)
    return all(len(w) <= 12 for w in words) and sum(c.isdigit() for c in segment) < 0.25 * len(segment)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def url_credentials(url: str, username_if: Callable[[str], bool] | None = None) -> list[str]:
    """The secrets in a URL's userinfo: the password, or the username when there is no password (and
    ``username_if``, when given, accepts it).

    ``http://TOKEN@host`` carries its credential as the username (GitHub-style tokens, many proxies
    and gateways), so a URL with a user and no password yields the user. Percent-escapes are kept as
    written (the form a quoted URL shows) and also decoded (the form a client sends and may echo).
    """
    from urllib.parse import unquote

    user, password = _userinfo(url)
    secret = password if password else user
    if not secret or (not password and username_if is not None and not username_if(secret)):
        return []
    return list(dict.fromkeys([secret, unquote(secret)]))


def url_basic_credentials(url: str) -> list[str]:
    """``base64(user:password)`` of a URL's userinfo: httpx turns ``http://alice:pw@host`` into
    ``Authorization: Basic <that>``, which decodes to the password in a gateway's echo of the header.
    As written and percent-decoded, as :func:`url_credentials`."""
    import base64
    from urllib.parse import unquote

    user, password = _userinfo(url)
    if not user or not password:
        return []
    forms = {f"{user}:{password}", f"{unquote(user)}:{unquote(password)}"}
    return sorted(base64.b64encode(form.encode("utf-8")).decode("ascii") for form in forms)


def _userinfo(url: str) -> tuple[str | None, str | None]:
    """A URL's user and password (None for each that is absent, or for a URL that cannot be parsed)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return parts.username, parts.password
    except ValueError:
        return None, None


def _normalise_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def is_credential_setting(name: str) -> bool:
    """An LM setting that is a credential or names one: :func:`is_sensitive_key`, and AWS key ids
    (``aws_access_key_id``: not secret, but temporary STS / SSO credentials are refreshed, so it must not
    identify a run)."""
    norm = _normalise_key(name)
    return is_sensitive_key(name) or norm.endswith("keyid") or "accesskey" in norm


def is_sensitive_key(key: object) -> bool:
    """True for dict keys whose values are credentials (``api_key``, ``Authorization``, ``x-api-key``...).

    Counting keys such as ``max_tokens``, ``tokens`` or ``prompt_tokens`` are not sensitive.
    """
    if not isinstance(key, str):
        return False
    norm = _normalise_key(key)
    return norm in _SENSITIVE_EXACT or norm.endswith(_SENSITIVE_SUFFIXES)


class _EnvScan:
    """The last scan of ``os.environ`` and what it found (see :func:`env_secret_values`). One per
    process, like the environment it mirrors; replaced whole, so a reader never sees half an update."""

    def __init__(self) -> None:
        self.last: tuple[dict[Any, Any], tuple[str, ...]] | None = None


_ENV_SCAN = _EnvScan()
#: Secrets of the current run that the environment does not hold (see :func:`run_secrets`).
_RUN_SECRETS: ContextVar[tuple[str, ...]] = ContextVar("turbogepa_run_secrets", default=())


@contextmanager
def run_secrets(values: Iterable[Any]) -> Iterator[None]:
    """Mask ``values`` (API keys passed to LM objects) like environment secrets inside the block.

    Non-strings and values shorter than :data:`MIN_ENV_SECRET_LENGTH` are ignored, as for the
    environment. Threads started inside the block see the values only if they run in a copy of this
    context (the engine thread and DSPy's worker threads do).
    """
    own = {v for v in values if isinstance(v, str) and len(v) >= MIN_ENV_SECRET_LENGTH}
    token = _RUN_SECRETS.set(tuple(sorted(own.union(_RUN_SECRETS.get()), key=lambda v: (-len(v), v))))
    try:
        yield
    finally:
        _RUN_SECRETS.reset(token)
        if own:  # the compiled patterns hold the run's keys: do not keep them past the run
            _merged.cache_clear()
            _env_pattern.cache_clear()


def secret_values() -> tuple[str, ...]:
    """Every exact value to mask here: the environment's secrets and the current run's, longest first."""
    return _merged(env_secret_values(), _RUN_SECRETS.get())


@lru_cache(maxsize=16)
def _merged(env: tuple[str, ...], run: tuple[str, ...]) -> tuple[str, ...]:
    if not run:
        return env
    return tuple(sorted(set(env).union(run), key=lambda v: (-len(v), v)))


def env_secret_values() -> tuple[str, ...]:
    """Values of environment variables that look like secrets, longest first.

    Re-scanned whenever ``os.environ`` changed since the last call (a cheap dict comparison), so a
    key set at any time is covered; the scan itself costs tens of microseconds, too much per row.
    """
    data = getattr(os.environ, "_data", None)  # CPython's raw mapping; compared, never modified
    cached = _ENV_SCAN.last
    if data is not None and cached is not None and cached[0] == data:
        return cached[1]
    values = {
        value
        for name, value in os.environ.items()
        if len(value) >= MIN_ENV_SECRET_LENGTH and any(marker in name.upper() for marker in SECRET_ENV_MARKERS)
        and value.strip().lower() not in KNOWN_PLACEHOLDERS  # OPENAI_API_KEY=anything for a local server
    }
    # an endpoint set through the environment (OPENAI_API_BASE, AZURE_API_BASE, OPENAI_BASE_URL, ...)
    # may carry a credential the LM object never shows: in its userinfo, path or query
    values.update(
        part
        for name, value in os.environ.items() if name.upper().endswith(URL_ENV_SUFFIXES) and "://" in value
        for part in url_credentials(value, username_if=_key_like) + url_key_material(value)
        if len(part) >= MIN_ENV_SECRET_LENGTH
    )
    result = tuple(sorted(values, key=lambda v: (-len(v), v)))
    if data is not None:
        _ENV_SCAN.last = (dict(data), result)
    return result


@lru_cache(maxsize=8)
def _env_pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    if not values:
        return None
    return re.compile("|".join(re.escape(v) for v in values))


def contains_secret(text: str, env_values: tuple[str, ...] | None = None) -> bool:
    """Whether :func:`mask_text` would change ``text``."""
    values = secret_values() if env_values is None else env_values
    if any(v in text for v in values):
        return True
    return any(prefix in text and pattern.search(text) is not None for prefix, pattern in _KEY_SHAPES)


def error_text(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when that raises: an SDK error's ``__str__`` may read a response
    field that is not there, and describing a failure must never become a second, fatal one."""
    try:
        return str(exc)
    except Exception as inner:  # noqa: BLE001 - whatever __str__ raised: say so instead
        return f"<str() of this {type(exc).__name__} raised {type(inner).__name__}>"


# Reading an error without raising a second one: what describing it here and classifying it (adapter/
# ratelimit.py) both walk.
_GROUP: type | None = getattr(builtins, "BaseExceptionGroup", None)  # Python >= 3.11


def error_attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)`` that also survives a property raising something else: an SDK
    error's ``status_code`` or ``headers`` may read a response field that is not there, and looking at a
    failure must never become a second, fatal one."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - whatever the property raised: the attribute is not there
        return None


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes/contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        if _GROUP is not None and isinstance(cur, _GROUP):  # e.g. an asyncio.TaskGroup in the program
            stack.extend(reversed(list(error_attr(cur, "exceptions") or ())))
        nxt = cur.__cause__ or cur.__context__
        if nxt is not None:
            stack.append(nxt)


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` for a log, a run store row or reflection feedback: never raises, masked."""
    return mask_text(f"{type(exc).__name__}: {error_text(exc)}", _with_sent_credentials(exc))


def _with_sent_credentials(exc: BaseException) -> tuple[str, ...] | None:
    """The secrets to mask in ``exc``'s text: the run's, and the credential headers of the requests its
    chain carries (an HTTP client's error keeps the request it sent). A key the run could not find,
    one a judge's LM two steps away or ``litellm.api_key`` holds, is masked in an echo of it this way."""
    sent = _sent_credentials(exc)
    if not sent:
        return None
    return tuple(sorted(set(secret_values()) | set(sent), key=lambda v: (-len(v), v)))


def _sent_credentials(exc: BaseException) -> list[str]:
    found: list[str] = []
    for cur in exception_chain(exc):
        for holder in (error_attr(cur, "request"), error_attr(error_attr(cur, "response"), "request")):
            headers = error_attr(holder, "headers")
            try:
                items = list(headers.items()) if headers is not None and hasattr(headers, "items") else []
            except Exception:  # noqa: BLE001 - a client's header object: reading it must not fail a description
                items = []
            found += [v for name, value in items for v in credential_header_values(name, value)
                      if len(v) >= MIN_ENV_SECRET_LENGTH and not is_placeholder_key(v)]
    return found


def credential_header_values(name: Any, value: Any) -> list[str]:
    """A credential header's value and, for "Bearer <token>", the token alone; nothing for another
    header. A header named "...key" is a credential too (x-portkey-virtual-key, x-goog-api-key)."""
    if not (isinstance(name, str) and isinstance(value, str)
            and (is_sensitive_key(name) or name.lower().endswith("key"))):
        return []
    return [value.strip(), value.split(None, 1)[-1].strip()]


def describe_traceback(exc: BaseException) -> str:
    """``exc``'s traceback, masked, for a log line: ``exc_info=`` would print the messages of every
    exception in the chain as they are (an MLflow error quoting ``http://user:pw@host``, an SDK error
    quoting the key it was given). Never raises."""
    import traceback

    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001 - an exception whose __str__ raises: its one-line description
        text = f"{type(exc).__name__}: {error_text(exc)}"
    return mask_text(text.rstrip(), _with_sent_credentials(exc))


def mask_text(text: str, env_values: tuple[str, ...] | None = None) -> str:
    """``text`` with every substring that looks like a credential replaced by :data:`REDACTED`."""
    values = secret_values() if env_values is None else env_values
    exact = _env_pattern(values)
    if exact is not None and any(v in text for v in values):
        text = exact.sub(REDACTED, text)
    for prefix, shape in _KEY_SHAPES:
        if prefix in text:
            text = shape.sub(REDACTED, text)
    return text


def redact(obj: Any, env_values: tuple[str, ...] | None = None) -> Any:
    """A copy of ``obj`` safe to persist: sensitive dict keys masked, credential-like strings masked.

    Mappings become dicts, tuples and sets become lists; other leaves (numbers, None, bools) are
    returned unchanged. A sensitive key keeps its value only when that value is None or a bool
    (``{"api_key": None}`` says no key was set, which is worth keeping).
    """
    values = secret_values() if env_values is None else env_values
    return _redact(obj, values)


def _redact(obj: Any, values: tuple[str, ...]) -> Any:
    if isinstance(obj, str):
        return mask_text(obj, values)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            safe_key = mask_text(key, values) if isinstance(key, str) else key
            if is_sensitive_key(key) and value is not None and not isinstance(value, bool):
                out[safe_key] = REDACTED
            else:
                out[safe_key] = _redact(value, values)
        return out
    if isinstance(obj, (list, tuple)):
        return [_redact(item, values) for item in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_redact(item, values) for item in obj]
        try:
            return sorted(items)
        except TypeError:  # mixed types ({"yes", None}): an order that is the same in every process
            return sorted(items, key=repr)
    return obj


def mask_json_text(text: str, env_values: tuple[str, ...] | None = None) -> str:
    """Mask credentials inside a JSON document, keeping it valid JSON.

    Only strings are touched, keys included, and only where they hold a credential: a key is never
    dropped for its name (trajectories legitimately hold fields named ``token``). Text without anything
    to mask is returned as is, so the common case costs one scan.
    Text that is not valid JSON is masked as plain text.
    """
    import json

    values = secret_values() if env_values is None else env_values
    # In JSON text a value may appear escaped (quotes, backslashes, non-ASCII as \uXXXX): look for
    # those spellings too, then mask the decoded strings.
    escaped = {form for v in values for form in (json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1])}
    if not contains_secret(text, tuple(escaped.union(values))):
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        return mask_text(text, values)
    # the form it came in: an ASCII-escaped document (outputs, objective scores) stays escaped
    return json.dumps(_mask_strings(parsed, values), ensure_ascii=text.isascii())


def _mask_strings(obj: Any, values: tuple[str, ...]) -> Any:
    if isinstance(obj, str):
        return mask_text(obj, values)
    if isinstance(obj, dict):
        return {mask_text(k, values): _mask_strings(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_strings(v, values) for v in obj]
    return obj
