"""`--data-loader gpu` (mae/data/gpu.py): bytes-only workers, the main process's decode + boxes
+ one fused crop, on the CPU here (the CPU decoders and the op's CPU kernel)."""
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
    center_crop_boxes,
    collate_encoded,
    decode_resized_crop,
)
from mae.data.images import (
    ImageFolderDataset,
    ShapesDataset,
    center_resize,
    read_rgb,
    to_tensor,
)
from mae_kernels import resized_crop

from .test_cli import exit_code_and_errors
from .utils import running

SIZE = 16


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
    """root/train/<class>/<i>.<kind>: two classes, images of `sizes` in the formats `kinds`."""
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
        elif kind == "jpeg":
            img.save(path, quality=95)
        else:
            img.save(path)
        paths.append(path)
    return paths


def encoded_batch(root, **kwargs):
    dataset = EncodedDataset(ImageFolderDataset(root, SIZE, split="train", **kwargs))
    return dataset, collate_encoded([dataset[i] for i in range(len(dataset))])


def pillow_tensors(batch):
    """The batch's images as the Pillow path reads them: (3, H, W) uint8."""
    return [torch.from_numpy(np.asarray(read_rgb(io.BytesIO(d), n)).copy()).permute(2, 0, 1)
            for d, n in zip(batch.data, batch.names)]


def test_gpu_batch_is_the_op_on_the_decoded_images_with_the_drawn_boxes(tmp_path):
    sizes = [(40, 56), (64, 48), (37, 90), (120, 80), (50, 50), (33, 70)]
    write_folder(tmp_path, sizes, kinds=("png", "grey", "png16", "jpeg-cmyk", "jpeg", "png"))
    _, (batch, labels, skipped) = encoded_batch(tmp_path)
    assert skipped == 0 and sorted(map(tuple, batch.shapes.tolist())) == sorted(sizes)
    prepare = GpuBatches(SIZE, "cpu", seed=3, rank=1)
    with running("cpu"):
        imgs, got_labels, unreadable = prepare(batch, labels, 2, 5)
        boxes, flips = prepare.boxes(batch.shapes, 2, 5)
        want = resized_crop(pillow_tensors(batch), boxes, SIZE, flips)
    assert unreadable == 0 and imgs.shape == (6, 3, SIZE, SIZE) and imgs.dtype == torch.float32
    assert flips.any() and not flips.all()  # the draw flips some, not all (seeded)
    torch.testing.assert_close(got_labels, labels)
    # where torchvision is installed it decodes the JPEGs: the same libjpeg-turbo, same pixels
    torch.testing.assert_close(imgs, want, rtol=0, atol=1e-6)


def test_gpu_path_matches_the_pillow_pipeline_on_the_same_boxes(tmp_path):
    """Pillow rounds to uint8 between its two passes and at the end, the op once: measured on
    these images 0.26/255 apart on average, 1.98/255 at most."""
    write_folder(tmp_path, sizes=((40, 56), (64, 48), (37, 90), (120, 80), (90, 90), (45, 33)))
    _, (batch, labels, _) = encoded_batch(tmp_path)
    prepare = GpuBatches(SIZE, "cpu", seed=0)
    imgs, _, _ = prepare(batch, labels, 0, 0)
    boxes, flips = prepare.boxes(batch.shapes, 0, 0)
    pillow = []
    for data, (top, left, h, w), flip in zip(batch.data, boxes.tolist(), flips.tolist()):
        img = Image.open(io.BytesIO(data)).convert("RGB").resize(
            (SIZE, SIZE), Image.BICUBIC, box=(left, top, left + w, top + h))
        pillow.append(to_tensor(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img))
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    diff = ((imgs - torch.stack(pillow)) * std * 255).abs()  # in 1/255 units
    assert diff.mean() < 0.4 and diff.max() < 2.5, (diff.mean(), diff.max())


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
    pillow = torch.stack([to_tensor(center_resize(Image.open(io.BytesIO(d)).convert("RGB"),
                                                  (SIZE, SIZE))) for d in batch.data])
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    diff = ((imgs - pillow) * std * 255).abs()
    assert diff.mean() < 1, diff.mean()


def test_built_in_shapes_go_through_png_unchanged():
    dataset = EncodedDataset(ShapesDataset(SIZE, length=4))
    item = dataset[3]
    img, label = dataset.base.load(3)
    assert item.label == label and item.shape == (64, 64)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(item.data))), np.asarray(img))


