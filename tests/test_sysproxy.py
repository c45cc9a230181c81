"""The macOS system proxy through a fake `networksetup`: enabling, and restoring exactly what was there."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from halton_meter.lifecycle import sysproxy
from halton_meter.lifecycle.sysproxy import SysProxyError

FAKEBIN = Path(__file__).resolve().parent / "fakebin"
PORT = 8081
OURS = {"enabled": True, "server": "127.0.0.1", "port": PORT, "authenticated": False}
OFF = {"enabled": False, "server": "", "port": 0, "authenticated": False}
CORPORATE = {
    "Wi-Fi": {
        "web": {"enabled": True, "server": "proxy.corp.example", "port": 3128},
        # Configured but switched off: the server and port must survive too.
        "secure_web": {"enabled": False, "server": "proxy.corp.example", "port": 3129},
        "bypass": ["*.corp.example", "169.254/16"],
    },
}


@dataclass
class FakeMac:
    state: Path

    def services(self) -> dict[str, dict]:
        return {s["name"]: s for s in json.loads((self.state / "networksetup.json").read_text())}

    def calls(self) -> list[list[str]]:
        path = self.state / "calls.jsonl"
        return [json.loads(line)["argv"] for line in path.read_text().splitlines()] if path.exists() else []

    def seed(self, settings: dict) -> None:
        (self.state / "networksetup-seed.json").write_text(json.dumps(settings))

    def fail(self, flag: str, message: str) -> None:
        (self.state / f"fail-networksetup{flag}").write_text(message)


@pytest.fixture
def mac(tmp_path, monkeypatch) -> FakeMac:
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("FAKE_SYSTEM_STATE", str(state))
    # The running interpreter's directory second, so the fakes' `env python3` skips any shim.
    monkeypatch.setenv("PATH", os.pathsep.join([str(FAKEBIN), str(Path(sys.executable).parent),
                                                os.environ["PATH"]]))
    return FakeMac(state)


def test_network_services_skip_the_heading_and_disabled_services(mac):
    assert sysproxy.network_services() == ["Wi-Fi", "Ethernet"]


def test_enable_points_every_enabled_service_at_the_proxy_and_disable_turns_it_off_again(mac):
    saved = sysproxy.enable(PORT)
    assert saved == {name: {"web": OFF, "secure_web": OFF, "bypass_domains": []} for name in ("Wi-Fi", "Ethernet")}
    assert json.loads(json.dumps(saved)) == saved
    services = mac.services()
    for name in ("Wi-Fi", "Ethernet"):
        assert services[name]["web"] == OURS and services[name]["secure_web"] == OURS
        assert services[name]["bypass"] == ["localhost", "127.0.0.1", "::1", "*.local"]
    assert services["Thunderbolt Bridge"]["secure_web"] == OFF
    assert not any("Thunderbolt Bridge" in call for call in mac.calls())
    assert sysproxy.is_enabled(PORT) is True
    assert sysproxy.is_enabled(PORT + 1) is False

    saved_with_a_vanished_service = {**saved, "USB 10/100 LAN": saved["Ethernet"]}
    lines = sysproxy.disable(saved_with_a_vanished_service)
    assert len(lines) == 7 and "Wi-Fi: secure web (HTTPS) proxy restored to off" in lines
    assert "USB 10/100 LAN: the network service no longer exists; nothing to restore" in lines
    services = mac.services()
    for name in ("Wi-Fi", "Ethernet"):
        assert services[name]["web"]["enabled"] is False and services[name]["secure_web"]["enabled"] is False
        assert services[name]["bypass"] == []
    assert sysproxy.is_enabled(PORT) is False


def test_a_corporate_proxy_comes_back_exactly_and_only_once(mac):
    mac.seed(CORPORATE)
    sysproxy.network_services()
    before = mac.services()

    saved = sysproxy.enable(PORT)
    assert saved["Wi-Fi"] == {"web": {**CORPORATE["Wi-Fi"]["web"], "authenticated": False},
                              "secure_web": {**CORPORATE["Wi-Fi"]["secure_web"], "authenticated": False},
                              "bypass_domains": CORPORATE["Wi-Fi"]["bypass"]}
    wifi = mac.services()["Wi-Fi"]
    assert wifi["secure_web"] == OURS
    # The user's own bypass list is kept after ours, so those hosts still go direct.
    assert wifi["bypass"] == ["localhost", "127.0.0.1", "::1", "*.local", "*.corp.example", "169.254/16"]

    lines = sysproxy.disable(saved)
    assert "Wi-Fi: web (HTTP) proxy restored to proxy.corp.example:3128" in lines
    assert "Wi-Fi: secure web (HTTPS) proxy restored to off (server proxy.corp.example:3129 kept)" in lines
    assert "Wi-Fi: proxy bypass list restored to *.corp.example, 169.254/16" in lines
    assert mac.services()["Wi-Fi"] == before["Wi-Fi"]

    calls_before = len(mac.calls())
    assert sysproxy.disable(saved) == []  # idempotent: nothing left to restore, nothing set
    assert not any(call[0].startswith("-set") for call in mac.calls()[calls_before:])


def test_enabling_twice_never_makes_disable_restore_halton_meter_itself(mac):
    mac.seed(CORPORATE)
    sysproxy.enable(PORT)
    again = sysproxy.enable(PORT)  # the caller lost the first result
    assert again["Wi-Fi"]["web"] == OFF and again["Wi-Fi"]["secure_web"] == OFF
    assert again["Wi-Fi"]["bypass_domains"] == ["*.corp.example", "169.254/16"]
    sysproxy.disable(again)
    assert sysproxy.is_enabled(PORT) is False
    assert mac.services()["Wi-Fi"]["bypass"] == ["*.corp.example", "169.254/16"]
    assert mac.services()["Ethernet"]["secure_web"]["enabled"] is False


def test_a_failure_half_way_is_an_error_and_leaves_no_service_switched(mac):
    mac.seed(CORPORATE)
    mac.fail("-setsecurewebproxy", "You cannot set the proxy on this service.")
    sysproxy.network_services()
    before = mac.services()
    with pytest.raises(SysProxyError) as caught:
        sysproxy.enable(PORT)
    message = str(caught.value)
    assert "`networksetup -setsecurewebproxy Wi-Fi 127.0.0.1 8081`" in message
    assert "** Error: You cannot set the proxy on this service." in message
    assert "System Settings" in message
    assert mac.services() == before


def test_without_networksetup_the_error_says_this_is_for_macos(mac, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SysProxyError, match="only be set on macOS.*init --apps"):
        sysproxy.network_services()


def test_the_linux_text_points_at_the_alternatives():
    assert "Linux" in sysproxy.LINUX_UNSUPPORTED
    assert "halton-meter init --apps" in sysproxy.LINUX_UNSUPPORTED
    assert "halton-meter run" in sysproxy.LINUX_UNSUPPORTED
