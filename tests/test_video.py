"""VideoMAE: kernels == reference, the config, 3D positions, the built-in and folder video data
sets, a compiled step without graph breaks, and `mae pretrain --video` learning on CPU."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mae
from mae.checkpoints.pretrained import model_from_checkpoint
from mae.cli import main
from mae.data.images import denormalize
from mae.data.video import Clips, MovingShapesDataset, VideoFolderDataset, read_clip
from mae.models.pos_embed import sincos_2d, sincos_3d
from mae.models.video import VideoMAE

SMALL = {"num_frames": 4, "img_size": 32, "patch_size": 8, "encoder_dim": 32,
         "encoder_layers": 1, "decoder_dim": 32, "decoder_layers": 1, "norm_pix_loss": True}


def test_kernels_match_the_reference_model(implementation):
    fused, plain = VideoMAE(SMALL), VideoMAE({**SMALL, "use_kernels": False})
    plain.load_state_dict(fused.state_dict())
    videos = torch.randn(2, 3, 4, 32, 32)
    noise = fused.draw_noise(2)
    got, want = fused(videos, noise=noise), plain(videos, noise=noise)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.reconstructed, want.reconstructed)
    assert got.reconstructed.shape == videos.shape
    # tube masking at 90%: VideoMAE's int(0.9 * 16) = 14 of 16 masked in both temporal positions
    assert got.mask.view(2, 2, 16).sum(2).tolist() == [[14.0, 14.0], [14.0, 14.0]]
    got.loss.backward()
    want.loss.backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_videomae_names_and_config_errors():
    model = VideoMAE(SMALL)
    names = set(model.state_dict())
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight",
            "mask_token", "decoder_pred.weight"} <= names
    assert "cls_token" not in names and model.patch_embed.proj.weight.dim() == 5
    with pytest.raises(ValueError, match="tubelet_size"):
        VideoMAE({**SMALL, "num_frames": 5})
    with pytest.raises(ValueError, match="mask_type"):
        VideoMAE({**SMALL, "mask_type": "random"})
    with pytest.raises(ValueError, match="videos"):
        model(torch.randn(1, 3, 8, 32, 32))


def test_named_factories_and_from_name():
    """As mae.models' factories and MAE.from_name: VideoMAE's ViT-S/B and the tiny CPU model."""
    for name in ("mae_videomae_tiny_patch16", "mae_videomae_small_patch16",
                 "mae_videomae_base_patch16"):
        assert getattr(mae, name).__name__ == name and name in mae.__all__
    with torch.device("meta"):  # ViT-B's shapes without its 100M parameters' memory
        base = mae.mae_videomae_base_patch16()
    assert isinstance(base, VideoMAE) and base.config["num_frames"] == 16
    assert base.blocks[0].attn.qkv.weight.shape == (3 * 768, 768) and len(base.blocks) == 12
    assert base.decoder_embed.weight.shape == (384, 768) and len(base.decoder_blocks) == 4
    assert base.patch_embed.grid_size == (8, 14, 14) and base.mask_ratio == 0.9

    tiny = VideoMAE.from_name("mae_videomae_tiny_patch16", num_frames=4, img_size=32,
                              patch_size=8, mask_ratio=0.75)
    assert (tiny.config["encoder_dim"], tiny.config["decoder_dim"]) == (192, 128)
    out = tiny(torch.randn(1, 3, 4, 32, 32))
    assert out.reconstructed.shape == (1, 3, 4, 32, 32) and out.mask.sum() == 2 * 12
    with pytest.raises(ValueError, match="model must be one of"):
        VideoMAE.from_name("mae_vit_base_patch16")
    with pytest.raises(ValueError, match="unknown MAE config key"):
        mae.mae_videomae_small_patch16(embed_dim=384)


def test_sincos_3d_shares_the_spatial_code_across_frames():
    table = sincos_3d(64, (3, 2, 4)).view(3, 8, 64)
    assert torch.equal(table[1, :, 16:], sincos_2d(48, (2, 4)))
    assert torch.equal(table[0, :, 16:], table[2, :, 16:])
    assert not torch.equal(table[0, :, :16], table[1, :, :16])
    with pytest.raises(ValueError, match="multiple of 16"):
        sincos_3d(40, (2, 2, 2))


def test_compile_fullgraph_step():
    model = VideoMAE(SMALL)
    compiled = torch.compile(model, fullgraph=True)
    videos, noise = torch.randn(2, 3, 4, 32, 32), model.draw_noise(2)
    loss = compiled(videos, noise=noise).loss
    loss.backward()
    torch.testing.assert_close(loss, model(videos, noise=noise).loss, rtol=1e-4, atol=1e-5)


def test_moving_shapes_move_and_are_deterministic():
    data = MovingShapesDataset(32, num_frames=6, train=True, length=20)
    clip, label = data[13]
    assert clip.shape == (3, 6, 32, 32) and label == 3
    assert torch.equal(clip, data[13][0])
    assert not torch.equal(clip[:, 0], clip[:, -1])  # it moves
    data.set_epoch(1)
    assert not torch.equal(clip, data[13][0])  # another crop next epoch
    val = MovingShapesDataset(32, num_frames=6, train=False, length=20, split="val")
    train_split = MovingShapesDataset(32, 6, train=False, length=20, split="train")
    assert not torch.equal(val[13][0], train_split[13][0])


def _write_frames(folder, count, value):
    folder.mkdir(parents=True)
    for k in range(count):
        Image.fromarray(np.full((16, 16, 3), value + k, np.uint8)).save(folder / f"{k:03d}.png")


def test_folder_of_frame_folders(tmp_path):
    _write_frames(tmp_path / "train" / "walk" / "clip1", 10, 10)
    _write_frames(tmp_path / "train" / "run" / "clip2", 3, 100)
    data = VideoFolderDataset(tmp_path, 16, num_frames=4, sampling_rate=2, train=False,
                              split="train")
    assert data.classes == ["run", "walk"] and len(data) == 2
    clip, label = data[1]  # walk: 10 frames, 4 taken 2 apart from the middle start 1
    assert clip.shape == (3, 4, 16, 16) and label == 1
    pixel = clip[0, :, 0, 0] * 0.229 + 0.485
    torch.testing.assert_close(pixel * 255, torch.tensor([11.0, 13, 15, 17]), atol=1.0,
                               rtol=0)
    short, _ = data[0]  # 3 frames: the last repeats
    assert torch.equal(short[:, 2], short[:, 3])
    with pytest.raises(FileNotFoundError, match="val"):
        VideoFolderDataset(tmp_path, 16, 4, split="val", required=True)
    (tmp_path / "train" / "jump").mkdir()  # a class without a clip, as torchvision refuses
    with pytest.raises(FileNotFoundError, match="no valid file for the classes jump under"):
        VideoFolderDataset(tmp_path, 16, num_frames=4, split="train")


def test_frame_folder_reads_only_the_sampled_frames(tmp_path, monkeypatch):
    folder = tmp_path / "cat" / "clip"
    folder.mkdir(parents=True)
    for k in range(120):
        Image.fromarray(np.full((8, 8, 3), 2 * k, np.uint8)).save(folder / f"{k:04d}.png")
    every = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.iterdir())]
    opened = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    clip, _ = VideoFolderDataset(tmp_path, 8, num_frames=4, sampling_rate=4, train=True)[0]
    assert clip.shape == (3, 4, 8, 8) and len(opened) == 4, opened
    for picks in ([50, 54, 58, 62], [117, 119, 119, 119], [0]):
        opened.clear()
        frames = read_clip(folder, lambda count, picks=picks: picks)
        assert len(opened) == len(set(picks))
        for frame, k in zip(frames, picks, strict=True):
            assert np.array_equal(np.asarray(frame), every[k]), k


def _write_video(path, av, count, gop):
    """`count` 32x32 frames whose brightness rises with the index; a key frame every `gop`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        for k in range(count):
            level = 255 * k // max(count - 1, 1)
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8),
                                               format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # mkv records no frame count
