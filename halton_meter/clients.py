"""Which client made a call: a family name from the User-Agent and the SDK headers.

Families (reference/providers.md §6): coding agents first (they embed SDKs and must not be
reported as the SDK), then SDKs by language, then generic HTTP tools. Unknown agents keep their
first product token, so a new tool shows up under its own name rather than as "unknown".
"""

from __future__ import annotations

import re

from halton_meter.http1 import Headers

# (pattern on the User-Agent, family). First match wins; order is significant.
_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), family)
    for pattern, family in (
        (r"^claude-cli/|claude-code", "claude-code"),
        (r"\bcursor/|cursor-", "cursor"),
        (r"^codex_|^codex-|\bcodex_cli_rs\b", "codex"),
        (r"^GeminiCLI", "gemini-cli"),
        (r"^CloudCodeVSCode|^CloudCode", "gemini-code-assist"),
        (r"^(Async)?Anthropic/Python", "anthropic-sdk-python"),
        (r"^(Async)?Anthropic/JS", "anthropic-sdk-js"),
        (r"^(Async)?OpenAI/Python", "openai-python"),
        (r"^(Async)?OpenAI/JS", "openai-node"),
        (r"^(Async)?Groq/Python", "groq-python"),
        (r"^(Async)?Groq/JS", "groq-node"),
        (r"google-genai-sdk/.*gl-python|^google-genai-sdk.*python", "google-genai-python"),
        (r"google-genai-sdk/.*gl-node|^google-genai-sdk", "google-genai-js"),
        (r"\blitellm\b", "litellm"),
        (r"^aider\b", "aider"),
        (r"^curl/", "curl"),
        (r"^python-requests/", "python-requests"),
        (r"^python-httpx/", "python-httpx"),
        (r"^Python-urllib/", "python-urllib"),
        (r"^aiohttp|Python/.*aiohttp", "python-aiohttp"),
        (r"^node-fetch|^undici|^node$", "node"),
        (r"^Wget/", "wget"),
    )
)
_FIRST_TOKEN = re.compile(r"^([A-Za-z][A-Za-z0-9._-]{0,39})")


_CACHE_MAX = 1024
_cache: dict[tuple[str, str, str], str] = {}


def client_family(headers: Headers) -> str:
    """The family of the client that sent a request with these headers (cached: UAs repeat)."""
    key = (headers.get("user-agent") or "", headers.get("originator") or "",
           headers.get("x-goog-api-client") or "")
    family = _cache.get(key)
    if family is None:
        family = _family(*key)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key] = family
    return family


def _family(user_agent: str, originator: str, api_client: str) -> str:
    for pattern, family in _FAMILIES:
        if pattern.search(user_agent):
            return family
    if originator.startswith("codex"):
        return "codex"
    if "genai-js" in api_client or "gl-node" in api_client:
        return "google-genai-js"
    if "gl-python" in api_client:
        return "google-genai-python"
    match = _FIRST_TOKEN.match(user_agent)
    return match.group(1).lower() if match else "unknown"
