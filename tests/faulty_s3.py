"""A real S3 server (moto's, in a thread) that answers errors to chosen requests.

It sits where a flaky or locked-down S3 endpoint would: bigmerge reaches it over HTTP
through the real s3fs/botocore stack, so what is tested is bigmerge's handling of the
errors, not a mock of it. moto's backends are process-wide, so this server sees the same
buckets as any other moto server started by the same test process.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

Environ = dict[str, Any]
RequestKey = tuple[str, str, str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_key(environ: Environ) -> RequestKey:
    """What makes two requests 'the same request': a retry repeats all of these."""
    return (
        environ["REQUEST_METHOD"],
        environ.get("PATH_INFO", ""),
        environ.get("QUERY_STRING", ""),
        environ.get("HTTP_RANGE", ""),
    )


class FaultyS3:
    """moto's S3 app behind a fault policy, set with `arm()` (none at first)."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request in the test log
        self._app = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self.arm()
        self.port = free_port()
        self._server = make_server(
            "127.0.0.1", self.port, self._wsgi, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def arm(
        self,
        *,
        fail_next: int = 0,
        match: Callable[[Environ], bool] | None = None,
        fail_each: int = 0,
        fail_always: bool = False,
        error: tuple[int, str] = (503, "ServiceUnavailable"),
    ) -> None:
        """Set the policy and clear the counters.

        - the next `fail_next` requests, whatever they are, get the error;
        - a request for which `match(environ)` holds gets it the first `fail_each` times it
          is seen (same method, path, query and Range), then goes through; with
          `fail_always`, every time.
        """
        with self._lock:
            self.fail_next = fail_next
            self.match = match or (lambda environ: False)
            self.fail_each = fail_each
            self.fail_always = fail_always
            self.status, self.code = error
            self.failed = 0
            self.log: list[RequestKey] = []
            self._seen: Counter[RequestKey] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()

    def _should_fail(self, environ: Environ) -> bool:
        key = request_key(environ)
        with self._lock:
            self.log.append(key)
            matched = self.match(environ)
            if matched:
                self._seen[key] += 1  # a failure from fail_next counts as one of its fail_each
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return matched and (self.fail_always or self._seen[key] <= self.fail_each)

    def _wsgi(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not self._should_fail(environ):
            return self._app(environ, start_response)
        # Drain the request body so that the connection stays in step, then refuse.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        elif environ.get("wsgi.input_terminated"):
            environ["wsgi.input"].read()
        with self._lock:
            self.failed += 1
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
            "<Message>injected by the test server</Message><RequestId>faulty-s3</RequestId></Error>"
        ).encode()
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""  # as S3 does: a HEAD error has only its status
        reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}.get(self.status, "Error")
        start_response(
            f"{self.status} {reason}",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body))), ("Connection", "close")],
        )
        return [body]
