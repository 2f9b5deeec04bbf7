"""The core that needs neither torch nor Ray, and Ray kept at the edge."""

import subprocess
import sys


def _imports_without(blocked: list, modules: str) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter where importing any of ``blocked`` fails."""
    code = "import sys; " + "".join(f"sys.modules[{b!r}] = None; " for b in blocked) + f"import {modules}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_driver_and_the_methods_need_neither_torch_nor_ray():
    done = _imports_without(["torch", "ray"], "gdfo_ray.driver, gdfo_ray.methods, gdfo_ray.harmonize, "
                                              "gdfo_ray.replay, gdfo_ray.metrics, gdfo_ray.playback")
    assert done.returncode == 0, done.stderr[-2000:]
    # The command line and the run builder load Ray only when a run starts one: `gdfo --help` stays quick.
    done = _imports_without(["ray"], "gdfo_ray.api, gdfo_ray.cli")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_ray_layer_and_a_service_teachers_actor_need_no_torch():
    done = _imports_without(["torch"], "gdfo_ray.distributed, gdfo_ray.teacher, gdfo_ray.http_teacher, "
                                       "gdfo_ray.student_group")
    assert done.returncode == 0, done.stderr[-2000:]
    refused = _imports_without(["torch"], "gdfo_ray.student")  # the check itself can fail
    assert refused.returncode != 0 and "torch" in refused.stderr


def test_ray_is_imported_only_by_the_distributed_package_and_tune():
    """Ray stays at the edge: ``api`` may only read its version; every actor, task and shared object is in
    ``gdfo_ray/distributed/`` (Tune's search lives in ``tune``)."""
    import ast
    import pathlib

    import gdfo_ray

    root = pathlib.Path(gdfo_ray.__file__).parent
    allowed = {"tune.py"}
    offenders = []

    def visit(node: ast.AST, rel: str, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inside = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                     else [child.module or ""] if isinstance(child, ast.ImportFrom) else [])
            if any(name == "ray" or name.startswith("ray.") for name in names):
                offenders.append(f"{rel}:{inside}")
            visit(child, rel, inside)

    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not (rel.startswith("distributed/") or rel in allowed):
            visit(ast.parse(path.read_text()), rel, "<module>")
    assert offenders == ["api.py:versions"], offenders  # versions(): records which Ray made a result
