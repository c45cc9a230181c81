"""The local HTTP API server: real sockets on 127.0.0.1, http.client and raw bytes as clients."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

from halton_meter.api import ApiServer, get_json, is_loopback_host
from halton_meter.config import ConfigError
from tests.conftest import closed_port

ALLOWED = "https://dash.example:3000"


def _boom(params):
    raise RuntimeError("sk-ant-secret-in-message")


ROUTES = {
    "/health": lambda params: (200, {"ok": True, "name": "häl"}),
    "/echo": lambda params: (200, params),
    "/boom": _boom,
    "/unserialisable": lambda params: (200, {1, 2}),
    "/nothing": lambda params: (204, None),
}


@pytest.fixture(scope="module")
def api(background_loop):
    server = ApiServer(ROUTES, port=0, allowed_origins=(ALLOWED + "/",))
    background_loop.run(server.start())
    yield server
    background_loop.run(server.close())


@pytest.fixture
def own_server(background_loop):
    """A fresh server per test, for tests that change its limits or close it."""
    servers = []

    def make() -> ApiServer:
        server = ApiServer(ROUTES, port=0)
        background_loop.run(server.start())
        servers.append(server)
        return server

    yield make
    for server in servers:
        background_loop.run(server.close())


def request(port, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def raw(port, data: bytes, timeout: float = 2.0) -> bytes:
    """Send `data`, return everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def status_of(response_bytes: bytes) -> int:
    return int(response_bytes.split(b" ", 2)[1])


def json_body(response_bytes: bytes):
    return json.loads(response_bytes.partition(b"\r\n\r\n")[2])


# --- ordinary requests ----------------------------------------------------------------------

def test_get_returns_json_with_safety_headers(api):
    response, body = request(api.port, "GET", "/health")
    assert response.status == 200
    assert json.loads(body.decode("utf-8")) == {"ok": True, "name": "häl"}
    assert body == '{"ok":true,"name":"häl"}'.encode()  # compact UTF-8, not \u escapes
    assert response.getheader("Content-Type") == "application/json; charset=utf-8"
    assert response.getheader("Cache-Control") == "no-store"
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert response.getheader("Content-Length") == str(len(body))
    assert response.getheader("Access-Control-Allow-Origin") is None


def test_head_has_get_headers_and_no_body(api):
    get, get_body = request(api.port, "GET", "/health")
    head, head_body = request(api.port, "HEAD", "/health")
    assert head.status == 200 and head_body == b""
    assert head.getheader("Content-Length") == str(len(get_body))


def test_query_parameters_reach_the_handler(api):
    response, body = request(api.port, "GET", "/echo?since=2024-01-01&tag=a&tag=b&empty=&x=%C3%A9")
    assert response.status == 200
    assert json.loads(body) == {"since": ["2024-01-01"], "tag": ["a", "b"], "empty": [""], "x": ["é"]}


def test_keep_alive_serves_two_requests_on_one_connection(api):
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=2)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        assert first.getheader("Connection") is None and sock is not None
        conn.request("GET", "/echo?n=2")
        second = conn.getresponse()
        assert json.loads(second.read()) == {"n": ["2"]}
        assert conn.sock is sock  # http.client would have reconnected had the server closed
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(api):
    data = raw(api.port, b"GET /echo?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"GET /echo?n=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.index(b'{"n":["1"]}') < data.index(b'{"n":["2"]}')


def test_http_1_0_is_answered_and_closed(api):
    data = raw(api.port, b"GET /health HTTP/1.0\r\n\r\n")  # no Host: allowed in HTTP/1.0
    assert status_of(data) == 200
    assert b"\r\nConnection: close\r\n" in data
    assert json_body(data) == {"ok": True, "name": "häl"}


def test_handler_204_has_no_body(api):
    response, body = request(api.port, "GET", "/nothing")
    assert response.status == 204 and body == b""
    assert response.getheader("Content-Length") is None


# --- errors -----------------------------------------------------------------------------------

def test_unknown_path_404_lists_known_paths(api):
    response, body = request(api.port, "GET", "/nope")
    assert response.status == 404
    document = json.loads(body)
    assert document["paths"] == sorted(ROUTES)
    assert "/health" in document["error"] and "/echo" in document["error"]
    assert response.getheader("Connection") is None  # a 404 keeps the connection


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "TRACE"])
def test_other_methods_405_with_allow(api, method):
    response, body = request(api.port, method, "/health")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert "GET or HEAD" in json.loads(body)["error"]


