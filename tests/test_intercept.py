"""The interceptor's trust decisions: loopback-only listeners, verified upstreams, fresh leaves."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from halton_meter.config import ConfigError, check_loopback
from halton_meter.edge import ProxyServer
from halton_meter.intercept import Interceptor, upstream_context


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.1", "::1", "localhost"])
def test_loopback_addresses_are_accepted(address):
    check_loopback(address)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.invalid", ""])
def test_anything_else_is_refused(address):
    with pytest.raises(ConfigError, match="loopback only"):
        check_loopback(address)


def test_proxy_server_refuses_a_network_address():
    with pytest.raises(ConfigError):
        ProxyServer(interceptor=None, listen="0.0.0.0", port=0)


def test_upstream_context_always_verifies(tmp_path):
    context = upstream_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_leaf_contexts_are_rechecked_with_the_ca(monkeypatch):
    class FakeCA:
        calls = 0

        def server_context(self, host):
            FakeCA.calls += 1
            return f"context-{FakeCA.calls}"

    interceptor = Interceptor(FakeCA(), ledger=None)
    interceptor.preload(("api.anthropic.com",))
    assert asyncio.run(interceptor.server_context("api.anthropic.com")) == "context-1"
    host_context, _ = interceptor._server_contexts["api.anthropic.com"]
    interceptor._server_contexts["api.anthropic.com"] = (host_context, 0.0)  # the recheck is due
    assert asyncio.run(interceptor.server_context("api.anthropic.com")) == "context-2"
