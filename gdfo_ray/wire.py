"""The black-box service's wire format: JSON, with arrays as base64 of little-endian bytes.

No pickle crosses the wire: a request is plain JSON that any client in any language
can build. Arrays travel as ``{"dtype": "float32", "shape": [n, h], "data": "<base64>"}``.
Every decoder here checks what it is given and raises :class:`WireError` with a
message meant for the client (the server answers it as a 400).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Mapping, Optional

import numpy as np

WIRE_DTYPES = ("float32", "float16")


class WireError(ValueError):
    """A request or response that does not follow the wire format; the message says which field and why."""


def encode_array(array: np.ndarray, dtype: str = "float32") -> dict:
    """``{"dtype", "shape", "data"}`` of an array, as little-endian bytes.

    >>> decode_array(encode_array(np.ones((2, 3))), "x").shape
    (2, 3)
    """
    if dtype not in WIRE_DTYPES:
        raise WireError(f"dtype must be one of {WIRE_DTYPES}, but got {dtype!r}.")
    a = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(obj: Any, name: str, *, ndim: Optional[int] = None, max_elements: int = 1 << 24) -> np.ndarray:
    """A float32 array from its wire form; ``name`` is the field named in errors."""
    if not isinstance(obj, Mapping):
        raise WireError(f"{name} must be an object with dtype, shape and data, but got {type(obj).__name__}.")
    unknown = set(obj) - {"dtype", "shape", "data"}
    if unknown:
        raise WireError(f"{name} has unknown fields {sorted(unknown)}; allowed: ['data', 'dtype', 'shape'].")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in WIRE_DTYPES:
        raise WireError(f"{name}.dtype must be one of {list(WIRE_DTYPES)}, but got {dtype!r}.")
    if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in shape)):
        raise WireError(f"{name}.shape must be a list of non-negative integers, but got {shape!r}.")
    if ndim is not None and len(shape) != ndim:
        raise WireError(f"{name} must have {ndim} dimensions, but its shape is {shape}.")
    count = int(np.prod(shape)) if shape else 1
    if count > max_elements:
        raise WireError(f"{name} has {count} elements; the limit is {max_elements}.")
    if not isinstance(data, str):
        raise WireError(f"{name}.data must be a base64 string, but got {type(data).__name__}.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(f"{name}.data is not valid base64: {e}.") from e
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise WireError(f"{name}.data holds {len(raw)} bytes, but shape {shape} of {dtype} needs {count * itemsize}.")
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise WireError(f"{name} contains NaN or infinite values.")
    return array
