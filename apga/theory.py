"""Closed-form and exact time predictions (docs/algorithms.md: the time model and the theory). Pure functions: numpy, no torch.

Two kinds of results live here.

**Exact round times** for constant per-worker times, in the simulator's time model (§5). They
are what the simulator must reproduce to the last bit, so the conventions are spelled out:

* worker i's k-th gradient (k = 1, 2, ...) completes at ``start_i + k * h_i``, evaluated in
  Python/IEEE float64 exactly in that order (one multiplication, one addition; with
  ``start_i = 0`` the sum is exact, so the time is ``k * h_i``);
* b_i(t) = #{k >= 1 : start_i + k * h_i <= t} (see :func:`counts_at`), so *all* gradients
  completing at exactly the stop time count, whatever order a simulator pops simultaneous
  events in;
* a round stops at the first completion time t at which the stop predicate holds on
  (b_1(t), ..., b_n(t)); the predicates :func:`rennala_stop`, :func:`malenia_stop` and the
  quota :func:`sync_quota` are shared with the simulator so both sides agree on ties;
* in-flight gradients are cancelled at the stop (``cancel: true``, the default).

**Bounds** of docs/algorithms.md, the theory (t_R, t_M and the per-method complexity table), which hold up to
absolute constants only; see :func:`complexity_table` for the convention used for constants.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# The stop rules are the protocol's own, so theory and simulator cannot disagree on them.
from apga.protocol.malenia_nigt import malenia_stop
from apga.protocol.rennala_nigt import rennala_stop
from apga.protocol.sync_nigt import sync_quota

ArrayLike = Sequence[float] | np.ndarray


def _times(h: ArrayLike) -> np.ndarray:
    a = np.asarray(h, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"compute times must be a non-empty list of finite positive numbers, got {h!r}")
    return a


def _offsets(kappa: ArrayLike | float | None, n: int, what: str = "communication times") -> np.ndarray:
    if kappa is None:
        return np.zeros(n)
    a = np.asarray(kappa, dtype=np.float64).reshape(-1)
    if a.size == 1:
        a = np.full(n, float(a[0]))
    if a.size != n or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{what} must be one or {n} finite non-negative numbers, got {kappa!r}")
    return a


# Counts of gradients per worker stay below 2^51, where float64 still tells k from k + 1 (beyond
# 2^53, k + 1.0 == k and the exact-count corrections below could never finish).
MAX_COUNT = 2**51
MAX_BATCH = 2**50


def _batch(M: int) -> int:
    if isinstance(M, float) and not math.isfinite(M):
        raise ValueError(f"batch size M must be a positive integer, got {M!r}")
    if int(M) != M or M < 1:
        raise ValueError(f"batch size M must be a positive integer, got {M!r}")
    if M > MAX_BATCH:
        raise ValueError(f"batch size M must be at most 2^50 (float64 cannot count further exactly), got {M:g}")
    return int(M)


# ---------------------------------------------------------------------------------------------
# Exact event arithmetic
# ---------------------------------------------------------------------------------------------


def counts_at(t: float, h: ArrayLike, start: ArrayLike | float | None = None) -> np.ndarray:
    """b_i(t) = #{k >= 1 : start_i + k*h_i <= t} per worker (int64), with float64 arithmetic."""
    h = _times(h)
    return _counts(t, h, _offsets(start, h.size, "start times"))


def _counts(t: float, h: np.ndarray, s: np.ndarray) -> np.ndarray:
    # The division gives an estimate that may be one off after rounding; it is then corrected
    # with the very comparison that defines b_i, so the count is exact for the float times.
    if not math.isfinite(t):
        raise ValueError(f"time {t!r} is not finite: the worker times or the batch size are too large")
    with np.errstate(over="ignore"):  # an overflow gives inf, refused just below
        k = np.maximum(np.floor((t - s) / h), 0.0)
    if np.any(k >= MAX_COUNT):  # also bounds the loops below: each moves k by one per pass
        raise ValueError(f"a worker completes more than 2^51 gradients by time {t:g}: float64 cannot count "
                         "them exactly; use times of a similar scale or a smaller batch size")
    for _ in range(_MAX_FIXES):  # estimate too small: the next completion is still <= t
        up = s + (k + 1.0) * h <= t
        if not up.any():
            break
        k += up
    else:
        raise _unresolvable(t)
    for _ in range(_MAX_FIXES):  # estimate too large: the k-th completion is after t
        down = (k > 0) & (s + k * h > t)
        if not down.any():
            break
        k -= down
    else:
        raise _unresolvable(t)
    return k.astype(np.int64)


