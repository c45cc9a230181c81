"""The data path end to end: clients -> CONNECT -> serve (TLS interception) -> fake provider."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import messages_body


def project() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def post(proxy, body: bytes, project_name: str, host: str = "api.anthropic.com", headers=None,
         path: str = "/v1/messages"):
    conn = proxy.connection(host)
    conn.request("POST", path, body=body, headers={
        "content-type": "application/json", "x-halton-project": project_name, **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def open_stream(proxy, project_name: str, **fake_options: str):
    """Start a streaming call steered by x-fake-* options; returns (connection, response)."""
    conn = proxy.connection()
    headers = {"content-type": "application/json", "x-halton-project": project_name}
    headers.update({f"x-fake-{k.replace('_', '-')}": v for k, v in fake_options.items()})
    conn.request("POST", "/v1/messages", body=messages_body(stream=True), headers=headers)
    return conn, conn.getresponse()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def raw_tunnel(proxy, host: str = "api.anthropic.com", alpn=None) -> ssl.SSLSocket:
    """A TLS socket through a CONNECT tunnel, for exchanges http.client cannot express."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    answer = read_until(sock, b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return proxy.client_context(alpn).wrap_socket(sock, server_hostname=host)


def direct_stream(fake, body: bytes) -> bytes:
    """The same call straight to the fake provider, for byte-for-byte comparison."""
    context = ssl.create_default_context(cafile=str(fake.ca_path))
    conn = http.client.HTTPSConnection("api.anthropic.com", fake.port, timeout=10)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", fake.port), timeout=10),
                                    server_hostname="api.anthropic.com")
    conn.request("POST", "/v1/messages", body=body, headers={"Host": "api.anthropic.com",
                                                             "content-type": "application/json"})
    data = conn.getresponse().read()
    conn.close()
    return data


# ---- calls that succeed -------------------------------------------------------------------

def test_non_streaming_call_is_forwarded_and_recorded(proxy):
    name = project()
    response, data = post(proxy, messages_body(), name, headers={"user-agent": "Anthropic/Python 0.121.0"})
    assert response.status == 200
    payload = json.loads(data)
    assert payload["model"] == "claude-sonnet-4-5-20250929"
    [row] = proxy.wait_rows(name)
    assert row["host"] == "api.anthropic.com" and row["method"] == "POST" and row["path"] == "/v1/messages"
    assert row["status"] == 200 and row["outcome"] == "ok" and row["is_stream"] == 0
    # The dated id only appears in the response: the tap parsed the response copy.
    assert row["model"] == "claude-sonnet-4-5-20250929"
    assert row["request_bytes"] > len(messages_body()) and row["response_bytes"] > len(data)
    assert 0 < row["ttfb_ms"] <= row["duration_ms"]
    assert row["user_agent"] == "Anthropic/Python 0.121.0"


def test_streaming_call_is_byte_identical_to_direct(proxy, fake):
    name = project()
    body = messages_body(stream=True)
    response, data = post(proxy, body, name)
    assert response.status == 200
    assert response.getheader("transfer-encoding") == "chunked"
    assert data == direct_stream(fake, body)
    assert data.count(b"event: content_block_delta") == 5
    [row] = proxy.wait_rows(name)
    assert row["is_stream"] == 1 and row["outcome"] == "ok" and row["status"] == 200
    assert row["model"] == "claude-sonnet-4-5-20250929"


def test_stream_is_not_buffered(proxy):
    """The first event reaches the client while the provider holds the rest back."""
    name = project()
    conn = proxy.connection()
    started = time.monotonic()
    conn.request("POST", "/v1/messages", body=messages_body(stream=True),
                 headers={"content-type": "application/json", "x-halton-project": name, "x-fake-hold-s": "3"})
    response = conn.getresponse()
    first = response.read1(65536)
    first_at = time.monotonic() - started
    rest = response.read()
    done_at = time.monotonic() - started
    conn.close()
    assert first.startswith(b"event: message_start")
    assert first_at < 1.5, f"first event took {first_at:.2f}s: the stream was buffered"
    assert done_at >= 2.5 and b"message_stop" in rest
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "ok" and row["ttfb_ms"] < 1500 and row["duration_ms"] >= 2500


