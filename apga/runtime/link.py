"""A direct request/reply link between the Ray runtime's driver and one worker actor.

Why: the calls of a round (begin, the progress long poll, halt, AllReduce) sit on its critical
path, and a Ray actor call costs 1.0-1.7 ms round trip on the 2-core machine apga is
benchmarked on (p90 up to 7.9 ms with both cores busy computing), a call over this link
0.06-0.28 ms (``python benchmarks/call_latency.py``; figures in benchmarks/README.md). A
Reacher-v5 round lasts 20-30 ms and makes three such calls one after the other.

The link is :mod:`multiprocessing.connection` over TCP: the actor listens on its node's IP
(a port the OS picks) with an HMAC challenge on a per-run secret key that the driver hands
to the actor through Ray, so only the driver that started the actor can talk to it; messages
are pickled, as Ray's own are. Each call runs on a thread of the actor's pool, so calls run
concurrently as Ray's threaded-actor calls do (a long poll does not hold up a halt). The
methods a link may call are listed in :data:`CALLS`.

Failures: when the actor's process dies its socket closes, and every call still open on the
link fails with :class:`LinkLost` at once (the driver treats it as Ray's ``RayActorError``:
the actor is lost, Ray restarts it, and the driver connects to the new incarnation). A call
that raised in the actor fails with :class:`RemoteError`, carrying the exception's last line.
"""
from __future__ import annotations

import itertools
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client, Listener
from multiprocessing.connection import wait as wait_readable

# The worker actor's methods a link may call (nothing else is dispatched).
CALLS = frozenset({"begin_all", "progress", "halt", "extend", "resume", "allreduce"})


class LinkLost(ConnectionError):
    """The actor's end of the link closed (its process died)."""


class RemoteError(RuntimeError):
    """The called method raised in the actor."""


class LinkServer:
    """The actor's end: serves :data:`CALLS` on ``target`` for every connection it accepts."""

    def __init__(self, target, host: str, authkey: bytes, threads: int):
        self.target = target
        self.listener = Listener((host, 0), family="AF_INET6" if ":" in host else "AF_INET", authkey=authkey)
        self.address = self.listener.address
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="apga-link")
        self.closed = False
        threading.Thread(target=self._accept, name="apga-link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn = self.listener.accept()  # the HMAC challenge runs here: a wrong key never gets a connection
            except Exception:  # a failed handshake, or the listener closed
                continue
            _no_delay(conn)
            threading.Thread(target=self._serve, args=(conn,), name="apga-link-read", daemon=True).start()

    def _serve(self, conn) -> None:
        lock = threading.Lock()  # replies come from several pool threads
        while True:
            try:
                call_id, method, args = conn.recv()
            except Exception:  # the driver went away (or sent what is not a call): drop the connection
                conn.close()
                return
            self.pool.submit(self._run, conn, lock, call_id, method, args)

    def _run(self, conn, lock, call_id: int, method: str, args: tuple) -> None:
        try:
            if method not in CALLS:
                raise ValueError(f"{method!r} cannot be called over the link")
            reply = (call_id, True, getattr(self.target, method)(*args))
        except Exception as exc:  # reported to the driver, as a Ray task error would be
            text = str(exc).strip().splitlines()
            reply = (call_id, False, f"{type(exc).__name__}: {text[-1] if text else ''}")
        with lock:
            try:
                conn.send(reply)
            except OSError:  # the driver went away
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class Call:
    """One call in flight on a link (hashable by identity, like a Ray ObjectRef)."""

    __slots__ = ("link", "id", "done", "ok", "value", "sent")

    def __init__(self, link: "Link", call_id: int):
        self.link, self.id = link, call_id
        self.done, self.ok, self.value = False, False, None
        self.sent = time.monotonic()

    def result(self):
        """The reply; raises :class:`LinkLost` or :class:`RemoteError` for a failed call."""
        assert self.done
        if self.ok:
            return self.value
        raise self.value


class Link:
    """The driver's end of one actor's link."""

    def __init__(self, address, authkey: bytes, timeout: float = 10.0):
        self.address = tuple(address)
        self.conn = _connect(self.address, authkey, timeout)
        self.ids = itertools.count()
        self.open: dict[int, Call] = {}
        self.lost = False

    def call(self, method: str, *args) -> Call:
        c = Call(self, next(self.ids))
        if self.lost:
            self._fail(c)
            return c
        self.open[c.id] = c
        try:
            self.conn.send((c.id, method, args))
        except OSError:
            self._lose()
        return c

    def _fail(self, c: Call) -> None:
        c.done, c.ok, c.value = True, False, LinkLost(f"link to {self.address} closed")

    def _lose(self) -> None:
        self.lost = True
        for c in self.open.values():
            self._fail(c)
        self.open.clear()
        try:
            self.conn.close()
        except OSError:
            pass

    def _read(self) -> None:
        """Take one reply (the connection is readable)."""
        try:
            call_id, ok, value = self.conn.recv()
        except (EOFError, OSError):
            self._lose()
            return
        c = self.open.pop(call_id, None)
        if c is not None:
            c.done, c.ok, c.value = True, ok, value if ok else RemoteError(value)

    def close(self) -> None:
        if not self.lost:
            self._lose()


def _no_delay(conn) -> None:
    """TCP_NODELAY: a message over 16 KiB goes out as a header and a body, and with Nagle's
    algorithm against the peer's delayed ACK the body waited 40 ms (a 41 KB call took 88 ms)."""
    sock = socket.socket(fileno=conn.fileno())  # a view of the connection's socket, not its own
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


def _connect(address, authkey: bytes, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Client has no timeout: where a firewall drops the packets it would hang for minutes,
            # so a bare connection must answer first (the listener drops it at the challenge).
            socket.create_connection(address, timeout=max(1.0, deadline - time.monotonic())).close()
            conn = Client(address, family="AF_INET6" if ":" in address[0] else "AF_INET", authkey=authkey)
            _no_delay(conn)
            return conn
        except (ConnectionRefusedError, ConnectionResetError):  # the listener is not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait(calls, timeout: float) -> list[Call]:
    """Read replies until one of ``calls`` is done or ``timeout`` seconds passed; the done ones."""
    deadline = time.monotonic() + timeout
    while True:
        done = [c for c in calls if c.done]
        if done:
            return done
        links = {c.link.conn: c.link for c in calls if not c.link.lost}
        left = deadline - time.monotonic()
        if left <= 0 or not links:
            return []
        for conn in wait_readable(list(links), left):
            links[conn]._read()
