"""`--data-loader gpu` (mae/data/gpu.py): workers that read files and ship packed tensors (JPEG
bytes for the device decoder, Pillow's pixels for the rest), the loader thread's decode + boxes +
one fused crop, on the CPU here (the op's CPU kernel; the device JPEG decoder is stood in for by
a batched decoder that fails the whole call on one bad file, as nvJPEG's does)."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mae.cli import main
from mae.data import gpu as gpu_data
from mae.data.gpu import (
    EncodedDataset,
    GpuBatches,
    JpegDecoder,
    PackedBatch,
    center_crop_boxes,
    collate_packed,
)
from mae.data.images import (
    ImageFolderDataset,
    ShapesDataset,
    center_resize,
    collate_skipping,
    random_resized_crop,
    read_rgb,
    to_tensor,
)
from mae_kernels import resized_crop

from .test_cli import exit_code_and_errors
from .utils import running

SIZE = 16
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A photograph-like (smooth) RGB image: gradients and a soft disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 0.3 * min(h, w)
    disc = 0.5 - 0.5 * np.tanh((np.hypot(y - cy, x - cx) - r) / 4)
    channels = [rng.uniform(40, 200) + rng.uniform(-50, 50) * (x / w) + rng.uniform(-50, 50)
                * (y / h) + rng.uniform(-60, 60) * disc for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).round().astype(np.uint8)


def write_folder(root, sizes=((40, 56), (64, 48), (37, 90), (120, 80)), kinds=("png",)):
    """root/train/<class>/<i>.<ext>: two classes, images of `sizes` in the formats `kinds`
    (png, grey (PNG), png16, jpeg, jpeg-grey, jpeg-cmyk, jpeg-progressive, jpeg-rotated: an
    EXIF orientation of 6)."""
    paths = []
    for i, (h, w) in enumerate(sizes):
        kind = kinds[i % len(kinds)]
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(smooth_image(h, w, i))
        path = folder / f"{i}.{'jpg' if kind.startswith('jpeg') else 'png'}"
        if kind == "grey":
            img.convert("L").save(path)
        elif kind == "png16":
            Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(path)
        elif kind == "jpeg-cmyk":
            img.convert("CMYK").save(path, quality=95)
        elif kind == "jpeg-grey":
            img.convert("L").save(path, quality=95)
        elif kind == "jpeg-progressive":
            img.save(path, quality=95, progressive=True)
        elif kind == "jpeg-rotated":
            exif = Image.Exif()
            exif[gpu_data.EXIF_ORIENTATION] = 6
            img.save(path, quality=95, exif=exif)
        elif kind == "jpeg":
            img.save(path, quality=95)
        else:
            img.save(path)
        paths.append(path)
    return paths


def pillow_decoder(calls: list | None = None, refuses=()) -> JpegDecoder:
    """A batched JPEG decoder on the CPU that, like nvJPEG's batched call, fails the whole call
    when one file fails (or is one it `refuses`, by size in bytes); records each call's size."""
    def decode(tensors, device):
        if calls is not None:
            calls.append(len(tensors))
        out = []
        for t in tensors:
            if t.numel() in refuses:
                raise RuntimeError("refused")
            try:
                with Image.open(io.BytesIO(t.numpy().tobytes())) as img:
                    rgb = img.convert("RGB")
            except OSError as exc:
                raise RuntimeError(f"decode failed: {exc}") from exc
            out.append(torch.from_numpy(np.asarray(rgb).transpose(2, 0, 1).copy()).to(device))
        return out

    return JpegDecoder("pillow-batch", decode)


def encoded_batch(root, ship_jpegs=False, **kwargs):
    dataset = EncodedDataset(ImageFolderDataset(root, SIZE, split="train", **kwargs), ship_jpegs)
    return dataset, collate_packed([dataset[i] for i in range(len(dataset))])


def pillow_tensors(batch):
    """The batch's files as the Pillow path reads them: (3, H, W) uint8."""
    return [torch.from_numpy(np.asarray(read_rgb(n, n)).copy()).permute(2, 0, 1)
            for n in batch.names]


