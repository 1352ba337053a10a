"""TLS against real servers: a redis-server with --tls-port and a throwaway Postgres
cluster with ssl=on, both asking for a client certificate. Certificates are made here
(one CA for the servers and the client, and a second CA nobody trusts)."""

from __future__ import annotations

import datetime as dt
import glob
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import stem
from stem import ConfigurationError, ServiceUnavailableError, SigningConfig, TlsConfig
from stem.config import StemConfig
from tests.helpers import running_worker


@dataclass
class Certs:
    ca: str
    wrong_ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, *,
           client: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.CLIENT_AUTH if client
                    else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if not client:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None,
           cert: x509.Certificate | None) -> str:
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    else:
        assert cert is not None
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    folder = Path(tempfile.mkdtemp(prefix="stem-tls-"))
    folder.chmod(0o755)
    ca_key, ca = _ca("stem test CA")
    _, wrong = _ca("some other CA")
    skey, scert = _issue(ca_key, ca, "localhost", client=False)
    ckey, ccert = _issue(ca_key, ca, "postgres", client=True)
    yield Certs(
        ca=_write(folder / "ca.pem", None, ca),
        wrong_ca=_write(folder / "wrong-ca.pem", None, wrong),
        server_cert=_write(folder / "server.pem", None, scert),
        server_key=_write(folder / "server.key", skey, None),
        client_cert=_write(folder / "client.pem", None, ccert),
        client_key=_write(folder / "client.key", ckey, None),
    )
    shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.05)


# -- Redis -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rediss_url(certs: Certs) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "these tests need a redis-server built with TLS (Debian's redis-server)"
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="stem-redis-tls-")
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", certs.server_cert, "--tls-key-file", certs.server_key,
         "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "redis-server with TLS")
        yield f"rediss://localhost:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _tls(certs: Certs, **changes: object) -> TlsConfig:
    values: dict[str, object] = {"ca_cert": certs.ca, "client_cert": certs.client_cert,
                                 "client_key": certs.client_key}
    values.update(changes)
    return TlsConfig(**values)  # type: ignore[arg-type]


async def test_redis_over_tls_with_a_client_certificate_runs_signed_tasks(
        rediss_url: str, certs: Certs, namespace: str) -> None:
    env = {"STEM_TLS_CA_CERT": certs.ca, "STEM_TLS_CLIENT_CERT": certs.client_cert,
           "STEM_TLS_CLIENT_KEY": certs.client_key}
    config = StemConfig(broker_url=rediss_url, tls=StemConfig.from_env(env).tls)
    app = stem.Stem("tls", config=config, namespace=namespace,
                    signing=SigningConfig(keys={"k": b"s" * 32}, active_key="k"))

    @app.task(name="tls.double")
    def double(n: int) -> int:
        return 2 * n

    async with running_worker(app):
        result = await app.wait(await app.enqueue("tls.double", n=21), timeout=10)
    assert result.value == 42
    await app.close()


async def _ping(url: str, tls: TlsConfig, namespace: str) -> None:
    app = stem.Stem("tls", broker=url, namespace=namespace, tls=tls)
    try:
        await app.store_for(url).ping()
    finally:
        await app.close()


async def test_redis_wrong_ca_names_the_ca_setting(rediss_url: str, certs: Certs,
                                                   namespace: str) -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        await _ping(rediss_url, _tls(certs, ca_cert=certs.wrong_ca), namespace)
    message = str(info.value)
    assert "STEM_TLS_CA_CERT" in message and certs.wrong_ca in message


async def test_redis_without_a_client_certificate_names_the_client_settings(
        rediss_url: str, certs: Certs, namespace: str) -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        await _ping(rediss_url, TlsConfig(ca_cert=certs.ca), namespace)
    assert "STEM_TLS_CLIENT_CERT" in str(info.value)


async def test_redis_allow_insecure_skips_the_server_check(rediss_url: str, certs: Certs,
                                                           namespace: str) -> None:
    await _ping(rediss_url, _tls(certs, ca_cert=certs.wrong_ca, allow_insecure=True), namespace)


