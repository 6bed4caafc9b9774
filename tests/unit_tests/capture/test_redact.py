"""Secret redaction: every built-in pattern is caught, whatever the case of its marker and whatever the
rest of the text is made of (the marker scan folds ASCII text as bytes, other text with ``str.lower()``)."""

from __future__ import annotations

import pytest

from langchain_metaclaw.capture.redact import REDACTED, may_hold_secret, redact_text

SECRETS = [
    "sk-proj-" + "A1b2C3d4" * 3,
    "sk-ant-" + "x" * 20,
    "tml-" + "Q" * 20,
    "AKIA" + "ABCDEFGHIJKLMNOP",
    "ghp_" + "a" * 36,
    "xoxb-" + "1234567890-abc",
    "hf_" + "b" * 34,
    "AIza" + "c" * 35,
    "eyJ" + "a" * 12 + ".eyJ" + "b" * 12 + "." + "c" * 12,
]
KEYED = ["api_key=hunter2hunter2", "API-KEY: hunter2hunter2", '"Password": "hunter2hunter2"',
         "client_secret=hunter2hunter2", "Authorization: Bearer abcdefgh12345", "BASIC dXNlcjpwYXNzd29yZA=="]
SURROUNDINGS = [("", ""), ("my key is ", ", thanks"), ("héllo wörld, clé ", " 日本語"), ("x" * 5000 + " ", " " + "y" * 5000)]


@pytest.mark.parametrize("before,after", SURROUNDINGS)
@pytest.mark.parametrize("secret", SECRETS)
def test_every_pattern_is_redacted_in_any_text(secret, before, after):
    text = f"{before}{secret}{after}"
    assert may_hold_secret(text)
    assert redact_text(text) == f"{before}{REDACTED}{after}"


@pytest.mark.parametrize("before,after", SURROUNDINGS)
@pytest.mark.parametrize("keyed", KEYED)
def test_keyed_secrets_keep_their_key(keyed, before, after):
    text = f"{before}{keyed}{after}"
    assert may_hold_secret(text)
    redacted = redact_text(text)
    assert "hunter2hunter2" not in redacted and "abcdefgh12345" not in redacted and "dXNlcjpw" not in redacted
    assert REDACTED in redacted and redacted.startswith(before) and redacted.endswith(after)


@pytest.mark.parametrize("text", ["", "hello", "The weather in Paris is sunny, 18 degrees.",
                                  "Prix : 12 €, café compris", "a" * 10_000, '{"query": "weather"}'])
def test_text_without_a_marker_is_left_alone(text):
    assert not may_hold_secret(text)
    assert redact_text(text) is text


def test_a_non_ascii_lowercase_fold_still_flags_the_text():
    """``str.lower()`` folds the Kelvin sign to ``k`` and the case-insensitive key pattern matches it; the
    scan of non-ASCII text must see what the regex would."""
    text = "api_\u212aey=hunter2hunter2"
    assert may_hold_secret(text)
    assert "hunter2hunter2" not in redact_text(text)
