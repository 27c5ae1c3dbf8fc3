"""What a server's start can check before anything is loaded (an export or a model load takes minutes): the TLS
files and the ports. Each mistake is a ConfigError naming the setting, one line for a terminal."""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

from gptserve.service.errors import ConfigError


def check_start(config) -> None:
    """Everything about a ServerConfig that the operating system decides: files readable, ports free."""
    if config.tls_cert_file:
        check_tls_files(config.tls_cert_file, config.tls_key_file)
    check_port("port", config.host, config.port)
    if config.http_port:
        check_port("http_port", config.host, config.http_port)
    if config.metrics_port:
        check_port("metrics_port", config.metrics_host, config.metrics_port)


def check_tls_files(cert_file: str | Path, key_file: str | Path) -> None:
    for setting, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if not Path(path).is_file():
            raise ConfigError(setting, f"{path}: no such file")
    # The pair gRPC will be given, loaded the same way: a swapped or mismatched pair fails here, by name,
    # rather than as gRPC's "Failed to bind".
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError("tls_cert_file", f"{cert_file} and {key_file} do not load as a PEM certificate chain and "
                                           f"its private key (swapped, or not a pair?): {error}") from error


def check_port(setting: str, host: str, port: int) -> None:
    """Binds `host:port` and lets go again, as gRPC will bind it (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    if not port:
        return  # any free port
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError("host", f"{host}: {error.strerror}") from error
    failures = []
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                failures.append(error)
    # An address family this machine lacks (IPv6 for "localhost") is not a failure while another one binds.
    in_use = [error for error in failures if error.errno in (errno.EADDRINUSE, errno.EACCES)]
    if in_use or len(failures) == len(addresses):
        failure = (in_use or failures)[0]
        assert failure.strerror is not None  # bind's errors come from errno, which names them
        raise ConfigError(setting, f"{host}:{port}: {failure.strerror.lower()}")
