"""Hostile and absurd input (issue 13): every case ends fast with exit 2 and one line on stderr
naming the key or path, no traceback, and nothing written. The fail-fast cases run the real
`apga` executable and check time and peak memory with generous margins (they only catch a
hang or a blow-up, never a slow machine).
"""
from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import time

import pytest
import yaml

BASE = {
    "seed": 3,
    "env": {"id": "synthetic", "kwargs": {"dim": 4}},
    "algorithm": {"name": "rennala_nigt", "batch_size": 4},
    "workers": {"n": 3, "compute_time": "sqrt", "comm_time": 0.1},
    "budget": {"iterations": 6},
    "eval": {"every": 3},
    "checkpoint": {"every": 2},
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_CAP = 3 << 30  # address-space cap of the child: a regression fails instead of swapping


def snapshot(root) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.join(folder, d)] = None
        for f in files:
            p = os.path.join(folder, f)
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[p] = "special"
    return out


def apga(argv, cwd, timeout=120, env=None):
    """Run `python -m apga ARGV` under an address-space cap; returns (exit code, stdout, stderr, seconds)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    start = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "apga", *argv], cwd=cwd, env=full_env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"apga {' '.join(argv)[:200]} did not end within {timeout} s") from None
    return p.returncode, out, err, time.monotonic() - start


def check_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err[:3000]}"
    line = lines[0]
    assert line.startswith("apga: error: "), line
    assert len(line) < 1100, line[:300]
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def write(path, cfg) -> str:
    with open(path, "w") as f:
        f.write(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(path)


def expect_refused(tmp_path, argv, *words, timeout=120, env=None):
    """Run apga with ARGV ({dir} and {out} filled in) and check the clean refusal: nothing in
    tmp_path changes and the --out dir is never created."""
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)).replace("{dir}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    code, stdout, err, seconds = apga(argv, tmp_path, timeout=timeout, env=env)
    line = check_error(code, err, *words)
    assert not out.exists(), "the run directory was created"
    assert snapshot(tmp_path) == before, "something was written"
    return line, seconds


# Run by a fresh small interpreter: it forks apga and reports apga's peak RSS from wait4. (A
# child forked straight from pytest would inherit pytest's RSS as its high-water mark.)
_LAUNCHER = """
import json, os, resource, sys
cap = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    os.execv(sys.executable, [sys.executable, "-m", "apga", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024]))
"""


def _peak_rss_mb(argv, cwd) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS (MB) of one apga run under the address-space cap."""
    import json
    p = subprocess.run([sys.executable, "-c", _LAUNCHER, str(MEMORY_CAP), *argv], cwd=cwd, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    code, rss = json.loads(p.stdout.strip().splitlines()[-1])
    return code, p.stderr, rss


# --- item 1: YAML alias bombs ------------------------------------------------------------------


def _alias_bomb(levels: int) -> str:
    text = "x0: &a0 [l,l,l,l,l,l,l,l,l,l]\n"
    for i in range(1, levels + 1):
        text += f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


@pytest.mark.parametrize("levels", [8, 12])
def test_alias_bomb_refused_fast_and_small(tmp_path, levels):
    """380 bytes that expand to 10^9 values: refused before anything is built (< 2 s, < 200 MB)."""
    write(tmp_path / "bomb.yaml", _alias_bomb(levels))
    before = snapshot(tmp_path)
    start = time.monotonic()
    code, err, rss = _peak_rss_mb(["train", "bomb.yaml", "--out", "out"], tmp_path)
    seconds = time.monotonic() - start
    check_error(code, err, "bomb.yaml", "expands to more than")
    assert seconds < 20 and rss < 200, (seconds, rss)  # measured: 0.3 s, 32 MB
    assert snapshot(tmp_path) == before


def test_alias_bomb_in_set_value(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    bomb = "[" + ",".join(["&a [1,2,3,4,5,6,7,8,9,10]"] + ["*a"] * 20000) + "]"
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", f"env.kwargs.x={bomb}"],
                   "--set", "expands to more than")


@pytest.mark.parametrize("text, words", [
    ("a: &a [1, *a]\n", ["cfg.yaml", "recursive"]),
    ("env: " + "[" * 5000 + "]" * 5000 + "\n", ["cfg.yaml", "nested more than"]),
    ("env: " + "[" * 100 + "]" * 100 + "\n", ["cfg.yaml", "nested more than"]),
    ("seed: " + "9" * 5000 + "\n", ["cfg.yaml", "5000 digits"]),
    ("seed: 0x" + "f" * 5000 + "\n", ["cfg.yaml", "digits"]),
])
def test_hostile_yaml_structures(tmp_path, text, words):
    write(tmp_path / "cfg.yaml", text)
    expect_refused(tmp_path, ["train", "cfg.yaml", "--out", "{out}"], *words)


def test_small_anchors_still_work(tmp_path):
    """Ordinary use of anchors and aliases (a handful, small) is fine."""
    from apga.config import yaml_load
    cfg = yaml_load("a: &t [0.1, 0.2, 0.3]\nb: *t\nc: {<<: {k: 1}, j: 2}\n")
    assert cfg == {"a": [0.1, 0.2, 0.3], "b": [0.1, 0.2, 0.3], "c": {"k": 1, "j": 2}}


def test_huge_int_in_set(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", "seed=" + "9" * 5000],
                   "--set", "5000 digits")


# --- item 8: `apga theory` answers at once, whatever its inputs --------------------------------


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", str(10**18)], ["--batch-size", "2^50"]),
    (["--compute-time", "1e308", "--workers", "3"], ["out of float64's range", "overflow"]),
    (["--workers", str(10**7)], ["--workers", "at most"]),
    (["--eps", "1e-300"], ["eps = 1e-300", "underflows"]),
    (["--gamma", "0.9999999999"], ["batch size", "--batch-size"]),
    (["--comm-time", "1e308"], ["cannot separate consecutive completions"]),
    (["--compute-time", "1e-300,1e300", "--workers", "2"], ["2^51 gradients"]),
    (["--sigma2", "1e308"], ["overflows float64"]),
    (["--L", "1e300", "--gamma", "0.99"], ["overflows float64"]),
])
def test_theory_extreme_inputs_end_fast(tmp_path, argv, words):
    """Each of these looped forever (k + 1.0 == k), took minutes, or raised ZeroDivisionError."""
    code, out, err, seconds = apga(["theory", *argv], tmp_path, timeout=60)
    check_error(code, err, *words)
    assert out == ""
    assert seconds < 30, seconds  # measured: about 0.3 s each


