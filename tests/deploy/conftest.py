"""Deployment fixtures: Debian's nginx (installed by `make test-deps`) and a self-signed certificate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def nginx() -> str:
    """The nginx binary, with the HTTP/2 and SSL modules the load balancer's configuration uses."""
    binary = shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx",) if Path(path).exists()), None)
    if binary is None:
        pytest.skip("nginx is not installed and could not be (`make test-deps` installs Debian's nginx-light)")
    build = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    for module in ("--with-http_v2_module", "--with-http_ssl_module"):
        if module not in build:
            pytest.skip(f"this nginx was built without {module}")
    return binary


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("deploy-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
