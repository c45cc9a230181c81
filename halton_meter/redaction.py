"""Secrets never stored: what is removed from anything halton-meter writes down.

Today: credentials carried in a URL's query string (Gemini's `?key=AIza…`, signed URLs).
"""

from __future__ import annotations

import re

REDACTED = "REDACTED"
# Query parameter names that carry credentials, compared case-insensitively.
_SECRET_PARAMS = frozenset({
    "key", "api_key", "apikey", "api-key", "access_token", "token", "auth", "authorization",
    "client_secret", "secret", "password", "sig", "signature", "x-goog-api-key",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
})
_PARAM = re.compile(r"([^&=]*)(=?)([^&]*)")


def redact_target(target: str) -> str:
    """The request target with the values of credential-carrying query parameters replaced."""
    path, question, query = target.partition("?")
    if not question:
        return target
    return f"{path}?{_PARAM.sub(_redact_param, query)}"


def _redact_param(match: re.Match) -> str:
    name, equals, value = match.groups()
    if equals and value and name.lower() in _SECRET_PARAMS:
        return f"{name}={REDACTED}"
    return match.group(0)
