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
the actor is lost, Ray restarts it, and the driver connects to the new incarnation). A node
that vanishes without closing its sockets (a crash, a cut cable) is found by TCP keepalive and
``TCP_USER_TIMEOUT``: within about :data:`DEAD_PEER` seconds every call on the link fails the
same way. A call that raised in the actor fails with :class:`RemoteError`, carrying the
exception's last line. A connection that cannot be made (nothing listens, a firewall, a wrong
key, a peer gone during the handshake) raises :class:`LinkRefused`, an ``OSError``, within the
connect timeout.

Only the handshake is authenticated; the messages after it are neither signed nor encrypted,
as Ray's own are not without TLS. With Ray's TLS on (``RAY_USE_TLS``), the runtime does not use
links (apga.runtime.ray_runtime).
"""
from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.connection import wait as wait_readable

# The worker actor's methods a link may call (nothing else is dispatched).
CALLS = frozenset({"begin_all", "progress", "halt", "extend", "resume", "allreduce"})
HANDSHAKE = 10.0  # seconds the HMAC challenge may take on either side
DEAD_PEER = 30  # seconds after which a silent peer counts as gone (keepalive, unacknowledged data)


class LinkLost(ConnectionError):
    """The actor's end of the link closed (its process died) or went silent (its node did)."""


class LinkRefused(ConnectionError):
    """No link could be made (the runtime then calls that actor through Ray)."""


class RemoteError(RuntimeError):
    """The called method raised in the actor."""


def _timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel send / receive timeouts on a blocking socket (0: none); a Connection built on the
    descriptor keeps them."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _tune(sock: socket.socket) -> None:
    """TCP_NODELAY: a message over 16 KiB goes out as a header and a body, and with Nagle's
    algorithm against the peer's delayed ACK the body waited 40 ms (a 41 KB call took 88 ms).
    Keepalive and TCP_USER_TIMEOUT: a peer that vanished without closing is found."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4),
                        ("TCP_USER_TIMEOUT", DEAD_PEER * 1000)):
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _handshake(sock: socket.socket, authkey: bytes, server: bool) -> Connection:
    """The HMAC challenge both ways (multiprocessing's), bounded by HANDSHAKE seconds."""
    sock.setblocking(True)
    _timeouts(sock, HANDSHAKE)
    _tune(sock)
    conn = Connection(sock.detach())
    try:
        if server:
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
        else:
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
        with socket.socket(fileno=conn.fileno()) as view:  # a view of the descriptor, detached below
            _timeouts(view, 0.0)
            view.detach()
        return conn
    except BaseException:
        conn.close()
        raise


class LinkServer:
    """The actor's end: serves :data:`CALLS` on ``target`` for every connection it accepts."""

    def __init__(self, target, host: str, authkey: bytes, threads: int):
        self.target, self.authkey = target, authkey
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.address = self.sock.getsockname()[:2]
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="apga-link")
        self.closed = False
        threading.Thread(target=self._accept, name="apga-link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # closed, or out of descriptors for a moment
                time.sleep(0.05)
                continue
            # each connection's handshake on its own thread: a peer that never answers holds up no other
            threading.Thread(target=self._serve, args=(sock,), name="apga-link-read", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            conn = _handshake(sock, self.authkey, server=True)
        except (OSError, EOFError, AuthenticationError):  # a wrong key, a silent or vanished peer
            return
        lock = threading.Lock()  # replies come from several pool threads
        while True:
            try:
                call_id, method, args, reply = conn.recv()
                self.pool.submit(self._run, conn, lock, call_id, method, args, reply)
            except Exception:  # the driver went away, sent what is not a call, or the server closed
                conn.close()
                return

    def _run(self, conn, lock, call_id: int, method: str, args: tuple, reply: bool) -> None:
        try:
            if method not in CALLS:
                raise ValueError(f"{method!r} cannot be called over the link")
            out = (call_id, True, getattr(self.target, method)(*args))
        except BaseException as exc:  # reported to the driver, as a Ray task error would be
            text = str(exc).strip().splitlines()
            out = (call_id, False, f"{type(exc).__name__}: {text[-1] if text else ''}")
        if not reply:
            return
        with lock:
            try:
                conn.send(out)
            except OSError:  # the driver went away
                pass
            except Exception as exc:  # the reply cannot be pickled: say so rather than never answer
                try:
                    conn.send((call_id, False, f"the reply to {method} cannot be sent: {type(exc).__name__}: {exc}"))
                except Exception:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class Call:
    """One call in flight on a link (hashable by identity, like a Ray ObjectRef)."""

    __slots__ = ("link", "id", "done", "ok", "value")

    def __init__(self, link: "Link", call_id: int):
        self.link, self.id = link, call_id
        self.done, self.ok, self.value = False, False, None

    def result(self):
        """The reply; raises :class:`LinkLost` or :class:`RemoteError` for a failed call."""
        assert self.done
        if self.ok:
            return self.value
        raise self.value


class Link:
    """The driver's end of one actor's link."""

    def __init__(self, address, authkey: bytes, timeout: float = HANDSHAKE, incarnation: str | None = None):
        self.address = tuple(address)
        self.conn = _connect(self.address, authkey, timeout)
        self.ids = itertools.count()
        self.open: dict[int, Call] = {}
        self.lost = False
        self.incarnation = incarnation  # the actor incarnation this link leads to (the runtime's record)

    def call(self, method: str, *args, reply: bool = True) -> Call:
        """Send a call; with ``reply=False`` the actor sends nothing back (the Call is done at once)."""
        c = Call(self, next(self.ids))
        if self.lost:
            self._fail(c)
            return c
        if reply:
            self.open[c.id] = c
        else:
            c.done, c.ok = True, True
        try:
            self.conn.send((c.id, method, args, reply))
        except OSError:
            self._lose()
            if not reply:
                self._fail(c)
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
        except Exception:  # closed, reset, timed out mid-message, or not a reply
            self._lose()
            return
        c = self.open.pop(call_id, None)
        if c is not None:
            c.done, c.ok, c.value = True, ok, value if ok else RemoteError(value)

    def close(self) -> None:
        if not self.lost:
            self._lose()


def _connect(address, authkey: bytes, timeout: float) -> Connection:
    """A connection to a LinkServer (listening before its address is known, so a refusal is
    final), or LinkRefused within about ``timeout`` seconds."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
        return _handshake(sock, authkey, server=False)
    except ConnectionRefusedError:
        raise LinkRefused(f"nothing answers at {address}") from None
    except AuthenticationError:
        raise LinkRefused(f"{address} refused the key (authentication failed)") from None
    except (OSError, EOFError) as exc:  # a timeout (a firewall), a peer gone during the handshake
        raise LinkRefused(f"no link to {address}: {type(exc).__name__}: {exc}") from None


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
