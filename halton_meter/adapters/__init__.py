"""The provider registry: which hosts are intercepted and which adapter reads each call.

The proxy core asks only `is_provider_host` and `adapter_for`; everything it intercepts is listed
here, and the CA's name constraints are built from the same tuple, so a host added here is also
one the CA may sign. Each provider module exports `ADAPTERS`; the first adapter whose hosts and
`matches(method, path)` fit a call reads it, and any other call to a provider host gets that
host's generic adapter (the row is written, with no usage expected).
"""

from halton_meter.adapters import (anthropic, bedrock, code_assist, codex, compat, gemini, openai,
                                   selftest, vertex)
from halton_meter.adapters.base import Adapter, split_target

# The hosts of reference/providers.md §1-5: minted ahead of time at start.
PRIMARY_HOSTS: tuple[str, ...] = (
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
    selftest.HOST,  # init's and doctor's loopback self-test (adapters/selftest.py)
)

# Regional endpoints: X.509 name constraints cannot express "region-aiplatform.googleapis.com"
# as a pattern, so each one is listed (leaves are minted on first use).
VERTEX_HOSTS: tuple[str, ...] = vertex.HOSTS
BEDROCK_HOSTS: tuple[str, ...] = bedrock.HOSTS

PROVIDER_HOSTS: tuple[str, ...] = PRIMARY_HOSTS + VERTEX_HOSTS + BEDROCK_HOSTS

_PROVIDER_HOST_SET = frozenset(PROVIDER_HOSTS)

# Registration order matters only where two adapters share a host: the first match wins.
REGISTRY: tuple[Adapter, ...] = (
    *anthropic.ADAPTERS,
    *openai.ADAPTERS,
    *gemini.ADAPTERS,
    *compat.ADAPTERS,
    *codex.ADAPTERS,
    *code_assist.ADAPTERS,
    *vertex.ADAPTERS,
    *bedrock.ADAPTERS,
    *selftest.ADAPTERS,
)

_PROVIDER_OF_HOST: dict[str, str] = {
    "api.anthropic.com": "anthropic",
    "api.openai.com": "openai",
    "generativelanguage.googleapis.com": "gemini",
    "cloudcode-pa.googleapis.com": "code_assist",
    "chatgpt.com": "codex",
    "api.x.ai": "xai",
    "cli-chat-proxy.grok.com": "grok_cli",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.mistral.ai": "mistral",
    "openrouter.ai": "openrouter",
    selftest.HOST: selftest.PROVIDER,
    **{host: "vertex" for host in VERTEX_HOSTS},
    **{host: "bedrock" for host in BEDROCK_HOSTS},
}


def _index(adapters: tuple[Adapter, ...]) -> dict[str, tuple[Adapter, ...]]:
    by_host: dict[str, list[Adapter]] = {}
    for adapter in adapters:
        for host in adapter.hosts:
            by_host.setdefault(host, []).append(adapter)
    return {host: tuple(found) for host, found in by_host.items()}


_BY_HOST = _index(REGISTRY)
_GENERIC: dict[str, Adapter] = {}


def adapter_for(host: str, method: str, target: str) -> Adapter:
    """The adapter that reads calls of `method` to `target` on `host`."""
    host = host.lower().rstrip(".")
    path, _ = split_target(target)
    for adapter in _BY_HOST.get(host, ()):
        if adapter.matches(method, path):
            return adapter
    return generic_adapter(host)


def generic_adapter(host: str) -> Adapter:
    """A provider host's catch-all: records the call, its status and error type, no usage."""
    adapter = _GENERIC.get(host)
    if adapter is None:
        adapter = Adapter()
        adapter.provider = provider_of(host)
        _GENERIC[host] = adapter
    return adapter


def provider_of(host: str) -> str:
    return _PROVIDER_OF_HOST.get(host.lower().rstrip("."), "unknown")


def is_provider_host(host: str) -> bool:
    """True when calls to `host` are intercepted and metered (exact, case-insensitive match)."""
    return host.lower().rstrip(".") in _PROVIDER_HOST_SET