def test_theory_many_workers_still_answers(tmp_path):
    code, out, err, seconds = apga(["theory", "--workers", "100000", "--format", "json"], tmp_path, timeout=60)
    assert code == 0, err
    assert '"fastest"' in out and seconds < 30  # measured: 1.7 s


def test_counts_refuse_unresolvable_times():
    from apga import theory
    with pytest.raises(ValueError, match="2\\^51"):
        theory.counts_at(1e300, [1e-300])
    with pytest.raises(ValueError, match="cannot separate"):
        theory.counts_at(1e20 + 5, [1.0], start=1e20)
    with pytest.raises(ValueError, match="2\\^50"):
        theory.rennala_round_time([1.0], 2**51)


# --- item 3: tracebacks where one line is promised ---------------------------------------------


@pytest.mark.parametrize("env_id", ["Hopper-v3", "Pusher-v4", "phys2d/CartPole-v1", "nosuchmodule:Foo-v0"])
def test_env_ids_whose_construction_raises(tmp_path, env_id):
    pytest.importorskip("gymnasium")
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", f"env.id={env_id}",
                              "--set", "env.kwargs={}"], "env.id", env_id, "could not be created")


@pytest.mark.parametrize("item, words", [
    ("workers.compute_time=1e308", ["workers.compute_time", "1e+308"]),
    ("workers.comm_time=1e308", ["workers.comm_time", "1e+308"]),
    ("workers.compute_time={shape: sqrt, scale: 1e300}", ["workers.compute_time"]),
    ("workers.compute_time={dist: exponential, mean: 1e300}", ["workers.compute_time.mean"]),
    ("workers.compute_time={schedule: [{until: 5, times: 1}, {times: 1e300}]}",
     ["workers.compute_time.schedule[1].times"]),
    ("workers.allreduce_time=1e308", ["workers.allreduce_time"]),
    ("workers.allreduce_time={bandwidth: 1e-300}", ["workers.allreduce_time"]),
])
def test_huge_finite_times_refused_up_front(tmp_path, item, words):
    """These overflowed the clock to inf after the run directory was written."""
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", item], *words)


