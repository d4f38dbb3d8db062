"""A TCP port of a host's namespace made reachable from the test process (like a port-forward).

The test addresses exist only inside the namespaces, and services bind their local API and
admin endpoint to 127.0.0.1 of their own host; `Forwarder(namespace, target)` listens on
127.0.0.1 of the test process and, for every connection, opens one to `target` from inside
the namespace, then copies bytes both ways. Only the test process's loopback and the
namespace's own addresses are involved.
"""

from __future__ import annotations

import socket
import threading

from apiary.wire import Endpoint
from net.netns import entered


class Forwarder:
    """Forwards 127.0.0.1:`local.port` (test process) to `target` inside `namespace`."""

    def __init__(self, namespace: str, target: Endpoint, connect_timeout: float = 5.0):
        self.namespace = namespace
        self.target = target
        self.connect_timeout = connect_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.local = Endpoint("127.0.0.1", self._listener.getsockname()[1])
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"forward {self.local} -> {namespace} {target}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with entered(self.namespace):
                upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                upstream.settimeout(self.connect_timeout)
                upstream.connect((self.target.host, self.target.port))
                upstream.settimeout(None)
            except OSError:
                client.close()  # the caller sees the connection refused or reset, as it would directly
                upstream.close()
                continue
            client.settimeout(None)
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stops listening and cuts every forwarded connection."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()