# The division's estimate is off by one or two; if it needs more fixes, a worker's start time is
# so much larger than its gradient time that s + k*h no longer moves with k in float64.
_MAX_FIXES = 64


def _unresolvable(t: float) -> ValueError:
    return ValueError(f"near time {t:g} a start or communication time is so much larger than a compute time "
                      "that float64 cannot separate consecutive completions; use times of a similar scale")


def _float_bits(t: float) -> int:
    return struct.unpack("<q", struct.pack("<d", t))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def _first_stop(h: np.ndarray, s: np.ndarray, stop: Callable[[np.ndarray], bool], t_up: float) -> float:
    """The smallest float t at which ``stop(counts_at(t))`` holds; it is a completion time.

    ``stop`` must be monotone in t (true stays true) and hold at ``t_up``. The counts only change
    at the float values s_i + k*h_i, so the first float where the predicate holds is exactly one
    of them. We bisect over the bit patterns of non-negative doubles (ordered like the doubles
    themselves): at most 64 steps, each O(n), whatever M is.
    """
    def holds(t: float) -> bool:
        return stop(_counts(t, h, s))

    if not math.isfinite(t_up):
        raise ValueError("the round does not end in finite float64 time: the worker times times the batch "
                         "size overflow")
    if not holds(t_up):  # a bug in the caller's bound, not a user error
        raise AssertionError("stop predicate does not hold at the upper bound")
    # Below the first completion every count is 0 and the predicate fails (M >= 1).
    lo, hi = _float_bits(float(np.min(s + h))) - 1, _float_bits(t_up)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(_bits_float(mid)):
            hi = mid
        else:
            lo = mid
    return _bits_float(hi)


def rennala_stop_time(h: ArrayLike, M: int, start: ArrayLike | float | None = None) -> float:
    """First completion time at which Σ_i b_i >= M (workers begin at ``start_i``, default 0)."""
    h, M = _times(h), _batch(M)
    s = _offsets(start, h.size, "start times")
    t_up = float(np.min(s + M * h))  # the worker reaching M alone first: the round is over by then
    return _first_stop(h, s, lambda b: rennala_stop(b, M), t_up)


def malenia_stop_time(h: ArrayLike, M: int, start: ArrayLike | float | None = None) -> float:
    """First completion time at which every b_i >= 1 and the harmonic mean of b_i >= M/n."""
    h, M = _times(h), _batch(M)
    s = _offsets(start, h.size, "start times")
    q = sync_quota(h.size, M)
    t_up = float(np.max(s + q * h))  # all b_i >= ceil(M/n) implies the harmonic mean >= M/n
    return _first_stop(h, s, lambda b: malenia_stop(b, M), t_up)


def rennala_round_time(h: ArrayLike, M: int) -> float:
    """Exact min{t : Σ_i ⌊t/h_i⌋ >= M} (zero communication); equals some k*h_i in float64."""
    return rennala_stop_time(h, M)


def malenia_round_time(h: ArrayLike, M: int) -> float:
    """Exact first t with every ⌊t/h_i⌋ >= 1 and harmonic mean >= M/n (zero communication)."""
    return malenia_stop_time(h, M)


def sync_round_time(h: ArrayLike, M: int) -> float:
    """max_i ceil(M/n) * h_i: every worker computes its quota, the round waits for the slowest."""
    h, M = _times(h), _batch(M)
    return float(np.max(sync_quota(h.size, M) * h))


# ---------------------------------------------------------------------------------------------
# Round times with communication
# ---------------------------------------------------------------------------------------------

_METHODS = {
    "rennala": "rennala", "rennala_nigt": "rennala", "rennala_pg": "rennala",
    "malenia": "malenia", "malenia_nigt": "malenia",
    "sync": "sync", "synchronous": "sync", "sync_nigt": "sync", "sync_pg": "sync",
}


@dataclass(frozen=True)
class RoundTiming:
    """One round with constant times, measured from the moment the new point exists (0).

    ``stop``: when the stop predicate first holds (sync: when the last worker finishes its quota);
    ``counts``: b_i at ``stop``; ``end``: when the next update happens (the round time).
    """

    stop: float
    counts: tuple[int, ...]
    end: float


