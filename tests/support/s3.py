"""A moto S3 endpoint on 127.0.0.1 that counts what it serves: for tests that prove who reads how much."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


@dataclass(frozen=True)
class Served:
    method: str
    path: str  # /bucket/key
    range: str | None  # the Range header, if any
    bytes: int  # of the response body


class CountingS3Server(ThreadedMotoServer):
    """moto's S3, recording every request it answers in `served` (clear it between phases of a test)."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 0, verbose=False)
        self.served: list[Served] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            body = list(app(environ, start_response))
            record = Served(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE"),
                            sum(len(chunk) for chunk in body))  # fmt: skip
            with self._lock:
                self.served.append(record)
            return body

        self._server = make_server(self._ip_address, self._port, counting, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    def gets(self, suffix: str = "") -> list[Served]:
        with self._lock:
            return [s for s in self.served if s.method == "GET" and s.path.endswith(suffix) and "?" not in s.path]
