"""The service's array format (gdfo_ray/wire.py): exact round trips, and a named error for each bad field."""

import base64

import numpy as np
import pytest

from gdfo_ray.wire import WireError, decode_array, encode_array


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_arrays_round_trip_as_little_endian_bytes(dtype):
    a = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(dtype)
    wire = encode_array(a.astype(np.dtype(dtype).newbyteorder(">")), dtype)  # a big-endian input travels alike
    assert base64.b64decode(wire["data"]) == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    out = decode_array(wire, "x")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a.astype(np.float32))


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "x must be an object"),
    ({"dtype": "float32", "shape": [1], "data": "AAAAAA==", "extra": 1}, "unknown fields \\['extra'\\]"),
    ({"dtype": "float64", "shape": [1], "data": ""}, "x.dtype must be one of"),
    ({"dtype": "float32", "shape": [-1], "data": ""}, "x.shape must be a list of non-negative integers"),
    ({"dtype": "float32", "shape": [True], "data": ""}, "x.shape must be a list"),
    ({"dtype": "float32", "shape": [2], "data": "AAAAAA=="}, "holds 4 bytes, but shape \\[2\\]"),
    ({"dtype": "float32", "shape": [1], "data": "not base64!"}, "not valid base64"),
    ({"dtype": "float32", "shape": [1], "data": 7}, "x.data must be a base64 string"),
    ({"dtype": "float32", "shape": [1 << 20, 1 << 20], "data": ""}, "elements; the limit"),
    (encode_array(np.array([np.nan])), "NaN or infinite"),
])
def test_each_bad_field_is_named(obj, match):
    with pytest.raises(WireError, match=match):
        decode_array(obj, "x")


def test_the_expected_number_of_dimensions_is_enforced():
    with pytest.raises(WireError, match="x must have 3 dimensions, but its shape is \\[2, 2\\]"):
        decode_array(encode_array(np.zeros((2, 2))), "x", ndim=3)
    with pytest.raises(WireError, match="dtype must be one of"):
        encode_array(np.zeros(2), "int8")