# -- Postgres --------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"these tests need the Postgres server binaries ({name})"
    return found


@pytest.fixture(scope="module")
def pg_tls_url(certs: Certs) -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="stem-pg-tls-"))
    root.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for src, dst in ((certs.server_cert, "server.crt"), (certs.server_key, "server.key"),
                     (certs.ca, "root.crt")):
        shutil.copy(src, data / dst)
        (data / dst).chmod(0o600)
        if as_user:
            shutil.chown(data / dst, "postgres")
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n")
    port = _free_port()
    options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c ssl=on "
               "-c ssl_cert_file=server.crt -c ssl_key_file=server.key "
               "-c ssl_ca_file=root.crt -c fsync=off")
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", options,
                    "-w", "start"], check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://postgres@localhost:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_verify_full_with_a_client_certificate(pg_tls_url: str, certs: Certs,
                                                              namespace: str) -> None:
    tls = _tls(certs)
    assert "sslmode=verify-full" in tls.apply(pg_tls_url)
    app = stem.Stem("tls", broker=pg_tls_url, namespace=namespace, tls=tls,
                    signing=SigningConfig(keys={"k": b"s" * 32}, active_key="k"))

    @app.task(name="tls.echo")
    def echo(text: str) -> str:
        return text

    async with running_worker(app):
        result = await app.wait(await app.enqueue("tls.echo", text="\u00fcber"), timeout=10)
    assert result.value == "\u00fcber"
    await app.close()


async def test_postgres_wrong_ca_names_the_ca_setting(pg_tls_url: str, certs: Certs,
                                                      namespace: str) -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        await _ping(pg_tls_url, _tls(certs, ca_cert=certs.wrong_ca), namespace)
    assert "STEM_TLS_CA_CERT" in str(info.value) and certs.wrong_ca in str(info.value)


async def test_postgres_without_a_client_certificate_names_the_client_settings(
        pg_tls_url: str, certs: Certs, namespace: str) -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        await _ping(pg_tls_url, TlsConfig(ca_cert=certs.ca), namespace)
    assert "STEM_TLS_CLIENT_CERT" in str(info.value)


# -- configuration (no server) ---------------------------------------------------------


def test_tls_files_are_checked_at_startup(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"STEM_TLS_CA_CERT .* is not a file"):
        StemConfig.from_env({"STEM_TLS_CA_CERT": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigurationError, match="no usable PEM CA"):
        TlsConfig(ca_cert=certs.client_key)
    with pytest.raises(ConfigurationError, match="matching private key"):
        TlsConfig(client_cert=certs.client_cert, client_key=certs.server_key)
    with pytest.raises(ConfigurationError, match="STEM_TLS_CLIENT_CERT"):
        TlsConfig(client_key=certs.client_key)
    with pytest.raises(ConfigurationError, match="true or false"):
        StemConfig.from_env({"STEM_TLS_ALLOW_INSECURE": "maybe"})
    assert StemConfig.from_env({}).tls is None


def test_tls_settings_become_url_options_and_the_url_wins(certs: Certs) -> None:
    tls = _tls(certs)
    assert tls.apply("redis://h:6379/0") == "redis://h:6379/0"  # no TLS asked for
    assert tls.apply("sqlite:///x.db") == "sqlite:///x.db"
    url = tls.apply("rediss://:pw@h:6380/0?ssl_ca_certs=%2Fmine.pem")
    assert url.startswith("rediss://:pw@h:6380/0?ssl_ca_certs=%2Fmine.pem&ssl_certfile=")
    assert "ssl_keyfile=" in url and url.count("ssl_ca_certs") == 1
    insecure = TlsConfig(allow_insecure=True)
    assert insecure.apply("rediss://h/0").endswith("ssl_cert_reqs=none&ssl_check_hostname=false")
    assert insecure.apply("postgresql://u@h/db") == "postgresql://u@h/db?sslmode=require"
    assert tls.apply("postgresql://u@h/db?sslmode=disable") == (
        "postgresql://u@h/db?sslmode=disable")
    assert "sslmode=verify-ca" in tls.apply("postgresql://u@h/db?sslmode=verify-ca")
