"""The lifecycle the local fakes share: listen on 127.0.0.1 at an OS-chosen port, serve in the background,
stop at once; `endpoint`, and use as a context manager.

- `LocalFake`: `port`, `endpoint` and the context manager, for any server (GoogleGrpcFake uses it alone).
- `HttpFake`: a `ThreadingHTTPServer` on a daemon thread. A subclass names its `handler_class` (and
  `server_class` for socket options such as `request_queue_size`); handlers reach the fake as
  `self.server.fake`.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

HOST = "127.0.0.1"


class LocalFake:
    """A fake server on 127.0.0.1; `port` is None until start() binds one.

    Use as a context manager, or call start() and stop().
    """

    def __init__(self) -> None:
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:PORT`, where a provider's endpoint should point, once started."""
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://{HOST}:{self.port}"

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FakeServer(ThreadingHTTPServer):
    """One thread per connection; `fake` is the HttpFake it serves."""

    daemon_threads = True  # a handler still sleeping (hang and timeout tests) must not block stop()
    fake: HttpFake


class FakeHandler(BaseHTTPRequestHandler):
    """Quiet, and keep-alive as the SDKs' pooled connections expect: every answer must carry
    Content-Length."""

    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet test output


class HttpFake(LocalFake):
    """A `server_class` serving `handler_class` on a background daemon thread."""

    handler_class: ClassVar[type[BaseHTTPRequestHandler]]
    server_class: ClassVar[type[FakeServer]] = FakeServer
    thread_name: ClassVar[str] = "http-fake"
    poll_interval: ClassVar[float] = 0.05  # how soon stop()'s shutdown is noticed

    def __init__(self) -> None:
        super().__init__()
        self._server: FakeServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind an OS-chosen port and serve in a background thread; a no-op when already started."""
        if self._server is None:
            server = self.server_class((HOST, 0), self.handler_class)
            server.fake = self
            self._server = server
            self.port = server.server_address[1]
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": self.poll_interval},
                name=self.thread_name,
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; requests still sleeping in handlers are abandoned (daemon
        threads)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        self.port = None