def test_video_file_decodes_only_from_the_key_frame_before_the_sample(tmp_path, monkeypatch,
                                                                      suffix):
    av = pytest.importorskip("av", reason="the [video] extra (PyAV) is not installed")
    path = tmp_path / "cat" / f"clip{suffix}"
    path.parent.mkdir()
    gop = 12
    _write_video(path, av, 120, gop)
    with av.open(str(path)) as container:
        every = [np.asarray(frame.to_image()) for frame in container.decode(video=0)]
    assert len(every) == 120
    decoded = []
    real_open = av.open

    class Counting:
        def __init__(self, container):
            self.container = container

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    monkeypatch.setattr(av, "open", lambda *args, **kwargs: Counting(real_open(*args, **kwargs)))
    span = 3 * 4 + 1
    data = VideoFolderDataset(tmp_path, 32, num_frames=4, sampling_rate=4, train=True)
    for index_seed in range(3):
        data.set_epoch(index_seed)
        decoded.clear()
        assert data[0][0].shape == (3, 4, 32, 32)
        assert 0 < len(decoded) <= span + gop, decoded
    for picks in ([50, 54, 58, 62], [0, 4, 8, 12], [110, 114, 118, 119], [119, 119], [7]):
        decoded.clear()
        frames = read_clip(path, lambda count, picks=picks: picks)
        assert len(decoded) <= picks[-1] - picks[0] + gop + 1, (picks, decoded)
        for frame, k in zip(frames, picks, strict=True):
            assert np.array_equal(np.asarray(frame), every[k]), (picks, k)


