"""Starting, joining and inspecting a Ray session for the Ray runtime (loopback-only by default).

A *local* session (``runtime.address: null``) is a fresh single-node Ray instance that

- binds every socket of every Ray process to 127.0.0.1 (the node IP is the loopback address:
  Ray would otherwise replace ``127.0.0.1`` by the machine's routable IP and listen on it);
- starts no dashboard, reports no usage statistics, logs warnings only;
- keeps all its files (sockets, logs, spill) in a fresh ``tempfile.mkdtemp`` (mode 0700; Ray's
  own folders inside it are 0777, but unreachable to other users) removed at close; a folder
  left by a killed driver is removed, with the Ray processes still using it, by a small
  watchdog process that sees the driver end (``_start_watchdog``), or else at the next local
  start (``clean_dead_sessions``);
- takes SIGTERM back from Ray's C++ handler, so that it stops a run like Ctrl-C;
- writes nothing to ``$HOME``: Ray's token authentication stays on, but with a per-process random
  token passed through the environment (``RAY_AUTH_TOKEN``) instead of ``~/.ray/auth_token``.

Joining a cluster (``runtime.address: HOST:PORT``) leaves all of that to whoever ran
``ray start``; see docs/ray.md.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # vectors are small; do not reserve 30 % of RAM
# Replies up to this size go straight to the caller instead of through the object store (Ray's
# default is 100 KiB). An actor hosting 5 workers reports 5 gradient sums in one reply (200 KB
# for a Reacher policy); through the store each such reply took a few ms more to reach the
# driver, a sizeable part of a short round (docs/ray.md, "Speed on short trajectories").
INLINE_REPLY_BYTES = 1024 * 1024

# Ray replaces a node IP of 127.0.0.1 by the machine's routable IP unless "clusters" are disabled
# (ray._private.ray_constants.ENABLE_RAY_CLUSTER, read from this variable at import).
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_RAY_PROCESS = re.compile(r"raylet|gcs_server|^ray::|default_worker|dashboard|runtime_env")
SHUTDOWN_GRACE = 5.0  # seconds Ray's processes get to exit by themselves before they are killed


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    # Ray announces at every start that token authentication is on (apga wants it on): not a
    # warning that needs the user. Set once: setLevel clears every logger's cache, and the Ray
    # runtime imports through here several times per round.
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if quiet.level != logging.ERROR:
        quiet.setLevel(logging.ERROR)
    return ray


@contextmanager
def _loopback_node_ip():
    """Keep 127.0.0.1 as the node IP while Ray starts or connects: in this process (the constant)
    and in the processes it spawns now (the environment; workers inherit it from the raylet)."""
    from ray._private import ray_constants
    saved_const, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(_CLUSTER_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTER_ENV] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env


@dataclass
class Session:
    """A Ray connection opened by apga. ``owned``: apga started the cluster (and removes it)."""

    owned: bool
    address: str | None
    temp_dir: str | None
    watchdog: object = None  # subprocess.Popen of the folder's watchdog (local sessions)

    def close(self) -> None:
        import ray
        # A worker process busy at shutdown (e.g. still importing torch on a loaded machine) can
        # outlive its raylet by minutes, reparented to init; note the session's processes first,
        # so that they can be reaped after the shutdown.
        procs = ray_processes() if self.owned else []
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            _reap(procs)
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = None
            if self.watchdog is not None:  # nothing left to clean: let it go
                watchdog, self.watchdog = self.watchdog, None
                try:
                    watchdog.stdin.close()
                    watchdog.wait(timeout=SHUTDOWN_GRACE)
                except Exception:  # noqa: BLE001 - it cleans nothing by now; never block the close
                    pass


def _terminate(signum, frame):
    from apga.errors import Terminated
    raise Terminated()


def _handle_sigterm() -> None:
    """After ray.init: Ray's C++ failure handler has taken SIGTERM and would print a stack dump
    and exit 1. Take it back: SIGTERM then stops the run like Ctrl-C (checkpointed, Ray shut
    down, exit 143). Only the main thread may set handlers; elsewhere Ray's stays."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


# ----------------------------------------------------------------------------- dead sessions
TEMP_PREFIX = "apga-ray-"
OWNER_FILE = "apga-owner"  # "PID START_TICKS" of the driver that made the session


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): a pid
    and its start time name one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_owner(temp_dir: str) -> None:
    pid = os.getpid()
    with open(os.path.join(temp_dir, OWNER_FILE), "w") as f:
        f.write(f"{pid} {_start_ticks(pid)}\n")