def test_keep_alive_reuses_both_connections(proxy):
    name = project()
    conn = proxy.connection()
    seen = []
    for _ in range(5):
        conn.request("POST", "/v1/messages", body=messages_body(),
                     headers={"content-type": "application/json", "x-halton-project": name})
        response = conn.getresponse()
        response.read()
        seen.append(int(response.getheader("x-fake-connection-requests")))
    conn.close()
    # 1..5 on one upstream connection: the proxy kept the provider connection alive too.
    assert seen == [1, 2, 3, 4, 5]
    assert len(proxy.wait_rows(name, 5)) == 5


def test_pipelined_requests_are_answered_in_order(proxy):
    name = project()
    sock = raw_tunnel(proxy)
    body = messages_body()
    one = (f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-type: application/json\r\n"
           f"x-halton-project: {name}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    sock.sendall(one + one.replace(b"Host:", b"Connection: close\r\nHost:"))
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"x-fake-connection-requests: 2" in data
    assert len(proxy.wait_rows(name, 2)) == 2


def test_chunked_response_and_chunked_request_body(proxy):
    name = project()
    conn = proxy.connection()
    parts = [messages_body()[:20], messages_body()[20:]]
    conn.request("POST", "/v1/messages", body=iter(parts), encode_chunked=True,
                 headers={"content-type": "application/json", "x-halton-project": name,
                          "x-fake-chunked": "1", "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    assert response.getheader("transfer-encoding") == "chunked"
    assert json.loads(data)["type"] == "message"
    assert int(response.getheader("x-fake-received-bytes")) == len(messages_body())
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "ok" and row["model"] == "claude-sonnet-4-5-20250929"


def test_close_delimited_response(proxy):
    name = project()
    response, data = post(proxy, messages_body(), name, headers={"x-fake-close": "1"})
    assert response.status == 200 and json.loads(data)["type"] == "message"
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "ok" and row["response_bytes"] >= len(data)


def test_gzip_is_negotiated_and_decoded_on_the_side(proxy):
    name = project()
    response, data = post(proxy, messages_body(), name, headers={"accept-encoding": "br, zstd, gzip"})
    # The provider was offered only what zlib decodes; the client got gzip bytes untouched.
    assert response.getheader("x-fake-saw-accept-encoding") == "gzip"
    assert response.getheader("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(data))["model"] == "claude-sonnet-4-5-20250929"
    [row] = proxy.wait_rows(name)
    assert row["model"] == "claude-sonnet-4-5-20250929" and row["outcome"] == "ok"
    assert row["parse_error"] is None


def test_brotli_only_client_gets_identity(proxy):
    response, data = post(proxy, messages_body(), project(), headers={"accept-encoding": "br"})
    assert response.getheader("x-fake-saw-accept-encoding") == "identity"
    assert response.getheader("content-encoding") is None and json.loads(data)


def test_project_header_is_removed_before_forwarding(proxy):
    name = project()
    response, _ = post(proxy, messages_body(), name)
    assert response.getheader("x-fake-saw-x-halton-project") is None
    assert proxy.wait_rows(name)[0]["project"] == name


def test_head_204_and_304_keep_framing_on_a_kept_alive_connection(proxy):
    name = project()
    conn = proxy.connection()
    statuses = []
    for method, status in (("HEAD", "200"), ("GET", "204"), ("GET", "304"), ("POST", "200")):
        conn.request(method, "/v1/messages", body=messages_body() if method == "POST" else None,
                     headers={"x-fake-status": status, "x-halton-project": name,
                              "content-type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        statuses.append((response.status, len(body), response.getheader("x-fake-connection-requests")))
    conn.close()
    assert statuses[:3] == [(200, 0, "1"), (204, 0, "2"), (304, 0, "3")]
    assert statuses[3][0] == 200 and statuses[3][1] > 0 and statuses[3][2] == "4"
    assert [r["status"] for r in proxy.wait_rows(name, 4)] == [200, 204, 304, 200]


def test_expect_100_continue(proxy):
    name = project()
    sock = raw_tunnel(proxy)
    body = messages_body()
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-type: application/json\r\n"
                  f"Expect: 100-continue\r\nx-halton-project: {name}\r\ncontent-length: {len(body)}\r\n\r\n").encode())
    interim = read_until(sock, b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")  # the client waits for this before the body
    sock.sendall(body)
    final = read_until(sock, b'"service_tier": "standard"}}')
    sock.close()
    assert b"HTTP/1.1 200 OK" in final and f"x-fake-received-bytes: {len(body)}".encode() in final
    [row] = proxy.wait_rows(name)
    assert row["status"] == 200 and row["outcome"] == "ok"


def test_websocket_upgrade_is_relayed_raw(proxy):
    name = project()
    sock = raw_tunnel(proxy)
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"x-halton-project: {name}\r\n\r\n").encode())
    head = read_until(sock, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    sock.sendall(b"\x81\x05hello-not-http")
    assert read_until(sock, b"hello-not-http").endswith(b"\x81\x05hello-not-http")
    sock.close()
    [row] = proxy.wait_rows(name)
    # A client closing an upgraded connection is its normal end; the upgraded bytes count too.
    assert row["status"] == 101 and row["outcome"] == "ok"
    assert row["request_bytes"] >= len(head) - 200 + 16 and row["response_bytes"] >= len(head) + 16


def test_client_offering_h2_falls_back_to_http1(proxy):
    for alpn, selected in ((["h2", "http/1.1"], "http/1.1"), (["h2"], None)):
        sock = raw_tunnel(proxy, alpn=alpn)
        assert sock.selected_alpn_protocol() == selected
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
        assert read_until(sock, b"\r\n").startswith(b"HTTP/1.1 200")
        sock.close()


def test_concurrent_streams_each_get_a_row(proxy):
    name = project()
    results = []

    def one():
        response, data = post(proxy, messages_body(stream=True), name)
        results.append((response.status, data.count(b"event: message_stop")))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [(200, 1)] * 12
    rows = proxy.wait_rows(name, 12)
    assert len(rows) == 12 and {r["outcome"] for r in rows} == {"ok"}
    assert len({r["call_id"] for r in rows}) == 12


# ---- provider errors, parse failures, broken upstreams, cancels ----------------------------

def test_provider_error_is_forwarded_and_classified(proxy):
    name = project()
    response, data = post(proxy, messages_body(), name, headers={"x-fake-status": "529"})
    assert response.status == 529
    assert json.loads(data)["error"]["type"] == "overloaded_error"
    [row] = proxy.wait_rows(name)
    assert row["status"] == 529 and row["outcome"] == "provider_error"


def test_unparseable_body_reaches_client_and_row_says_unparsed(proxy):
    name = project()
    response, data = post(proxy, messages_body(), name, headers={"x-fake-invalid-json": "1"})
    assert response.status == 200 and data == b'{"id": "msg_broken", "usage": '
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "unparsed" and "JSONDecodeError" in row["parse_error"]


def test_bad_upstream_certificate_is_never_accepted(proxy):
    name = project()
    response, data = post(proxy, b"{}", name, host="api.openai.com", path="/v1/chat/completions")
    assert response.status == 502
    text = data.decode()
    assert "failed verification" in text and "--upstream-ca" in text
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "upstream_error" and "verification" in row["error"]


def test_upstream_refused_gives_502_and_a_row(proxy):
    name = project()
    response, data = post(proxy, b"{}", name, host="api.groq.com", path="/openai/v1/chat/completions")
    assert response.status == 502 and b"could not connect to api.groq.com" in data
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "upstream_error" and row["status"] is None


def test_upstream_reset_mid_stream(proxy):
    name = project()
    conn, response = open_stream(proxy, name, reset_after="3")
    assert response.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    conn.close()
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "upstream_error" and row["is_stream"] == 1
    assert "mid-response" in row["error"]


def test_client_cancel_mid_stream_is_recorded_promptly(proxy):
    name = project()
    conn, response = open_stream(proxy, name, hold_s="20")
    assert response.read1(65536).startswith(b"event: message_start")
    cancelled_at = time.monotonic()
    conn.sock.close()
    conn.close()
    [row] = proxy.wait_rows(name, timeout=10)
    # Recorded long before the provider's 20 s pause ends: the disconnect itself ended the call.
    assert time.monotonic() - cancelled_at < 5
    assert row["outcome"] == "client_cancelled" and row["is_stream"] == 1
    assert row["model"] == "claude-sonnet-4-5-20250929"  # what was seen before the cancel


def test_large_request_body_streams_without_memory_growth(proxy):
    name = project()
    size = 10 * 1024 * 1024
    block = os.urandom(64 * 1024)
    digest = hashlib.sha256(block * (size // len(block))).hexdigest()
    before = proxy.rss_kib()
    conn = proxy.connection(timeout=60)
    conn.request("POST", "/v1/messages", body=iter([block] * (size // len(block))),
                 headers={"content-type": "application/octet-stream", "content-length": str(size),
                          "x-halton-project": name})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert int(response.getheader("x-fake-received-bytes")) == size
    assert response.getheader("x-fake-received-sha256") == digest
    peak = proxy.rss_kib("VmHWM")
    assert peak - before < 6 * 1024, f"proxy grew {peak - before} KiB for a 10 MiB body"
    [row] = proxy.wait_rows(name)
    assert row["request_bytes"] > size and row["outcome"] == "ok"


def test_large_response_streams_through_with_bounded_memory(proxy):
    name = project()
    size = 40 * 1024 * 1024
    before = proxy.rss_kib()
    conn = proxy.connection(timeout=60)
    conn.request("POST", "/v1/messages", body=messages_body(),
                 headers={"content-type": "application/json", "x-halton-project": name,
                          "x-fake-body-bytes": str(size)})
    response = conn.getresponse()
    received = 0
    while piece := response.read1(1 << 20):
        received += len(piece)
    conn.close()
    assert received > size
    peak = proxy.rss_kib("VmHWM")
    # The side copy of a JSON body is capped (8 MiB): the proxy never holds the 40 MiB.
    assert peak - before < 16 * 1024, f"proxy grew {peak - before} KiB for a 40 MiB response"
    [row] = proxy.wait_rows(name)
    assert row["response_bytes"] > size and row["outcome"] == "ok"


# ---- what is not intercepted ---------------------------------------------------------------

def test_non_provider_host_gets_a_blind_tunnel(proxy, fake):
    before = sqlite_count(proxy)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"CONNECT 127.0.0.1:{fake.port} HTTP/1.1\r\nHost: 127.0.0.1:{fake.port}\r\n\r\n".encode())
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    # Only the fake's own CA is trusted here: the handshake succeeds only if nothing intercepted it.
    context = ssl.create_default_context(cafile=str(fake.ca_path))
    tls = context.wrap_socket(sock, server_hostname="api.anthropic.com")
    tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
    assert read_until(tls, b"\r\n").startswith(b"HTTP/1.1 200")
    tls.close()
    time.sleep(0.3)
    assert sqlite_count(proxy) == before


def test_provider_host_is_intercepted_by_our_ca(proxy, fake):
    sock = raw_tunnel(proxy)
    # The proxy's CA signed this leaf, not the fake provider's.
    with pytest.raises(ssl.SSLCertVerificationError):
        bad = ssl.create_default_context(cafile=str(fake.ca_path))
        plain = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        plain.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\n\r\n")
        read_until(plain, b"\r\n\r\n")
        bad.wrap_socket(plain, server_hostname="api.anthropic.com")
    sock.close()


def test_plain_http_is_forwarded_unmetered(proxy):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"path={self.path} proxy-auth={self.headers.get('Proxy-Authorization')}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        url = f"http://127.0.0.1:{server.server_address[1]}/simple/pip/?x=1"
        conn.request("GET", url, headers={"Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA=="})
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b"path=/simple/pip/?x=1 proxy-auth=None"
    finally:
        server.shutdown()


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"not a proxy request"),
    (b"CONNECT nohost HTTP/1.1\r\n\r\n", 400, b"not host:port"),
    (b"CONNECT bad..host:443 HTTP/1.1\r\n\r\n", 400, b"invalid host name"),
    (b"CONNECT a b c d\r\n\r\n", 400, b"malformed"),
    (b"CONNECT x:443 HTTP/1.1\r\nBad Header: y\r\n\r\n", 400, b"malformed header name"),
    (b"CONNECT x:443 HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, b"64 KiB"),
])
def test_malformed_proxy_requests_get_a_clear_4xx(proxy, request_bytes, status, words):
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(request_bytes)
    answer = read_until(sock, b"\n\n")
    sock.close()
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
    assert words in answer


def test_malformed_request_inside_tunnel_gets_400(proxy):
    sock = raw_tunnel(proxy)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    answer = read_until(sock, b"\n\n")
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"both Transfer-Encoding and Content-Length" in answer


def sqlite_count(proxy) -> int:
    import sqlite3

    db = sqlite3.connect(proxy.db)
    try:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    finally:
        db.close()


def test_failed_upstream_row_still_names_the_requested_model(proxy):
    name = project()
    body = json.dumps({"model": "gpt-5.5", "messages": []}).encode()
    response, _ = post(proxy, body, name, host="api.groq.com", path="/openai/v1/chat/completions")
    assert response.status == 502
    assert proxy.wait_rows(name)[0]["model"] == "gpt-5.5"


# ---- defences against a misbehaving provider or client (review findings) -------------------

def test_post_is_never_sent_twice_when_a_kept_alive_upstream_hangs_up(proxy, fake):
    name, request_id = project(), uuid.uuid4().hex
    conn = proxy.connection()
    conn.request("POST", "/v1/messages", body=messages_body(), headers={"x-halton-project": name})
    conn.getresponse().read()
    conn.request("POST", "/v1/messages", body=messages_body(),
                 headers={"x-halton-project": name, "x-fake-hangup": "1", "x-fake-id": request_id})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    # Repeating a POST could bill it twice: the client gets the error and decides.
    assert response.status == 502 and b"closed the connection without answering" in body
    assert fake.seen_ids[request_id] == 1
    assert [r["outcome"] for r in proxy.wait_rows(name, 2)] == ["ok", "upstream_error"]


def test_idempotent_request_is_retried_once_on_a_fresh_connection(proxy, fake):
    request_id = uuid.uuid4().hex
    conn = proxy.connection()
    conn.request("GET", "/v1/models")
    conn.getresponse().read()
    conn.request("GET", "/v1/models", headers={"x-fake-hangup": "1", "x-fake-id": request_id})
    assert conn.getresponse().status == 502
    conn.close()
    assert fake.seen_ids[request_id] == 2


@pytest.mark.parametrize("method, options", [
    ("POST", {}), ("POST", {"x-fake-chunked": "1"}), ("HEAD", {}),
])
def test_bytes_after_a_response_never_reach_the_next_one(proxy, method, options):
    name = project()
    smuggled = "HTTP/1.1 299 SMUGGLED\\r\\nContent-Length: 5\\r\\n\\r\\nEVIL!"
    conn = proxy.connection()
    conn.request(method, "/v1/messages", body=messages_body(),
                 headers={"x-halton-project": name, "x-fake-extra": smuggled, **options})
    first = conn.getresponse()
    first.read()
    conn.request("POST", "/v1/messages", body=messages_body(), headers={"x-halton-project": name})
    second = conn.getresponse()
    data = second.read()
    conn.close()
    assert first.status == 200 and second.status == 200 and b"EVIL" not in data
    # The tainted upstream connection was dropped: the second call went out on a fresh one.
    assert second.getheader("x-fake-connection-requests") == "1"
    assert [r["status"] for r in proxy.wait_rows(name, 2)] == [200, 200]


def test_malformed_chunked_request_body_gets_a_prompt_400(proxy):
    name = project()
    sock = raw_tunnel(proxy)
    started = time.monotonic()
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n"
                  f"x-halton-project: {name}\r\n\r\nzz\r\n").encode())
    answer = read_until(sock, b"\n\n")
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"malformed chunked request body" in answer
    assert time.monotonic() - started < 3
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "bad_request"


def test_client_abandoning_an_upload_is_recorded_quietly(proxy):
    name = project()
    sock = raw_tunnel(proxy)
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: {10 << 20}\r\n"
                  f"x-halton-project: {name}\r\n\r\n").encode() + b"x" * (1 << 20))
    time.sleep(0.2)
    sock.close()
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "client_cancelled" and row["request_bytes"] >= 1 << 20


def test_upstream_reset_in_a_close_delimited_body_is_an_upstream_error(proxy):
    name = project()
    response, _ = post(proxy, messages_body(), name, headers={"x-fake-close": "1", "x-fake-reset-after": "20"})
    assert response.status == 200
    [row] = proxy.wait_rows(name)
    assert row["outcome"] == "upstream_error" and "mid-response" in row["error"]


def test_expect_answered_with_a_final_status_and_no_100(proxy):
    name = project()
    sock = raw_tunnel(proxy)
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nExpect: 100-continue\r\n"
                  f"Content-Length: 10\r\nx-fake-reject-expect: 417\r\nx-halton-project: {name}\r\n\r\n").encode())
    answer = read_until(sock, b"\r\n\r\n")
    sock.close()
    assert answer.startswith(b"HTTP/1.1 417")
    [row] = proxy.wait_rows(name)
    assert row["status"] == 417 and row["outcome"] == "provider_error"


