"""A TCP proxy the tests put between pluginhost and PostgreSQL, to cut the
database off and bring it back without touching the shared server."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``.

    ``cut()`` resets every open connection and refuses new ones (the database
    "goes away"); ``blackhole()`` accepts connections and never answers (an
    unreachable host: clients wait for their timeout); ``stall()`` keeps every
    open connection and accepts new ones (connected to the server as usual) but
    forwards nothing in either direction (a hung network path or pgbouncer: no
    reset, no FIN, the kernel still acks what clients send); ``restore()``
    forwards again on the same port: stalled connections resume where they
    stopped, connections accepted while blackholed (they never reached the
    server) are reset, as a client's retransmitted handshake would then succeed.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._unpiped: list[socket.socket] = []  # accepted while blackholed
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def cut(self) -> None:
        with self._lock:
            self.mode = "refuse"
            self._close_listener()
            self._reset_all()

    def blackhole(self) -> None:
        with self._lock:
            self.mode = "blackhole"
            self._reset_all()
            if self._listener is None:
                self._listen()

    def stall(self) -> None:
        with self._lock:
            self.mode = "stall"
            if self._listener is None:
                self._listen()

    def restore(self) -> None:
        with self._lock:
            self.mode = "forward"
            for conn in self._unpiped:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    conn.close()
            self._unpiped.clear()
            if self._listener is None:
                self._listen()

    def close(self) -> None:
        self._stopped.set()
        with self._lock:
            self._close_listener()
            self._reset_all()
        self._thread.join(5)

    # -- internals ---------------------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.05)
        self._listener = sock

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _reset_all(self) -> None:
        for conn in self._conns:
            # shutdown() acts at once even while a pipe thread sits in select()
            # on the socket (a bare close() would wait for that select to return)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()
        self._unpiped.clear()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                self._stopped.wait(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._conns.append(client)
                if self.mode == "blackhole":
                    self._unpiped.append(client)
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=2)
                except OSError:
                    client.close()
                    continue
                self._conns.append(upstream)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        pair = {a: b, b: a}
        try:
            while not self._stopped.is_set():
                if self.mode == "stall":
                    self._stopped.wait(0.02)  # hold the bytes: nothing read, nothing sent
                    continue
                ready, _, _ = select.select(list(pair), [], [], 0.2)
                if self.mode == "stall":
                    continue  # stalled while waiting: what just arrived is held, not forwarded
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
