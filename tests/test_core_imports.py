"""The core that needs neither torch nor Ray."""


def test_the_driver_and_the_methods_need_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['ray'] = None; "
            "import gdfo_ray.driver, gdfo_ray.methods, gdfo_ray.harmonize, gdfo_ray.replay, gdfo_ray.metrics")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