def test_query_string_keys_and_proxy_credentials_are_not_stored_or_forwarded(proxy):
    name = project()
    conn = proxy.connection()
    conn.request("POST", "/v1/messages?beta=true&key=AIzaSECRETKEY", body=messages_body(),
                 headers={"x-halton-project": name, "Proxy-Authorization": "Basic c2VjcmV0"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.getheader("x-fake-saw-proxy-authorization") is None
    [row] = proxy.wait_rows(name)
    assert row["path"] == "/v1/messages?beta=true&key=REDACTED"
    assert "SECRETKEY" not in proxy.log


def test_client_reset_before_its_connect_line_is_quiet(proxy):
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"CONN")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    time.sleep(0.2)
    assert "Traceback" not in proxy.log


def test_client_hello_sent_with_connect_falls_back_to_a_blind_tunnel(proxy, fake):
    """A client that does not wait for our 200 still reaches its provider (unmetered)."""
    before = sqlite_count(proxy)
    context = ssl.create_default_context(cafile=str(fake.ca_path))  # the provider's real chain
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.anthropic.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\n\r\n" + outgoing.read())
    pending = read_until(sock, b"\r\n\r\n")
    assert pending.startswith(b"HTTP/1.1 200")
    incoming.write(pending.split(b"\r\n\r\n", 1)[1])

    def pump_until(step):
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))

    pump_until(tls.do_handshake)
    tls.write(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
    sock.sendall(outgoing.read())
    assert pump_until(lambda: tls.read(65536)).startswith(b"HTTP/1.1 200")
    sock.close()
    time.sleep(0.3)
    assert sqlite_count(proxy) == before


@pytest.mark.parametrize("method, sent", [("GET", 2), ("POST", 1)])
def test_reset_on_a_reused_upstream_is_retried_only_when_safe(proxy, fake, method, sent):
    request_id = uuid.uuid4().hex
    conn = proxy.connection()
    conn.request("GET", "/v1/models")
    conn.getresponse().read()
    conn.request(method, "/v1/models", body=b"{}" if method == "POST" else None,
                 headers={"x-fake-hangup": "reset", "x-fake-id": request_id})
    assert conn.getresponse().status == 502
    conn.close()
    assert fake.seen_ids[request_id] == sent


def test_provider_refusing_an_upload_early_is_what_the_client_sees(proxy):
    """413 + close before the body is sent: the client gets the 413, not a 502 of ours."""
    body = b"x" * (4 << 20)
    for attempt in range(4):
        name = project()
        sock = raw_tunnel(proxy)
        sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nExpect: 100-continue\r\n"
                      f"Content-Length: {len(body)}\r\nx-fake-reject-expect: 413\r\n"
                      f"x-halton-project: {name}\r\n\r\n").encode())
        uploader = threading.Thread(target=lambda: _send_quietly(sock, body))
        uploader.start()  # a client that does not wait for 100 Continue
        answer = read_until(sock, b"\r\n\r\n")
        uploader.join(10)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 413"), (attempt, answer[:100])
        [row] = proxy.wait_rows(name)
        assert row["status"] == 413 and row["outcome"] == "provider_error"


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
