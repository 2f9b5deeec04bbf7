"""The core that needs neither torch nor Ray."""


def test_the_driver_and_the_methods_need_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['ray'] = None; "
            "import gdfo_ray.driver, gdfo_ray.methods, gdfo_ray.harmonize, gdfo_ray.replay, gdfo_ray.metrics")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_ray_layer_and_a_service_teachers_actor_need_no_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; "
            "import gdfo_ray.distributed, gdfo_ray.teacher, gdfo_ray.http_teacher, gdfo_ray.student_group")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
