"""The core that needs neither torch nor Ray, and Ray kept at the edge."""

import subprocess
import sys


def _imports_without(blocked: list, modules: str) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter where importing any of ``blocked`` fails."""
    code = "import sys; " + "".join(f"sys.modules[{b!r}] = None; " for b in blocked) + f"import {modules}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_driver_and_the_methods_need_neither_torch_nor_ray():
    done = _imports_without(["torch", "ray"], "gdfo_ray.driver, gdfo_ray.methods, gdfo_ray.harmonize, "
                                              "gdfo_ray.replay, gdfo_ray.metrics, gdfo_ray.teachers.playback")
    assert done.returncode == 0, done.stderr[-2000:]
    # The command line and the run builder load Ray only when a run starts one: `gdfo --help` stays quick.
    done = _imports_without(["ray"], "gdfo_ray.api, gdfo_ray.cli")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_ray_layer_and_a_service_teachers_actor_need_no_torch():
    done = _imports_without(["torch"], "gdfo_ray.distributed, gdfo_ray.teachers, gdfo_ray.teachers.http, "
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


def _import_graph() -> dict:
    """``{module: modules of gdfo_ray it imports}``, at any depth of its code (a function's import counts)."""
    import ast
    import pathlib

    import gdfo_ray

    root = pathlib.Path(gdfo_ray.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def target(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(target(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found.update(target(f"{base}.{a.name}") for a in node.names)
        graph[module] = {m for m in found if m and m != module}
    return graph


def test_the_import_graph_has_no_circle_and_no_import_back_up():
    graph = _import_graph()
    assert "gdfo_ray.teachers.base" in graph and "gdfo_ray.api" in graph  # the walk found the package
    up = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if m.startswith(d + "."))
    assert up == [], up  # a module importing a package above it (its __init__) runs that package first
    # A circle is a path from a module back to itself.
    circles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join(path + (start,)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert circles == [], circles[:5]


def test_the_package_version_is_pyprojects():
    import pathlib
    import re

    from gdfo_ray import __version__

    pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == __version__