@pytest.mark.parametrize("ship_jpegs", [False, True], ids=["workers-decode", "thread-decodes"])
def test_gpu_batch_is_the_op_on_the_decoded_images_with_the_drawn_boxes(tmp_path, ship_jpegs):
    sizes = [(40, 56), (64, 48), (37, 90), (120, 80), (50, 50), (33, 70), (44, 44), (52, 30)]
    write_folder(tmp_path, sizes, kinds=("png", "grey", "png16", "jpeg-cmyk", "jpeg",
                                         "jpeg-grey", "jpeg-progressive", "jpeg-rotated"))
    _, (batch, labels, skipped) = encoded_batch(tmp_path, ship_jpegs)
    assert skipped == 0 and sorted(map(tuple, batch.shapes.tolist())) == sorted(sizes)
    calls = []
    prepare = GpuBatches(SIZE, "cpu", seed=3, rank=1, decoder=pillow_decoder(calls))
    with running("cpu"):
        imgs, got_labels, unreadable = prepare(batch, labels, 2, 5)
        boxes, flips = prepare.boxes(batch.shapes, 2, 5)
        want = resized_crop(pillow_tensors(batch), boxes, SIZE, flips)
    assert unreadable == 0 and imgs.shape == (8, 3, SIZE, SIZE) and imgs.dtype == torch.float32
    assert flips.any() and not flips.all()  # the draw flips some, not all (seeded)
    torch.testing.assert_close(got_labels, labels)
    torch.testing.assert_close(imgs, want, rtol=0, atol=1e-6)
    # only the whole RGB and greyscale JPEGs without an EXIF rotation travel as bytes
    shipped = {n.rsplit("/", 1)[1] for n, j in zip(batch.names, batch.jpeg.tolist()) if j}
    assert shipped == ({"4.jpg", "5.jpg", "6.jpg"} if ship_jpegs else set())
    assert calls == ([3] if ship_jpegs else [])


def test_workers_ship_one_packed_tensor_through_shared_memory(tmp_path):
    """A DataLoader worker's batch is one uint8 buffer (JPEG bytes and pixels back to back)
    that reaches the main process in shared memory: no bytes object per image is pickled."""
    paths = write_folder(tmp_path, kinds=("png", "jpeg"))
    dataset = EncodedDataset(ImageFolderDataset(tmp_path, SIZE, split="train"), ship_jpegs=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                         collate_fn=dataset.collate)
    (batch, labels, skipped), = list(loader)
    assert isinstance(batch, PackedBatch) and batch.data.dtype == torch.uint8
    assert batch.data.is_shared() and batch.data.dim() == 1 and skipped == 0
    bounds = batch.bounds.tolist()
    for b, name in enumerate(batch.names):
        item = batch.data[bounds[b]:bounds[b + 1]]
        if batch.jpeg[b]:  # the file's own bytes
            assert bytes(item.numpy()) == open(name, "rb").read()
        else:
            h, w = batch.shapes[b].tolist()
            assert torch.equal(item.view(3, h, w), pillow_tensors(batch)[b])
    assert sorted(n.rsplit("/", 1)[1] for n in batch.names) == sorted(p.name for p in paths)


def test_a_failed_batched_decode_is_split_to_find_the_bad_file(tmp_path):
    """One JPEG the decoder fails on makes the batched call fail: the batch is halved until
    that file is alone; Pillow cannot read it either, so it is skipped, named and counted."""
    paths = write_folder(tmp_path, sizes=[(30 + i, 40) for i in range(8)], kinds=("jpeg",))
    _, (batch, labels, _) = encoded_batch(tmp_path, ship_jpegs=True)
    bad = batch.names.index(str(paths[5]))
    start, stop = batch.bounds[bad].item(), batch.bounds[bad + 1].item()
    batch.data[start + 300:stop - 2] = 0  # its entropy-coded data wiped: no longer a JPEG
    calls = []
    prepare = GpuBatches(SIZE, "cpu", decoder=pillow_decoder(calls))
    with pytest.warns(RuntimeWarning, match=f"skipping unreadable image {paths[5]}"):
        imgs, kept_labels, unreadable = prepare(batch, labels, 0, 0)
    assert unreadable == 1 and imgs.shape[0] == 7 and prepare.take_fallbacks() == 0
    assert calls[0] == 8 and 1 in calls and len(calls) <= 1 + 2 * math.ceil(math.log2(8))
    keep = [b for b in range(8) if b != bad]
    torch.testing.assert_close(kept_labels, labels[keep])
    boxes, flips = prepare.boxes(batch.shapes, 0, 0)
    with running("cpu"):
        want = resized_crop([pillow_tensors(batch)[b] for b in keep], boxes[keep], SIZE,
                            flips[keep])
    torch.testing.assert_close(imgs, want, rtol=0, atol=1e-6)


