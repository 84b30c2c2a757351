"""sslmode as libpq means it, against a private cluster that offers TLS."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import wait_for, with_query
from infra import pg_connect

import minflow

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_pg(private_pg):
    """The private cluster with TLS switched on (a self-signed certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = private_pg.data / "server.crt", private_pg.data / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    shutil.chown(cert, "postgres", "postgres")
    shutil.chown(key, "postgres", "postgres")
    key.chmod(0o600)
    conn = pg_connect(private_pg.dsn)
    try:
        conn.run("ALTER SYSTEM SET ssl = on")
        conn.run("SELECT pg_reload_conf()")
    finally:
        conn.close()

    def offered() -> bool:
        probe = pg_connect(private_pg.dsn)
        try:
            return probe.run("SHOW ssl")[0][0] == "on"
        finally:
            probe.close()

    wait_for(offered, timeout=10, interval=0.05, message="TLS to be switched on")
    return private_pg


@pytest.mark.parametrize(
    ("mode", "encrypted"),
    [("disable", False), ("allow", False), ("prefer", True), ("require", True)],
)
def test_sslmode_decides_whether_the_connection_is_encrypted(tls_pg, mode, encrypted):
    with minflow.Client(with_query(tls_pg.dsn, sslmode=mode, schema="tls")) as client:
        client.migrate()
        client.submit("tls.t")
        with client._pool.connection() as conn:
            used = conn.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert used == [[encrypted]]