def round_timing(
    method: str,
    h: ArrayLike,
    M: int,
    kappa: ArrayLike | float | None = None,
    kappa_allreduce: float | None = None,
    aggregation: str = "server",
) -> RoundTiming:
    """The exact timeline of one round (docs/algorithms.md, the time model) for constant times; see :class:`RoundTiming`.

    ``method``: rennala | malenia | sync (the config names rennala_nigt, malenia_nigt, sync_nigt
    are accepted too). ``kappa``: per-worker upload/download time (one number or n). Modes:

    * ``server``: worker i receives the point at κ_i and starts then (completions
      κ_i + k*h_i); at the stop every worker with b_i > 0 uploads, and the round ends when the
      last upload arrives: max_{b_i>0} (stop + κ_i). Sync: worker i ends its upload at
      (κ_i + q*h_i) + κ_i with q = ceil(M/n), and the round ends at the latest of these.
    * ``allreduce``: no download (every worker applies the step itself), all start at 0, and one
      AllReduce of ``kappa_allreduce`` (default 0) follows the stop: stop + κ_allreduce.
    """
    key = _METHODS.get(method.lower())
    if key is None:
        if method.lower() == "afedpg":
            raise ValueError("AFedPG has no rounds; use afedpg_updates_by for its update count")
        raise ValueError(f"unknown method {method!r}; choose rennala, malenia or sync")
    if aggregation not in ("server", "allreduce"):
        raise ValueError(f"aggregation must be 'server' or 'allreduce', got {aggregation!r}")
    h, M = _times(h), _batch(M)
    n = h.size
    kap = _offsets(kappa, n)
    k_ar = 0.0 if kappa_allreduce is None else float(kappa_allreduce)
    if not math.isfinite(k_ar) or k_ar < 0:
        raise ValueError(f"kappa_allreduce must be a finite non-negative number, got {kappa_allreduce!r}")
    start = kap if aggregation == "server" else np.zeros(n)

    if key == "sync":
        q = sync_quota(n, M)
        done = start + q * h
        counts = (q,) * n
        stop = float(np.max(done))
        end = float(np.max(done + kap)) if aggregation == "server" else stop + k_ar
        return RoundTiming(stop, counts, end)

    stop_fn = rennala_stop_time if key == "rennala" else malenia_stop_time
    stop = stop_fn(h, M, start)
    b = _counts(stop, h, start)
    if aggregation == "server":
        end = float(np.max(stop + kap[b > 0]))
    else:
        end = stop + k_ar
    return RoundTiming(stop, tuple(int(x) for x in b), end)


def round_time(
    method: str,
    h: ArrayLike,
    M: int,
    kappa: ArrayLike | float | None = None,
    kappa_allreduce: float | None = None,
    aggregation: str = "server",
) -> float:
    """Exact duration of one round (update to update); see :func:`round_timing` for the model."""
    return round_timing(method, h, M, kappa, kappa_allreduce, aggregation).end


def afedpg_updates_by(
    h: ArrayLike, T: float, kappa: ArrayLike | float | None = None, initial_download: bool = True
) -> int:
    """Number of AFedPG server updates that have happened by time T (inclusive), constant times.

    Worker i cycles download κ_i → compute h_i → upload κ_i, and the server updates when the
    upload arrives, so its k-th update lands at k * c_i with c_i = h_i + 2κ_i (float64, in
    that order). With ``initial_download=False`` the workers hold θ_0 already and update k lands
    at k * c_i - κ_i. With κ = 0 the count is Σ_i ⌊T/h_i⌋.
    """
    h = _times(h)
    kap = _offsets(kappa, h.size)
    cycle = h + 2.0 * kap
    # Update k lands at shift_i + k*c_i: the completions of a worker "starting" at shift_i.
    shift = np.zeros_like(kap) if initial_download else -kap
    return int(_counts(float(T), cycle, shift).sum())


# ---------------------------------------------------------------------------------------------
# Bounds (docs/algorithms.md, the theory): hold up to absolute constants
# ---------------------------------------------------------------------------------------------


def rennala_time_bound(h: ArrayLike, S: float) -> tuple[float, int]:
    """t_R(S) = min_m (Σ_{i<=m} 1/h_(i))^{-1} (S + m) over sorted h, and the minimising m.

    For S = M this brackets the exact round time: t_R(M)/2 <= rennala_round_time(h, M) <= t_R(M).
    """
    hs = np.sort(_times(h))
    m = np.arange(1, hs.size + 1)
    values = (S + m) / np.cumsum(1.0 / hs)
    best = int(np.argmin(values))  # first minimum: the fewest workers achieving it
    return float(values[best]), best + 1


