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


def test_ray_is_imported_only_by_the_distributed_package_and_tune():
    """Ray stays at the edge: ``api`` may only read its version; every actor, task and shared object is in
    ``gdfo_ray/distributed/`` (Tune's search lives in ``tune``)."""
    import ast
    import pathlib

    import gdfo_ray

    root = pathlib.Path(gdfo_ray.__file__).parent
    allowed = {"tune.py"}
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("distributed/") or rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "ray" or name.startswith("ray."):
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == ["api.py:54"], offenders  # versions(): records which Ray made a result
