"""Backend selection, and the fallback when the compiled extension is missing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mae_kernels as mk
from mae_kernels import backend


def test_use_backend_nests_and_restores():
    outer = mk.current_backend()
    with mk.use_backend("reference"):
        assert mk.current_backend() == "reference"
        with mk.use_backend("cpp"):
            assert mk.current_backend() == "cpp"
        assert mk.current_backend() == "reference"
    assert mk.current_backend() == outer


def test_auto_picks_extension_on_cpu():
    if not backend.HAS_EXTENSION:
        pytest.skip("extension not built")
    with mk.use_backend("auto"):
        assert backend.resolve(torch.device("cpu")) == backend.EXTENSION
        assert backend.resolve(torch.device("cpu"), has_extension_path=False) == backend.REFERENCE


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "reference")
    assert mk.current_backend() == "reference"
    assert backend.resolve(torch.device("cpu")) == backend.REFERENCE
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        mk.current_backend()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not backend.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with mk.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.resolve(torch.device("cpu"))


def test_missing_extension_warns_once_and_falls_back():
    """Importing with the compiled module hidden: one warning, then the reference path."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["mae_kernels._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, mae_kernels as mk
            from mae_kernels import reference as ref
        relevant = [w for w in caught if "extension is unavailable" in str(w.message)]
        assert len(relevant) == 1, [str(w.message) for w in caught]
        assert not mk.backend.HAS_EXTENSION
        x = torch.randn(2, 6, 3, requires_grad=True)
        noise = torch.rand(2, 6)
        got = mk.random_masking(x, 0.5, noise)
        want = ref.random_masking(x, 0.5, noise)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        idx = torch.tensor([[0, 2], [5, 1]])
        assert torch.equal(torch.ops.mae_kernels.gather_tokens(x, idx), ref.gather_tokens(x, idx))
        got[0].sum().backward()
        print("fallback ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "MAE_KERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