def malenia_time_bound(h: ArrayLike, S: float) -> float:
    """t_M(S) = max{h_max, (1/n Σ h_i) S/n}; t_M(M) <= malenia_round_time(h, M) <= 2 t_M(M)."""
    h = _times(h)
    return float(max(h.max(), h.mean() * S / h.size))


@dataclass(frozen=True)
class MethodBound:
    """One row of the complexity table; times in the unit of h and κ (seconds)."""

    key: str  # sync_pg | rennala_pg | afedpg | sync_nigt | rennala_nigt | malenia_nigt
    name: str
    computation: float
    communication: float
    total: float
    allreduce: bool  # can aggregate with one AllReduce instead of a server
    heterogeneous: bool  # the guarantee holds when workers sample different environments
    workers_used: int  # optimal m (the m fastest workers); n when the method needs everyone
    batch_size: int | None  # gradients per update; None for AFedPG (one gradient per update)
    comm_mode: str  # "allreduce" or "server": the cheaper way this method can communicate
    notes: str = field(default="", compare=False)


def gaussian_mlp_param_count(obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64)) -> int:
    """Parameters of the paper's policy: tanh MLP trunk, then a mean head and a softplus-std head.

    Humanoid-v5 (obs 348, act 17): 348·64+64 + 64·64+64 + 2·(64·17+17) = 28,706.
    """
    sizes = [obs_dim, *hidden]
    trunk = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return trunk + 2 * (sizes[-1] * act_dim + act_dim)


HUMANOID_POLICY_DIM = gaussian_mlp_param_count(348, 17)


