"""rediss:// works: a TLS-only client to a server that requires TLS."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dedupcall import Dedup, DedupError, RedisUnavailable
from dedupcall.embedded import EmbeddedServer, free_port


def make_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    names = {
        n: folder / f"{n}" for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt", "ext")
    }
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): the CA needs its key usage and
    # the server certificate its own extensions and a link to the CA's key.
    names["ext"].write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        str(names["ca.key"]),
        "-out",
        str(names["ca.crt"]),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(names["srv.key"]),
        "-out",
        str(names["srv.csr"]),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(names["srv.csr"]),
        "-CA",
        str(names["ca.crt"]),
        "-CAkey",
        str(names["ca.key"]),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(names["ext"]),
        "-out",
        str(names["srv.crt"]),
    )
    return names


async def test_rediss_url_with_a_private_ca(
    tmp_path: Path,
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
) -> None:
    certs = make_certs(tmp_path)
    tls_port = free_port()
    try:
        make_redis_server(
            extra_args=[
                "--tls-port",
                str(tls_port),
                "--tls-cert-file",
                str(certs["srv.crt"]),
                "--tls-key-file",
                str(certs["srv.key"]),
                "--tls-ca-cert-file",
                str(certs["ca.crt"]),
                "--tls-auth-clients",
                "no",
            ]
        )
    except DedupError as exc:
        pytest.skip(f"this server engine has no TLS: {exc}")
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca.crt']}"
    a, b = make_dedup(url=url), make_dedup(url=url)
    runs = 0

    async def fetch() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return "over tls"

    assert await asyncio.gather(a.call("/tls", fetch), b.call("/tls", fetch)) == ["over tls"] * 2
    assert runs == 1

    untrusted = make_dedup(url=f"rediss://127.0.0.1:{tls_port}/0", socket_timeout=2.0)
    with pytest.raises(RedisUnavailable):  # the system CAs do not know our private CA
        await untrusted.call("/tls", fetch)
