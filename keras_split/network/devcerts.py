"""A throwaway certificate authority for trying TLS on one machine, and for tests.

Certificates are valid for "localhost" and 127.0.0.1 for one day. For real
deployments use your organisation's CA.
"""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "Making development certificates requires the cryptography package. Install it with "
        "pip install 'keras-split[tls]'."
    ) from error


@dataclass
class Pair:
    certificate: bytes
    private_key: bytes


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _build(subject, issuer, public_key, signing_key, ca: bool, sans=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


class Authority:
    def __init__(self, name="test-ca"):
        self.name = name
        self.key = _key()
        self.certificate = _build(name, name, self.key.public_key(), self.key, ca=True)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str) -> Pair:
        key = _key()
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = _build(common_name, self.name, key.public_key(), self.key, ca=False, sans=sans)
        return Pair(cert.public_bytes(serialization.Encoding.PEM), _pem(key))


def self_signed(common_name="localhost") -> Pair:
    key = _key()
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = _build(common_name, common_name, key.public_key(), key, ca=True, sans=sans)
    return Pair(cert.public_bytes(serialization.Encoding.PEM), _pem(key))


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
