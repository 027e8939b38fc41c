"""Compiles every Triton kernel for Hopper (sm_90) ahead of time, without a GPU, exactly as the
launchers would launch it at MAE sizes, and reports the width of its global loads and stores.

Run with TRITON_INTERPRET unset (tests/test_triton_compile.py does): the launchers run on CPU
tensors with their kernels' `run` replaced by recorders, then each recorded launch is compiled
with the specialisations Triton's JIT would apply (16-byte aligned pointers, integers divisible
by 16).
Prints one JSON object: {kernel: {"compiled": n, "loads": [...], "stores": [...]}}.
"""
import json
import re
import warnings

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mae_kernels import loss, masking, patches, unshuffling

warnings.filterwarnings("ignore")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}


class Recorder:
    """Stands in for a kernel's `run`: keeps the arguments of each launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []
        kernel.run = self

    def __call__(self, *args, grid, warmup, **kwargs):
        self.calls.append((args, kwargs))


def compile_call(kernel, args, kwargs):
    signature, constexprs, attrs = {}, {}, {}
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def run_launchers(dtype):
    """Each launcher at MAE-B sizes (the kernels only record: outputs stay uninitialised)."""
    B, L, D, P, K = 8, 196, 768, 1, 49
    x = torch.randn(B, L, D).to(dtype)
    ids_restore = torch.stack([torch.randperm(L) for _ in range(B)])
    mask = (ids_restore >= K).float()
    masking._random_masking_triton(x, torch.rand(B, L), K, torch.float32)
    dec = torch.randn(B, P + K, 512).to(dtype)
    unshuffling._unshuffle_triton(dec, torch.randn(1, 1, 512).to(dtype), ids_restore, P,
                                  torch.randn(1, P + L, 512).to(dtype))
    unshuffling._unshuffle_backward_triton(torch.randn(B, P + L, 512).to(dtype), ids_restore, K,
                                           P, dtype)
    imgs = torch.randn(B, 3, 224, 224).to(dtype)
    pred = torch.randn(B, L, 768).to(dtype)
    loss._mae_loss_triton(imgs, pred, mask, 16, True)
    loss._mae_loss_backward_triton(torch.tensor(1.0), imgs, pred, mask, 16, True)
    patches._unpatchify_triton(patches._patchify_triton(imgs, 16), 16, 14, 14, 3)


def main():
    kernels = {
        "random_masking": masking._random_masking_kernel,
        "unshuffle": unshuffling._unshuffle_kernel,
        "unshuffle_backward": unshuffling._unshuffle_backward_kernel,
        "loss_forward": loss._loss_forward_kernel,
        "loss_backward": loss._loss_backward_kernel,
        "patchify": patches._patch_rows_kernel,
    }
    recorders = {name: Recorder(kernel) for name, kernel in kernels.items()}
    with set_wrap_triton_enabled(False):  # launch directly, as the op's eager kernel does
        for dtype in (torch.bfloat16, torch.float32):
            run_launchers(dtype)
    report = {}
    for name, recorder in recorders.items():
        entry = report.setdefault(name, {"compiled": 0, "loads": set(), "stores": set()})
        for args, kwargs in recorder.calls:
            ptx = compile_call(recorder.kernel, args, dict(kwargs))
            entry["compiled"] += 1
            entry["loads"] |= set(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx))
            entry["stores"] |= set(re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx))
    print(json.dumps({k: {**v, "loads": sorted(v["loads"]), "stores": sorted(v["stores"])}
                      for k, v in report.items()}))


if __name__ == "__main__":
    main()
