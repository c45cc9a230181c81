"""Client families from real User-Agent shapes (reference/providers.md §6)."""

import pytest

from halton_meter.clients import client_family
from halton_meter.http1 import Headers


@pytest.mark.parametrize("user_agent,extra,family", [
    ("claude-cli/2.1.3 (external, cli)", {}, "claude-code"),
    ("Anthropic/Python 0.121.0", {}, "anthropic-sdk-python"),
    ("AsyncAnthropic/Python 0.121.0", {}, "anthropic-sdk-python"),
    ("Anthropic/JS 0.70.1", {}, "anthropic-sdk-js"),
    ("OpenAI/Python 3.3.1", {}, "openai-python"),
    ("AsyncOpenAI/Python 3.3.1", {}, "openai-python"),
    ("OpenAI/JS 6.1.0", {}, "openai-node"),
    ("codex_cli_rs/0.61.0 (Ubuntu 24.4.0; x86_64) xterm-256color", {}, "codex"),
    ("reqwest", {"originator": "codex_exec"}, "codex"),
    ("GeminiCLI/0.20.0/gemini-2.5-pro (linux; x64; terminal)", {}, "gemini-cli"),
    ("CloudCodeVSCode/1.2.3", {}, "gemini-code-assist"),
    ("google-genai-sdk/2.19.0 gl-python/3.12.1", {}, "google-genai-python"),
    ("Groq/Python 0.30.0", {}, "groq-python"),
    ("Cursor/1.7.2", {}, "cursor"),
    ("curl/8.5.0", {}, "curl"),
    ("python-requests/2.32.3", {}, "python-requests"),
    ("python-httpx/0.28.1", {}, "python-httpx"),
    ("MyAgent/3.1 (build 7)", {}, "myagent"),
    ("", {}, "unknown"),
])
def test_client_family(user_agent, extra, family):
    fields = [("User-Agent", user_agent)] if user_agent else []
    assert client_family(Headers(fields + list(extra.items()))) == family
