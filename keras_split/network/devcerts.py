"""A throwaway certificate authority for trying TLS on one machine, and for tests.

Certificates are valid for "localhost" and 127.0.0.1 for one day. For real
deployments use your organisation's CA.
"""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from keras_split_wire.optional import require


def _crypto() -> SimpleNamespace:
    """The parts of cryptography used here, imported on first use (the `tls` extra)."""
    require("cryptography", "Making development certificates", "keras-split[tls]")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    return SimpleNamespace(x509=x509, hashes=hashes, serialization=serialization, ec=ec,
                           NameOID=NameOID)


@dataclass
class Pair:
    certificate: bytes
    private_key: bytes


def _key():
    ec = _crypto().ec
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key) -> bytes:
    serialization = _crypto().serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _sans() -> list:
    x509 = _crypto().x509
    return [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _build(subject, issuer, public_key, signing_key, ca: bool, sans=None):
    crypto = _crypto()
    x509, common_name = crypto.x509, crypto.NameOID.COMMON_NAME
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(common_name, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(common_name, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signing_key, crypto.hashes.SHA256())


class Authority:
    def __init__(self, name="test-ca"):
        self.name = name
        self.key = _key()
        self.certificate = _build(name, name, self.key.public_key(), self.key, ca=True)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(_crypto().serialization.Encoding.PEM)

    def issue(self, common_name: str) -> Pair:
        key = _key()
        cert = _build(common_name, self.name, key.public_key(), self.key, ca=False, sans=_sans())
        return Pair(cert.public_bytes(_crypto().serialization.Encoding.PEM), _pem(key))


def self_signed(common_name="localhost") -> Pair:
    key = _key()
    cert = _build(common_name, common_name, key.public_key(), key, ca=True, sans=_sans())
    return Pair(cert.public_bytes(_crypto().serialization.Encoding.PEM), _pem(key))


def write_dev_certificates(folder) -> dict[str, Path]:
    """Write ca.pem, server.pem/server.key and client.pem/client.key into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    authority = Authority("keras-split-dev-ca")
    server = authority.issue("localhost")
    client = authority.issue("client")
    files = {
        "ca": (folder / "ca.pem", authority.pem),
        "server_cert": (folder / "server.pem", server.certificate),
        "server_key": (folder / "server.key", server.private_key),
        "client_cert": (folder / "client.pem", client.certificate),
        "client_key": (folder / "client.key", client.private_key),
    }
    for path, data in files.values():
        path.write_bytes(data)
        if path.suffix == ".key":
            path.chmod(0o600)
    return {name: path for name, (path, _) in files.items()}
