"""A server that did not prove itself never gets the password: real libpq (psycopg2's) against an impostor speaking
just enough of the PostgreSQL protocol to ask for a clear-text password, with and without TLS."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import threading

import psycopg2
import pytest

from pgactive_upgrade.db import Credentials, Endpoint, connect
from pgactive_upgrade.deployment import parse

SSL_REQUEST = 80877103
PASSWORD = "the-admin-password-0123"


class Impostor:
    """Answers SSLRequest (with a self-signed certificate when `cert` is given), then asks for a clear-text password
    and keeps whatever password message arrives."""

    def __init__(self, cert: tuple[str, str] | None = None):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        self.context = None
        if cert:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*cert)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(10)
        try:
            connection, _ = self.server.accept()
        except OSError:
            return
        connection.settimeout(10)
        try:
            self._talk(connection)
        except (OSError, ssl.SSLError, struct.error):
            pass
        finally:
            connection.close()

    def _talk(self, connection) -> None:
        length, code = struct.unpack("!ii", _read(connection, 8))
        if code == SSL_REQUEST:
            if self.context is None:
                connection.sendall(b"N")
            else:
                connection.sendall(b"S")
                connection = self.context.wrap_socket(connection, server_side=True)
            length = struct.unpack("!i", _read(connection, 4))[0]
            _read(connection, length - 4)  # the startup message
        else:
            _read(connection, length - 8)
        connection.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind = _read(connection, 1)
        length = struct.unpack("!i", _read(connection, 4))[0]
        body = _read(connection, length - 4)
        if kind == b"p":
            self.received.append(body)

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=10)


def _read(connection, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("impostor")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert, "-days", "1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def some_other_ca(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("bundle")
    cert, key = str(directory / "ca.pem"), str(directory / "ca.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=not the impostor",
                    "-keyout", key, "-out", cert, "-days", "1"], check=True, capture_output=True)
    return cert


def deployment(tls: dict):
    return parse('{"connections": {"db_conn_id": [], "replication_conn_id": [], "probe_conn_id": [], '
                 '"aws_conn_id": []}, "sources": {}, "tls": ' + json.dumps(tls) + "}")


def attempt(impostor: Impostor, credentials: Credentials) -> str:
    try:
        connect(Endpoint("127.0.0.1", impostor.port, "app"), credentials, connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        return str(error)
    finally:
        impostor.close()
    return "connected"


def test_without_the_packages_settings_libpq_hands_the_password_over(self_signed):
    impostor = Impostor()
    attempt(impostor, Credentials("postgres", PASSWORD))
    assert impostor.received and PASSWORD.encode() in impostor.received[0], "the attack this guards against works"


def test_verify_full_refuses_a_server_without_tls(some_other_ca):
    impostor = Impostor()
    said = attempt(impostor, Credentials("postgres", PASSWORD, deployment({"root_cert": some_other_ca}).tls(iam=False)))
    assert "SSL" in said and impostor.received == [], said


def test_verify_full_refuses_a_certificate_the_bundle_did_not_sign(self_signed, some_other_ca):
    impostor = Impostor(cert=self_signed)
    said = attempt(impostor, Credentials("postgres", PASSWORD, deployment({"root_cert": some_other_ca}).tls(iam=False)))
    assert "certificate verify failed" in said and impostor.received == [], said


def test_an_iam_token_goes_only_to_a_server_whose_certificate_the_bundle_signed(self_signed, some_other_ca):
    impostor = Impostor(cert=self_signed)
    login = Credentials("postgres", tls=deployment({"root_cert": some_other_ca}).tls(iam=True),
                        token=lambda host, port, user: PASSWORD)
    said = attempt(impostor, login)
    assert "certificate verify failed" in said and impostor.received == [], said


def test_require_auth_refuses_a_clear_text_request_even_under_the_local_opt_out():
    impostor = Impostor()
    said = attempt(impostor, Credentials("postgres", PASSWORD, deployment({"local_only_no_tls": True}).tls(iam=False)))
    assert "server requested a cleartext password" in said and impostor.received == [], said
