"""The provider registry: which hosts are intercepted and which adapter reads each call.

The proxy core asks only `is_provider_host`; everything it intercepts is listed here, and the CA's
name constraints are built from the same tuple, so a host added here is also one the CA may sign.
"""

from halton_meter.adapters.base import Adapter

# Hosts whose TLS halton-meter terminates (reference/providers.md, sections 1-5).
PROVIDER_HOSTS: tuple[str, ...] = (
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    "cloudcode-pa.googleapis.com",
    "chatgpt.com",
    "api.x.ai",
    "cli-chat-proxy.grok.com",
    "api.groq.com",
    "api.deepseek.com",
    "api.mistral.ai",
    "openrouter.ai",
)

_PROVIDER_HOST_SET = frozenset(PROVIDER_HOSTS)


def adapter_for(host: str, method: str, path: str) -> Adapter:
    """The adapter that reads calls to (host, method, path)."""
    return _GENERIC


def is_provider_host(host: str) -> bool:
    """True when calls to `host` are intercepted and metered (exact, case-insensitive match)."""
    return host.lower().rstrip(".") in _PROVIDER_HOST_SET


_GENERIC = Adapter()
