"""Explicit state files: plain data and registered apga objects in a zip of JSON + .npy arrays.

This replaces pickle for checkpoints: reading a state file never runs code from the file. It
holds one ``state.json`` (the structure) and one ``a<N>.npy`` per numpy array (written and read
with ``allow_pickle=False``), so ``numpy.load(path)`` lists it too.

What can be stored:

* ``None``, ``bool``, ``int``, ``float`` (also nan / inf), ``str``, ``bytes``, ``list``, ``tuple``,
  ``dict`` (any storable keys), ``set``, ``frozenset``, ``fractions.Fraction``;
* numpy arrays (not of dtype object) and numpy scalars, with their dtype;
* instances of REGISTERED classes only. An object is stored as its registered name and its
  state: ``obj.__getstate__()`` (by default its ``__dict__``), with the class's ``transient``
  attributes replaced by None. It is rebuilt with ``cls.__new__(cls)`` and ``__setstate__`` (or a
  ``__dict__`` update): its ``__init__`` never runs. Frozen dataclasses work the same way.

Classes are found only in this module's registry, never by a module or class name read from the
file: an unknown name is a one-line :class:`StateFileError`. To make a class storable::

    from apga import statefile

    @statefile.register                      # stored under its class name
    class MyRuntime: ...

    statefile.register(SomeClass, name="SomeClass", transient=("handle",))   # or as a call

Objects shared in the structure (the same array or object reached twice) stay shared, and
cycles through registered objects are allowed. Types are kept exactly (a numpy float64 stays a
numpy float64, a tuple a tuple), so a restored state behaves bit for bit like the original.
"""
from __future__ import annotations

import base64
import importlib
import io
import json
import math
import zipfile
from fractions import Fraction
from typing import Any

import numpy as np

from apga.errors import ApgaError

FORMAT = "apga-state"
VERSION = 1  # format of state.json / the zip layout; bump on incompatible changes
STATE_MEMBER = "state.json"
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed: the same state gives the same bytes


class StateFileError(ApgaError):
    """A state file cannot be written or read (the message is one line)."""


# ----------------------------------------------------------------------------- the registry
class _Entry:
    def __init__(self, cls: type, name: str, transient: tuple[str, ...]):
        self.cls, self.name, self.transient = cls, name, tuple(transient)


_BY_NAME: dict[str, _Entry] = {}
_BY_CLASS: dict[type, _Entry] = {}

# apga's own storable classes, imported on first use (so that, e.g., Ray is only imported when
# a state holds a RayRuntime): name -> ((module, class name) candidates, transient attributes).
# A fixed table in the code; several candidates let a class move between modules without
# changing its name in files (the first that imports wins).
_BUILTIN: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    **{name: ((("apga.config", name),), ()) for name in (
        "Config", "EnvConfig", "PolicyConfig", "AlgorithmConfig", "WorkersConfig", "RuntimeConfig",
        "BudgetConfig", "EvalConfig", "CheckpointConfig")},
    "NIGTState": ((("apga.protocol.nigt", "NIGTState"),), ()),
    "WorkerBatch": ((("apga.oracle.base", "WorkerBatch"),), ()),
    # protocols: one module per method
    "AFedPG": ((("apga.protocol.afedpg", "AFedPG"),), ()),
    "RennalaNIGT": ((("apga.protocol.rennala_nigt", "RennalaNIGT"),), ()),
    "MaleniaNIGT": ((("apga.protocol.malenia_nigt", "MaleniaNIGT"),), ()),
    "SyncNIGT": ((("apga.protocol.sync_nigt", "SyncNIGT"),), ()),
    "SyncPG": ((("apga.protocol.sync_pg", "SyncPG"),), ()),
    "RennalaPG": ((("apga.protocol.rennala_pg", "RennalaPG"),), ()),
    "Update": ((("apga.protocol.base", "Update"),), ()),
    "Reduction": ((("apga.protocol.base", "Reduction"),), ()),
    "RoundTally": ((("apga.protocol.base", "RoundTally"),), ()),
    # runtimes
    "Totals": ((("apga.runtime.base", "Totals"),), ()),
    "Simulator": ((("apga.runtime.simulator", "Simulator"),), ()),
    # A custom oracle_factory (a function) is not state: attach() restores the default one.
    "RayRuntime": ((("apga.runtime.ray_runtime", "RayRuntime"),), ("oracle_factory",)),
}


def register(cls: type | None = None, *, name: str | None = None, transient=()):
    """Make ``cls`` storable under ``name`` (default: its class name). Usable as ``@register``,
    ``@register(name=..., transient=(...))`` or ``register(cls, ...)``. ``transient``: attributes
    stored as None (handles, processes, functions; the owner reconnects them after loading)."""
    def add(c: type) -> type:
        key = name or c.__name__
        old = _BY_NAME.get(key)
        if old is not None and old.cls is not c:
            raise ValueError(f"statefile: name {key!r} is already registered for {old.cls!r}")
        entry = _Entry(c, key, tuple(transient))
        _BY_NAME[key], _BY_CLASS[c] = entry, entry
        return c
    return add if cls is None else add(cls)