def complexity_table(
    h: ArrayLike,
    kappa: ArrayLike | float | None = None,
    kappa_allreduce: float | None = None,
    *,
    eps: float,
    L: float = 1.0,
    delta: float = 1.0,
    sigma2: float = 1.0,
    horizon: float = 1.0,
) -> list[MethodBound]:
    """Predicted time to an ε-stationary point (E‖∇J‖ <= ε) per method, docs/algorithms.md, the theory.

    All bounds hold up to absolute constants; only their ratios are meaningful. Convention:

    * ``h``: seconds per stochastic gradient (one trajectory) of each worker — the simulator's
      h_i; the table's ḣ_i (per env step) times the trajectory length is exactly this.
    * ``horizon`` H = 1/(1-γ) scales the per-step constants to those of J in the standard way for
      Gaussian/softmax policies with bounded score (Papini et al. 2018, Yuan et al. 2022):
      L_J = L·H² (smoothness), σ_J² = σ²·H³ (variance of one GPOMDP estimate). H = 1 means
      L and σ² are already the constants of J. Δ = J* − J(θ_0) is taken as given.
    * K = L_J·Δ/ε² updates are needed (the ε^-2 term); the variance term counts gradients,
      S_PG = σ_J²·L_J·Δ/ε⁴ for plain PG and S_NIGT = σ_J²·L_J·Δ/ε^{7/2} for NIGT (whose
      second-order smoothness constant is folded into L_J). The implied batch sizes are
      M = S/K: M_PG = ⌈σ_J²/ε²⌉ and M_NIGT = ⌈σ_J²/ε^{3/2}⌉ (NIGT's analysis: a batch of
      σ²/ε^{3/2} keeps the number of updates at O(ε^-2)).
    * Rows (t_h = harmonic-type means over the used workers, sorted fastest first):
        Synchronous PG/NIGT: max h·(K + S/n), comm κ_r·(K + S/n) — the paper's row, one gradient
          per worker per round (batch n), hence the variance term in the communication too;
        Rennala PG/NIGT: min over m of (Σ_{i<=m} 1/h_i)^{-1}(m·K + S) + κ_r(m)·K, batch M;
        AFedPG: (1/n Σ 1/h_i)^{-1}(n^{4/3}·L_J·Δ·ε^{-7/3} + S_NIGT/n), comm 2κ̄·L_J·Δ·ε^{-3}
          (a lower bound: one upload + one download per gradient; κ̄ = mean κ_i because the
          workers' links run in parallel and no round waits for the slowest — generous to AFedPG);
        Malenia NIGT: h_max·K + (1/n Σ h_i)·S_NIGT/n, comm κ_r·K, batch M_NIGT, all n workers.
    * κ_r, the communication time of one round, is the cheaper of one AllReduce
      (``kappa_allreduce``, default max κ_i) and a server round trip 2·max κ_i over the workers
      the method uses (download + upload, both on the critical path).
    """
    h = _times(h)
    n = h.size
    kap = _offsets(kappa, n)
    k_ar = float(kap.max()) if kappa_allreduce is None else float(kappa_allreduce)
    for name, v in (("eps", eps), ("L", L), ("delta", delta), ("horizon", horizon)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    if not (math.isfinite(sigma2) and sigma2 >= 0):
        raise ValueError(f"sigma2 must be a finite non-negative number, got {sigma2!r}")
    if not (math.isfinite(k_ar) and k_ar >= 0):
        raise ValueError(f"kappa_allreduce must be a finite non-negative number, got {kappa_allreduce!r}")

    if min(eps**2, eps**3.5, eps**4) == 0.0:
        raise ValueError(f"eps = {eps:g} is too small: eps^4 underflows to 0 in float64")
    L_J, sig_J = L * horizon**2, sigma2 * horizon**3
    K = L_J * delta / eps**2
    S_pg = sig_J * L_J * delta / eps**4
    S_nigt = sig_J * L_J * delta / eps**3.5
    if not math.isfinite(sig_J / eps**2):
        raise ValueError("the batch size sigma_J^2/eps^2 overflows float64")
    M_pg = max(1, math.ceil(sig_J / eps**2))
    M_nigt = max(1, math.ceil(sig_J / eps**1.5))

    order = np.argsort(h, kind="stable")
    hs, ks = h[order], kap[order]
    prefix_max_kappa = np.maximum.accumulate(ks)

    def per_round(server_trip: float) -> tuple[float, str]:
        # Ties go to AllReduce: it also saves the broadcast of the new point.
        return (k_ar, "allreduce") if k_ar <= server_trip else (server_trip, "server")

    def sync_row(key: str, name: str, S: float) -> MethodBound:
        rounds = K + S / n
        kr, mode = per_round(2.0 * float(kap.max()))
        comp, comm = float(h.max()) * rounds, kr * rounds
        return MethodBound(key, name, comp, comm, comp + comm, True, True, n, n, mode,
                           "one gradient per worker per round")

    def rennala_row(key: str, name: str, S: float, M: int) -> MethodBound:
        m = np.arange(1, n + 1)
        comp = (m * K + S) / np.cumsum(1.0 / hs)
        trips = [per_round(2.0 * float(x)) for x in prefix_max_kappa]
        comm = np.array([t[0] for t in trips]) * K
        j = int(np.argmin(comp + comm))  # first minimum: the fewest workers achieving it
        return MethodBound(key, name, float(comp[j]), float(comm[j]), float(comp[j] + comm[j]),
                           True, False, j + 1, M, trips[j][1], "homogeneous environments only")

    afedpg_comp = (n ** (4 / 3) * L_J * delta * eps ** (-7 / 3) + S_nigt / n) / float(np.mean(1.0 / h))
    afedpg_comm = 2.0 * float(kap.mean()) * L_J * delta * eps**-3
    afedpg = MethodBound("afedpg", "AFedPG", afedpg_comp, afedpg_comm, afedpg_comp + afedpg_comm,
                         False, False, n, None, "server", "communication is a lower bound")

    kr_all, mode_all = per_round(2.0 * float(kap.max()))
    malenia_comp = float(h.max()) * K + float(h.mean()) * S_nigt / n
    malenia = MethodBound("malenia_nigt", "Malenia NIGT", malenia_comp, kr_all * K,
                          malenia_comp + kr_all * K, True, True, n, M_nigt, mode_all,
                          "heterogeneous environments")

    return [
        sync_row("sync_pg", "Synchronous PG", S_pg),
        rennala_row("rennala_pg", "Rennala PG", S_pg, M_pg),
        afedpg,
        sync_row("sync_nigt", "Synchronous NIGT", S_nigt),
        rennala_row("rennala_nigt", "Rennala NIGT", S_nigt, M_nigt),
        malenia,
    ]


def best_batch_size(eps: float, sigma2: float = 1.0, horizon: float = 1.0, method: str = "nigt") -> int:
    """The theory's batch size: ⌈σ_J²/ε^{3/2}⌉ for NIGT, ⌈σ_J²/ε²⌉ for PG (σ_J² = σ²·H³), at least 1."""
    power = {"nigt": 1.5, "pg": 2.0}[method]
    value = sigma2 * horizon**3 / eps**power
    if not math.isfinite(value):
        raise ValueError(f"the batch size sigma_J^2/eps^{power:g} overflows float64")
    return max(1, math.ceil(value))
