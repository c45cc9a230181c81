"""Coding-agent backends: Codex on chatgpt.com (§4.1) and the Grok CLI proxy (§4.3).

Both speak APIs read elsewhere — OpenAI Responses and xAI's shapes — on their own hosts.
"""

from __future__ import annotations

from halton_meter.adapters.base import BILL_TOKENS
from halton_meter.adapters.compat import XAIChat, XAIResponses
from halton_meter.adapters.openai import ResponsesAdapter
from halton_meter.http1 import ResponseHead


class CodexResponses(ResponsesAdapter):
    """Codex signed in with ChatGPT: Responses over `POST /backend-api/codex/responses`.

    Usage is `response.completed.response.usage`, as Codex itself reads it (codex
    `codex-api/src/sse/responses.rs`); a stream that closes without a terminal event has no
    usage and the row says unknown. Billing is the ChatGPT plan: any cost is an API estimate.
    """

    name = "codex.responses"
    provider = "codex"
    hosts = ("chatgpt.com",)
    endpoints = {
        "/backend-api/codex/responses": ("responses", BILL_TOKENS),
        # Remote compaction (path inferred from the API's /v1/responses/compact, §2.2).
        "/backend-api/codex/responses/compact": ("compact", BILL_TOKENS),
    }

    def request_id_from_headers(self, head: ResponseHead) -> str | None:
        # Codex reads x-request-id, then x-oai-request-id (codex-rs API error handling).
        return super().request_id_from_headers(head) or head.headers.get("x-oai-request-id")


# The Grok CLI's wire format is unconfirmed (§4.3): metered as xAI's Responses and chat shapes.


class GrokCliResponses(XAIResponses):
    name = "grok_cli.responses"
    provider = "grok_cli"
    hosts = ("cli-chat-proxy.grok.com",)
    endpoints = {"/v1/responses": ("responses", BILL_TOKENS)}


class GrokCliChat(XAIChat):
    name = "grok_cli.chat"
    provider = "grok_cli"
    hosts = ("cli-chat-proxy.grok.com",)
    endpoints = {"/v1/chat/completions": ("chat", BILL_TOKENS)}


ADAPTERS = (CodexResponses(), GrokCliResponses(), GrokCliChat())
