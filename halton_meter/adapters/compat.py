"""OpenAI-compatible providers — xAI, Groq, DeepSeek, Mistral, OpenRouter (§5) — on openai.py's
readers, each correcting only its own quirk: xAI's reasoning outside the completion, Groq's
second usage place, DeepSeek's hit/miss counts, and xAI's and OpenRouter's own charge."""

from __future__ import annotations

from halton_meter.adapters.base import (BILL_TOKENS, CallState, Usage, as_int, get_path,
                                        usd_to_nanousd)
from halton_meter.adapters.openai import (ChatAdapter, ResponsesAdapter, chat_usage,
                                          responses_usage)
from halton_meter.http1 import ResponseHead

# ---- xAI — api.x.ai -------------------------------------------------------------------------

TICKS_PER_NANOUSD = 10  # 1 USD = 10^10 ticks (docs.x.ai/developers/cost-tracking)


def ticks_to_nanousd(value: object) -> int | None:
    """xAI's `cost_in_usd_ticks` as nano-dollars, rounded half to even; None when absent."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        return None
    nano, rest = divmod(value, TICKS_PER_NANOUSD)
    if rest > 5 or (rest == 5 and nano % 2):
        nano += 1
    return nano


def fold_xai_reasoning(usage: Usage, raw: dict, prompt_key: str, completion_key: str) -> Usage:
    """Billed output = completion + reasoning when xAI counted reasoning outside the completion.

    xAI chat `completion_tokens` excludes `reasoning_tokens` while `total_tokens` includes them
    (§5, LiteLLM `fold_reasoning_tokens_into_completion`). Fold only when the total proves it:
    total == prompt + completion + reasoning. When total == prompt + completion the reasoning is
    already inside, and without a total nothing is assumed.
    """
    reasoning = usage.reasoning_tokens or 0
    total = raw.get("total_tokens")
    if reasoning and isinstance(total, int) and not isinstance(total, bool):
        completion = as_int(raw.get(completion_key))
        if total == as_int(raw.get(prompt_key)) + completion + reasoning:
            usage.output_tokens = completion + reasoning
    return usage


def xai_error_type(payload: object) -> str | None:
    """xAI errors are `{"code": "<status text>", "error": "<message>"}`: the code is the type
    (the message can quote part of the key). Seen in beeai-framework issue #447."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        code = payload.get("code")
        if isinstance(code, str) and code:
            return code[:100]
    return None


class _XAIUsage:
    """xAI's traps, for its chat and Responses adapters: reasoning outside the output count
    (folded in when `total_tokens` says so), its own charge in ticks, its error body shape."""

    parse_usage = staticmethod(chat_usage)
    usage_keys = ("prompt_tokens", "completion_tokens")

    def read_usage(self, state: CallState, raw: dict) -> None:
        state.usage = fold_xai_reasoning(self.parse_usage(raw), raw, *self.usage_keys)
        state.usage_final = True
        state.provider_cost_nanousd = ticks_to_nanousd(raw.get("cost_in_usd_ticks"))

    def on_error_json(self, state: CallState, payload: object) -> None:
        state.error_type = xai_error_type(payload)
        if state.error_type is None:
            super().on_error_json(state, payload)


class XAIChat(_XAIUsage, ChatAdapter):
    name = "xai.chat"
    provider = "xai"
    hosts = ("api.x.ai",)
    endpoints = {"/v1/chat/completions": ("chat", BILL_TOKENS)}


class XAIResponses(_XAIUsage, ResponsesAdapter):
    name = "xai.responses"
    provider = "xai"
    hosts = ("api.x.ai",)
    endpoints = {"/v1/responses": ("responses", BILL_TOKENS)}
    parse_usage = staticmethod(responses_usage)
    usage_keys = ("input_tokens", "output_tokens")


# ---- Groq — api.groq.com --------------------------------------------------------------------


class GroqChat(ChatAdapter):
    """Groq streams put usage in `x_groq.usage` on the final chunk, and also in a top-level
    `usage` with `include_usage` (groq-sdk `chat_completion_chunk.py`): one is read, never both.
    """

    name = "groq.chat"
    provider = "groq"
    hosts = ("api.groq.com",)
    endpoints = {
        "/openai/v1/chat/completions": ("chat", BILL_TOKENS),
        "/openai/v1/embeddings": ("embeddings", BILL_TOKENS),
    }

    def on_chunk(self, state: CallState, chunk: dict) -> None:
        x_groq = chunk.get("x_groq")
        if isinstance(x_groq, dict):
            # `x_groq.id` is the request id (req_…), as in Groq's x-request-id header: it wins
            # over the chunk's chatcmpl-… id when no header gave one.
            request_id = x_groq.get("id")
            if state.request_id is None and isinstance(request_id, str) and request_id:
                state.request_id = request_id
            error = x_groq.get("error")  # "why a stream was stopped early"
            if isinstance(error, str) and error:
                state.error_type = error[:100]
        super().on_chunk(state, chunk)

    def usage_of(self, chunk: dict) -> dict | None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            return usage
        usage = get_path(chunk, "x_groq", "usage")
        return usage if isinstance(usage, dict) else None


