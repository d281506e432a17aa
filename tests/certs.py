"""Throwaway X.509 material for the TLS tests: a CA, a server certificate for loopback, and
client certificates (one from the CA, one from an unrelated CA)."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key, subject: str, issuer_key, issuer: str, *, ca: bool, sans=(), usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *objs) -> str:
    data = b""
    for o in objs:
        if isinstance(o, x509.Certificate):
            data += o.public_bytes(serialization.Encoding.PEM)
        else:
            data += o.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@dataclass
class Certs:
    ca: str  # the CA that signed the server and the good client
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str  # an unrelated CA, and a client certificate it signed
    rogue_client_cert: str
    rogue_client_key: str


def make_certs(folder: Path) -> Certs:
    ca_key, rogue_key = _key(), _key()
    ca = _cert(ca_key, "tpserve test CA", ca_key, "tpserve test CA", ca=True)
    rogue = _cert(rogue_key, "rogue CA", rogue_key, "rogue CA", ca=True)
    sk, ck, rk = _key(), _key(), _key()
    server = _cert(sk, "tpserve", ca_key, "tpserve test CA", ca=False,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                   usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _cert(ck, "good client", ca_key, "tpserve test CA", ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = _cert(rk, "rogue client", rogue_key, "rogue CA", ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certs(_write(folder / "ca.pem", ca), _write(folder / "server.pem", server), _write(folder / "server.key", sk),
                 _write(folder / "client.pem", client), _write(folder / "client.key", ck),
                 _write(folder / "rogue-ca.pem", rogue), _write(folder / "rogue-client.pem", rogue_client),
                 _write(folder / "rogue-client.key", rk))