def _dead_owner(temp_dir: str) -> bool:
    try:
        with open(os.path.join(temp_dir, OWNER_FILE)) as f:
            pid, ticks = f.read().split()
    except (OSError, ValueError):
        return False  # no owner recorded (yet): not ours to judge
    return _start_ticks(int(pid)) != ticks


def clean_dead_sessions(root: str | None = None) -> list[str]:
    """Remove what a killed apga driver left (SIGKILL runs no cleanup): for each of this user's
    private ``apga-ray-*`` folders whose recorded driver is gone, kill the Ray processes still
    using the folder (GCS, raylet, agents, workers), then delete it. Live sessions, other users'
    folders and folders without an owner record are left alone. Returns the folders removed."""
    import stat
    root = root or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not _dead_owner(path):
            continue
        _cleanup(path)
        removed.append(path)
    return removed


def _uses(pid: int, cmdline: list, path: str) -> bool:
    """Whether a process names ``path`` on its command line (GCS, raylet, workers) or holds a
    file under it open (the agents, whose command line Ray rewrites to ``ray::DashboardAgent``)."""
    if any(path in arg for arg in cmdline or []):
        return True
    prefix = path.rstrip("/") + "/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _users_of(path: str) -> list[int]:
    """This user's processes (other than this one) that use ``path``, read from /proc (stdlib
    only: the watchdog runs this without Ray's psutil)."""
    me, uid = os.getpid(), os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if _uses(int(name), cmdline, path):
            found.append(int(name))
    return found