def test_huge_time_in_a_trace(tmp_path):
    (tmp_path / "t.csv").write_text("worker,seconds\n0,1\n1,1e308\n2,1\n")
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set",
                              "workers.compute_time={trace: t.csv}"], "workers.compute_time.trace", "1e+308")


@pytest.mark.parametrize("address, words", [
    ("ray://127.0.0.1:10001", ["runtime.address", "ray://"]),
    ("127.0.0.1:1", ["runtime.address", "nothing answers"]),
    ("no-port-here", ["runtime.address", "HOST:PORT"]),
    ("auto", ["runtime.address", "no running Ray cluster"]),
])
def test_ray_address_refused_before_the_run_dir(tmp_path, address, words):
    """Ray starts lazily, at the first step: a bad address used to leave a half-made run dir."""
    pytest.importorskip("ray")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        try:
            canonicalize_bootstrap_address("auto")
            pytest.skip("a Ray cluster is running on this machine")
        except ConnectionError:
            pass
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", "runtime.name=ray",
                              "--set", f"runtime.address={address}"], *words, timeout=60)


def _tmpfs(path, options: str, why: str):
    """A tmpfs mounted at ``path`` with ``options`` for the test's duration (skipped without root)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                            capture_output=True).returncode != 0:
        pytest.skip(f"needs root and mount {why}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root ignores chmod, so a mount is the only honest read-only dir)."""
    yield from _tmpfs(tmp_path / "ro", "size=1m,ro", "to make a read-only file system")


def test_read_only_out(tmp_path, read_only_dir):
    write(tmp_path / "base.yaml", BASE)
    for out in (read_only_dir, read_only_dir / "run"):
        code, _, err, _ = apga(["train", "base.yaml", "--out", str(out)], tmp_path)
        check_error(code, err, str(out), "Read-only file system")
    assert os.listdir(read_only_dir) == []


def test_read_only_run_dir_resume(tmp_path):
    """A finished run on a file system remounted read-only: --resume refuses in one line, and
    the run's files are untouched."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    run = tmp_path / "fs"
    run.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(run)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        write(tmp_path / "base.yaml", BASE)
        code, _, err, _ = apga(["train", "base.yaml", "--out", str(run / "r"), "--quiet"], tmp_path)
        assert code == 0, err
        subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
        before = snapshot(run)
        code, _, err, _ = apga(["train", "--resume", str(run / "r")], tmp_path)
        check_error(code, err, "Read-only file system")
        assert snapshot(run) == before
    finally:
        subprocess.run(["umount", str(run)], check=True)


# --- item 2: absurd sizes and files that never end ---------------------------------------------


@pytest.mark.parametrize("item, key", [
    ("workers.n=1000000000", "workers.n"),
    ("algorithm.batch_size=1000000000", "algorithm.batch_size"),
    ("env.horizon=1000000000", "env.horizon"),
    ("policy.hidden=[100000, 100000]", "policy.hidden"),
    ("policy.rollout_batch=1000000000", "policy.rollout_batch"),
    ("runtime.processes=100000", "runtime.processes"),
])
def test_absurd_sizes_refused_up_front(tmp_path, item, key):
    """Refused from a memory estimate before anything is allocated: fast and small."""
    pytest.importorskip("gymnasium")
    cfg = dict(BASE, env={"id": "CartPole-v1"})
    write(tmp_path / "base.yaml", cfg)
    before = snapshot(tmp_path)
    start = time.monotonic()
    code, err, rss = _peak_rss_mb(["train", "base.yaml", "--out", "out", "--set", item], tmp_path)
    line = check_error(code, err, f"{key}: the run needs at least", "GB of memory", f"lower {key}")
    assert time.monotonic() - start < 30 and rss < 300, (rss, line)  # measured: 0.6 s, 32 MB
    assert snapshot(tmp_path) == before


def test_synthetic_dimension_refused(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", "env.kwargs.dim=10000000000"],
                   "env.kwargs.dim: the run needs at least")


def test_memory_estimate_uses_the_address_space_limit(tmp_path):
    """What fits is judged against the smallest limit: here the child's 3 GB rlimit."""
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", "env.kwargs.dim=200000000"],
                   "env.kwargs.dim", "address-space limit")


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom", "fifo", "big"])
def test_config_must_be_a_small_regular_file(tmp_path, fifo, source):
    if source == "big":
        (tmp_path / "big").write_text("# padding\n" * 200_000)
    path = source if source.startswith("/") else str(tmp_path / source)
    line, seconds = expect_refused(tmp_path, ["train", path, "--out", "{out}"], "config file", path)
    assert ("not a regular file" in line) == (source != "big") and seconds < 30


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom", "fifo"])
def test_trace_must_be_a_regular_file(tmp_path, fifo, source):
    write(tmp_path / "base.yaml", BASE)
    path = source if source.startswith("/") else str(tmp_path / source)
    _, seconds = expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set",
                                           f"workers.compute_time={{trace: {path}}}"],
                                "workers.compute_time.trace", "not a regular file")
    assert seconds < 30