def test_a_file_only_the_device_decoder_fails_on_is_decoded_by_pillow_and_counted(tmp_path):
    paths = write_folder(tmp_path, sizes=[(30 + i, 40) for i in range(4)], kinds=("jpeg",))
    _, (batch, labels, _) = encoded_batch(tmp_path, ship_jpegs=True)
    refused = paths[2].stat().st_size
    prepare = GpuBatches(SIZE, "cpu", decoder=pillow_decoder(refuses={refused}))
    with pytest.warns(RuntimeWarning, match=f"pillow-batch failed on {paths[2]} \\(refused\\); "
                                            f"decoded on the CPU by Pillow"):
        imgs, _, unreadable = prepare(batch, labels, 0, 0)
    assert unreadable == 0 and imgs.shape[0] == 4
    assert prepare.take_fallbacks() == 1 and prepare.take_fallbacks() == 0  # per epoch


def test_an_evaluation_counts_the_files_only_the_device_decoder_fails_on(tmp_path):
    """evaluate() through the gpu loader's centre crops reports the files its device decoder
    failed on (Pillow decoded them) beside the scores, counting this evaluation's only."""
    from mae.data.prefetch import DeviceLoader
    from mae.train.engine import evaluate

    paths = write_folder(tmp_path, sizes=[(30 + i, 40) for i in range(6)], kinds=("jpeg",))
    dataset, _ = encoded_batch(tmp_path, ship_jpegs=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_packed)
    prepare = GpuBatches(SIZE, "cpu", train=False, decoder=pillow_decoder(
        refuses={paths[1].stat().st_size, paths[4].stat().st_size}))
    prepare.fallbacks = 5  # an earlier evaluation's
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 3))
    with pytest.warns(RuntimeWarning, match="decoded on the CPU by Pillow"):
        stats = evaluate(model, DeviceLoader(loader, torch.device("cpu"), prepare),
                         torch.device("cpu"), None)
    assert stats["images"] == 6 and stats["decode_fallbacks"] == 2
    plain = torch.utils.data.DataLoader(ImageFolderDataset(tmp_path, SIZE, split="train"),
                                        batch_size=4, collate_fn=collate_skipping)
    assert "decode_fallbacks" not in evaluate(model, plain, torch.device("cpu"), None)


def broken_decoder(calls):
    def decode(tensors, device):
        calls.append(len(tensors))
        raise RuntimeError("nvjpegCreate failed: NVJPEG_STATUS_ARCH_MISMATCH")

    return JpegDecoder("nvjpeg-test", decode)


