"""Devices and dtypes (gdfo_ray/models/devices.py)."""

import numpy as np
import torch


def test_auto_dtype_takes_bfloat16_only_where_the_processor_computes_it(monkeypatch):
    import gdfo_ray.models.devices as models

    cpu = torch.device("cpu")
    assert models.resolve_dtype("float16", cpu) == "float16"
    monkeypatch.setattr(models, "cpu_has_fast_bfloat16", lambda: True)
    assert models.resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(models, "cpu_has_fast_bfloat16", lambda: False)
    assert models.resolve_dtype("auto", cpu) == "float32"


def test_host_tensor_copies_read_only_and_reversed_arrays():
    """Ray's object store gives read-only arrays; a reversed view has negative strides."""
    import torch

    from gdfo_ray.models import host_tensor

    a = np.arange(6.0)
    a.setflags(write=False)
    t = host_tensor(a[::-1], torch.device("cpu"))
    assert t.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    t[0] = -1.0
    assert a[-1] == 5.0