# --- item 9: smaller lies and leaks ------------------------------------------------------------


def test_keys_beside_trace_refused(tmp_path):
    (tmp_path / "t.csv").write_text("worker,seconds\n0,1\n1,2\n2,3\n")
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set",
                              "workers.compute_time={trace: t.csv, scale: 2}"], "workers.compute_time", "'scale'")


@pytest.mark.parametrize("seed", [2**64, -1, 2**70])
def test_seed_out_of_range(tmp_path, seed):
    """seed 2**64 used to wrap silently to seed 0."""
    write(tmp_path / "base.yaml", BASE)
    expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}", "--set", f"seed={seed}"], "seed", "2^64 - 1")


def test_largest_seed_is_its_own_stream():
    from apga import rng
    top = rng.stream(2**64 - 1, rng.INIT).normal(size=3)
    assert not (top == rng.stream(0, rng.INIT).normal(size=3)).all()


def test_nothing_written_under_home(tmp_path):
    """matplotlib's font cache goes to a private temp folder, not $HOME/.cache or ~/.config."""
    home = tmp_path / "home"
    home.mkdir()
    write(tmp_path / "base.yaml", BASE)
    env_clean = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    p = subprocess.run([sys.executable, "-m", "apga", "train", "base.yaml", "--out", "out", "--quiet"], cwd=tmp_path,
                       env=dict(env_clean, PYTHONPATH=ROOT, HOME=str(home)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "returns.png").exists()
    assert list(home.iterdir()) == [], list(home.rglob("*"))


def test_matplotlib_dir_refuses_a_planted_folder(tmp_path, monkeypatch):
    """A folder of the shared name that is open to others (someone could plant a matplotlibrc)
    is not used: a fresh private one is made instead."""
    from apga import guards
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setattr(guards.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    planted = tmp_path / f"apga-matplotlib-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    chosen = guards.matplotlib_config_dir()
    assert chosen != str(planted) and os.stat(chosen).st_mode & 0o777 == 0o700
    assert os.environ["MPLCONFIGDIR"] == chosen


def test_long_env_id_gives_a_short_line(tmp_path):
    cfg = dict(BASE, env={"id": "A" * 900_000})
    write(tmp_path / "base.yaml", cfg)
    line, _ = expect_refused(tmp_path, ["train", "base.yaml", "--out", "{out}"], "env.id", "900000 characters")
    assert len(line) < 400


def test_any_error_line_is_bounded(tmp_path):
    """Whatever a message quotes, the CLI prints at most about 1000 characters."""
    from apga.cli import one_line
    text = one_line("x: " + "y" * 10**6 + "\nsecond line")
    assert len(text) < 1100 and "\n" not in text and text.endswith("second line")


RAY_RUN = {
    "seed": 3,
    "env": {"id": "synthetic", "kwargs": {"dim": 4}},
    "algorithm": {"name": "rennala_nigt", "batch_size": 4},
    "workers": {"n": 2, "compute_time": 0.05, "comm_time": 0.0},
    "runtime": {"name": "ray", "inject_delays": True},
    "budget": {"iterations": 100000},
    "eval": {"every": 0},
    "checkpoint": {"every": 5},
}


def _start_ray_run(tmp_path, out="out", env=None):
    """Start a long Ray run; return the process once its first checkpoint after row 0 exists."""
    write(tmp_path / "ray.yaml", RAY_RUN)
    p = subprocess.Popen([sys.executable, "-m", "apga", "train", "ray.yaml", "--out", out, "--quiet"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / out / "metrics.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") > 7:  # past update 5's checkpoint
            return p
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"the Ray run did not make progress: {p.communicate()[1][-2000:]}")


@pytest.mark.ray
def test_sigterm_on_a_ray_driver_exits_cleanly(tmp_path):
    """SIGTERM used to print Ray's C++ stack dump ("*** SIGTERM received ...") and exit 1."""
    pytest.importorskip("ray")
    from apga import statefile
    p = _start_ray_run(tmp_path)
    p.terminate()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "apga: terminated; continue with `apga train --resume DIR`"
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert '"status": "running"' in summary  # resumable
    state = statefile.loads((tmp_path / "out" / "checkpoint.npz").read_bytes())
    assert state["runtime"].totals.iteration >= 5


@pytest.fixture
def short_tmpdir():
    """A private TMPDIR with a short path (Ray's socket paths must stay under 107 bytes)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="apga-t-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _users_of(path):
    from apga.runtime.ray_session import _psutil, _uses
    psutil = _psutil()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if _uses(p.pid, p.info["cmdline"], path):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.ray
def test_ray_session_private_and_a_dead_one_cleaned(tmp_path, short_tmpdir):
    """Items 5 and 6: Ray makes its temp dir and session folder 0777 without the sticky bit, so
    apga puts them inside a 0700 folder of its own; and what a SIGKILLed driver leaves (the
    folder, the agents reparented to init) is removed by its watchdog."""
    pytest.importorskip("ray")
    import stat
    from apga.runtime import ray_session
    p = _start_ray_run(tmp_path, env={"TMPDIR": short_tmpdir})
    try:
        (private,) = [os.path.join(short_tmpdir, n) for n in os.listdir(short_tmpdir) if n.startswith("apga-ray-")]
        st = os.stat(private)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert os.listdir(short_tmpdir) and all(  # everything else of the session is inside it
            stat.S_IMODE(os.stat(os.path.join(short_tmpdir, n)).st_mode) & 0o077 == 0
            for n in os.listdir(short_tmpdir))
        session = os.path.join(private, "ray")
        assert os.path.isdir(session) and _users_of(private)
    finally:
        p.kill()
        p.communicate(timeout=60)
    # SIGKILL runs no cleanup in the driver: its watchdog removes the folder and kills the
    # processes still using it (Ray's agents would linger for minutes, the folder forever)
    deadline = time.monotonic() + 60
    while (os.path.exists(private) or _users_of(private)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(private)
    assert _users_of(private) == []
    assert ray_session.clean_dead_sessions(short_tmpdir) == []


def test_clean_dead_sessions_spares_live_and_unknown_folders(tmp_path):
    pytest.importorskip("ray")
    from apga.runtime import ray_session
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    folders = {name: tmp_path / f"apga-ray-{name}" for name in ("live", "dead", "unknown")}
    for path in folders.values():
        path.mkdir(mode=0o700)
    (folders["live"] / "apga-owner").write_text(f"{os.getpid()} {ray_session._start_ticks(os.getpid())}\n")
    (folders["dead"] / "apga-owner").write_text(f"{dead_pid} 12345\n")
    (tmp_path / "apga-ray-file").write_text("not a folder")
    # a process that names the folder on its command line and holds a file in it open; it says
    # "ready" only once both are true, so the scan cannot race its start-up
    holder = ("import sys, time; f = open(sys.argv[1], 'w'); print('ready', flush=True); "
              "time.sleep(600)")
    user = subprocess.Popen([sys.executable, "-c", holder, str(folders["dead"] / "x")],
                            stdout=subprocess.PIPE, text=True)
    assert user.stdout.readline().strip() == "ready"
    assert ray_session.clean_dead_sessions(str(tmp_path)) == [str(folders["dead"])]
    assert user.wait(timeout=30) == -9  # killed: it was using the dead session's folder
    assert folders["live"].is_dir() and folders["unknown"].is_dir() and (tmp_path / "apga-ray-file").exists()
    # the same pid with another start time is another process: its folder is stale
    (folders["live"] / "apga-owner").write_text(f"{os.getpid()} 1\n")
    assert ray_session.clean_dead_sessions(str(tmp_path)) == [str(folders["live"])]


# --- item 7: resume that is exact, or refused ---------------------------------------------------


@pytest.fixture
def trace_run(tmp_path):
    """A finished run whose compute times come from conf/t.csv, named relative to the config's
    folder and started from another directory."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "t.csv").write_text("worker,seconds\n0,1\n1,2\n2,3\n0,0.5\n")
    cfg = dict(BASE, workers={"n": 3, "compute_time": {"trace": "t.csv"}, "comm_time": 0.1})
    write(conf / "c.yaml", cfg)
    code, _, err, _ = apga(["train", "conf/c.yaml", "--out", "run", "--quiet"], tmp_path)
    assert code == 0, err
    return tmp_path / "run", conf / "t.csv"


def test_relative_trace_resolves_against_the_config(trace_run):
    run, trace = trace_run
    stored = yaml.safe_load((run / "config.yaml").read_text())["workers"]["compute_time"]["trace"]
    assert stored == str(trace)


def test_resume_refuses_a_changed_trace(trace_run, tmp_path):
    run, trace = trace_run
    code, _, err, _ = apga(["train", "--resume", str(run), "--quiet"], tmp_path)  # unchanged: fine
    assert code == 0, err
    trace.write_text("worker,seconds\n0,100\n1,2\n2,3\n")
    before = snapshot(run)
    code, _, err, _ = apga(["train", "--resume", str(run)], tmp_path)
    check_error(code, err, "workers.compute_time.trace", str(trace), "changed since the run started")
    assert snapshot(run) == before


def test_resume_of_a_run_that_lost_its_checkpoint_is_refused(tmp_path):
    """It used to delete the results and silently run again."""
    write(tmp_path / "base.yaml", BASE)
    code, _, err, _ = apga(["train", "base.yaml", "--out", "run", "--quiet"], tmp_path)
    assert code == 0, err
    os.unlink(tmp_path / "run" / "checkpoint.npz")
    before = snapshot(tmp_path / "run")
    code, _, err, _ = apga(["train", "--resume", "run"], tmp_path)
    check_error(code, err, "checkpoint.npz is missing", "past its first checkpoint")
    assert snapshot(tmp_path / "run") == before


def test_resume_before_the_first_checkpoint_still_restarts(tmp_path):
    """Killed before the first checkpoint (only config.yaml and the header): a restart is right."""
    write(tmp_path / "base.yaml", BASE)
    code, _, err, _ = apga(["train", "base.yaml", "--out", "ref", "--quiet"], tmp_path)
    assert code == 0, err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes((tmp_path / "ref" / "config.yaml").read_bytes())
    header = (tmp_path / "ref" / "metrics.csv").read_text().split("\n")[0] + "\n"
    (tmp_path / "run" / "metrics.csv").write_text(header)
    code, _, err, _ = apga(["train", "--resume", "run", "--quiet"], tmp_path)
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()


# --- item 4: disk full ------------------------------------------------------------------------


def _whole_records(path) -> int:
    """Number of TFRecords in an event file; fails if the file ends inside a record."""
    import struct
    from apga.run.logger import _masked_crc32c
    data = path.read_bytes()
    pos = count = 0
    while pos < len(data):
        assert pos + 12 <= len(data), f"{path}: torn record header at {pos}"
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc32c(data[pos:pos + 8])
        end = pos + 12 + length + 4
        assert end <= len(data), f"{path}: torn record at {pos}"
        assert struct.unpack("<I", data[end - 4:end])[0] == _masked_crc32c(data[pos + 12:end - 4])
        pos, count = end, count + 1
    return count


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root)."""
    yield from _tmpfs(tmp_path / "disk", "size=2m", "for a small tmpfs")


def test_disk_full(tmp_path, small_disk):
    """ENOSPC: one line, exit 2, summary "failed", metrics.csv and tb/ cut back to whole lines
    and records, the checkpoint intact; after freeing space, --resume gives the uninterrupted run."""
    cfg = dict(BASE, budget={"iterations": 3000}, eval={"every": 1}, checkpoint={"every": 100})
    write(tmp_path / "fill.yaml", cfg)
    code, _, err, _ = apga(["train", "fill.yaml", "--out", "ref", "--quiet"], tmp_path)
    assert code == 0, err
    reference = (tmp_path / "ref" / "metrics.csv").read_bytes()
    assert len(reference) > 250_000  # more than the room left below
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 1_850_000)

    run = small_disk / "run"
    code, _, err, _ = apga(["train", "fill.yaml", "--out", str(run), "--quiet"], tmp_path)
    check_error(code, err, str(run), "No space left on device", "--resume")
    summary = (run / "summary.json").read_text()
    assert '"status": "failed"' in summary and "No space left" in summary
    metrics = (run / "metrics.csv").read_bytes()
    assert metrics.endswith(b"\n") and reference.startswith(metrics) and len(metrics) < len(reference)
    events = sorted(run.glob("tb/**/events.out.tfevents.*"))
    assert events and all(_whole_records(e) >= 1 for e in events)

    filler.unlink()
    code, _, err, _ = apga(["train", "--resume", str(run), "--quiet"], tmp_path)
    assert code == 0, err
    assert (run / "metrics.csv").read_bytes() == reference
    assert '"status": "finished"' in (run / "summary.json").read_text()


# --- item 5: no orphans -------------------------------------------------------------------------

COMPARE = {
    "base": {"env": {"id": "synthetic", "kwargs": {"dim": 4}}, "algorithm": {"batch_size": 4},
             "workers": {"n": 3, "compute_time": "sqrt", "comm_time": 0.1},
             "budget": {"iterations": 10**6}, "eval": {"every": 1000, "episodes": 1},
             "checkpoint": {"every": 100}},
    "seeds": 2,
    "variants": {"rennala_nigt": {"algorithm.name": "rennala_nigt"}},
}


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGHUP"])
def test_compare_workers_die_with_their_parent(tmp_path, sig):
    """`apga compare` killed by SIGKILL or SIGHUP used to leave its pool workers (and the
    resource tracker) running forever under init, holding the run locks."""
    import fcntl
    import signal
    from apga.runtime.ray_session import _psutil
    psutil = _psutil() if _has_ray() else pytest.importorskip("psutil")
    write(tmp_path / "cmp.yaml", COMPARE)
    p = subprocess.Popen([sys.executable, "-m", "apga", "compare", "cmp.yaml", "--out", "out", "--jobs", "2",
                          "--quiet"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         # SIGHUP as a terminal would deliver it, also when pytest runs under nohup
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    children = []
    try:
        runs = [tmp_path / "out" / "default" / "rennala_nigt" / f"seed{k}" for k in (0, 1)]
        deadline = time.monotonic() + 240
        while not all((r / "checkpoint.npz").exists() for r in runs):  # both workers are training
            assert time.monotonic() < deadline and p.poll() is None, "the compare runs did not start"
            time.sleep(0.2)
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) >= 2
        p.send_signal(getattr(signal, sig))
        p.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert alive == [], [c.pid for c in alive]
    finally:  # a failed check must not leave a million-iteration compare running
        if p.poll() is None:
            p.kill()
            p.wait()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
    for r in runs:  # the locks are free: a re-run would not be "in use by another apga process"
        fd = os.open(r / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def _has_ray() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def test_compare_refuses_absurd_sizes_before_writing(tmp_path):
    cmp = dict(COMPARE, variants={"big": {"algorithm.name": "rennala_nigt", "workers.n": 10**9}})
    write(tmp_path / "cmp.yaml", cmp)
    expect_refused(tmp_path, ["compare", "cmp.yaml", "--out", "{out}"], "workers.n: the run needs at least")
