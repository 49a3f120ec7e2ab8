"""The Ray runtime's direct link (apga/runtime/link.py): calls and replies, concurrency, the key,
what may be called, and a dead peer. No Ray here: the link is a socket between two processes."""
import logging
import multiprocessing as mp
import os
import socket
import threading
import time

import numpy as np
import pytest

from apga.runtime import link


class Target:
    """Stands in for a worker actor: a long poll that waits for a halt, and a failing call."""

    def __init__(self):
        self.halted = threading.Event()

    def progress(self, x):
        return x

    def begin_all(self, wait_for_halt: bool):
        if wait_for_halt:
            assert self.halted.wait(30)
        return "begun"

    def halt(self):
        self.halted.set()
        return "halted"

    def resume(self):
        raise ValueError("first line\nthe last line says what went wrong")

    def extend(self):
        return threading.Lock()  # a reply that cannot be pickled

    def info(self):  # a real method of the target, but not one a link may call
        return "secret"


def _call(ln, method, *args, timeout=30.0):
    c = ln.call(method, *args)
    assert link.wait([c], timeout) == [c]
    return c.result()


@pytest.fixture
def served():
    key = os.urandom(32)
    server = link.LinkServer(Target(), "127.0.0.1", key, threads=4)
    ln = link.Link(server.address, key)
    try:
        yield server, ln, key
    finally:
        ln.close()
        server.close()


def test_a_call_returns_its_reply_exactly(served):
    _, ln, _ = served
    x = np.random.default_rng(0).standard_normal(5_000)  # a Reacher policy's parameters: 41 KB
    y = _call(ln, "progress", x)
    assert y.dtype == x.dtype and y.tobytes() == x.tobytes()
    assert _call(ln, "progress", {"round": 3, "finishes": [0.5, 0.25]}) == {"round": 3, "finishes": [0.5, 0.25]}


def test_calls_run_concurrently_a_halt_answers_while_a_long_poll_waits(served):
    _, ln, _ = served
    poll = ln.call("begin_all", True)  # blocks in the actor until the halt
    assert link.wait([poll], 0.3) == []  # still waiting: nothing else has happened
    halt = ln.call("halt")
    done = link.wait([halt], 30)
    assert done == [halt] and halt.result() == "halted"
    assert link.wait([poll], 30) == [poll] and poll.result() == "begun"


def test_only_the_listed_methods_can_be_called_and_errors_come_back(served):
    _, ln, _ = served
    with pytest.raises(link.RemoteError, match="'info' cannot be called over the link"):
        _call(ln, "info")
    with pytest.raises(link.RemoteError, match="ValueError: the last line says what went wrong"):
        _call(ln, "resume")
    with pytest.raises(link.RemoteError, match="the reply to extend cannot be sent"):
        _call(ln, "extend")  # an answer, not a call left open for ever
    assert _call(ln, "progress", 1) == 1  # the link goes on after a failed call


def test_a_call_without_reply_is_done_at_once_and_still_runs(served):
    _, ln, _ = served
    c = ln.call("halt", reply=False)
    assert c.done and c.result() is None
    assert _call(ln, "begin_all", True) == "begun"  # it waits for the halt: the halt ran
    assert not ln.open  # nothing left waiting for a reply


def test_a_wrong_key_gets_no_connection_and_the_right_one_still_does(served):
    server, ln, key = served
    with pytest.raises(link.LinkRefused, match="authentication"):
        link.Link(server.address, os.urandom(32))
    other = link.Link(server.address, key)
    try:
        assert _call(other, "progress", 7) == 7 and _call(ln, "progress", 8) == 8
    finally:
        other.close()


def test_a_peer_silent_in_the_handshake_holds_up_no_other_connection(served):
    server, _, key = served
    silent = socket.create_connection(server.address)  # connects, never answers the challenge
    try:
        other = link.Link(server.address, key, timeout=5.0)
        assert _call(other, "progress", 9) == 9
        other.close()
    finally:
        silent.close()


def _serve_forever(key, address_queue):
    server = link.LinkServer(Target(), "127.0.0.1", key, threads=4)
    address_queue.put(server.address)
    time.sleep(600)


def test_a_dead_peer_fails_every_open_call_at_once():
    """The actor's process dies during a long poll: the call fails with LinkLost as soon as the
    socket closes (not after a timeout), and later calls fail the same way without blocking."""
    key = os.urandom(32)
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_serve_forever, args=(key, q), daemon=True)
    proc.start()
    try:
        ln = link.Link(q.get(timeout=60), key)
        poll = ln.call("begin_all", True)  # waits for a halt that never comes
        assert link.wait([poll], 0.3) == []
        proc.kill()
        assert link.wait([poll], 30) == [poll]  # 30 s only catches a hang
        with pytest.raises(link.LinkLost):
            poll.result()
        assert ln.lost
        later = ln.call("progress", 1)
        assert later.done
        with pytest.raises(link.LinkLost):
            later.result()
    finally:
        proc.kill()
        proc.join()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nobody listens on
    return port


def test_connecting_where_nothing_listens_is_refused():
    with pytest.raises(link.LinkRefused, match="nothing answers"):
        link.Link(("127.0.0.1", _closed_port()), os.urandom(32), timeout=0.3)
    assert issubclass(link.LinkRefused, OSError)


def test_the_runtime_calls_an_actor_it_cannot_link_to_through_ray(caplog):
    """No Ray needed: the runtime's connect step, given an actor whose link address refuses,
    leaves that actor without a link (its calls then go through Ray) and says so."""
    from apga.config import load_config
    from apga.run.build import build_oracle, build_runtime
    cfg = load_config({"env": {"id": "synthetic"}, "workers": {"n": 2}, "runtime": {"name": "ray"},
                       "eval": {"every": 0}})
    oracle = build_oracle(cfg)
    rt = build_runtime(cfg, oracle)
    rt._groups, rt._links, rt._authkey = [[0], [1]], [None, None], os.urandom(32)
    key = rt._authkey
    server = link.LinkServer(Target(), "127.0.0.1", key, threads=2)
    try:
        with caplog.at_level(logging.WARNING):
            rt._connect(0, {"link": ("127.0.0.1", _closed_port()), "incarnation": "a"})
            rt._connect(1, {"link": server.address, "incarnation": "b"})
        assert rt._links[0] is None and isinstance(rt._links[1], link.Link)
        assert "no direct link to the actor of workers [0]" in caplog.text and "through Ray" in caplog.text
        c = rt._send(1, "progress", 5)
        assert link.wait([c], 30) == [c] and c.result() == 5
    finally:
        for ln in rt._links:
            if ln is not None:
                ln.close()
        server.close()
        oracle.close()