class GroqResponses(ResponsesAdapter):
    """Groq's Responses API (beta), OpenAI's shape."""

    name = "groq.responses"
    provider = "groq"
    hosts = ("api.groq.com",)
    endpoints = {"/openai/v1/responses": ("responses", BILL_TOKENS)}


# ---- DeepSeek — api.deepseek.com ------------------------------------------------------------


def deepseek_usage(raw: dict) -> Usage:
    """prompt = hit + miss: input is the miss count, cache read the hit count. Responses may
    also carry `prompt_tokens_details.cached_tokens` with the hit count again (§5): never both."""
    usage = chat_usage(raw)
    if "prompt_cache_hit_tokens" in raw or "prompt_cache_miss_tokens" in raw:
        usage.input_tokens = as_int(raw.get("prompt_cache_miss_tokens"))
        usage.cache_read_tokens = as_int(raw.get("prompt_cache_hit_tokens"))
        # Disk caching has no write charge (api-docs.deepseek.com/guides/kv_cache).
        usage.cache_write_30m_tokens = usage.cache_write_12h_tokens = 0
    return usage


class DeepSeekChat(ChatAdapter):
    name = "deepseek.chat"
    provider = "deepseek"
    hosts = ("api.deepseek.com",)
    # The OpenAI-compatible surface is rooted at the bare host, `/v1` is accepted too, and the
    # beta base URL (prefix completion, FIM) has the same bodies.
    endpoints = {
        "/chat/completions": ("chat", BILL_TOKENS),
        "/v1/chat/completions": ("chat", BILL_TOKENS),
        "/beta/chat/completions": ("chat", BILL_TOKENS),
        "/beta/completions": ("fim", BILL_TOKENS),
    }

    def read_usage(self, state: CallState, raw: dict) -> None:
        state.usage = deepseek_usage(raw)
        state.usage_final = True


# ---- Mistral — api.mistral.ai ---------------------------------------------------------------


class MistralChat(ChatAdapter):
    """Usage `{prompt_tokens, completion_tokens, total_tokens}` on the last stream chunk, with
    or without include_usage (observed); cached counts are read from `prompt_tokens_details`
    when present (unverified for Mistral, §5)."""

    name = "mistral.chat"
    provider = "mistral"
    hosts = ("api.mistral.ai",)
    endpoints = {
        "/v1/chat/completions": ("chat", BILL_TOKENS),
        "/v1/fim/completions": ("fim", BILL_TOKENS),
        "/v1/embeddings": ("embeddings", BILL_TOKENS),
    }


# ---- OpenRouter — openrouter.ai -------------------------------------------------------------


class OpenRouterChat(ChatAdapter):
    """Usage is always in the last chunk (openrouter.ai/docs/use-cases/usage-accounting), with
    `cost` in USD: OpenRouter's own charge. The model is the OpenRouter slug."""

    name = "openrouter.chat"
    provider = "openrouter"
    hosts = ("openrouter.ai",)
    endpoints = {
        "/api/v1/chat/completions": ("chat", BILL_TOKENS),
        "/api/v1/completions": ("completions", BILL_TOKENS),
    }

    def request_id_from_headers(self, head: ResponseHead) -> str | None:
        # "The generation ID is returned in the X-Generation-Id response header" (streaming docs).
        return head.headers.get("x-generation-id") or super().request_id_from_headers(head)

    def read_usage(self, state: CallState, raw: dict) -> None:
        usage = chat_usage(raw)
        model = state.response_model or state.request_model or ""
        if model.startswith("anthropic/") and usage.cache_write_tokens:
            # Anthropic writes are 5-minute ones unless asked otherwise; the 30m/12h buckets
            # are OpenAI's.
            usage.cache_write_5m_tokens = usage.cache_write_tokens
            usage.cache_write_30m_tokens = usage.cache_write_12h_tokens = 0
        state.usage = usage
        state.usage_final = True
        state.provider_cost_nanousd = usd_to_nanousd(raw.get("cost"))


ADAPTERS = (XAIChat(), XAIResponses(), GroqChat(), GroqResponses(), DeepSeekChat(), MistralChat(),
            OpenRouterChat())
