"""A small X.509 certificate authority for a fleet's broker: one CA, server and client certificates.

``devft-edge broker-config --tls`` uses it so that a fleet needs no public CA and no ``openssl``
command line. Keys are ECDSA P-256: small and quick to make and to use on a device, and TLS 1.2
and 1.3 stacks support them. Certificates carry the extensions strict verifiers (OpenSSL 3,
Python 3.13's ``VERIFY_X509_STRICT``) expect: basic constraints, key usage, subject and authority
key identifiers. Pure: objects and PEM bytes in and out, the caller writes files.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates are valid from this long before now: a device clock a little behind still accepts them."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (mosquitto and paho read it without a passphrase)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def new_ca(common_name: str, days: int) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    return Issued(_builder(name, key, name, key, days, ca=True).sign(key, hashes.SHA256()), key)


def issue_server(ca: Issued, hosts: Iterable[str], days: int) -> Issued:
    """A server certificate for ``hosts`` (subject alternative names: IP addresses or DNS names)."""
    hosts = list(hosts)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _issue(ca, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, days, x509.SubjectAlternativeName(names))


def issue_client(ca: Issued, common_name: str, days: int) -> Issued:
    """A client certificate with subject ``CN=<common_name>``."""
    return _issue(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def _issue(
    ca: Issued,
    common_name: str,
    purpose: x509.ObjectIdentifier,
    days: int,
    alternative_names: x509.SubjectAlternativeName | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(common_name), key, ca.certificate.subject, ca.key, days, ca=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    if alternative_names is not None:
        builder = builder.add_extension(alternative_names, critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _builder(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    ca: bool,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
