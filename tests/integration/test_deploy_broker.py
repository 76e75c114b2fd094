"""The production broker config in deploy/mosquitto, run for real: TLS, passwords and ACLs hold."""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.mqtt import Message, MqttClient, MqttError
from shared.processes import ManagedProcess, free_port, wait_for_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
PASSWORDS = {"hub": "hub-secret", "d1": "d1-secret", "d2": "d2-secret"}


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool) -> x509.Certificate:  # noqa: ANN001
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pki(certs: Path) -> None:
    certs.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgefed-test-ca", ca_key, None, ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", ca_key, ca.subject, srv_key, ca=False)
    (certs / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (certs / "server.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (certs / "server.key").write_bytes(
        srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
    )


@pytest.fixture
def prod_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    etc = tmp_path / "etc"
    _write_pki(etc / "certs")
    passwd = etc / "edgefed.passwd"
    for i, (user, pw) in enumerate(PASSWORDS.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(passwd), user, pw], check=True)
    (etc / "edgefed.acl").write_text((DEPLOY / "edgefed.acl").read_text())
    port = free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    assert "listener 8883" in conf and "/etc/mosquitto/" in conf
    conf = conf.replace("listener 8883", f"listener {port} 127.0.0.1")
    conf = conf.replace("/etc/mosquitto/", f"{etc}/").replace("/var/lib/mosquitto/", f"{tmp_path}/")
    # As root, mosquitto drops to user 'mosquitto', which cannot read pytest's private tmp dirs.
    conf += f"\nuser {getpass.getuser()}\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    from shared.broker import find_mosquitto

    proc = ManagedProcess("mosquitto-prod", [find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")],
                          tmp_path / "mosquitto.log").start()
    try:
        wait_for_port("127.0.0.1", port, 10, alive=proc.alive)
        yield port, etc / "certs" / "ca.crt"
    finally:
        proc.stop()


def _client(port: int, ca: Path, user: str | None, password: str | None = None, wait: float = 5) -> MqttClient:
    c = MqttClient(f"mqtts://127.0.0.1:{port}", f"test-{user}", username=user,
                   password=password if password is not None else PASSWORDS.get(user or "", None), ca_file=str(ca))
    c.start(wait=wait)
    return c


def _inbox(client: MqttClient, topic: str) -> queue.Queue[Message]:
    q: queue.Queue[Message] = queue.Queue()
    client.subscribe(topic, q.put)
    return q


def test_tls_and_credentials_are_required(prod_broker: tuple[int, Path]) -> None:
    port, ca = prod_broker
    with pytest.raises(MqttError, match="no connection"):
        _client(port, ca, None, wait=2)
    with pytest.raises(MqttError, match="no connection"):
        _client(port, ca, "d1", "wrong-password", wait=2)
    plain = MqttClient(f"mqtt://127.0.0.1:{port}", "plain", username="d1", password=PASSWORDS["d1"])
    with pytest.raises(MqttError, match="no connection"):
        plain.start(wait=2)


def test_acls_confine_devices_to_their_own_subtree(prod_broker: tuple[int, Path]) -> None:
    port, ca = prod_broker
    hub, d1, d2 = (_client(port, ca, u) for u in ("hub", "d1", "d2"))
    try:
        hub_in = _inbox(hub, "$share/hub/edgefed/v1/+/escalate")
        d2_in = _inbox(d2, "edgefed/v1/+/answer")  # asks for everyone's answers
        d1_in = _inbox(d1, "edgefed/v1/d1/answer")
        import time

        time.sleep(0.3)  # let the SUBACKs land before publishing
        # d2 writes into d1's subtree (denied), then into its own (allowed); order per client holds.
        d2.publish("edgefed/v1/d1/escalate", b"forged")
        d2.publish("edgefed/v1/d2/escalate", b"own")
        first = hub_in.get(timeout=5)
        assert (first.topic, first.payload) == ("edgefed/v1/d2/escalate", b"own")
        # The hub answers d1, then d2; d2 must only ever see its own answer.
        hub.publish("edgefed/v1/d1/answer", b"for-d1")
        hub.publish("edgefed/v1/d2/answer", b"for-d2")
        assert d1_in.get(timeout=5).payload == b"for-d1"
        got = d2_in.get(timeout=5)
        assert (got.topic, got.payload) == ("edgefed/v1/d2/answer", b"for-d2")
        assert d2_in.empty() and hub_in.empty()
    finally:
        for c in (hub, d1, d2):
            c.stop()
