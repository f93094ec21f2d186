"""Session 43's review of redaction: keys the LM discovery did not reach, keys of unusual shapes given
to an LM, text cut before it was masked, and ordinary words masked as credentials."""

from __future__ import annotations

import base64

import dspy
import httpx
import pytest

from dspy_turbogepa.adapter.lm_discovery import _looks_like_a_key, lm_api_keys
from dspy_turbogepa.adapter.metric import read_metric_return
from dspy_turbogepa.redaction import REDACTED, describe_error, describe_traceback, mask_text
from dspy_turbogepa.tracking.mlflow_tracking import _short

KEY = "gw7QzR4tYp2LmN8vXc3BkJ6h"  # 24 characters


def _program() -> dspy.Module:
    return dspy.Predict("question -> answer")


def test_a_string_score_quoting_a_key_across_the_cut_is_masked_whole(monkeypatch):
    monkeypatch.setenv("JUDGE_GATEWAY_KEY", KEY)
    reading = read_metric_return("x" * 185 + f" key {KEY}", 0.0)  # the key across character 200
    assert reading.invalid is not None
    assert KEY[:6] not in reading.invalid, reading.invalid


def test_an_mlflow_error_quoting_a_key_across_the_cut_is_masked_whole(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", KEY)
    text = _short(RuntimeError("403 Forbidden: " + "y" * 265 + f" token={KEY}"))  # across character 300
    assert KEY[:6] not in text, text


@pytest.mark.parametrize("value", ["AbcdEfghIjklMnopQrst", "0f1e2d3c4b5a6978", "abcdefghijklmnopqrstuvwxyz12",
                                   "qwertyuiopasdfghjklzx"])
def test_a_key_of_an_unusual_shape_given_to_an_lm_is_a_key(value):
    assert _looks_like_a_key(value)


@pytest.mark.parametrize("value", ["anything", "lm-studio", "sk-no-key-required", "my-local-server", "placeholder",
                                   "not-needed", "token-abc123"])
def test_a_placeholder_given_to_an_lm_is_not_a_key(value):
    assert not _looks_like_a_key(value)


def test_a_key_with_a_stray_space_is_registered_without_it():
    program = _program()
    program.lm = dspy.LM("openai/x", api_key=" AbcdEfghIjklMnopQrst\n")
    assert "AbcdEfghIjklMnopQrst" in lm_api_keys(program, None)


def test_keys_an_lm_holds_elsewhere_are_registered(monkeypatch):
    import litellm

    class VaultLM(dspy.LM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._vault_key = "xai-Vt5mQ8rW2nK4pL7s"

    program = _program()
    program.lm = VaultLM("openai/x")
    nested = dspy.LM("openai/y", extra_body={"auth": {"api_key": "nvapi-Nb3kR9sT1vX5"}})
    monkeypatch.setattr(litellm, "api_key", "gsk_Qx2Lm7Np4Rt8Vw1Z")
    keys = lm_api_keys(program, nested)
    assert {"xai-Vt5mQ8rW2nK4pL7s", "nvapi-Nb3kR9sT1vX5", "gsk_Qx2Lm7Np4Rt8Vw1Z"} <= set(keys), keys


def test_a_key_the_run_did_not_find_is_masked_where_the_request_that_sent_it_is_known():
    secret = "gsk_Jd9Wm2Xq7Lp4Zr8T"
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions",
                            headers={"Authorization": f"Bearer {secret}"})
    response = httpx.Response(400, request=request)
    inner = httpx.HTTPStatusError(f"Request rejected, key: {secret}", request=request, response=response)
    try:
        try:
            raise inner
        except httpx.HTTPStatusError as err:
            raise RuntimeError(f"judge failed: {secret}") from err
    except RuntimeError as exc:
        described, traceback_text = describe_error(exc), describe_traceback(exc)
    assert secret not in described and REDACTED in described
    assert secret not in traceback_text


def test_basic_credentials_are_masked_and_product_names_are_not():
    token = base64.b64encode(b"alice:S3cr3t!").decode()
    assert mask_text(f"Authorization: Basic {token}") == f"Authorization: {REDACTED}"
    assert mask_text(f"Basic {base64.b64encode(b'user:pass').decode()}") == REDACTED
    for prose in ("Basic Windows10 tickets go to general", "Basic Office365", "Basic iPhone12",
                  "Basic PlayStation5", "Basic instructions"):
        assert mask_text(prose) == prose


def test_a_placeholder_key_in_the_environment_does_not_mask_the_word(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "anything")
    monkeypatch.setenv("OTHER_API_KEY", KEY)
    assert mask_text("Do not add anything else.") == "Do not add anything else."
    assert mask_text(f"key {KEY}") == f"key {REDACTED}"


def test_a_basic_credential_cut_short_is_still_masked():
    token = base64.b64encode(b"admin:S3cretPassw0rd!").decode()
    for n in range(12, len(token) + 1):
        assert token[:n] not in mask_text(f"Authorization: Basic {token[:n]}..."), n
    for short in (b"user:pw", b"a:secret", b"user:pwd"):
        token = base64.b64encode(short).decode()
        assert mask_text(f"Basic {token}") == REDACTED, short


def test_a_setting_named_like_a_key_outside_headers_is_not_a_credential():
    program = _program()
    program.lm = dspy.LM("openai/x", extra_body={"sort_key": "Priority"},
                         extra_headers={"x-portkey-virtual-key": "vk-Pk4mT9rW2q"})
    assert lm_api_keys(program, None) == ["vk-Pk4mT9rW2q"]


def test_reading_the_client_libraries_keys_loads_nothing():
    import subprocess
    import sys

    code = (
        "import litellm, openai, sys\n"
        "from dspy_turbogepa.adapter.lm_discovery import _client_globals\n"
        "before = {m for m in sys.modules if m.startswith('openai.resources')}\n"
        "_client_globals()\n"
        "after = {m for m in sys.modules if m.startswith('openai.resources')}\n"
        "print(len(after - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0", out.stdout
