"""Unpickling files that may come from anyone: numpy arrays and plain containers only.

A pickle names the callables it wants run. We map the few that numpy arrays need to our own
stand-ins, which check the pickled state (dtype, shape, byte count) and build the array with
`np.frombuffer`; numpy's own `__setstate__` never sees the bytes (fuzzing showed malformed states
can crash it). Every other callable is refused before anything runs.
"""
from __future__ import annotations

import io
import math
import pickle

import numpy as np

_NUMERIC_KINDS = "biuf"  # bool, int, unsigned, float: all a CIFAR batch needs
_MAX_ITEMS = 1 << 31     # refuse absurd shapes before allocating anything


class _DType:
    """Stands in for `numpy.dtype(name, align, copy)`; BUILD sets the byte order."""

    def __init__(self, name=None, align=False, copy=False):
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if not isinstance(name, str):
            raise pickle.UnpicklingError(f"bad dtype name {name!r}")
        try:
            dt = np.dtype(name)
        except TypeError:
            raise pickle.UnpicklingError(f"bad dtype name {name!r}") from None
        if dt.kind not in _NUMERIC_KINDS or dt.fields or dt.subdtype:
            raise pickle.UnpicklingError(f"dtype {name!r} is not a plain numeric type")
        self.dtype = dt

    def __setstate__(self, state) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"bad byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """Stands in for `numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`."""

    def __init__(self, *args):
        self.array = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("bad array state")
        _, shape, dtype, fortran, raw = state
        self.array = _build(raw, dtype, shape, "F" if fortran else "C")


def _build(raw, dtype, shape, order: str) -> np.ndarray:
    """A checked copy of `raw` as an array: plain numeric dtype, sane shape, exact byte count."""
    if isinstance(dtype, _DType):
        dtype = dtype.dtype
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("array state has no dtype")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"bad array shape {shape!r}")
    if math.prod(shape) > _MAX_ITEMS:
        raise pickle.UnpicklingError(f"array shape {shape} is too large")
    if isinstance(raw, str):  # arrays pickled by Python 2 carry latin-1 text
        raw = raw.encode("latin-1")
    if isinstance(raw, pickle.PickleBuffer):
        raw = bytes(raw.raw())
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f"array data does not match shape {shape} of {dtype}")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"bad array order {order!r}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order).copy()


def _frombuffer(buf, dtype, shape, order="C"):
    """Stands in for `numpy._core.numeric._frombuffer`, used by pickle protocol 5."""
    return _build(buf, dtype, shape, order)


def _scalar(dtype, raw=b""):
    """Stands in for `numpy.core.multiarray.scalar(dtype, bytes)`."""
    dt = dtype.dtype if isinstance(dtype, _DType) else None
    if dt is None or not isinstance(raw, bytes) or len(raw) != dt.itemsize:
        raise pickle.UnpicklingError("bad numpy scalar")
    return np.frombuffer(raw, dtype=dt)[0]


def _encode(text, encoding="latin1"):
    """Stands in for `_codecs.encode`, which Python-2 numpy pickles use for their bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("bad encoded bytes")
    return text.encode("latin-1")


_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,  # only ever passed to _Array, never called
    ("numpy", "dtype"): _DType,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _STAND_INS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load '{module}.{name}' (only numpy arrays "
                                         "and plain containers are allowed)") from None


def _resolve(obj, depth: int = 0):
    """Replace the stand-ins by the arrays/dtypes they built, in plain containers."""
    if depth > 50:
        raise pickle.UnpicklingError("containers nested too deeply")
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("array without data")
        return obj.array
    if isinstance(obj, _DType):
        return obj.dtype
    if isinstance(obj, dict):
        return {_resolve(k, depth + 1): _resolve(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, depth + 1) for v in obj)
    if obj is np.ndarray or callable(obj) and not isinstance(obj, (int, float, str, bytes)):
        raise pickle.UnpicklingError("a bare numpy callable is not data")
    return obj


def safe_unpickle(raw: bytes):
    """Unpickle bytes that may come from anyone: no code runs, only data is rebuilt."""
    return _resolve(_RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load())