def test_post_with_body_405_and_connection_closed(api):
    response, body = request(api.port, "POST", "/health", body=b"x" * 5000,
                             headers={"Content-Type": "application/json"})
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"
    assert response.getheader("Connection") == "close"
    assert "error" in json.loads(body)


def test_post_body_is_never_read_as_a_request(api):
    smuggled = b"GET /echo?smuggled=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    data = raw(api.port, b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    assert status_of(data) == 405
    assert data.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in data


def test_large_unread_body_does_not_reset_the_reply(api):
    # Closing a socket with unread input sends a TCP RST that would destroy the 405 in flight;
    # the server drains the body it refuses before closing.
    body = b"x" * 200_000
    for _ in range(3):
        data = raw(api.port, b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert status_of(data) == 405


@pytest.mark.parametrize("framing", [b"Content-Length: 3\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"])
def test_get_with_body_400_and_closed(api, framing):
    data = raw(api.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing)
    assert status_of(data) == 400
    assert "body" in json_body(data)["error"]
    assert b"\r\nConnection: close\r\n" in data


def test_get_with_zero_content_length_is_fine(api):
    data = raw(api.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert status_of(data) == 200


def test_handler_exception_500_logs_type_only_and_connection_survives(api, caplog):
    caplog.set_level(logging.DEBUG, logger="halton_meter.api")
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=2)
    try:
        conn.request("GET", "/boom?q=user-prompt-text")
        response = conn.getresponse()
        assert response.status == 500
        assert json.loads(response.read()) == {"error": "internal error"}
        sock = conn.sock
        conn.request("GET", "/health")
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["ok"] is True
        assert conn.sock is sock
    finally:
        conn.close()
    assert "RuntimeError" in caplog.text
    assert "secret" not in caplog.text and "user-prompt-text" not in caplog.text


def test_unserialisable_handler_result_is_500(api):
    response, body = request(api.port, "GET", "/unserialisable")
    assert response.status == 500 and json.loads(body) == {"error": "internal error"}


def test_no_info_logging_per_request(api, caplog):
    caplog.set_level(logging.INFO, logger="halton_meter.api")
    request(api.port, "GET", "/health")
    request(api.port, "GET", "/nope")
    assert [r for r in caplog.records if r.name == "halton_meter.api"] == []


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", 505),
    (b"GET /health HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n", 400),
    (b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
])
def test_malformed_requests_400_json_and_closed(api, data, status):
    answer = raw(api.port, data)
    assert status_of(answer) == status
    assert "error" in json_body(answer)
    assert b"\r\nConnection: close\r\n" in answer


def test_oversized_head_431(api):
    answer = raw(api.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert "KiB" in json_body(answer)["error"]


def test_partial_head_times_out_with_408(own_server):
    server = own_server()
    server.head_timeout_s = 0.2
    started = time.monotonic()
    answer = raw(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert status_of(answer) == 408
    assert time.monotonic() - started < 1.5


# --- Host: the DNS-rebinding defence --------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "10.0.0.1", "10.0.0.1:8765",
                                  "127.0.0.1.evil.example", "localhost.evil.example", "[::2]",
                                  "0.0.0.0", "localhost:notaport", "localhost:99999"])
def test_foreign_host_403(api, host):
    response, body = request(api.port, "GET", "/health", headers={"Host": host})
    assert response.status == 403
    assert "loopback" in json.loads(body)["error"]
    assert b"ok" not in body


@pytest.mark.parametrize("host", ["localhost", "localhost:8765", "LocalHost:1", "127.0.0.1",
                                  "127.0.0.1:8765", "127.5.6.7", "[::1]", "[::1]:8765"])
def test_loopback_host_variants_200(api, host):
    response, body = request(api.port, "GET", "/health", headers={"Host": host})
    assert response.status == 200 and json.loads(body)["ok"] is True


