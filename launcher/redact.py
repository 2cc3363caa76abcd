"""The one place that decides what a secret looks like, for everything the launcher prints or writes.

Processes still receive the real environment (they need their credentials); only copies meant for
eyes are redacted: `plan` and `plan --json`, `status`, validation errors, the supervisor's log,
and run-directory files that need no secret to do their job. Three signals, any one suffices:

- the variable's name has a secret-shaped word in it (NATS_PASS, HF_TOKEN, AUTH_HEADER, API_KEY);
- the value has a secret shape (`Bearer ...`, `hf_...`, `sk-...`, a JWT, a long random token);
- a URL carries userinfo (`nats://user:pass@host`): the userinfo goes, the host stays, because
  "which server" is what a reader of a plan or an error needs.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Any

MASK = "***"

# Whole words of a variable name (split on _ - .): NATS_PASS, AUTH_HEADER, but not PASSTHROUGH or MONKEY.
_NAME_WORDS = {"TOKEN", "SECRET", "SECRETS", "PASS", "PASSWD", "PASSWORD", "PASSPHRASE", "KEY", "KEYS",
               "APIKEY", "AUTH", "AUTHORIZATION", "CREDENTIAL", "CREDENTIALS", "CREDS", "COOKIE", "PRIVATE",
               "SIGNATURE", "JWT", "BEARER", "NKEY"}
# Substrings that are secret-shaped even glued to other words (DBPASSWORD, MYSECRET); TOKEN only as a
# word's end (HFTOKEN), because TOKENIZER and max-num-batched-tokens are no secrets.
_NAME_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "APIKEY", "PRIVATEKEY")

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_VALUE_SHAPES = [
    re.compile(r"(?i)\b(?:bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{16,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),  # JWT
]
# No '/' or '.': a path or a dotted model name is not a token, however long.
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+_-]{24,}={0,2}")


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    words = set(re.split(r"[_\-.]+", upper))
    return (bool(words & _NAME_WORDS) or any(part in upper for part in _NAME_PARTS)
            or any(w.endswith("TOKEN") for w in words))


def _random_looking(token: str) -> bool:
    """Long, mixed letters and digits, high entropy, one long unbroken run: an API key, not a
    hyphenated model name (DeepSeek-R1-Distill-Llama-8B) or a word."""
    if max(len(run) for run in re.split(r"[_\-+=]", token)) < 20:
        return False
    if not (any(c.isdigit() for c in token) and any(c.isalpha() for c in token)):
        return False
    counts = Counter(token)
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())
    return entropy >= 3.5


def redact_text(text: str) -> str:
    """URL userinfo, and every secret-shaped substring, replaced by ***."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    for shape in _VALUE_SHAPES:
        text = shape.sub(MASK, text)
    return _LONG_TOKEN.sub(lambda m: MASK if _random_looking(m.group()) else m.group(), text)


def redact_value(name: str, value: str) -> str:
    return MASK if value and is_secret_name(name) else redact_text(value)


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: redact_value(k, str(v)) for k, v in env.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """`--api-key X` hides X; `--api-key=X` too; anything else goes through redact_text. A secret-named
    switch (`--allow-credentials`) has no value: the flag after it is shown, not taken for one."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            hide_next = False
            if not arg.startswith("--"):
                out.append(MASK)
                continue
        if arg.startswith("--") and is_secret_name(arg[2:].split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + MASK)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg))
    return out


def redact_obj(obj: Any, key: str = "") -> Any:
    """JSON-like data (plan --json, status --json, run-dir files): env mappings by name, argv
    lists by flag, every other string by shape."""
    if isinstance(obj, dict):
        if key == "env":
            return {k: (redact_value(str(k), v) if isinstance(v, str) else redact_obj(v, str(k)))
                    for k, v in obj.items()}
        return {k: (MASK if isinstance(v, str) and v and is_secret_name(str(k)) else redact_obj(v, str(k)))
                for k, v in obj.items()}
    if isinstance(obj, list):
        if key == "argv" and all(isinstance(a, str) for a in obj):
            return redact_argv(obj)
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """Redacts each record's final message, so a log the launcher writes never holds a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    """On every handler of the root logger (call after logging.basicConfig)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