def _kill_users_of(path: str, grace: float = SHUTDOWN_GRACE) -> None:
    """SIGKILL this user's processes that use the session folder ``path``, until none is left."""
    import signal
    import time
    deadline = time.monotonic() + grace
    while True:
        pids = _users_of(path)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def _cleanup(temp_dir: str) -> None:
    _kill_users_of(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _start_watchdog(temp_dir: str):
    """A small process that outlives a killed driver: it waits for the end of a pipe from this
    process (the kernel closes it however the driver ends, SIGKILL included), then kills what
    still uses the session folder and removes it. Ray's agents would otherwise linger for minutes
    and the folder forever. It runs in its own session, so Ctrl-C in the terminal does not stop it."""
    import json
    import subprocess
    import sys
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[2]); "
            "from apga.runtime.ray_session import _watch; _watch(sys.argv[1])")
    try:
        return subprocess.Popen([sys.executable, "-c", code, temp_dir, json.dumps(sys.path)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:
        return None  # no watchdog: the next local start cleans up instead (clean_dead_sessions)


def _watch(temp_dir: str) -> None:
    import sys
    sys.stdin.buffer.read()  # returns when the driver is gone (or closed the pipe at its close())
    if os.path.isdir(temp_dir):
        _cleanup(temp_dir)


def start_local(num_cpus: int | None = None) -> Session:
    """Start a fresh loopback-only single-node Ray instance (see the module docstring)."""
    ray = _import_ray()
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # Ray makes its temp dir and session folder mode 0777 (no sticky bit). It gets a folder
    # inside a private 0700 one, so no other user can reach, plant or replace anything there.
    clean_dead_sessions()
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    watchdog = None
    try:
        os.chmod(temp_dir, 0o700)
        _write_owner(temp_dir)
        watchdog = _start_watchdog(temp_dir)
        with _loopback_node_ip():
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                configure_logging=True,
                logging_level="warning",
                log_to_driver=False,
                _node_ip_address=LOOPBACK,
                _temp_dir=os.path.join(temp_dir, "ray"),
                _system_config={"max_direct_call_object_size": INLINE_REPLY_BYTES},
            )
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed after Ray started some of its processes: stop
        # them too. Removing the folder first would leave them running, and the watchdog, which
        # finds them through the folder, with nothing to find.
        try:
            ray.shutdown()
        except Exception:  # a half-started instance: what is left is killed below
            pass
        _cleanup(temp_dir)
        if watchdog is not None:
            watchdog.stdin.close()
        raise
    _handle_sigterm()
    return Session(True, None, temp_dir, watchdog)


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse, before a run writes anything, a ``runtime.address`` that nothing answers at:
    ``ray.init`` would otherwise retry for minutes after the run directory exists."""
    from apga.errors import ApgaError
    if address == "auto":  # the cluster `ray start` recorded on this machine: find its address
        _import_ray()
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # another Ray version: ray.init will tell
            return
        try:
            address = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise ApgaError("runtime.address: auto finds no running Ray cluster on this machine; start one with "
                            "`ray start --head`, or set runtime.address: null for a local run") from None
        if not address:
            return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ApgaError(f"runtime.address: expected HOST:PORT of a running Ray head (ray start --head), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ApgaError(f"runtime.address: nothing answers at {address!r} ({exc.strerror or exc}); "
                        "start the head with `ray start --head`, or set runtime.address: null for a local run") from None


def join(address: str) -> Session:
    """Connect this process, as a driver, to a running cluster (``ray start --head``)."""
    ray = _import_ray()
    kwargs = dict(address=address, configure_logging=True, logging_level="warning", log_to_driver=False)
    from apga.errors import ApgaError
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if address == "auto":  # the cluster `ray start` recorded on this machine
        ray.init(**kwargs)
        _handle_sigterm()
        return Session(False, address, None)
    if not host or not port.isdigit():
        raise ApgaError(f"runtime.address: expected HOST:PORT of a running Ray head (ray start --head), got {address!r}")
    try:  # fail fast: ray.init would retry for minutes
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ApgaError(f"runtime.address: nothing answers at {address!r} ({exc.strerror or exc}); "
                        "start the head with `ray start --head`, or set runtime.address: null for a local run") from None
    try:
        # As Ray does for address="auto": a token in RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token
        # switches this driver to token authentication (Ray would not for an explicit address).
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:  # an older Ray without token authentication
        pass
    try:
        if is_loopback(host) or host == "localhost":  # a cluster on this machine's loopback interface
            with _loopback_node_ip():
                ray.init(_node_ip_address=LOOPBACK, **kwargs)
        else:
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ApgaError(f"runtime.address: cannot join the Ray cluster at {address!r} ({first}); "
                        "start it with `ray start --head`, or set runtime.address: null for a local run") from None
    _handle_sigterm()
    return Session(False, address, None)


def open_session(address: str | None, num_cpus: int | None = None) -> Session | None:
    """A session for the runtime: None if this process is already connected to Ray (a caller,
    e.g. a test fixture, owns it); else a new local instance or a connection to ``address``."""
    ray = _import_ray()
    if ray.is_initialized():
        return None
    return join(address) if address else start_local(num_cpus)


# ----------------------------------------------------------------------------- inspection
def is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _psutil():
    _import_ray()  # Ray ships psutil in its thirdparty_files, on sys.path once ray is imported
    import psutil
    return psutil


def session_processes(root_pid: int | None = None):
    """The driver and every process it started (GCS, raylets, agents, workers, actors)."""
    psutil = _psutil()
    root = psutil.Process(root_pid or os.getpid())
    return [root] + root.children(recursive=True)


def is_ray_process(p) -> bool:
    try:
        return bool(_RAY_PROCESS.search(p.name() + " " + " ".join(p.cmdline())))
    except Exception:  # gone, zombie or not ours
        return False


def ray_processes(root_pid: int | None = None):
    """The Ray processes (GCS, raylets, agents, workers, actors) started by this process."""
    return [p for p in session_processes(root_pid)[1:] if is_ray_process(p)]


def _reap(procs, grace: float = SHUTDOWN_GRACE) -> None:
    """Wait up to ``grace`` seconds for ``procs`` to exit, then kill the ones still running."""
    if not procs:
        return
    psutil = _psutil()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def inet_sockets(processes) -> list[dict]:
    """Every TCP/UDP socket of ``processes``: pid, name, status, local and remote address."""
    psutil = _psutil()
    out = []
    for p in processes:
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        for c in conns:
            out.append({
                "pid": p.pid, "name": name, "status": c.status,
                "local": c.laddr.ip if c.laddr else None, "local_port": c.laddr.port if c.laddr else None,
                "remote": c.raddr.ip if c.raddr else None,
            })
    return out


def non_loopback_sockets(processes=None) -> list[dict]:
    """Sockets of the session's processes bound or connected to anything but the loopback address."""
    socks = inet_sockets(processes if processes is not None else session_processes())
    return [s for s in socks if not (s["local"] is None or is_loopback(s["local"]))
            or (s["remote"] is not None and not is_loopback(s["remote"]))]
