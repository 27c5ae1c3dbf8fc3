"""Service fixtures: engines loaded once per run (shared by the servers each module starts), a TLS certificate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gptserve.service.engine import Engine


@pytest.fixture(scope="session")
def default_engine(default_artifact) -> Engine:
    return Engine.load(default_artifact, provider="cpu")


@pytest.fixture(scope="session")
def tiny_engine(tiny_artifact) -> Engine:
    return Engine.load(tiny_artifact, provider="cpu")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
