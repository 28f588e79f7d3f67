"""A TCP proxy in front of a local server that can go down and come back (an outage of the
object store without losing the server's state: moto keeps its buckets in memory) or be slow."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

from tests.conftest import free_port


class FlakyProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream``.

    ``down()`` refuses new connections and cuts the open ones (requests in flight fail);
    ``up()`` serves again. ``cut_when(pattern, seconds)`` arms a trigger: the first
    client->server chunk containing ``pattern`` is forwarded (the start of that request
    reaches the server) and then the proxy goes down for ``seconds``. ``delay(seconds, when)``
    holds each client->server chunk for which ``when(chunk)`` is true that long before passing
    it on: a server slow to take some requests.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream, self.port = upstream, free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._trigger: tuple[bytes, float] | None = None
        self._skip = 0
        self._delay: tuple[float, Callable[[bytes], bool]] | None = None
        self.triggered = threading.Event()
        self.outages: list[tuple[float, float]] = []  # (start, end) monotonic times
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
            if self.outages and self.outages[-1][1] == 0.0:
                self.outages[-1] = (self.outages[-1][0], time.monotonic())
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            if listener is not None:
                self.outages.append((time.monotonic(), 0.0))
        if listener is not None:
            listener.close()
        for conn in conns:
            _close(conn)

    def outage(self, seconds: float) -> None:
        """Down now, up again after ``seconds`` (in the background)."""
        self.down()
        threading.Timer(seconds, self.up).start()

    def cut_when(self, pattern: bytes, seconds: float, skip: int = 0) -> None:
        """Arm the trigger; the first ``skip`` matching chunks pass through untouched."""
        with self._lock:
            self._trigger, self._skip = (pattern, seconds), skip

    def delay(self, seconds: float, when: Callable[[bytes], bool]) -> None:
        self._delay = (seconds, when)

    def close(self) -> None:
        self._trigger = None
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    _close(client)
                    _close(server)
                    return
                self._conns |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _fires(self, data: bytes) -> bool:
        with self._lock:
            if self._trigger is None or self._trigger[0] not in data:
                return False
            if self._skip > 0:
                self._skip -= 1
                return False
            self._cut_seconds, self._trigger = self._trigger[1], None
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self._delay and self._delay[1](data):
                    time.sleep(self._delay[0])
                if upstream and self._fires(data):
                    dst.sendall(data[: len(data) // 2 or 1])
                    self.triggered.set()
                    self.outage(self._cut_seconds)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
