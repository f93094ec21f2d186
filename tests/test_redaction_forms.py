"""Credential forms beyond the well-known key shapes must not reach anything a run writes.

Two forms leaked into the run store (``evaluations.message`` / ``trajectory_json``) when a program
error quoted the LM's settings: a token given as the only userinfo of ``api_base``
(``http://TOKEN@host``), and the value of an ``Ocp-Apim-Subscription-Key`` header (Azure API
Management), whose name the sensitive-key matcher did not know. These tests pin both, their near
relatives, and that ordinary counting fields are left alone.
"""

from __future__ import annotations

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.redaction import REDACTED, is_sensitive_key, mask_json_text, mask_text, redact
from dspy_turbogepa.testing import SimServer
from dspy_turbogepa.testing.fake_lm import make_reflection_lm

from helpers import FailsOnTracking, small_splits

USER_TOKEN = "usrtok0a9b8c7d6e5f4a3b2c1d"
APIM = "apim0a9b8c7d6e5f4a3b2c1d9e8f"


@pytest.mark.parametrize(
    "name",
    [
        "Ocp-Apim-Subscription-Key",  # Azure API Management: the form that leaked
        "subscription_key",
        "AZURE_SUBSCRIPTION_KEY",
        "x-functions-key",  # Azure Functions
        "AccountKey",  # Azure Storage connection strings
        "X-Authorization",  # gateways that rename the standard header
        "Proxy-Authorization",
        "authorization",
        "x-api-key",
        "api-key",  # Azure OpenAI
        "x-goog-api-key",
        "X-Auth-Token",
        "PRIVATE-TOKEN",  # GitLab
        "x-amz-security-token",
        "refresh_token",
        "client_secret",
        "x-api-secret",
        "db_password",
        "ssh_passphrase",
        "password",
        "X-Auth-Key",  # Cloudflare
        "Helicone-Auth",
    ],
)
def test_credential_header_and_field_names_are_sensitive(name):
    """Each name carries a credential in a header or a settings dict: its value must be dropped by
    :func:`redact`, and (through ``_lm_api_keys``, which asks :func:`is_sensitive_key`) masked
    wherever an error quotes it."""
    assert is_sensitive_key(name)
    assert redact({name: "value-0a9b8c7d"}) == {name: REDACTED}


@pytest.mark.parametrize(
    "name",
    [
        "max_tokens",
        "max_completion_tokens",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "tokens",
        "token_count",
        "num_tokens",
        "keywords",
        "key",
        "cache_key",
        "primary_key",
        "sort_key",
        "subscription",
        "author",
        "authority",
        "authored_by",
        "model",
        "monkey",
    ],
)
def test_ordinary_field_names_are_not_sensitive(name):
    """Counters and plain names must keep their values: masking ``max_tokens`` or ``cache_key`` would
    make stored settings, usage statistics and summaries useless."""
    assert not is_sensitive_key(name)
    assert redact({name: 1000}) == {name: 1000}


def test_a_token_as_the_only_url_userinfo_is_masked():
    """``http://TOKEN@host`` carries the credential as the username; only ``user:password@`` was masked."""
    text = f"cannot reach http://{USER_TOKEN}@127.0.0.1:9/v1 (timeout)"
    assert mask_text(text) == f"cannot reach http://{REDACTED}@127.0.0.1:9/v1 (timeout)"
    assert USER_TOKEN not in mask_json_text(f'{{"error": "{text}"}}')
    # a user:password pair is masked as before, as one unit
    assert mask_text("https://bob:pw-1@proxy.local/v1") == f"https://{REDACTED}@proxy.local/v1"


def test_plain_url_usernames_and_emails_are_kept():
    """A lone username is masked only when it looks like key material, so instructions or outputs that
    mention ``ssh://git@github.com`` or a person's login are stored as written."""
    for text in (
        "clone ssh://git@github.com/org/repo.git",
        "open https://alice@example.com/dashboard",
        "open https://firstname.lastname@example.com/",
        "write to support@example.com",
        "see https://example.com/a:b@c",
        "see https://example.com/path/0a9b8c7d6e5f4a3b2c1d@x",  # '@' in a path, not userinfo
    ):
        assert mask_text(text) == text, text


def test_url_credentials_returns_the_username_when_there_is_no_password():
    """The extractor for exact masking: a URL's password, else its username (the ``TOKEN@host`` form)."""
    from dspy_turbogepa.redaction import url_credentials  # imported here: absent before the fix

    assert url_credentials(f"http://{USER_TOKEN}@127.0.0.1:9/v1") == [USER_TOKEN]
    assert url_credentials("http://alice:hunter22@127.0.0.1:9/v1") == ["hunter22"]
    assert url_credentials("http://127.0.0.1:9/v1") == []
    assert url_credentials("http://tok%2Fen0123456789@h/") == ["tok%2Fen0123456789", "tok/en0123456789"]
    assert url_credentials("http://[bad") == []
    # a lone username only when the caller's test accepts it; a password always
    assert url_credentials("http://alice@127.0.0.1:9/v1", username_if=lambda u: len(u) >= 16) == []
    assert url_credentials(f"http://{USER_TOKEN}@h/", username_if=lambda u: len(u) >= 16) == [USER_TOKEN]
    assert url_credentials("http://alice:pw@h/", username_if=lambda u: False) == ["pw"]


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_quoted_url_token_and_apim_header_are_never_written(routing, tmp_path, engine):
    """End to end (the reviewer's repro): a program error quotes the LM's api_base and headers; neither
    the URL-username token nor the APIM subscription key may be in any byte under log_dir."""

    def quoting_error() -> Exception:  # a client error that echoes what it was configured with
        kw = dspy.settings.lm.kwargs
        return RuntimeError(f"cannot reach {kw['api_base']} headers={kw['extra_headers']}")

    splits = small_splits(routing, n_train=20, n_val=10)
    with SimServer("test", seed=0) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url.replace("http://", f"http://{USER_TOKEN}@"),
                          api_key="anything", extra_headers={"Ocp-Apim-Subscription-Key": APIM}, cache=False,
                          **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, log_dir=str(tmp_path), track_stats=True, verbose=False)
        with dspy.context(lm=student):
            program = opt.compile(FailsOnTracking(routing.make_program(), quoting_error),
                                  trainset=splits.train, valset=splits.val)
    assert program.detailed_results.run_stats["failures"].get("program_error", 0) > 0  # the errors were stored
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.sqlite3" for p in written)
    for path in written:
        data = path.read_bytes()
        assert USER_TOKEN.encode() not in data and APIM.encode() not in data, path
