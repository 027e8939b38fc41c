"""One representative call (forward and backward) of every op on CUDA, for the GPU plan's
`compute-sanitizer --tool memcheck` stage (scripts/gpu_plan.py runs it with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that an access past a tensor leaves its allocation instead
of landing in the caching allocator's pool). Sizes are small and odd (D=40, a 7x9 grid), so
partial blocks and row tails are exercised. Prints how often each Triton kernel launched and
names any that no call reached.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mae_kernels as mk  # noqa: E402
from mae_kernels import tokens  # noqa: E402
from tests.utils import KERNELS, count_launches  # noqa: E402

DEV = "cuda"


def backward(out, *inputs):
    torch.autograd.grad(out, inputs, torch.randn_like(out))


def main() -> None:
    B, D, grid = 3, 40, (7, 9)
    L = grid[0] * grid[1]
    x = torch.randn(B, L, D, device=DEV, requires_grad=True)
    with count_launches() as launches:
        maskings = [mk.random_masking(x, 0.75), mk.block_masking(x, 0.75, grid),
                    mk.grid_masking(x[:, :48], (6, 8))]  # its grid's sides must be even
        for x_masked, _, _ in maskings:
            backward(x_masked, x)
        video = torch.randn(B, 4 * L, D, device=DEV, requires_grad=True)
        x_masked, _, _ = mk.tube_masking(video, 0.9, 4)
        backward(x_masked, video)

        x_masked, mask, ids_restore = mk.random_masking(x, 0.75)
        enc = torch.randn(B, 1 + x_masked.shape[1], D, device=DEV, requires_grad=True)
        mask_token = torch.randn(1, 1, D, device=DEV, requires_grad=True)
        pos = torch.randn(1, 1 + L, D, device=DEV, requires_grad=True)
        backward(mk.unshuffle(enc, mask_token, ids_restore, 1, pos), enc, mask_token, pos)

        imgs = torch.randn(B, 3, 16 * grid[0], 16 * grid[1], device=DEV, requires_grad=True)
        backward(mk.unpatchify(mk.patchify(imgs, 16), 16, grid), imgs)
        pred = torch.randn(B, L, 16 * 16 * 3, device=DEV, requires_grad=True)
        for norm_pix_loss in (True, False):
            backward(mk.mae_loss(imgs.detach(), pred, mask, 16, norm_pix_loss), pred)
        mk.hog_targets(imgs.detach(), 16, mask=mask)

        clips = torch.randn(B, 3, 4, 16 * grid[0], 16 * grid[1], device=DEV, requires_grad=True)
        tubelets = mk.patchify3d(clips, (2, 16, 16))
        backward(mk.unpatchify3d(tubelets, (2, 16, 16), (2, *grid)), clips)
        pred3d = torch.randn_like(tubelets, requires_grad=True)
        mask3d = (torch.rand(B, tubelets.shape[1], device=DEV) < 0.9).float()
        backward(mk.mae_loss(clips.detach(), pred3d, mask3d, 16, True, tubelet_size=2), pred3d)

    # the extension's CUDA kernels
    assert "cuda" in tokens.KERNEL_DEVICES, "the extension was built without CUDA kernels"
    index = torch.rand(B, L, device=DEV).argsort(1)[:, :L // 4].contiguous()
    kept = torch.ops.mae_kernels.gather_tokens(x.detach(), index)
    torch.ops.mae_kernels.scatter_tokens(kept, index, L)
    torch.cuda.synchronize()

    for name in sorted(KERNELS):
        print(f"{launches[name]:4d}  {name}")
    missed = sorted(set(KERNELS) - set(launches))
    print("kernels no call reached:", ", ".join(missed) if missed else "none")


if __name__ == "__main__":
    main()