def test_a_broken_device_decoder_is_one_warning_then_the_cpu_decodes(tmp_path, capsys):
    """A decoder that fails on every JPEG Pillow reads: the first 4 are taken for odd files
    (one warning each); at 8 in a row it is broken: one line, then the CPU decodes."""
    write_folder(tmp_path, sizes=[(30 + i, 40) for i in range(4)], kinds=("jpeg",))
    _, (batch, labels, _) = encoded_batch(tmp_path, ship_jpegs=True)
    calls = []
    prepare = GpuBatches(SIZE, "cpu", decoder=broken_decoder(calls))
    with pytest.warns(RuntimeWarning, match="nvjpeg-test failed on .*; decoded on the CPU"):
        first, _, unreadable = prepare(batch, labels, 0, 0)
    assert unreadable == 0 and first.shape[0] == 4 and capsys.readouterr().err == ""
    second, _, _ = prepare(batch, labels, 0, 1)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: nvjpeg-test failed on 8 JPEGs in a row that Pillow decodes "
                   "(nvjpegCreate failed: NVJPEG_STATUS_ARCH_MISMATCH): the CPU decodes the "
                   "JPEGs from now on, in the loader thread (counted as decode_fallbacks) "
                   "until the DataLoader workers start again (the next epoch) and decode "
                   "them"], err
    tried = len(calls)
    again, _, _ = prepare(batch, labels, 0, 0)
    assert len(calls) == tried and capsys.readouterr().err == ""  # not tried again, said once
    torch.testing.assert_close(again, first)
    assert prepare.take_fallbacks() == 12
    # asked for by name (--data-loader gpu), the run stops with that line instead
    strict = GpuBatches(SIZE, "cpu", decoder=broken_decoder([]), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict(batch, labels, 0, 0)
    with pytest.raises(ValueError, match=r"^--data-loader gpu: nvjpeg-test failed on 8 JPEGs "
                                         r"in a row that Pillow decodes .*; use --data-loader "
                                         r"pil"):
        strict(batch, labels, 0, 1)


def test_after_the_device_decoder_broke_the_workers_decode_from_the_next_epoch(tmp_path,
                                                                            capsys):
    """The decoder breaks in epoch 0 (the loader thread decodes the rest); as epoch 1's
    Prefetcher starts the DataLoader workers again they decode the JPEGs (Pillow, in
    parallel): no fallback in the thread, no decoder call, the same pixels."""
    from mae.data.prefetch import Prefetcher

    write_folder(tmp_path, sizes=[(30 + i, 40) for i in range(12)], kinds=("jpeg",))
    dataset, _ = encoded_batch(tmp_path, ship_jpegs=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                         collate_fn=collate_packed)
    calls = []
    prepare = GpuBatches(SIZE, "cpu", train=False, decoder=broken_decoder(calls))
    epochs = []
    for epoch in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first 4 files' own warnings
            with Prefetcher(loader, "cpu", prepare, epoch=epoch) as batches:
                epochs.append([imgs for imgs, _, _ in batches])
        if epoch == 0:
            assert "the CPU decodes the JPEGs from now on" in capsys.readouterr().err
            assert prepare.take_fallbacks() == 12 and dataset.ship_jpegs
            tried = len(calls)
    assert not dataset.ship_jpegs and len(calls) == tried and prepare.take_fallbacks() == 0
    for before, after in zip(*epochs, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_pillow_path_crops_then_resizes_as_the_gpu_path(tmp_path):
    """A dark image in a white frame, the box just inside the frame: Pillow's `resize(box=)`
    would filter the white in at the edges (17 grey levels, measured); cropping first, as
    torchvision and the fused op do, keeps the edges dark: the loaders agree there."""
    pixels = np.full((40, 40, 3), 255, np.uint8)
    pixels[4:36, 4:36] = 30
    img = Image.fromarray(pixels)

    class Box:  # draws the box (4, 4, 32, 32): area 0.64, ratio 1, at (4, 4)
        def uniform(self, low, high):
            return low

        def randint(self, low, high):
            return 4

    pil = to_tensor(random_resized_crop(img, (SIZE, SIZE), Box(), scale=(0.64, 0.64),
                                        ratio=(1, 1)))
    with running("cpu"):
        op = resized_crop([torch.from_numpy(pixels).permute(2, 0, 1).contiguous()],
                          torch.tensor([[4, 4, 32, 32]]), SIZE)[0]
    diff = ((pil - op) * STD * 255).abs()
    assert diff.max() < 1, diff.max()


@pytest.mark.parametrize("shape", [(64, 64), (375, 500), (500, 375), (33, 200), (17, 19)])
def test_eval_box_is_center_resize_geometry(shape):
    """The box is center_resize's crop mapped back to the source, within half a pixel."""
    H, W = shape
    (top, left, h, w), = center_crop_boxes(torch.tensor([shape]), 32).tolist()
    scale = max(32 / H, 32 / W) * 256 / 224
    resized_h, resized_w = max(32, round(H * scale)), max(32, round(W * scale))
    crop_top, crop_left = (resized_h - 32) // 2, (resized_w - 32) // 2
    for got, want in ((top, crop_top * H / resized_h), (left, crop_left * W / resized_w),
                      (h, 32 * H / resized_h), (w, 32 * W / resized_w)):
        assert abs(got - want) <= 0.5 + 1e-9, (got, want)
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W


def test_eval_batch_is_within_a_pixel_shift_of_center_resize(tmp_path):
    """Evaluation through the gpu path against the Pillow path's center_resize: the box is
    rounded to whole source pixels and the filter stays inside it, so small shifts: measured
    0.57/255 apart on average (5.3/255 at most, at edges)."""
    write_folder(tmp_path, sizes=((64, 64), (96, 72), (80, 120)))
    _, (batch, labels, _) = encoded_batch(tmp_path)
    imgs, _, _ = GpuBatches(SIZE, "cpu", train=False)(batch, labels, 0, 0)
    pillow = torch.stack([to_tensor(center_resize(read_rgb(n, n), (SIZE, SIZE)))
                          for n in batch.names])
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    diff = ((imgs - pillow) * std * 255).abs()
    assert diff.mean() < 1, diff.mean()


def test_decoding_in_sub_batches_under_a_small_budget_gives_the_same_batch(tmp_path, monkeypatch):
    write_folder(tmp_path, sizes=((200, 300), (64, 48), (37, 90), (150, 120), (20, 20)))
    _, (batch, labels, _) = encoded_batch(tmp_path)
    calls = []
    real = gpu_data.resized_crop

    def recording(data, boxes, size, flips, **kwargs):
        calls.append((len(boxes), data.numel()))
        return real(data, boxes, size, flips, **kwargs)

    monkeypatch.setattr(gpu_data, "resized_crop", recording)
    whole, _, _ = GpuBatches(SIZE, "cpu")(batch, labels, 0, 0)
    assert [n for n, _ in calls] == [5]
    calls.clear()
    budget = 3 * 150 * 120  # less than the first image: it goes alone
    chunked, _, _ = GpuBatches(SIZE, "cpu", budget=budget)(batch, labels, 0, 0)
    assert len(calls) > 1 and sum(n for n, _ in calls) == 5
    assert all(n == 1 or held <= budget for n, held in calls)  # the decoded bytes held at once
    # the CPU kernel pads its weight matrices to the call's widest crop: sums may differ by ulps
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    for run in gpu_data._chunks([3 * h * w for h, w in batch.shapes.tolist()], budget):
        assert len(run) == 1 or sum(3 * h * w for h, w in batch.shapes[run].tolist()) <= budget


def test_built_in_shapes_go_as_their_pixels():
    dataset = EncodedDataset(ShapesDataset(SIZE, length=4))
    item = dataset[3]
    img, label = dataset.base.load(3)
    assert item.label == label and item.shape == (64, 64) and not item.jpeg
    assert np.array_equal(item.payload.transpose(1, 2, 0), np.asarray(img))


def test_bad_files_are_skipped_counted_and_named(tmp_path):
    paths = write_folder(tmp_path, sizes=((40, 56), (64, 48), (37, 90), (50, 50)),
                         kinds=("png", "jpeg"))
    paths[0].write_bytes(b"not an image")  # the header fails: the worker skips it
    data = paths[1].read_bytes()  # a JPEG whose header reads but whose data is cut short
    paths[1].write_bytes(data[:len(data) * 2 // 3])
    for ship_jpegs in (False, True):  # a cut JPEG goes to Pillow in the worker either way
        with pytest.warns(RuntimeWarning) as caught:
            dataset, (batch, labels, skipped) = encoded_batch(tmp_path, ship_jpegs)
        said = " ".join(str(w.message) for w in caught)
        assert str(paths[0]) in said and str(paths[1]) in said
        assert skipped == 2 and len(batch) == 2 and not batch.jpeg[:1].any()
        imgs, kept_labels, unreadable = GpuBatches(SIZE, "cpu", decoder=pillow_decoder())(
            batch, labels, 0, 0)
        assert unreadable == 0 and imgs.shape[0] == 2 and len(kept_labels) == 2
    # the Pillow path counts the same two files
    pil = ImageFolderDataset(tmp_path, SIZE, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(pil[i] is None for i in range(len(pil))) == 2


def test_boxes_depend_on_seed_epoch_rank_step_only():
    shapes = torch.tensor([[375, 500], [64, 64], [800, 600]] * 4)

    def draw(seed=0, epoch=1, rank=0, step=7):
        return GpuBatches(224, "cpu", seed=seed, rank=rank).boxes(shapes, epoch, step)

    first = draw()
    GpuBatches(224, "cpu").boxes(shapes, 0, 0)  # another draw in between changes nothing
    again = draw()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (draw(seed=1), draw(epoch=2), draw(rank=1), draw(step=8)):
        assert not torch.equal(other[0], first[0])
    top, left, h, w = first[0].T
    area = (h * w).double() / (shapes[:, 0] * shapes[:, 1]).double()
    assert (area >= 0.2 - 0.02).all() and (area <= 1).all()  # the pre-training scale (0.2, 1)
    assert ((top + h) <= shapes[:, 0]).all() and ((left + w) <= shapes[:, 1]).all()


@pytest.mark.parametrize("flags,named,exit_code", [
    (["--data-loader", "foo"], "--data-loader", 2),
    (["--data-loader", "gpu", "--video"], "--data-loader gpu", 2),
    (["--data-path", "{dir}/train-{{000000..000003}}.tar"], "train-000000.tar", 1),
])
def test_bad_loader_input_is_one_error_line(tmp_path, capsys, flags, named, exit_code):
    out = tmp_path / "out"
    flags = [f.format(dir=tmp_path) for f in flags]
    code, errors = exit_code_and_errors(
        ["pretrain", "--model", "mae_vit_tiny_patch16", "--input-size", "16", "--patch-size",
         "4", "--epochs", "1", "--device", "cpu", "--quiet", *flags, "--output-dir", str(out)],
        capsys)
    assert code == exit_code and len(errors) == 1 and named in errors[0], (code, errors)
    assert not out.exists()


def test_default_loader_is_pil_on_cpu():
    from mae.cli import parse_args

    assert parse_args(["pretrain", "--device", "cpu"]).data_loader == "pil"
    assert parse_args(["linprobe", "--finetune", "x.pth", "--device", "cpu",
                       "--data-loader", "gpu"]).data_loader == "gpu"


def decoders(monkeypatch, torchcodec=None, torchvision=None):
    monkeypatch.setattr(gpu_data, "torchcodec_decoder", lambda: torchcodec or (None, None))
    monkeypatch.setattr(gpu_data, "torchvision_decoder", lambda: torchvision or (None, None))


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision", None])
def test_the_default_on_cuda_is_gpu_where_a_jpeg_decoder_loads_and_says_which(monkeypatch,
                                                                              decoder):
    from mae import cli

    found = (JpegDecoder(f"{decoder} 9.9", None), None)
    broken = (None, "torchcodec is installed but does not load (libnvrtc.so.13: cannot open)")
    decoders(monkeypatch, torchcodec=found if decoder == "torchcodec" else broken,
             torchvision=found if decoder == "torchvision" else None)
    assert gpu_data.default_loader("cuda") == ("gpu" if decoder else "pil")
    assert gpu_data.default_loader("cuda:1", video=True) == "pil"
    assert gpu_data.default_loader("cpu") == "pil"
    monkeypatch.setattr(cli, "device", str)  # a CPU-only torch refuses --device cuda itself
    argv = ["linprobe", "--finetune", "x.pth", "--device", "cuda"]
    assert cli.parse_args(argv).data_loader == ("gpu" if decoder else "pil")
    note = gpu_data.decoding_note("cuda")
    if decoder:
        assert note.startswith(f"JPEGs decoded by {decoder} 9.9 (nvJPEG), other files by "
                               f"Pillow in the DataLoader workers; crops on cuda")
    else:
        assert note.startswith("Pillow decodes in the DataLoader workers (no torchcodec or "
                               "torchvision to decode JPEGs on the GPU)")
    assert ("libnvrtc.so.13" in note) == (decoder != "torchcodec")  # why not torchcodec
    assert gpu_data.jpeg_decoder("cpu") is None  # the CPU's workers decode, in parallel


@pytest.mark.parametrize("library", ["torchcodec", "torchvision"])
def test_the_real_decoders_read_a_batch_as_pillow_does_and_fail_it_on_a_bad_file(tmp_path,
                                                                                 library):
    """Where installed and loading (the CI row with torchvision, and torchcodec beside it), each
    library's own decoder on the CPU: the pixels Pillow reads (the same libjpeg-turbo) and
    one RuntimeError for a batch holding a broken file, which the bisection relies on."""
    decoder, why = getattr(gpu_data, f"{library}_decoder")()
    if decoder is None:
        pytest.skip(f"{library} is not installed here{f' ({why})' if why else ''}")
    paths = write_folder(tmp_path, sizes=[(30, 40), (41, 33), (25, 60)],
                         kinds=("jpeg", "jpeg-grey", "jpeg-progressive"))
    tensors = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = decoder.decode(tensors, torch.device("cpu"))
    assert not caught, [str(w.message) for w in caught]  # none left in the newest row
    for img, path in zip(decoded, paths):
        want = torch.from_numpy(np.asarray(read_rgb(path, path)).copy()).permute(2, 0, 1)
        assert torch.equal(img, want), path
    broken = torch.frombuffer(bytearray(paths[0].read_bytes()[:200]), dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        decoder.decode([tensors[1], broken], torch.device("cpu"))


def test_a_non_square_input_size_falls_back_to_pil_unless_gpu_was_asked_for(capsys):
    from argparse import Namespace

    default = Namespace(data_loader="gpu", sources={})
    gpu_data.loader_for_size(default, [16, 32])
    assert default.data_loader == "pil"
    assert capsys.readouterr().out.splitlines() == [
        "--data-loader pil: the input size 16x32 is not square, and the gpu loader crops squares"]
    for source in ("flag", "config"):
        asked = Namespace(data_loader="gpu", sources={"data_loader": source})
        with pytest.raises(ValueError, match="--data-loader gpu needs a square --input-size, "
                                             "got 16x32; use --data-loader pil"):
            gpu_data.loader_for_size(asked, [16, 32])
    square = Namespace(data_loader="gpu", sources={"data_loader": "flag"})
    gpu_data.loader_for_size(square, [32, 32])
    assert square.data_loader == "gpu" and capsys.readouterr().out == ""
    # a checkpoint's square [H, W] crops as its int does; a non-square one is refused by name
    assert GpuBatches([32, 32], "cpu").size == GpuBatches(32, "cpu").size == 32
    with pytest.raises(ValueError, match="--data-loader gpu needs a square"):
        GpuBatches([16, 32], "cpu")


def test_probing_a_non_square_checkpoint_with_the_gpu_loader(tmp_path, capsys, monkeypatch):
    from mae import MAE

    config = MAE.from_name("mae_vit_tiny_patch16", img_size=16, patch_size=8).config
    model = MAE({**config, "encoder_layers": 1, "img_size": [16, 32]})
    path = tmp_path / "wide.pth"
    torch.save({"model": model.state_dict(),
                "args": {"model_config": model.config, "input_size": [16, 32]}}, path)
    argv = ["linprobe", "--checkpoint", str(path), "--device", "cpu", "--train-size", "8",
            "--val-size", "8", "--batch-size", "8", "--num-workers", "0", "--quiet"]
    code, errors = exit_code_and_errors([*argv, "--data-loader", "gpu"], capsys)
    assert code == 1 and errors == ["error: --data-loader gpu needs a square --input-size, got "
                                    "16x32; use --data-loader pil"], (code, errors)
    # gpu by default (as on CUDA): the probe runs through pil, and says so
    monkeypatch.setattr(gpu_data, "default_loader", lambda device, video=False: "gpu")
    assert main(argv) == 0
    assert "--data-loader pil: the input size 16x32 is not square" in capsys.readouterr().out


TINY = ["--model", "mae_vit_tiny_patch16", "--input-size", "16", "--patch-size", "4",
        "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--blr", "1e-3",
        "--warmup-epochs", "1", "--quiet", "--device", "cpu"]


@pytest.mark.slow
def test_pretrain_on_a_folder_through_the_gpu_loader_trains_and_counts_bad_files(tmp_path):
    from mae.cli import parse_args
    from mae.train.pretrain import pretrain

    paths = write_folder(tmp_path / "data", sizes=[(40 + 3 * i, 56 - 2 * i) for i in range(9)],
                         kinds=("png", "jpeg"))
    paths[2].write_bytes(b"broken")
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[:len(data) * 2 // 3])
    summaries = {}
    for loader in ("gpu", "pil"):
        args = parse_args(["pretrain", *TINY, "--epochs", "2", "--data-path",
                           str(tmp_path / "data"), "--data-loader", loader,
                           "--output-dir", str(tmp_path / loader)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summaries[loader] = pretrain(args)
    gpu, pil = summaries["gpu"], summaries["pil"]
    assert (tmp_path / "gpu" / "checkpoint-last.pth").is_file()
    assert all(math.isfinite(r["loss"]) for r in gpu["epochs"])
    assert gpu["skipped_images"] == pil["skipped_images"] > 0


@pytest.mark.slow
def test_gpu_loader_pretraining_learns_as_the_pillow_path_does(tmp_path, capsys):
    """A small MAE (2 blocks, 64 wide) pre-trained briefly on the built-in data through each
    loader (4 epochs of 1024 images, about 15 s each on one core), then linearly probed (the
    demo probe, mean-pooled): the loss falls the same way and the probes agree within noise.
    Measured: epoch losses gpu 1.080 0.586 0.533 0.524, pil 1.082 0.584 0.528 0.521; probe
    top-1 gpu 16.0%, pil 15.0% (chance 10%; 512 val images: one standard error ~1.6)."""
    import json

    config = tmp_path / "small.yaml"
    config.write_text("encoder_dim: 64\nencoder_layers: 2\ndecoder_dim: 64\n"
                      "decoder_layers: 1\n")
    common = ["--config", str(config), "--input-size", "32", "--patch-size", "8",
              "--batch-size", "32", "--dataset-size", "1024", "--epochs", "4", "--blr", "1e-2",
              "--warmup-epochs", "1", "--norm-pix-loss", "--num-workers", "1", "--quiet",
              "--device", "cpu"]
    probe = ["--epochs", "40", "--train-size", "1024", "--val-size", "512", "--global-pool",
             "--quiet", "--device", "cpu", "--num-workers", "0"]
    losses, top1 = {}, {}
    for loader in ("gpu", "pil"):
        out = tmp_path / loader
        assert main(["pretrain", *common, "--data-loader", loader, "--output-dir", str(out)]) == 0
        records = [json.loads(line) for line in open(out / "log.jsonl")]
        losses[loader] = [r["loss"] for r in records if r.get("kind") == "epoch"]
        capsys.readouterr()
        assert main(["linprobe", "--finetune", str(out / "checkpoint-last.pth"), *probe,
                     "--data-loader", loader]) == 0
        top1[loader] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"]
    for gpu, pil in zip(losses["gpu"], losses["pil"], strict=True):
        assert abs(gpu - pil) < 0.05 * pil, losses
    assert losses["gpu"][-1] < 0.6 * losses["gpu"][0], losses
    assert abs(top1["gpu"] - top1["pil"]) < 6, top1
    assert min(top1.values()) > 10 + 3, top1  # above chance by about three standard errors


def test_finetune_evaluates_through_the_gpu_loader_as_through_pillow(tmp_path, monkeypatch):
    """A fine-tuned ViT evaluated on the same images through both loaders: the centre box
    and the op's rounding move the logits a little, not the result. Not marked slow (6 s):
    it needs timm, so it runs in the row that has it (the slow tests' row has not)."""
    pytest.importorskip("timm", reason="the [finetune] extra (timm, torchvision) is not installed")
    from mae.cli import parse_args
    from mae.train.finetune import finetune

    fast = ["--model", "vit_tiny_patch16", "--input-size", "16", "--patch-size", "4",
            "--batch-size", "8", "--dataset-size", "32", "--val-size", "24", "--num-workers",
            "0", "--warmup-epochs", "1", "--quiet", "--device", "cpu"]
    finetune(parse_args(["finetune", *fast, "--epochs", "1", "--output-dir", str(tmp_path)]))
    decoded = []
    real = gpu_data.GpuBatches._crop
    monkeypatch.setattr(gpu_data.GpuBatches, "_crop",
                        lambda self, images, *a: decoded.append(len(images)) or
                        real(self, images, *a))
    stats = {loader: finetune(parse_args(["finetune", *fast, "--eval", "--resume",
                                          str(tmp_path / "checkpoint-last.pth"),
                                          "--data-loader", loader]))
             for loader in ("gpu", "pil")}
    assert sum(decoded) == 24 and stats["gpu"]["images"] == stats["pil"]["images"] == 24
    assert abs(stats["gpu"]["loss"] - stats["pil"]["loss"]) < 0.05 * stats["pil"]["loss"], stats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_batch_matches_the_cpu_path_on_every_kind_of_file(tmp_path):
    """The real device decoder (nvJPEG through torchcodec or torchvision) in the loader thread's
    path on CUDA, against the CPU path on the same boxes: RGB, greyscale and progressive JPEGs
    decoded on the GPU; CMYK, EXIF-rotated JPEGs and PNG shipped as Pillow's pixels; a cut
    JPEG skipped by the worker. nvJPEG's IDCT differs from libjpeg-turbo's by a grey level or
    two on some pixels: compared within 3/255 before normalisation."""
    decoder = gpu_data.jpeg_decoder("cuda")
    if decoder is None:
        pytest.skip("no GPU JPEG decoder (torchcodec or torchvision) is installed")
    sizes = [(40 + 3 * i, 64 - 2 * i) for i in range(7)]
    paths = write_folder(tmp_path, sizes, kinds=("jpeg", "jpeg-grey", "jpeg-progressive",
                                                 "jpeg-cmyk", "jpeg-rotated", "png", "jpeg"))
    data = paths[6].read_bytes()
    paths[6].write_bytes(data[:len(data) // 2])
    with pytest.warns(RuntimeWarning, match=str(paths[6])):
        _, (batch, labels, skipped) = encoded_batch(tmp_path, ship_jpegs=True)
    assert skipped == 1 and batch.jpeg.sum() == 3
    prepare = GpuBatches(SIZE, "cuda", seed=1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # as the loader thread runs it
        imgs, got, unreadable = prepare(batch.pin_memory(), labels, 0, 4)
    stream.synchronize()
    assert unreadable == 0 and prepare.take_fallbacks() == 0 and imgs.is_cuda
    boxes, flips = prepare.boxes(batch.shapes, 0, 4)
    want = resized_crop(pillow_tensors(batch), boxes, SIZE, flips)
    diff = ((imgs.cpu() - want) * STD * 255).abs()
    assert diff.max() < 3, diff.max()
    torch.testing.assert_close(got.cpu(), labels)
