"""Credentials in query strings never reach the ledger."""

import pytest

from halton_meter.redaction import redact_target


@pytest.mark.parametrize("target, stored", [
    ("/v1beta/models/gemini-2.5-flash:generateContent?key=AIzaSyA-secret",
     "/v1beta/models/gemini-2.5-flash:generateContent?key=REDACTED"),
    ("/v1/x?alt=sse&KEY=abc&beta=true", "/v1/x?alt=sse&KEY=REDACTED&beta=true"),
    ("/v1/x?X-Amz-Signature=deadbeef&X-Amz-Date=2026", "/v1/x?X-Amz-Signature=REDACTED&X-Amz-Date=2026"),
    ("/v1/messages?beta=true", "/v1/messages?beta=true"),
    ("/v1/messages", "/v1/messages"),
    ("/v1/x?key=&token", "/v1/x?key=&token"),
])
def test_redact_target(target, stored):
    assert redact_target(target) == stored
