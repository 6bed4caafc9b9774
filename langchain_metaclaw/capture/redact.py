"""Secret redaction applied to every capture record before it touches disk.

The writer runs :func:`redact_text` over every free-text field of a record (message contents, tool args
and results, errors, metadata; containers as their JSON text, so ``"api_key": "..."`` inside a dict is
caught), with a cache because a conversation resends its history on every call. Patterns never match
``"`` or ``\\``, so redacted JSON text stays valid JSON. A user hook (``redact=`` on the handler) sees each
record as a dict first and can remove more.
"""

from __future__ import annotations

import re

import ahocorasick_rs

REDACTED = "[REDACTED]"

_TOKEN = r"[A-Za-z0-9_\-\.~+/=]"
SECRET_PATTERNS: tuple[str, ...] = (
    r"sk-(?:proj-|ant-|or-)?[A-Za-z0-9_\-]{16,}",  # OpenAI, Anthropic, OpenRouter
    r"tml-[A-Za-z0-9_\-]{16,}",  # Tinker
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",  # Slack
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"AIza[0-9A-Za-z_\-]{35}",  # Google
    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
    rf"(?<=[Bb][Ee][Aa][Rr][Ee][Rr] ){_TOKEN}{{8,}}",
    r"(?<=[Bb][Aa][Ss][Ii][Cc] )[A-Za-z0-9+/=]{12,}",
)
# key=value / "key": "value" forms, where the key names a secret; keeps the key, hides the value.
_KEYED = re.compile(
    r"(?i)((?:api[_-]?key|secret|password|passwd|access[_-]?token|auth[_-]?token|client[_-]?secret)"
    r"(?:\\?\")?\s*[:=]\s*(?:\\?\")?)([^\s\"\\,}]{4,})"
)
_SECRETS = re.compile("|".join(f"(?:{p})" for p in SECRET_PATTERNS))

# Every pattern above contains one of these (lower-cased). One Aho-Corasick pass finds them all, so text with
# none of them (nearly all text) skips the regex pass, which costs ~30 us per KB. Leftmost-first matching runs
# the automaton's SIMD prefilter (standard matching does not) and bytes skip the str-offset bookkeeping: 0.4 us
# per KB of ASCII text, against 2.2 us for standard matching on str.
_MARKERS = (
    "sk-", "tml-", "akia", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "hf_", "aiza", "eyj", "bearer ",
    "basic ", "api_key", "api-key", "apikey", "secret", "password", "passwd", "access_token", "access-token",
    "auth_token", "auth-token",
)
_MARKER_SEARCH = ahocorasick_rs.BytesAhoCorasick(
    [m.encode() for m in _MARKERS], matchkind=ahocorasick_rs.MatchKind.LeftmostFirst
)


_SHORTEST_MATCH = 11
"""No pattern matches fewer characters (``secret=abcd``): shorter strings skip the scan."""


def may_hold_secret(text: str) -> bool:
    """``False`` when no pattern can match ``text`` (one pass; nearly all text)."""
    if len(text) < _SHORTEST_MATCH:
        return False
    # bytes.lower() folds ASCII only; str.lower() also folds the Kelvin sign to k, as the (?i) key pattern does
    folded = text.encode().lower() if text.isascii() else text.lower().encode()
    return bool(_MARKER_SEARCH.find_matches_as_indexes(folded))


def redact_text(text: str) -> str:
    """Replace anything that looks like a credential with ``[REDACTED]``."""
    if not may_hold_secret(text):
        return text
    text = _SECRETS.sub(REDACTED, text)
    return _KEYED.sub(lambda m: m.group(1) + REDACTED, text)
