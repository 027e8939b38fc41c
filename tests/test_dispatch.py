"""How an op finds its implementation: the dispatcher by device, the one testing switch
(MAE_KERNELS_BACKEND), the extension's loading (ABI check, build on import, fallback), and an
import graph without cycles whose rooms import only downward."""
import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mae_kernels import _extension, tokens

ROOT = Path(__file__).resolve().parents[1]


def _python(script: str, package_root=ROOT, **env) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter that imports mae_kernels from `package_root`."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MAE_KERNELS_BACKEND", "MAE_KERNELS_NO_EXTENSION")}
    clean.update(env, PYTHONPATH=str(package_root))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env=clean, timeout=600, cwd=package_root)


def _package_copy(tmp_path: Path) -> Path:
    """mae_kernels without any compiled library: what a plain `pip install -e .` leaves."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "mae_kernels", root / "mae_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", root / "csrc")  # beside the package, as in a checkout
    return root


MASKING_MATCHES_REFERENCE = """
    import torch, mae_kernels as mk
    x, noise = torch.randn(2, 9, 4), torch.rand(2, 9)
    got, want = mk.random_masking(x, 0.5, noise), mk.reference.random_masking(x, 0.5, noise)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
"""


def test_reference_switch_runs_no_custom_op():
    result = _python(MASKING_MATCHES_REFERENCE + """
    with torch.profiler.profile() as prof:
        mk.unshuffle(torch.randn(2, 5, 4), torch.randn(1, 1, 4), got[2])
        mk.mae_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 12), torch.ones(2, 4), 2)
    assert not [e.name for e in prof.events() if e.name.startswith("mae_kernels::")]
    print("reference ok")
    """, MAE_KERNELS_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert "reference ok" in result.stdout


def test_triton_switch_puts_cpu_tensors_on_the_triton_launchers():
    result = _python(MASKING_MATCHES_REFERENCE + """
    from tests.utils import count_launches
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("mae_kernels::masking", "CPU")
    with count_launches() as launches:
        mk.random_masking(x, 0.5, noise)
    assert launches["_masking_kernel"] == 1, launches
    print("triton ok")
    """, MAE_KERNELS_BACKEND="triton", TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "triton ok" in result.stdout


def test_triton_switch_without_interpreter_is_a_clear_error():
    result = _python("import mae_kernels", MAE_KERNELS_BACKEND="triton", TRITON_INTERPRET="0")
    assert result.returncode != 0
    assert "MAE_KERNELS_BACKEND=triton" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_unknown_backend_is_a_clear_error():
    result = _python("import mae_kernels", MAE_KERNELS_BACKEND="fast")
    assert "MAE_KERNELS_BACKEND must be" in result.stderr


def test_no_extension_falls_back_to_plain_pytorch():
    result = _python(MASKING_MATCHES_REFERENCE + """
    assert mk.tokens.LIBRARY is None
    idx = torch.tensor([[0, 2], [5, 1]])
    xg = x.requires_grad_()
    assert torch.equal(mk.gather_tokens(xg, idx), mk.reference.gather_tokens(x, idx))
    mk.random_masking(xg, 0.5, noise)[0].sum().backward()
    print("fallback ok")
    """, MAE_KERNELS_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


@pytest.mark.slow
def test_failed_build_warns_once_and_falls_back(tmp_path):
    """No prebuilt library and no working compiler: one warning, then plain PyTorch."""
    result = _python("""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, mae_kernels as mk
    relevant = [w for w in caught if "could not be built" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert mk.tokens.LIBRARY is None
    """ + MASKING_MATCHES_REFERENCE, package_root=_package_copy(tmp_path),
        MAE_KERNELS_CACHE=str(tmp_path / "cache"), CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_library_built_for_another_torch_is_rebuilt_not_loaded(tmp_path):
    """A library whose embedded build id is not this torch's is never loaded: the sources are
    compiled on import instead, and that build carries this torch's id."""
    assert tokens.LIBRARY is not None
    root = _package_copy(tmp_path)
    built = tokens.LIBRARY.read_bytes()
    ours = _extension.torch_build_id().encode()
    stale = built.replace(b"mae_kernels build: " + ours, b"mae_kernels build: " + b"9" * len(ours))
    assert stale != built
    (root / "mae_kernels" / "_C.abi3.so").write_bytes(stale)
    result = _python("""
    import mae_kernels as mk
    from mae_kernels import _extension
    assert mk.tokens.LIBRARY.name != "_C.abi3.so", mk.tokens.LIBRARY
    assert _extension.built_for(mk.tokens.LIBRARY) == _extension.torch_build_id()
    """ + MASKING_MATCHES_REFERENCE, package_root=root, MAE_KERNELS_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "was built for torch 999" in result.stderr and "not loading it" in result.stderr
    assert "compiling the C++" in result.stderr  # the one line saying what happens, and where


def test_loaded_library_matches_this_torch():
    assert tokens.LIBRARY is not None
    assert _extension.built_for(tokens.LIBRARY) == _extension.torch_build_id()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mae_kernels::gather_tokens", "CPU")


def _imports(path: Path, package: str) -> set[str]:
    """The modules of the two packages that `path` imports, anywhere in the file."""
    found = set()
    parts = path.relative_to(ROOT).with_suffix("").parts
    here = ".".join(parts[:-1])  # the package a relative import starts from
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c.split(".")[0] in ("mae_kernels", "mae")}
    return found


def _import_graph() -> dict[str, set[str]]:
    """Each module of the two packages (a package by its name) to those of them it imports."""
    modules = {}
    for package in ("mae_kernels", "mae"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return {name: {m for m in _imports(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycles():
    graph = _import_graph()
    # a package's __init__ re-exports its modules; an edge into it is an edge to those
    packages = {n for n in graph if any(m.startswith(n + ".") for m in graph)}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if nxt in packages and node.startswith(nxt + "."):
                continue  # a module importing a sibling through its own package
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


# mae's rooms, lowest first (DESIGN.md): a module imports from its own room and those below
# (models and data side by side, neither importing the other), mae_kernels from anywhere
ROOMS = {"mae.models": 0, "mae.data": 0, "mae.checkpoints": 1, "mae.eval": 2, "mae.train": 3,
         "mae.cli": 4}


def _room(module: str) -> str | None:
    return next((room for room in ROOMS if module == room or module.startswith(room + ".")),
                None)


def test_every_mae_module_sits_in_a_room():
    graph = _import_graph()
    assert {m for m in graph if m.startswith("mae.") and _room(m) is None} == set()
    assert ROOMS.keys() <= graph.keys()


def test_mae_rooms_import_only_downward():
    upward = []
    for module, imported in _import_graph().items():
        room = _room(module)
        if room is None:  # mae_kernels, and mae's own __init__ (the models' names)
            continue
        for target in imported:
            # `import mae` or `from mae import X` is an import of the models the package exports
            target_room = "mae.models" if target == "mae" else _room(target)
            if target_room is None or target_room == room:
                continue
            if ROOMS[target_room] >= ROOMS[room]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward
    assert _import_graph()["mae"] <= {"mae.models"}  # the front door re-exports the models


@pytest.mark.parametrize("module", ["mae_kernels.masking", "mae_kernels.unshuffling",
                                    "mae_kernels.loss", "mae_kernels.patches",
                                    "mae_kernels.tokens", "mae_kernels.integrations",
                                    "mae.models", "mae.data.shards", "mae.checkpoints.files",
                                    "mae.eval.anomaly", "mae.train.pretrain"])
def test_each_module_imports_alone(module):
    result = _python(f"import {module}")
    assert result.returncode == 0, result.stderr