def test_bad_files_are_skipped_counted_and_named(tmp_path):
    paths = write_folder(tmp_path, sizes=((40, 56), (64, 48), (37, 90), (50, 50)),
                         kinds=("png", "jpeg"))
    paths[0].write_bytes(b"not an image")  # the header fails: the worker skips it
    data = paths[1].read_bytes()  # a JPEG whose header reads but whose data is cut short
    paths[1].write_bytes(data[:len(data) * 2 // 3])
    with pytest.warns(RuntimeWarning, match=str(paths[0])):
        dataset, (batch, labels, skipped) = encoded_batch(tmp_path)
    assert skipped == 1 and len(batch) == 3
    with pytest.warns(RuntimeWarning, match=str(paths[1])):
        imgs, kept_labels, unreadable = GpuBatches(SIZE, "cpu")(batch, labels, 0, 0)
    assert unreadable == 1 and imgs.shape[0] == 2 and len(kept_labels) == 2
    # the Pillow path counts the same two files
    pil = ImageFolderDataset(tmp_path, SIZE, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(pil[i] is None for i in range(len(pil))) == 2


def test_decoding_in_sub_batches_under_a_small_budget_gives_the_same_batch(tmp_path, monkeypatch):
    write_folder(tmp_path, sizes=((200, 300), (64, 48), (37, 90), (150, 120), (20, 20)))
    _, (batch, labels, _) = encoded_batch(tmp_path)
    crops, calls = [], []

    def recording(images, boxes, size, flips):
        calls.append(len(images))
        crops.extend(images)
        return resized_crop(images, boxes, size, flips)

    monkeypatch.setattr(gpu_data, "resized_crop", recording)
    # boxes inside each image, one of them whole
    boxes = torch.tensor([[h // 4, w // 5, h // 2, w // 2] for h, w in batch.shapes.tolist()])
    boxes[1] = torch.tensor([0, 0, *batch.shapes[1].tolist()])
    flips = torch.tensor([True, False, False, True, False])
    whole, kept = decode_resized_crop(batch, boxes, flips, SIZE, "cpu")
    assert calls == [5] and kept == [0, 1, 2, 3, 4]
    calls.clear()
    crops.clear()
    budget = 3 * 150 * 120  # less than the first image: it goes alone
    chunked, kept = decode_resized_crop(batch, boxes, flips, SIZE, "cpu", budget=budget)
    assert len(calls) > 1 and sum(calls) == 5 and kept == [0, 1, 2, 3, 4]
    # the CPU kernel pads its weight matrices to the call's widest crop: sums may differ by ulps
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    # each crop holds its box alone (the decoded image is not kept alive behind it)
    assert [tuple(c.shape[1:]) for c in crops] == [tuple(b[2:]) for b in boxes.tolist()]
    assert all(c.untyped_storage().nbytes() == c.numel() for c in crops[:1] + crops[2:4])
    for run in gpu_data._chunks([3 * h * w for h, w in batch.shapes.tolist()], budget):
        assert len(run) == 1 or sum(3 * h * w for h, w in batch.shapes[run].tolist()) <= budget


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


@pytest.mark.parametrize("torchvision", [True, False])
def test_default_loader_on_cuda_is_gpu_only_where_torchvision_decodes(monkeypatch, capsys,
                                                                       torchvision):
    from mae import cli

    monkeypatch.setattr(gpu_data, "_torchvision_io", lambda: object() if torchvision else None)
    assert gpu_data.default_loader("cuda") == ("gpu" if torchvision else "pil")
    assert gpu_data.default_loader("cuda:1", video=True) == "pil"
    assert gpu_data.default_loader("cpu") == "pil"
    monkeypatch.setattr(cli, "device", str)  # a CPU-only torch refuses --device cuda itself
    argv = ["linprobe", "--finetune", "x.pth", "--device", "cuda"]
    assert cli.parse_args(argv).data_loader == ("gpu" if torchvision else "pil")
    assert capsys.readouterr().err == ""
    # asked for without torchvision: one line says the main process decodes with Pillow
    assert cli.parse_args([*argv, "--data-loader", "gpu"]).data_loader == "gpu"
    warnings_printed = capsys.readouterr().err.splitlines()
    assert warnings_printed == ([] if torchvision else [gpu_data.pillow_fallback_warning("cuda")])
    assert torchvision or "Pillow" in warnings_printed[0]


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
    real = gpu_data.decode_resized_crop
    monkeypatch.setattr(gpu_data, "decode_resized_crop",
                        lambda batch, *a, **k: decoded.append(len(batch)) or real(batch, *a, **k))
    stats = {loader: finetune(parse_args(["finetune", *fast, "--eval", "--resume",
                                          str(tmp_path / "checkpoint-last.pth"),
                                          "--data-loader", loader]))
             for loader in ("gpu", "pil")}
    assert sum(decoded) == 24 and stats["gpu"]["images"] == stats["pil"]["images"] == 24
    assert abs(stats["gpu"]["loss"] - stats["pil"]["loss"]) < 0.05 * stats["pil"]["loss"], stats