def test_clip_flip_is_independent_of_the_crop():
    """One crop and one flip per clip, from separate draws: flipped clips have every crop area
    (they had only areas below 0.6 when the flip reused the crop's first number)."""
    ramp = np.arange(256, dtype=np.uint8)
    # red = column, green = row: a crop's width and height and its flip read off its pixels
    frame = Image.fromarray(np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)),
                                      np.zeros((256, 256), np.uint8)], axis=2))

    class Still(Clips):
        def __len__(self):
            return 400

        def load(self, index, rng):
            return [frame, frame], 0

    data = Still(16, num_frames=2, train=True, seed=0)
    flips, areas = [], []
    for i in range(len(data)):
        clip = data[i][0]
        assert torch.equal(clip[:, 0], clip[:, 1])  # every frame gets the same crop and flip
        rgb = denormalize(clip[:, 0]) * 255
        columns, rows = rgb[0, 8], rgb[1, :, 8]
        flips.append(bool(columns[0] > columns[-1]))
        areas.append(float((columns[0] - columns[-1]).abs() * (rows[-1] - rows[0])) / 240**2)
    flipped = [a for a, f in zip(areas, flips) if f]
    assert 0.4 < len(flipped) / len(areas) < 0.6
    assert min(flipped) < 0.4 and max(flipped) > 0.75, (min(flipped), max(flipped))


def test_video_files_through_pyav(tmp_path):
    av = pytest.importorskip("av", reason="the [video] extra (PyAV) is not installed")
    path = tmp_path / "cat" / "clip.mp4"
    path.parent.mkdir()
    _write_video(path, av, 12, gop=12)
    clip, label = VideoFolderDataset(tmp_path, 32, num_frames=4, sampling_rate=3,
                                     train=False)[0]
    assert clip.shape == (3, 4, 32, 32) and label == 0
    brightness = clip.mean(dim=(0, 2, 3))
    assert torch.all(brightness[1:] > brightness[:-1])  # frames in order


@pytest.mark.slow  # in the default CI environment only
def test_pretrain_video_learns_on_the_built_in_clips(tmp_path):
    """`mae pretrain --video` (the demo's VideoMAE-Tiny, 8 frames of 32x32, 90% tube masking):
    three epochs of 256 clips, about a minute on 2 CPU cores; the loss falls by a quarter
    (measured: 0.70 -> 0.16, in VideoMAE's un-normalised pixel units)."""
    assert main(["pretrain", "--video", "--epochs", "3", "--dataset-size", "256",
                 "--num-workers", "0", "--quiet", "--output-dir", str(tmp_path)]) == 0
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in epochs if r.get("kind") == "epoch"]
    assert losses[-1] < 0.8 * losses[0], losses
    model, saved = model_from_checkpoint(tmp_path / "checkpoint-last.pth")
    assert isinstance(model, VideoMAE) and saved["model_config"]["num_frames"] == 8
    assert (tmp_path / "reconstruction-002.png").exists()


def test_pretrain_video_on_frame_folders_and_flag_errors(tmp_path, capsys):
    for k in range(2):
        _write_frames(tmp_path / "data" / f"clip{k}", 4, 30 * k)
    assert main(["pretrain", "--video", "--data-path", str(tmp_path / "data"),
                 "--config", str(_config(tmp_path)), "--input-size", "16", "--patch-size",
                 "8", "--num-frames", "2", "--tubelet-size", "1", "--mask-ratio", "0.5",
                 "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--quiet",
                 "--device", "cpu", "--output-dir", str(tmp_path / "out")]) == 0
    assert main(["pretrain", "--num-frames", "4", "--epochs", "1"]) == 1
    assert "--video" in capsys.readouterr().err


def _config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("encoder_dim: 32\nencoder_layers: 1\ndecoder_dim: 32\ndecoder_layers: 1\n")
    return path
