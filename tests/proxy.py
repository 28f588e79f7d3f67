"""A TCP proxy on loopback in front of a real server, for tests of a server that hangs or
answers slowly."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

from tests.conftest import free_port


class BlackHoleProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream``.

    ``hang()`` makes it a server that hangs: new connections are accepted and their requests
    read but never answered, and open connections go silent at their next byte. ``forward()``
    serves new connections again; the silent ones stay silent until their client gives up.
    ``delay(seconds, when)`` holds each piece of a request for which ``when(data)`` is true
    that long before passing it on (a server that is slow to take some requests). Loopback only, at most ``MAX_CONNECTIONS`` at once; it closes itself after
    ``lifetime_s``.
    """

    MAX_CONNECTIONS = 64

    def __init__(self, upstream: int, lifetime_s: float = 300.0) -> None:
        self.upstream, self.port = upstream, free_port()
        self._delay: tuple[float, Callable[[bytes], bool]] | None = None
        self._hanging = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        self._timer = threading.Timer(lifetime_s, self.close)
        self._timer.daemon = True
        self._timer.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def delay(self, seconds: float, when: Callable[[bytes], bool]) -> None:
        self._delay = (seconds, when)

    def hang(self) -> None:
        self._hanging.set()

    def forward(self) -> None:
        self._hanging.clear()

    def close(self) -> None:
        self._timer.cancel()
        _close(self._listener)
        with self._lock:
            socks, self._socks = self._socks, set()
        for sock in socks:
            _close(sock)

    def _track(self, *socks: socket.socket) -> bool:
        with self._lock:
            if len(self._socks) + len(socks) > self.MAX_CONNECTIONS:
                return False
            self._socks.update(socks)
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._hanging.is_set():
                if self._track(client):
                    threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                else:
                    _close(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            if not self._track(client, server):
                _close(client)
                _close(server)
                continue
            silent = threading.Event()  # this connection hung: nothing passes any more
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, upstream, silent), daemon=True
                ).start()

    def _swallow(self, client: socket.socket) -> None:
        """Read a connection accepted while hanging until its client gives up."""
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self._untrack(client)

    def _pump(self, src, dst, upstream: bool, silent: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if upstream and self._delay and self._delay[1](data):
                    time.sleep(self._delay[0])
                if self._hanging.is_set():
                    silent.set()
                if not silent.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        if upstream or not silent.is_set():
            self._untrack(src, dst)
        # else: the server closed a silent connection; its client still hears nothing

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.difference_update(socks)
        for sock in socks:
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