def _builtin(name: str) -> _Entry | None:
    spec = _BUILTIN.get(name)
    if spec is None:
        return None
    candidates, transient = spec
    missing = None
    for module, attr in candidates:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ModuleNotFoundError as exc:
            if not (exc.name and module.startswith(exc.name)):
                missing = exc.name  # the module exists but needs something not installed (e.g. ray)
            continue
        if isinstance(cls, type):
            if cls not in _BY_CLASS:
                register(cls, name=name, transient=transient)
            return _BY_CLASS[cls]
    if missing:
        raise StateFileError(f"class {name!r} needs module {missing!r}, which is not installed")
    return None


def _entry_for_class(cls: type) -> _Entry | None:
    entry = _BY_CLASS.get(cls)
    if entry is None and cls.__name__ in _BUILTIN:
        if (cls.__module__, cls.__qualname__) in _BUILTIN[cls.__name__][0]:
            entry = _builtin(cls.__name__)
    return entry


def _entry_for_name(name: str) -> _Entry | None:
    return _BY_NAME.get(name) or _builtin(name)


# ----------------------------------------------------------------------------- encoding
class _Encoder:
    def __init__(self):
        self.arrays: list[np.ndarray] = []
        self.array_ids: dict[int, int] = {}
        self.objects: dict[int, int] = {}
        self.keep: list = []  # keeps encoded objects alive so their ids stay unique

    def encode(self, x: Any, path: str):
        t = type(x)
        if x is None or t is bool or t is str or t is int:
            return x
        if t is float:
            return x if math.isfinite(x) else {"$float": repr(x)}
        if t is list:
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if t is tuple:
            return {"$tuple": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if t is dict:
            if all(type(k) is str and not k.startswith("$") for k in x):
                return {k: self.encode(v, f"{path}[{k!r}]") for k, v in x.items()}
            return {"$dict": [[self.encode(k, f"{path}.key"), self.encode(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if t is set or t is frozenset:
            items = sorted(x, key=repr)  # a stable order in the file; the set itself has none
            return {"$set" if t is set else "$frozenset": [self.encode(v, f"{path}.item") for v in items]}
        if t is bytes:
            return {"$bytes": base64.b64encode(x).decode("ascii")}
        if t is Fraction:
            return {"$fraction": [str(x.numerator), str(x.denominator)]}
        if t is np.ndarray:
            return {"$array": self._array(x, path)}
        if isinstance(x, np.generic):
            return {"$scalar": self._array(np.asarray(x), path)}
        return self._object(x, path)

    def _array(self, a: np.ndarray, path: str) -> int:
        if a.dtype.hasobject or a.dtype.fields is not None:
            raise StateFileError(f"{path}: numpy arrays of dtype {a.dtype} cannot be stored")
        key = self.array_ids.get(id(a))
        if key is None:
            key = self.array_ids[id(a)] = len(self.arrays)
            self.arrays.append(a)
            self.keep.append(a)
        return key

    def _object(self, obj: Any, path: str):
        entry = _entry_for_class(type(obj))
        if entry is None:
            raise StateFileError(f"{path}: objects of type {type(obj).__module__}.{type(obj).__qualname__} "
                                 "cannot be stored; register the class with apga.statefile.register")
        ref = self.objects.get(id(obj))
        if ref is not None:
            return {"$ref": ref}
        ref = self.objects[id(obj)] = len(self.objects)
        self.keep.append(obj)
        state = obj.__getstate__()
        if state is None:
            state = {}
        if entry.transient and isinstance(state, dict):
            state = {k: (None if k in entry.transient else v) for k, v in state.items()}
        return {"$obj": entry.name, "id": ref, "state": self.encode(state, f"{path}<{entry.name}>")}


def dumps(obj: Any) -> bytes:
    """The bytes of a state file holding ``obj`` (deterministic: equal states, equal bytes)."""
    enc = _Encoder()
    root = enc.encode(obj, "state")
    doc = {"format": FORMAT, "version": VERSION, "arrays": len(enc.arrays), "root": root}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo(STATE_MEMBER, _ZIP_DATE), json.dumps(doc, separators=(",", ":")))
        for i, a in enumerate(enc.arrays):
            out = io.BytesIO()
            np.lib.format.write_array(out, np.asarray(a), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"a{i}.npy", _ZIP_DATE), out.getvalue())
    return buf.getvalue()


# ----------------------------------------------------------------------------- decoding
class _Decoder:
    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.objects: dict[int, Any] = {}

    def decode(self, x: Any):
        if isinstance(x, list):
            return [self.decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) >= 1 and any(k.startswith("$") for k in x):
            return self._tagged(x)
        return {k: self.decode(v) for k, v in x.items()}

    def _tagged(self, x: dict):
        tags = [k for k in x if k.startswith("$")]
        if len(tags) != 1:
            raise StateFileError(f"malformed state entry with keys {sorted(x)[:4]}")
        tag = tags[0]
        v = x[tag]
        if tag == "$float":
            if v not in ("nan", "inf", "-inf"):
                raise StateFileError(f"malformed float {v!r}")
            return float(v)
        if tag == "$tuple":
            return tuple(self.decode(i) for i in v)
        if tag == "$dict":
            return {_hashable(self.decode(k)): self.decode(val) for k, val in v}
        if tag == "$set":
            return {_hashable(self.decode(i)) for i in v}
        if tag == "$frozenset":
            return frozenset(_hashable(self.decode(i)) for i in v)
        if tag == "$bytes":
            return base64.b64decode(v, validate=True)
        if tag == "$fraction":
            return Fraction(int(v[0]), int(v[1]))
        if tag == "$array":
            return self.arrays[_index(v, len(self.arrays))]
        if tag == "$scalar":
            a = self.arrays[_index(v, len(self.arrays))]
            if a.ndim != 0:
                raise StateFileError("malformed numpy scalar")
            return a[()]
        if tag == "$ref":
            if v not in self.objects:
                raise StateFileError(f"reference to unknown object {v!r}")
            return self.objects[v]
        if tag == "$obj":
            return self._object(v, x)
        raise StateFileError(f"unknown entry type {tag!r}")

    def _object(self, name, x: dict):
        entry = _entry_for_name(name) if isinstance(name, str) else None
        if entry is None:
            raise StateFileError(f"unknown class {str(name)[:80]!r} (not in apga's registry of storable classes)")
        cls = entry.cls
        obj = cls.__new__(cls)
        self.objects[x.get("id")] = obj  # before the state: cycles resolve to this object
        state = self.decode(x.get("state", {}))
        setstate = getattr(cls, "__setstate__", None)
        if setstate is not None:
            setstate(obj, state)
        elif isinstance(state, dict):
            obj.__dict__.update(state)
        else:
            raise StateFileError(f"malformed state of a {name}")
        return obj


def _index(v, n: int) -> int:
    if type(v) is not int or not 0 <= v < n:
        raise StateFileError(f"array index {v!r} out of range")
    return v


def _hashable(v):
    if isinstance(v, (list, dict, set, np.ndarray)):
        raise StateFileError("malformed state: unhashable dict key or set item")
    return v


def version_of(data: bytes) -> Any:
    """The format version recorded in a state file's bytes (None if it is not one)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            doc = json.loads(z.read(STATE_MEMBER))
        return doc.get("version") if doc.get("format") == FORMAT else None
    except Exception:  # noqa: BLE001 - any unreadable file simply has no version
        return None


def loads(data: bytes) -> Any:
    """The object held by a state file's bytes. Any problem is a one-line StateFileError; no
    code from the file runs (classes come from the registry, arrays are read without pickle)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise StateFileError("not an apga state file (not a zip archive)") from None
    with z:
        try:
            doc = json.loads(z.read(STATE_MEMBER))
        except KeyError:
            raise StateFileError(f"not an apga state file (no {STATE_MEMBER})") from None
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            raise StateFileError(f"damaged state file ({type(exc).__name__})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateFileError("not an apga state file (wrong format tag)")
        version = doc.get("version")
        if version != VERSION:
            raise StateFileError(f"state file format version {version!r} is not readable by this apga "
                                 f"(it reads version {VERSION})")
        n = doc.get("arrays")
        if type(n) is not int or n < 0:
            raise StateFileError("malformed state file (array count)")
        arrays = []
        try:
            for i in range(n):
                with z.open(f"a{i}.npy") as f:
                    arrays.append(np.lib.format.read_array(f, allow_pickle=False))
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise StateFileError(f"damaged array a{len(arrays)}.npy ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:120]})") from None
    try:
        return _Decoder(arrays).decode(doc.get("root"))
    except StateFileError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise StateFileError(f"malformed state ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None


def read_member(data: bytes, name: str) -> bytes | None:
    """An extra member stored with :func:`dumps_with` (None when absent)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return z.read(name) if name in z.namelist() else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def dumps_with(obj: Any, extra: dict[str, bytes]) -> bytes:
    """:func:`dumps` plus extra raw members (e.g. an earlier state file kept inside this one)."""
    buf = io.BytesIO(dumps(obj))
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_STORED) as z:
        for name, data in extra.items():
            if name == STATE_MEMBER or (name.startswith("a") and name.endswith(".npy")):
                raise ValueError(f"reserved member name {name!r}")
            z.writestr(zipfile.ZipInfo(name, _ZIP_DATE), data)
    return buf.getvalue()
