"""RDS as slow as the real one, in front of moto (which does everything at once): a harness-made delay, the
package is not changed.

A small HTTP proxy forwards every call to moto. For `create_seconds` after CreateDBInstance an instance is
reported `creating`, and for `reboot_seconds` after RebootDBInstance `rebooting`, in every DescribeDBInstances
answer. Point the AWS connection's endpoint_url at `url`.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_INSTANCE = re.compile(rb"<DBInstance>.*?</DBInstance>", re.S)
_IDENTIFIER = re.compile(rb"<DBInstanceIdentifier>([^<]+)</DBInstanceIdentifier>")
_STATUS = re.compile(rb"<DBInstanceStatus>[^<]*</DBInstanceStatus>")


class SlowRds:
    def __init__(self, moto_url: str, *, create_seconds: float = 60, reboot_seconds: float = 0, port: int = 0):
        self.moto = urllib.parse.urlsplit(moto_url)
        self.create_seconds, self.reboot_seconds = create_seconds, reboot_seconds
        self.busy_until: dict[str, tuple[str, float]] = {}  # identifier -> (status, until)
        self.calls: list[tuple[float, str]] = []  # (time, Action) of every call, for the benches
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="slow-rds", daemon=True)

    def __enter__(self) -> SlowRds:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def note(self, body: bytes) -> None:
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        action, identifier = form.get("Action", [""])[0], form.get("DBInstanceIdentifier", [""])[0]
        with self._lock:
            self.calls.append((time.monotonic(), action))
            if action == "CreateDBInstance" and self.create_seconds:
                self.busy_until[identifier] = ("creating", time.monotonic() + self.create_seconds)
            elif action == "RebootDBInstance" and self.reboot_seconds:
                self.busy_until[identifier] = ("rebooting", time.monotonic() + self.reboot_seconds)

    def rewrite(self, answer: bytes) -> bytes:
        now = time.monotonic()
        with self._lock:
            busy = {name: status for name, (status, until) in self.busy_until.items() if until > now}
        if not busy:
            return answer

        def slow(match: re.Match) -> bytes:
            block = match.group(0)
            found = _IDENTIFIER.search(block)
            status = busy.get(found.group(1).decode()) if found else None
            return _STATUS.sub(f"<DBInstanceStatus>{status}</DBInstanceStatus>".encode(), block) if status else block

        return _INSTANCE.sub(slow, answer)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._forward()

            def do_GET(self) -> None:
                self._forward()

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.note(body)
                upstream = http.client.HTTPConnection(proxy.moto.hostname, proxy.moto.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                answer = response.read()
                if b"DescribeDBInstancesResponse" in answer[:200]:
                    answer = proxy.rewrite(answer)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                upstream.close()

        return Handler
