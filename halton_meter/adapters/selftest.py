"""The self-test's pseudo provider: `selftest.halton-meter.test`, spoken in Anthropic's format.

`init` and `doctor` prove the installed proxy end to end with no internet: a call to this host
goes through the edge, the hand-off, TLS termination with the local CA and the ledger writer like
any provider call, and reaches a loopback test upstream on the port named in the CONNECT line.
The name is under `.test` (RFC 2606), which no one can register, so letting the CA sign it gives
nothing away; the upstream is always 127.0.0.1 and must present a certificate of our own CA.
"""

from halton_meter.adapters.anthropic import AnthropicMessages

HOST = "selftest.halton-meter.test"
PROVIDER = "selftest"


class SelftestMessages(AnthropicMessages):
    name = "selftest.messages"
    provider = PROVIDER
    hosts = (HOST,)


ADAPTERS = (SelftestMessages(),)
