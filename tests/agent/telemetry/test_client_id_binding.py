"""deploy/mosquitto/mosquitto.conf, loaded by a real Mosquitto with throwaway certificates: a
device whose certificate names A cannot take the client id of device B.

The broker runs the project's configuration as written, with only its paths and ports moved
into the test's directory (``project_broker_config``); the certificates (a fleet CA, the
broker's, one per device with the device id as CN) are made here with ``cryptography``. The
same test without ``use_username_as_clientid`` shows what the line prevents.
"""

from __future__ import annotations

import getpass
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import MqttConfig
from agent.contracts.telemetry import Command
from agent.telemetry import TelemetryClient
from tests.agent.telemetry.conftest import free_port, port_open
from tests.agent.telemetry.test_client import command
from tests.conftest import ROOT

pytestmark = pytest.mark.broker
BINDING = "use_username_as_clientid true"


# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    dir: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    common_name: str,
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(root: Path, devices: tuple[str, ...]) -> Pki:
    """A fleet CA, the broker's certificate (for 127.0.0.1) and one client certificate per
    device id (CN = the id), in the file names mosquitto.conf expects."""
    root.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test fleet CA")])
    now = datetime.now(timezone.utc)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(root / "fleet-ca.pem", root)
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, server in [("broker", True), *((d, False) for d in devices)]:
        cert, key = _issue(ca_key, ca_name, "127.0.0.1" if server else name, server=server)
        pki.cert(name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pki.key(name))
    return pki


# -- the broker with the project's configuration --------------------------------------------


@dataclass(frozen=True)
class FleetBroker:
    device_port: int  # the project's 8883: mutual TLS
    operator_port: int  # the project's 8884: TLS + password
    pki: Pki


def project_broker_config(
    workdir: Path, pki: Pki, passwd: Path, *, drop: str | None = None
) -> tuple[str, int, int]:
    """deploy/mosquitto/mosquitto.conf with its paths and ports moved into ``workdir``; every
    other line as written (``drop``: one line left out, to show what it does)."""
    device_port, operator_port = free_port(), free_port()
    persistence = workdir / "persistence"
    persistence.mkdir()
    moved = {
        "listener 8883": f"listener {device_port} 127.0.0.1",
        "listener 8884": f"listener {operator_port} 127.0.0.1",
        "acl_file /etc/mosquitto/edgefleet.acl": f"acl_file {ROOT / 'deploy/mosquitto/acl'}",
        "password_file /etc/mosquitto/passwd": f"password_file {passwd}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {persistence}/",
    }
    lines = [f"user {getpass.getuser()}"]
    project = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    assert drop is None or drop in project, f"{drop!r} is not in the project's configuration"
    for line in project:
        if line == drop:
            continue
        line = moved.get(line, line).replace("/etc/mosquitto/certs/", f"{pki.dir}/")
        lines.append(line)
    text = "\n".join(lines) + "\n"
    settings = [line for line in lines if not line.startswith("#")]
    assert not [line for line in settings if "/etc/" in line or "/var/" in line], text
    return text, device_port, operator_port


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., FleetBroker]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*, drop: str | None = None) -> FleetBroker:
        pki = make_pki(tmp_path / "certs", ("dev-a", "dev-b"))
        passwd = tmp_path / "passwd"
        passwd.write_text("")
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), "control-plane", "control-plane-pw"],
            check=True,
        )
        text, device_port, operator_port = project_broker_config(tmp_path, pki, passwd, drop=drop)
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(text)
        log = tmp_path / "mosquitto.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=out, stderr=out)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not (port_open(device_port) and port_open(operator_port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {log.read_text()}")
            time.sleep(0.02)
        return FleetBroker(device_port, operator_port, pki)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


# -- clients ---------------------------------------------------------------------------------


class Peer:
    """A plain paho client over TLS: the control plane (password) or an impostor (certificate)."""

    def __init__(
        self,
        port: int,
        pki: Pki,
        client_id: str,
        *,
        cert: str | None = None,
        password: tuple[str, str] | None = None,
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.disconnects = 0
        self.connack: threading.Event = threading.Event()
        self.refused: str | None = None
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(pki.ca),
            certfile=str(pki.cert(cert)) if cert else None,
            keyfile=str(pki.key(cert)) if cert else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        if password is not None:
            self.client.username_pw_set(*password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, m: self.messages.append(m)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.refused = str(rc)
        self.connack.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self.disconnects += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _device(broker: FleetBroker, device_id: str, cert: str, state_dir: Path) -> TelemetryClient:
    pki = broker.pki
    return TelemetryClient(
        MqttConfig(
            host="127.0.0.1",
            port=broker.device_port,
            tls_ca=pki.ca,
            tls_cert=pki.cert(cert),
            tls_key=pki.key(cert),
        ),
        device_id=device_id,
        state_dir=state_dir,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- tests -----------------------------------------------------------------------------------


def test_a_device_cannot_take_another_devices_client_id(
    start_broker: Callable[..., FleetBroker], tmp_path: Path
) -> None:
    broker = start_broker()
    got: list[Command] = []
    victim = _device(broker, "dev-b", "dev-b", tmp_path / "b")
    victim.on_command("check-update", got.append)
    cp = Peer(
        broker.operator_port,
        broker.pki,
        "edgefleet-control-plane",
        password=("control-plane", "control-plane-pw"),
    )
    with victim:
        assert victim.wait_connected(10)
        assert victim.wait_commands_ready(10)
        # dev-a, with its own valid certificate, connects under dev-b's client id.
        impostor = Peer(broker.device_port, broker.pki, "dev-b", cert="dev-a")
        impostor.client.subscribe("edgefleet/v1/dev-b/cmd", qos=1)
        impostor.client.subscribe("edgefleet/v1/dev-a/cmd", qos=1)
        time.sleep(0.5)  # a takeover would drop the victim at once
        cp.client.publish("edgefleet/v1/dev-b/cmd", command(id="for-b"), qos=1)
        cp.client.publish("edgefleet/v1/dev-a/cmd", command(id="for-a"), qos=1)
        assert _wait(lambda: [c.id for c in got] == ["for-b"])
        assert _wait(lambda: any(m.topic.endswith("dev-a/cmd") for m in impostor.messages))
        counters = victim.counters()
        assert impostor.refused is None  # connected: but as dev-a, its certificate's identity
        assert impostor.disconnects == 0
        impostor.close()
    cp.close()
    assert counters.connects == 1, counters  # the victim was never knocked off
    assert counters.disconnects == 0, counters
    # the impostor's session was its own: it received dev-a's command, never dev-b's
    assert [m.topic for m in impostor.messages] == ["edgefleet/v1/dev-a/cmd"]


def test_without_the_binding_the_same_client_id_takes_the_session(
    start_broker: Callable[..., FleetBroker], tmp_path: Path
) -> None:
    """The control: the project's configuration less the one line, and the takeover works."""
    broker = start_broker(drop=BINDING)
    victim = _device(broker, "dev-b", "dev-b", tmp_path / "b")
    with victim:
        assert victim.wait_connected(10)
        impostor = Peer(broker.device_port, broker.pki, "dev-b", cert="dev-a")
        assert _wait(lambda: victim.counters().disconnects >= 1)
        impostor.close()


def test_the_agent_refuses_a_certificate_that_names_another_device(
    start_broker: Callable[..., FleetBroker], tmp_path: Path
) -> None:
    broker = start_broker()
    confused = _device(broker, "dev-b", "dev-a", tmp_path / "b")
    with confused:
        assert not confused.wait_connected(1.0)
        assert confused.counters().connect_failures >= 1
        assert confused.counters().connects == 0
