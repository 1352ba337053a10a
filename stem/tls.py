"""TLS settings for Redis and Postgres connections (``STEM_TLS_*``, as in the Dart Stem).

- ``STEM_TLS_CA_CERT``: PEM file of the CA(s) that signed the server's certificate
  (default: the system's CAs).
- ``STEM_TLS_CLIENT_CERT`` / ``STEM_TLS_CLIENT_KEY``: PEM client certificate and its
  unencrypted key, for servers that ask for one (mutual TLS).
- ``STEM_TLS_ALLOW_INSECURE``: ``true`` encrypts without checking the server's
  certificate or host name (for tests only).

They apply to ``rediss://`` URLs (and ``redis://...?ssl=1``, ``redis+sentinel://...?ssl=1``)
and to Postgres URLs: one without ``sslmode`` gets ``sslmode=verify-full`` (``require``
when insecure), one with ``sslmode=disable`` is left alone. Options written in a URL
win over these settings (``?ssl_ca_certs=``, ``?sslrootcert=``...). :meth:`TlsConfig.apply`
does the mapping, so the adapters see plain URL options; the files are checked when the
configuration is built, and a failed handshake names the file or setting to check
(:func:`tls_hint`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from stem.errors import ConfigurationError

ENV_CA_CERT: Final = "STEM_TLS_CA_CERT"
ENV_CLIENT_CERT: Final = "STEM_TLS_CLIENT_CERT"
ENV_CLIENT_KEY: Final = "STEM_TLS_CLIENT_KEY"
ENV_ALLOW_INSECURE: Final = "STEM_TLS_ALLOW_INSECURE"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """CA file, client certificate and key (paths), and whether to skip verification.

    The constructor checks that the files exist and load (a CA bundle, a certificate
    with its matching unencrypted key) and raises :class:`~stem.errors.ConfigurationError`
    naming the setting otherwise.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        for name, env_name in (("ca_cert", ENV_CA_CERT), ("client_cert", ENV_CLIENT_CERT),
                               ("client_key", ENV_CLIENT_KEY)):
            path = getattr(self, name)
            if path is None:
                continue
            if not isinstance(path, str | os.PathLike) or not str(path):
                raise ConfigurationError(f"TLS: {env_name} ({name}=) must be a file path")
            path = os.fspath(path)
            object.__setattr__(self, name, path)
            if not os.path.isfile(path):
                raise ConfigurationError(f"TLS: {env_name} ({name}=) {path!r} is not a file")
            if not os.access(path, os.R_OK):
                raise ConfigurationError(
                    f"TLS: {env_name} ({name}=) {path!r} is not readable by this process")
        if self.client_key is not None and self.client_cert is None:
            raise ConfigurationError(
                f"TLS: {ENV_CLIENT_KEY} is set but {ENV_CLIENT_CERT} is not; give the client "
                "certificate too")
        if self.ca_cert is not None:
            try:
                ssl.create_default_context(cafile=self.ca_cert)
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigurationError(
                    f"TLS: {ENV_CA_CERT} {self.ca_cert!r} holds no usable PEM CA "
                    f"certificate ({exc})") from None
        if self.client_cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key, password=_no_password)
            except ConfigurationError:
                raise
            except (ssl.SSLError, ValueError) as exc:
                what = (f"{ENV_CLIENT_CERT} {self.client_cert!r} and {ENV_CLIENT_KEY} "
                        f"{self.client_key!r}" if self.client_key else
                        f"{ENV_CLIENT_CERT} {self.client_cert!r} (no {ENV_CLIENT_KEY})")
                raise ConfigurationError(
                    f"TLS: {what} do not load as a PEM certificate with its matching "
                    f"private key ({exc})") from None

    @property
    def enabled(self) -> bool:
        """True when anything is set."""
        return bool(self.ca_cert or self.client_cert or self.allow_insecure)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        """Read ``STEM_TLS_*``; None when none is set."""
        e = os.environ if env is None else env
        raw = e.get(ENV_ALLOW_INSECURE, "").strip().lower()
        if raw not in _TRUE | _FALSE:
            raise ConfigurationError(
                f"TLS: {ENV_ALLOW_INSECURE}={raw!r} must be true or false")
        config = cls(
            ca_cert=e.get(ENV_CA_CERT) or None,
            client_cert=e.get(ENV_CLIENT_CERT) or None,
            client_key=e.get(ENV_CLIENT_KEY) or None,
            allow_insecure=raw in _TRUE,
        )
        return config if config.enabled or config.client_key else None

    def apply(self, url: str) -> str:
        """``url`` with these settings added as its driver's TLS options (see module doc).

        URLs of other schemes, non-TLS Redis URLs and ``sslmode=disable`` come back as
        they are; an option the URL already has is kept.
        """
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        given = {k for k, _ in query}
        add: list[tuple[str, str]] = []
        scheme = parts.scheme
        if scheme in ("redis", "rediss", "redis+sentinel"):
            tls = scheme == "rediss" or any(
                k == "ssl" and v.lower() in _TRUE for k, v in query)
            if not tls:
                return url
            if self.ca_cert and not self.allow_insecure:
                add.append(("ssl_ca_certs", self.ca_cert))
            if self.client_cert:
                add.append(("ssl_certfile", self.client_cert))
            if self.client_key:
                add.append(("ssl_keyfile", self.client_key))
            if self.allow_insecure:
                add += [("ssl_cert_reqs", "none"), ("ssl_check_hostname", "false")]
        elif scheme in ("postgres", "postgresql"):
            mode = dict(query).get("sslmode") or dict(query).get("ssl")
            if mode == "disable":
                return url
            if mode is None:
                add.append(("sslmode", "require" if self.allow_insecure else "verify-full"))
            if self.ca_cert and not self.allow_insecure:
                add.append(("sslrootcert", self.ca_cert))
            if self.client_cert:
                add.append(("sslcert", self.client_cert))
            if self.client_key:
                add.append(("sslkey", self.client_key))
        else:
            return url
        add = [(k, v) for k, v in add if k not in given]
        if not add:
            return url
        # Re-encode only what we add: the URL's own query stays byte for byte.
        extra = urlencode(add)
        new_query = f"{parts.query}&{extra}" if parts.query else extra
        return urlunsplit(parts._replace(query=new_query))