def test_missing_host_on_http_1_1_400(api):
    answer = raw(api.port, b"GET /health HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 400
    assert "Host" in json_body(answer)["error"]


def test_two_host_headers_400(api):
    answer = raw(api.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")
    assert status_of(answer) == 400


def test_foreign_host_on_http_1_0_403(api):
    answer = raw(api.port, b"GET /health HTTP/1.0\r\nHost: evil.example\r\n\r\n")
    assert status_of(answer) == 403


@pytest.mark.parametrize(("value", "expected"), [
    ("localhost", True), ("127.0.0.1:80", True), ("127.255.255.254", True), ("[::1]:1", True),
    (" [0:0:0:0:0:0:0:1] ", True), ("[::1", False), ("[::1]x", False), ("::1", False),
    ("127.1", False), ("localhost:", False), ("localhost:²", False), ("", False),
])
def test_is_loopback_host(value, expected):
    assert is_loopback_host(value) is expected


# --- Origin: CORS ---------------------------------------------------------------------------

def test_allowed_origin_gets_cors_headers(api):
    response, _ = request(api.port, "GET", "/health", headers={"Origin": ALLOWED})
    assert response.status == 200
    assert response.getheader("Access-Control-Allow-Origin") == ALLOWED
    assert response.getheader("Vary") == "Origin"


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "[::1]"])
def test_own_port_origin_is_always_allowed(api, name):
    origin = f"http://{name}:{api.port}"
    response, _ = request(api.port, "GET", "/health", headers={"Origin": origin})
    assert response.status == 200
    assert response.getheader("Access-Control-Allow-Origin") == origin


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1",
                                     "https://127.0.0.1:{port}", "https://dash.example:3001"])
def test_foreign_origin_403_without_cors_headers(api, origin):
    response, body = request(api.port, "GET", "/health", headers={"Origin": origin.format(port=api.port)})
    assert response.status == 403
    assert response.getheader("Access-Control-Allow-Origin") is None
    assert "Origin" in json.loads(body)["error"] and b"ok" not in body


def test_preflight_from_allowed_origin_204(api):
    response, body = request(api.port, "OPTIONS", "/health", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "GET"})
    assert response.status == 204 and body == b""
    assert response.getheader("Access-Control-Allow-Origin") == ALLOWED
    assert response.getheader("Access-Control-Allow-Methods") == "GET, HEAD"


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {}])
def test_preflight_otherwise_403(api, headers):
    response, _ = request(api.port, "OPTIONS", "/health", headers=headers)
    assert response.status == 403
    assert response.getheader("Access-Control-Allow-Origin") is None


# --- lifecycle and limits -------------------------------------------------------------------

@pytest.mark.parametrize("listen", ["0.0.0.0", "192.0.2.10", "::"])
def test_non_loopback_listen_refused(listen):
    with pytest.raises(ConfigError, match="loopback"):
        ApiServer(ROUTES, listen=listen)


def test_close_closes_idle_keep_alive_connections(own_server, background_loop):
    server = own_server()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
    conn.request("GET", "/health")
    conn.getresponse().read()
    started = time.monotonic()
    background_loop.run(server.close())
    assert conn.sock.recv(1) == b""  # closed by the server, not by the 2 s client timeout
    assert time.monotonic() - started < 1.0
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_idle_keep_alive_connection_is_closed(own_server):
    server = own_server()
    server.idle_timeout_s = 0.2
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        started = time.monotonic()
        while chunk := sock.recv(65536):
            received += chunk
        assert status_of(received) == 200 and received.count(b"HTTP/1.1") == 1
        assert 0.15 < time.monotonic() - started < 1.5


def test_connections_beyond_the_limit_get_503(own_server):
    server = own_server()
    server.max_connections = 2
    held = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=2) for _ in range(2)]
    try:
        for conn in held:
            conn.request("GET", "/health")
            assert conn.getresponse().read()
        response, body = request(server.port, "GET", "/health")
        assert response.status == 503 and "too many" in json.loads(body)["error"]
        held[0].close()
        deadline = time.monotonic() + 2
        while (response := request(server.port, "GET", "/health")[0]).status == 503:
            assert time.monotonic() < deadline, "a closed connection never freed its slot"
            time.sleep(0.02)
        assert response.status == 200
    finally:
        for conn in held:
            conn.close()


# --- get_json -------------------------------------------------------------------------------

def test_get_json_round_trip(api):
    assert get_json(api.port, "/echo?a=1&a=2&b=") == (200, {"a": ["1", "2"], "b": [""]})
    status, body = get_json(api.port, "/missing")
    assert status == 404 and "/health" in body["paths"]


def test_get_json_closed_port_raises_oserror():
    with pytest.raises(OSError):
        get_json(closed_port(), "/health", timeout=1)


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                                    b"SSH-2.0-OpenSSH_9.6\r\n"])
def test_get_json_from_something_else_raises_valueerror(answer):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve_once():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)
        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        with pytest.raises(ValueError):
            get_json(listener.getsockname()[1], "/health", timeout=1)
        thread.join(2)
