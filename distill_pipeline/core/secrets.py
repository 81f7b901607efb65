"""Secrets are never written in clear: one redaction for every text that comes back from a provider.

A provider or a proxy may quote the credentials it received in an error ("Received
Authorization: Bearer sk-..."), and that text would otherwise reach quarantine reasons,
manifests, metadata, the ledger and run logs. :func:`redact` replaces, in any text:

- every secret value this process knows: the keys registered by the code that holds them
  (:func:`register_secret`; the teacher client registers its ``api_key``) and the values of the
  environment variables that hold credentials (:func:`is_secret_variable`: ``OPENAI_API_KEY``,
  ``ANTHROPIC_API_KEY``, ``AZURE_API_KEY``, ``GEMINI_API_KEY``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``DISTILL_TEACHER_API_KEY``, ... any name ending in ``_API_KEY``,
  ``_APIKEY``, ``_SECRET``, ``_TOKEN`` or ``_PASSWORD``, or holding ``SECRET``), read at each call
  so a key set after start-up is covered;
- the value of an ``Authorization`` header, and ``Bearer`` / ``Basic`` credentials;
- key-shaped tokens: provider-prefixed keys (``sk-...``, ``sk-ant-...``, ``gsk_...``, ``hf_...``,
  ``AIza...``, ``AKIA...``), JSON web tokens, the password of a URL, and a long run of letters
  and digits right after a word such as ``key``, ``token``, ``secret`` or ``password``.

Ordinary text is left alone: a token is taken for a key only with a provider's prefix, or after
a credential word and mixing letters and digits, so sentences, numbers, request ids and
``max_tokens: 256`` pass unchanged.

Written here rather than borrowed: litellm scrubs its own log records with similar patterns, but
not the messages of the exceptions it raises nor our tables, it knows no configured key, and it
is imported only when a teacher is called, while this module serves every stage.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

REDACTED = "***"
# Shorter environment values are flags, ports or test placeholders ("testing"), not keys, and
# replacing them would blank ordinary words.
MIN_ENV_SECRET_CHARS = 8
# A value registered explicitly is a secret whatever it looks like, unless it is too short to
# be told from ordinary text.
MIN_REGISTERED_SECRET_CHARS = 4

_SECRET_VARIABLE = re.compile(r"(?:_API_?KEY|_SECRET|_TOKEN|_PASSWORD)$|SECRET")
_registered: set[str] = set()

_TOKEN_CHARS = r"[A-Za-z0-9._~+/=-]"
_AUTHORIZATION = re.compile(
    r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?[^\s\"',;)}>\]]+"
)
# A scheme's credential has a digit, a symbol of base64 or a lower-upper pair ("dXNlcjpw"): not
# "bearer instruments" or "basic understanding".
_SCHEMED_CREDENTIAL = re.compile(
    rf"(?i)(\b(?:bearer|basic)\s+)(?-i:(?={_TOKEN_CHARS}*(?:\d|[a-z][A-Z]|[+/=_.~-]))){_TOKEN_CHARS}{{8,}}"
)
_PREFIXED_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{16,}"  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), DeepSeek
    r"|(?:gsk|hf|xai|pplx|r8|ghp|gho)[_-](?=[A-Za-z0-9]*\d)[A-Za-z0-9]{20,}"  # Groq, Hugging Face, xAI, ...
    r"|github_pat_[A-Za-z0-9_]{20,}"
    r"|AIza[0-9A-Za-z_-]{35}"  # Google
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # JSON web tokens
    r")"
)
_URL_PASSWORD = re.compile(r"(://[^/\s:@'\"]{1,256}:)[^/\s@'\"]{1,256}(?=@)")
# A credential word, a separator (": ", "=", '"key": "', " provided: "), then a token of at least 16
# characters that mixes letters and digits: "api_key=3f9a...", "token: ab12...", "secret is 8d7c...".
_AFTER_CREDENTIAL_WORD = re.compile(
    r"(?i)((?<![A-Za-z0-9])(?:api[_-]?key|key|token|secret|password|passwd|credential)s?(?![A-Za-z0-9])"
    r"[\"']?(?:\s*(?:provided|given|is|was|value))?\s*[:=]?\s*[\"']?)"
    rf"(?<=[\s:=\"'])(?={_TOKEN_CHARS}*[A-Za-z])(?={_TOKEN_CHARS}*\d){_TOKEN_CHARS}{{16,}}"
)


def is_secret_variable(name: str) -> bool:
    """Whether an environment variable of this name holds a credential litellm or boto3 may read."""
    return bool(_SECRET_VARIABLE.search(name.upper()))


def register_secret(value: str | None) -> None:
    """Redact ``value`` from every text from now on (a configured key that is in no variable)."""
    if value and len(value) >= MIN_REGISTERED_SECRET_CHARS:
        _registered.add(value)


def known_secrets() -> tuple[str, ...]:
    """The registered keys and the values of the environment's credential variables."""
    from_env = {
        value for name, value in os.environ.items() if len(value) >= MIN_ENV_SECRET_CHARS and is_secret_variable(name)
    }
    return tuple(sorted(_registered | from_env))


@functools.lru_cache(maxsize=8)
def _values_pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    if not values:
        return None
    # Longest first: a key that contains another is replaced whole.
    return re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))


def redact(text: str) -> str:
    """``text`` with every secret in it replaced by ``***`` (see the module's docstring)."""
    return _redact(text, _values_pattern(known_secrets()))


def redact_all(texts: Iterable[str | None]) -> list[str | None]:
    """:func:`redact` over many texts (a table's column), the secrets looked up once; None stays None."""
    values = _values_pattern(known_secrets())
    return [None if text is None else _redact(text, values) for text in texts]


def _redact(text: str, values: re.Pattern[str] | None) -> str:
    if not text:
        return text
    if values is not None:
        text = values.sub(REDACTED, text)
    text = _AUTHORIZATION.sub(rf"\g<1>{REDACTED}", text)
    text = _SCHEMED_CREDENTIAL.sub(rf"\g<1>{REDACTED}", text)
    text = _PREFIXED_KEY.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}", text)
    return _AFTER_CREDENTIAL_WORD.sub(rf"\g<1>{REDACTED}", text)


def error_text(exc: BaseException) -> str:
    """An exception as one redacted line: its type and message."""
    return redact(f"{type(exc).__name__}: {exc}")


class RedactedError(RuntimeError):
    """An error whose text held a secret, raised again with the secret taken out and no chain."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and the causes a traceback would show with it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


@contextmanager
def errors_redacted() -> Iterator[None]:
    """Let errors through unchanged, unless their text or their causes' holds a secret.

    Such an error is raised again as a :class:`RedactedError` that says the same, redacted, with
    its chain cut: whoever records it (a run's failure event, a log) sees no secret.
    """
    try:
        yield
    except Exception as exc:
        texts = [f"{type(e).__name__}: {e}" for e in _chain(exc)]
        redacted = [redact(text) for text in texts]
        if redacted == texts:
            raise
        raise RedactedError("; caused by ".join(redacted)) from None