def _no_password() -> NoReturn:
    raise ConfigurationError(
        f"TLS: {ENV_CLIENT_KEY} is encrypted; give an unencrypted key file (or, for Redis, "
        "?ssl_password= in the URL)")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(out) < 10:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def tls_hint(exc: BaseException, url: str) -> str | None:
    """What to check when ``exc`` (from connecting to ``url``) is a TLS failure, else None.

    Names the setting and the file in use: the CA when the server's certificate was
    refused, the client certificate and key when the server refused ours, the port and
    scheme when the server does not speak TLS there.
    """
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    low = text.lower()
    is_tls = any(isinstance(e, ssl.SSLError) for e in chain) or any(
        s in low for s in ("[ssl", "ssl upgrade", "certificate", "tlsv1", "ssl:"))
    if not is_tls:
        return None
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    ca = query.get("ssl_ca_certs") or query.get("sslrootcert")
    cert = query.get("ssl_certfile") or query.get("sslcert")
    key = query.get("ssl_keyfile") or query.get("sslkey")
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or \
            "certificate_verify_failed" in low or "certificate verify failed" in low:
        using = f"now {ca!r}" if ca else "unset, so the system's CAs"
        return (f"TLS handshake failed: the server's certificate was not accepted; check "
                f"{ENV_CA_CERT} ({using}) is the CA that signed it, and that the host "
                f"name in the URL is one the certificate names ({ENV_ALLOW_INSECURE}=true "
                "skips the check, for tests only)")
    if any(s in low for s in ("certificate required", "certificate_required", "bad certificate",
                              "bad_certificate", "unknown ca", "unknown_ca",
                              "requires a valid client certificate", "handshake failure",
                              "sslv3_alert_handshake_failure")):
        using = f"now {cert!r} with key {key!r}" if cert else "unset"
        return (f"TLS handshake failed: the server refused this client's certificate; check "
                f"{ENV_CLIENT_CERT} / {ENV_CLIENT_KEY} ({using}) hold a certificate signed "
                "by a CA the server trusts")
    if any(s in low for s in ("wrong version number", "wrong_version_number",
                              "rejected ssl upgrade", "packet length too long",
                              "record layer failure", "unexpected eof")):
        return ("TLS handshake failed: the server does not seem to speak TLS on that port; "
                "check the port, or use redis:// / sslmode=disable for a server without TLS")
    if "no pg_hba.conf entry" in low or "not using ssl" in low:
        return None
    return (f"TLS handshake failed; check {ENV_CA_CERT} ({ca!r}), {ENV_CLIENT_CERT} "
            f"({cert!r}), {ENV_CLIENT_KEY} ({key!r}) and the server's TLS settings")
