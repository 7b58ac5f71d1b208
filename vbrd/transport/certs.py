"""The agent's TLS identity: a self-signed certificate, pinned by its SHA-256 fingerprint.

There is no CA between the backup server and its agents. An agent makes its own certificate
and key at first start and prints the fingerprint; the backup server's config pins it
(``fingerprint = "sha256:..."``), so the Manager talks to that agent and to no other machine
that happens to answer at its address. The same certificate is what the repository's data
movers present to the proxies' ones.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
from pathlib import Path

from vbrd.errors import VbrdError

CERT_VALIDITY = datetime.timedelta(days=3650)


class CertificateError(VbrdError):
    """The agent's certificate or key cannot be made or read."""


def parse_fingerprint(text: str) -> bytes:
    """``sha256:ab12...`` (colons and case are free) → the 32 digest bytes."""
    m = re.fullmatch(r"\s*sha256:([0-9a-fA-F:]+)\s*", text)
    hexdigits = m.group(1).replace(":", "") if m else ""
    if len(hexdigits) != 64:
        raise ValueError(f"not a certificate fingerprint: {text!r} (expected \"sha256:\" and "
                         f"64 hex digits, as `vbrd agent --fingerprint` prints)")
    return bytes.fromhex(hexdigits)


def format_fingerprint(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def fingerprint_of_pem(pem: str | bytes) -> bytes:
    """SHA-256 of the certificate's DER form, as TLS peers see it."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).digest()


#: More than any one certificate's PEM; a longer text is refused unread.
MAX_CERTIFICATE_PEM = 64 * 1024
_PEM_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")


def single_certificate(text: object, what: str = "the peer certificate") -> str:
    """``text`` as exactly one PEM X.509 certificate, re-encoded; :class:`CertificateError`
    otherwise.

    A file of certificates given as a TLS trust store trusts every one of them (and OpenSSL
    skips what it cannot parse), so a peer certificate that must be one certificate is
    checked to be one: a single PEM block of type CERTIFICATE, nothing around it, that parses
    as X.509. What is written out is that certificate's own encoding, not the text given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def refuse(why: str) -> CertificateError:
        return CertificateError(f"{what} must be exactly one PEM X.509 certificate: {why}")

    if not isinstance(text, str):
        raise refuse(f"got {type(text).__name__}")
    if len(text) > MAX_CERTIFICATE_PEM:
        raise refuse(f"{len(text)} characters is more than one certificate")
    blocks = _PEM_BEGIN.findall(text)
    if blocks != ["CERTIFICATE"]:
        raise refuse(f"it holds {len(blocks)} PEM blocks"
                     + (f" ({', '.join(blocks)})" if blocks else ""))
    pem = text.strip()
    if not (pem.startswith("-----BEGIN CERTIFICATE-----")
            and pem.endswith("-----END CERTIFICATE-----")):
        raise refuse("there is text around the certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise refuse(f"it does not parse ({e})") from None
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def ensure_certificate(cert_path: Path, key_path: Path, name: str,
                       addresses: tuple[str, ...] = ()) -> tuple[str, bool]:
    """The certificate's PEM, made first (with its key) when neither file exists.

    Returns ``(pem, made)``. A certificate without its key, or the reverse, is an error
    rather than a reason to make new ones: a new certificate breaks every pin of the old.
    """
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert != have_key:
        missing, present = (key_path, cert_path) if have_cert else (cert_path, key_path)
        raise CertificateError(f"{present} exists but {missing} does not; restore it, or "
                               f"remove both to make a new certificate (and pin its new "
                               f"fingerprint on the backup server)")
    if have_cert:
        try:
            return cert_path.read_text(), False
        except OSError as e:
            raise CertificateError(f"cannot read {cert_path}: {e.strerror}") from None
    pem, key_pem = _self_signed(name, addresses)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, pem.encode(), 0o644)
    return pem, True


def _self_signed(name: str, addresses: tuple[str, ...]) -> tuple[str, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vbrd agent")])
    alt: list[x509.GeneralName] = [x509.DNSName(socket.gethostname())]
    for address in addresses:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            if address:
                alt.append(x509.DNSName(address))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
            # its own trust anchor: the proxies' data movers verify it as their only CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
