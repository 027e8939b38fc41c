"""Compiles every Triton kernel for Hopper (sm_90) ahead of time, without a GPU, exactly as the
launchers would launch it at MAE sizes, and reports the width of its global loads and stores.

Run with TRITON_INTERPRET unset (tests/test_triton_compile.py does): the launchers run on CPU
tensors with their kernels replaced by recorders, then each recorded launch is compiled with
the specialisations Triton's JIT would apply (16-byte aligned pointers, integers divisible by 16).
Prints one JSON object: {kernel: {"compiled": n, "loads": [...], "stores": [...]}}.
"""
import json
import re
import warnings

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mae_kernels.kernels import loss, masking, patchify, rows, unshuffle

warnings.filterwarnings("ignore")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


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
    B, L, D, P = 8, 196, 768, 1
    x = torch.randn(B, L, D).to(dtype)
    noise = torch.rand(B, L)
    out = masking.random_masking_triton(x, noise, 49, torch.float32)
    rows.gather_rows_triton(x, out[3])
    rows.scatter_rows_triton(out[0], out[3], L)
    dec = torch.randn(B, P + 49, 512).to(dtype)
    unshuffle.unshuffle_triton(dec, torch.randn(1, 1, 512).to(dtype), out[2], P,
                               torch.randn(1, P + L, 512).to(dtype))
    unshuffle.unshuffle_backward_triton(torch.randn(B, P + L, 512).to(dtype), out[2], 49, P,
                                        dtype, True, True)
    imgs = torch.randn(B, 3, 224, 224).to(dtype)
    pred = torch.randn(B, L, 768).to(dtype)
    loss.mae_loss_triton(imgs, pred, out[1], 16, True)
    loss.mae_loss_backward_triton(torch.tensor(1.0), imgs, pred, out[1], 16, True)
    patchify.unpatchify_triton(patchify.patchify_triton(imgs, 16), 16, 14, 14, 3)


def main():
    kernels = {
        "rows": (rows, "_copy_rows_kernel"),
        "random_masking": (masking, "_random_masking_kernel"),
        "unshuffle": (unshuffle, "_unshuffle_kernel"),
        "unshuffle_backward": (unshuffle, "_unshuffle_backward_kernel"),
        "loss_forward": (loss, "_loss_forward_kernel"),
        "loss_backward": (loss, "_loss_backward_kernel"),
        "patchify": (patchify, "_patch_rows_kernel"),
    }
    recorders = {}
    for name, (module, attr) in kernels.items():
        recorders[name] = Recorder(getattr(module, attr))
        setattr(module, attr, recorders[name])
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
