"""A TCP proxy in front of a real server that fails on request, the way a network does.

It forwards bytes both ways, one thread per connection, and on request:

- loses the next answer: the request reaches the server and is processed, then the proxy
  closes the client's connection instead of passing the answer on;
- answers the next request itself (a canned 503, as an overloaded gateway would) without
  forwarding it;
- cuts every open connection, as a dropped Wi-Fi link does to a long-lived event stream.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HEADER_END = b"\r\n\r\n"


class FaultyProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._lose = 0
        self._canned: list[bytes] = []
        self._open: set[socket.socket] = set()
        self._closed = False
        self.lost = 0  # answers lost so far
        self.answered = 0  # requests answered by the proxy itself
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_next_answer(self) -> None:
        with self._lock:
            self._lose += 1

    def answer_next(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        head = [f"HTTP/1.1 {status} Injected", f"content-length: {len(body)}", "connection: close"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        with self._lock:
            self._canned.append(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def cut(self) -> None:
        """Drop every open connection (new ones are accepted as before)."""
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed by its own thread meanwhile

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self._lock:
            self._open |= {client, upstream}
        try:
            while not self._closed:
                readable, _, _ = select.select([client, upstream], [], [], 0.2)
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    canned = self._take_canned()
                    if canned is not None:
                        _read_request(client, data)
                        client.sendall(canned)
                        return
                    upstream.sendall(data)
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    if self._take_lose():
                        return  # the server answered; the client never hears it
                    client.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open -= {client, upstream}
            client.close()
            upstream.close()

    def _take_canned(self) -> bytes | None:
        with self._lock:
            if not self._canned:
                return None
            self.answered += 1
            return self._canned.pop(0)

    def _take_lose(self) -> bool:
        with self._lock:
            if not self._lose:
                return False
            self._lose -= 1
            self.lost += 1
            return True


def _read_request(sock: socket.socket, data: bytes) -> None:
    """Read the rest of the request that ``data`` starts, so closing the socket sends FIN, not RST."""
    while HEADER_END not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(HEADER_END)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)


@contextmanager
def faulty_proxy(upstream_port: int) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()
