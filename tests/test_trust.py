"""Trusting the CA: the login keychain through a fake `security`, the Linux anchors through a fake
`update-ca-certificates`, both acting on real files under tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from halton_meter.lifecycle import trust
from halton_meter.lifecycle.trust import SystemStore, TrustChange, TrustError
from halton_meter.tls.ca import CertificateAuthority

FAKEBIN = Path(__file__).resolve().parent / "fakebin"
DEBIAN_ANCHORS = "usr/local/share/ca-certificates"


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory) -> Path:
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca"), ["api.anthropic.com"])
    ca.ensure()
    return ca.ca_cert_path


@pytest.fixture(scope="module")
def other_ca_pem(tmp_path_factory) -> Path:
    """A second CA, as after `halton-meter` rebuilt its CA for a changed host list."""
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca2"), ["api.openai.com"])
    ca.ensure()
    return ca.ca_cert_path


@dataclass
class FakeSystem:
    state: Path
    root: Path
    home: Path

    def calls(self, tool: str) -> list[list[str]]:
        path = self.state / "calls.jsonl"
        if not path.exists():
            return []
        return [c["argv"] for c in map(json.loads, path.read_text().splitlines()) if c["tool"] == tool]

    def keychain(self) -> list[dict]:
        return json.loads((self.state / "keychain.json").read_text())

    def debian_store(self) -> SystemStore:
        (self.root / DEBIAN_ANCHORS).mkdir(parents=True, exist_ok=True)
        store = trust.system_store()
        assert store is not None
        return store

    @property
    def bundle(self) -> Path:
        return self.root / "etc/ssl/certs/ca-certificates.crt"


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSystem:
    system = FakeSystem(tmp_path / "state", tmp_path / "root", tmp_path / "home")
    system.root.mkdir()
    system.home.mkdir()
    monkeypatch.setenv("FAKE_SYSTEM_STATE", str(system.state))
    monkeypatch.setenv("HALTON_METER_TRUST_ROOT", str(system.root))
    monkeypatch.setenv("HOME", str(system.home))
    # The running interpreter's directory second, so the fakes' `env python3` skips any shim.
    monkeypatch.setenv("PATH", os.pathsep.join([str(FAKEBIN), str(Path(sys.executable).parent),
                                                os.environ["PATH"]]))
    return system


def test_ca_sha1_is_the_fingerprint_openssl_prints(ca_pem):
    done = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha1", "-in", str(ca_pem)],
                          capture_output=True, text=True, check=True)
    assert trust.ca_sha1(ca_pem) == done.stdout.strip().split("=", 1)[1].replace(":", "")


def test_ca_sha1_of_a_file_without_a_certificate_says_how_to_fix_it(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    with pytest.raises(TrustError, match="holds no PEM certificate.*halton-meter init"):
        trust.ca_sha1(path)


# -- macOS login keychain ----------------------------------------------------------------------

def test_keychain_add_is_idempotent_and_remove_takes_it_out_again(fake, ca_pem):
    keychain = str(fake.home / "Library/Keychains/login.keychain-db")
    sha1 = trust.ca_sha1(ca_pem)
    assert trust.keychain_path() == Path(keychain)
    assert trust.keychain_trusts(ca_pem) is False  # `security` exits 44 on an empty keychain

    change = trust.add_to_keychain(ca_pem)
    assert change == TrustChange("keychain", True, change.detail) and sha1 in change.detail
    assert ["add-trusted-cert", "-r", "trustRoot", "-k", keychain, str(ca_pem)] in fake.calls("security")
    assert [(c["sha1"], c["trusted"], c["keychain"]) for c in fake.keychain()] == [(sha1, True, keychain)]
    assert trust.keychain_trusts(ca_pem) is True

    assert trust.add_to_keychain(ca_pem).changed is False
    assert [c[0] for c in fake.calls("security")].count("add-trusted-cert") == 1

    change = trust.remove_from_keychain(sha1)
    assert change.changed is True and sha1 in change.detail
    assert ["delete-certificate", "-Z", sha1, "-t", keychain] in fake.calls("security")
    assert fake.keychain() == []
    assert trust.keychain_trusts(ca_pem) is False


def test_removing_an_absent_certificate_changes_nothing(fake, ca_pem):
    change = trust.remove_from_keychain(trust.ca_sha1(ca_pem))
    assert change.store == "keychain" and change.changed is False


def test_another_certificate_in_the_keychain_is_not_ours(fake, ca_pem, other_ca_pem):
    trust.add_to_keychain(other_ca_pem)
    assert trust.keychain_trusts(ca_pem) is False
    assert trust.add_to_keychain(ca_pem).changed is True
    trust.remove_from_keychain(trust.ca_sha1(ca_pem))
    assert [c["sha1"] for c in fake.keychain()] == [trust.ca_sha1(other_ca_pem)]


def test_a_refused_keychain_change_is_a_trust_error_with_the_command_and_its_stderr(fake, ca_pem):
    fake.state.mkdir()
    (fake.state / "fail-security-add-trusted-cert").write_text(
        "SecTrustSettingsSetTrustSettings: The authorization was denied since no user interaction was possible.\n")
    with pytest.raises(TrustError) as caught:
        trust.add_to_keychain(ca_pem)
    message = str(caught.value)
    assert "`security add-trusted-cert -r trustRoot" in message
    assert "exit code 1" in message and "no user interaction was possible" in message
    assert "Keychain Access" in message  # the fix


def test_a_missing_security_binary_is_a_trust_error(fake, ca_pem, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(TrustError, match="security is not installed or not on PATH"):
        trust.keychain_trusts(ca_pem)


# -- Linux system store ------------------------------------------------------------------------

def test_no_store_without_an_anchors_directory_or_without_its_update_command(fake, monkeypatch, tmp_path):
    assert trust.system_store() is None
    (fake.root / DEBIAN_ANCHORS).mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert trust.system_store() is None


def test_the_first_usable_store_wins(fake, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("update-ca-trust", "trust"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (fake.root / "etc/ca-certificates/trust-source/anchors").mkdir(parents=True)
    assert trust.system_store() == SystemStore(
        fake.root / "etc/ca-certificates/trust-source/anchors", "halton-meter.crt", ("trust", "extract-compat"))
    (fake.root / "etc/pki/ca-trust/source/anchors").mkdir(parents=True)
    assert trust.system_store() == SystemStore(
        fake.root / "etc/pki/ca-trust/source/anchors", "halton-meter.pem", ("update-ca-trust", "extract"))
    (fake.root / DEBIAN_ANCHORS).mkdir(parents=True)
    assert trust.system_store() == SystemStore(
        fake.root / DEBIAN_ANCHORS, "halton-meter.crt", ("update-ca-certificates",))


def test_system_store_add_is_idempotent_follows_a_new_ca_and_removes(fake, ca_pem, other_ca_pem):
    store = fake.debian_store()
    anchor = fake.root / DEBIAN_ANCHORS / "halton-meter.crt"
    assert trust.system_store_permitted(store) is True
    assert trust.system_store_trusts(store, ca_pem) is False

    change = trust.add_to_system_store(store, ca_pem)
    assert change.store == "system" and change.changed is True and "added" in change.detail
    assert anchor.read_bytes() == ca_pem.read_bytes()
    assert anchor.stat().st_mode & 0o777 == 0o644
    assert fake.calls("update-ca-certificates") == [[]]
    assert ca_pem.read_text() in fake.bundle.read_text()  # it reached what clients read
    assert trust.system_store_trusts(store, ca_pem) is True

    assert trust.add_to_system_store(store, ca_pem).changed is False
    assert len(fake.calls("update-ca-certificates")) == 1

    assert trust.system_store_trusts(store, other_ca_pem) is False
    change = trust.add_to_system_store(store, other_ca_pem)
    assert change.changed is True and "replaced" in change.detail
    assert anchor.read_bytes() == other_ca_pem.read_bytes()
    assert fake.bundle.read_text() == other_ca_pem.read_text()

    change = trust.remove_from_system_store(store)
    assert change.changed is True and not anchor.exists()
    assert fake.bundle.read_text() == ""
    assert len(fake.calls("update-ca-certificates")) == 3

    assert trust.remove_from_system_store(store).changed is False
    assert len(fake.calls("update-ca-certificates")) == 3


def test_a_failed_update_is_a_trust_error_and_leaves_the_store_as_it_was(fake, ca_pem):
    store = fake.debian_store()
    anchor = fake.root / DEBIAN_ANCHORS / "halton-meter.crt"
    fake.state.mkdir()
    (fake.state / "fail-update").touch()
    with pytest.raises(TrustError) as caught:
        trust.add_to_system_store(store, ca_pem)
    message = str(caught.value)
    assert "`update-ca-certificates` failed with exit code 1" in message
    assert "run-parts: /etc/ca-certificates/update.d/jks-keystore exited with return code 1" in message
    assert "sudo" in message
    assert not anchor.exists()  # so that the retry below is not mistaken for "already trusted"

    (fake.state / "fail-update").unlink()
    assert trust.add_to_system_store(store, ca_pem).changed is True

    (fake.state / "fail-update").touch()
    with pytest.raises(TrustError, match="run-parts"):
        trust.remove_from_system_store(store)
    assert anchor.read_bytes() == ca_pem.read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: os.access ignores the 0555 mode")
def test_a_read_only_anchors_directory_is_not_permitted_and_adding_says_how_to_fix_it(fake, ca_pem):
    store = fake.debian_store()
    store.anchors.chmod(0o555)
    try:
        assert trust.system_store_permitted(store) is False
        with pytest.raises(TrustError, match="sudo"):
            trust.add_to_system_store(store, ca_pem)
        assert fake.calls("update-ca-certificates") == []
    finally:
        store.anchors.chmod(0o755)


def test_per_client_explanation_names_each_variable_with_the_bundle_and_its_clients(tmp_path):
    bundle = tmp_path / "ca-bundle.pem"
    text = trust.per_client_explanation(bundle, "http://127.0.0.1:8081")
    assert "HTTPS_PROXY=http://127.0.0.1:8081" in text
    for name, client in (("SSL_CERT_FILE", "httpx"), ("REQUESTS_CA_BUNDLE", "requests"),
                         ("CURL_CA_BUNDLE", "curl"), ("NODE_EXTRA_CA_CERTS", "Claude Code")):
        line = next(i for i, line in enumerate(text.splitlines()) if f"{name}={bundle}" in line)
        assert client in text.splitlines()[line + 1]
    assert "halton-meter run" in text and "init --apps" in text
