"""Checkpoints that never lose work: a full disk, a killed save, a corrupt or empty file, a file
that is not a checkpoint, a checkpoint of another kind or whose arguments do not fit its
weights, bad .safetensors metadata: each one `error:` line naming the file; `--resume auto`
past a corrupt checkpoint; a log holding each epoch once after a resume."""
import argparse
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae import MAE
from mae.checkpoints import files as ckpt
from mae.cli import main
from mae.models.video import VideoMAE
from mae.train import pretrain as pretrain_module
from mae.train.engine import check_resumable, start_run

from .test_training import TINY

SMALL = {"img_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_layers": 1,
         "decoder_dim": 32, "decoder_layers": 1}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def pretrain_main(out, *extra) -> int:
    return main(["pretrain", *TINY, "--output-dir", str(out), *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two epochs of the tiny model, a numbered checkpoint each (copied by each test)."""
    out = tmp_path_factory.mktemp("run")
    assert pretrain_main(out, "--epochs", "2", "--save-every", "1") == 0
    return out


@pytest.fixture
def run(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def saved_small(path, model=None, config=None):
    """A pre-training checkpoint of a small model, as `mae pretrain` saves one."""
    model = model or MAE(SMALL)
    config = config or model.config
    torch.save({"model": model.state_dict(),
                "args": {"model_config": config, "input_size": config["img_size"]}}, path)
    return path


def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(path)
    return path


# --- writing ---------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_naming_the_file_and_free_space(run, capsys, monkeypatch):
    before = ckpt.load_checkpoint(run / "checkpoint-last.pth")

    class FullDisk:  # a checkpoint file whose disk fills after its first 4 KiB
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):  # the real torch.save, writing to that disk
        f = real_fdopen(fd, *args, **kwargs)
        return FullDisk(f) if ".checkpoint-" in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    capsys.readouterr()
    assert pretrain_main(run, "--epochs", "3", "--resume", "auto") == 1
    line = one_error_line(capsys)
    assert str(run / "checkpoint-last.pth") in line and "MiB free" in line, line
    assert "intact" in line
    monkeypatch.undo()
    after = ckpt.load_checkpoint(run / "checkpoint-last.pth")
    assert after["epoch"] == before["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_a_run_removes_the_partial_files_a_killed_save_left(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()

    def temporary(name, writer):  # what write_atomically's mkstemp makes
        fd, path = tempfile.mkstemp(prefix=f".{name}.{writer}.", suffix=".tmp", dir=out)
        os.close(fd)
        return Path(path)

    # left behind by a writer killed with -9, and by another host's, long ago
    stale = [temporary(name, f"{host}.{dead}")
             for name in ("checkpoint-last.pth", "checkpoint-20.pth", "log.jsonl")]
    stale.append(temporary("checkpoint-last.pth", "node-7.cluster.1234"))
    os.utime(stale[-1], (time.time() - 7200,) * 2)
    # a save in progress: this live process's, another host's just now
    others = [temporary("checkpoint-last.pth", f"{host}.{os.getpid()}"),
              temporary("checkpoint-last.pth", "node-7.cluster.1234")]
    others += [out / ".notes.tmp", out / ".checkpoint-last.pth.tmp", out / "checkpoint-1.pth"]
    for path in others[2:]:
        path.write_text("not ours")
    args = argparse.Namespace(device="cpu", output_dir=str(out), seed=0)
    start_run(args)
    assert "removed 4 partial file(s)" in capsys.readouterr().out
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in others)


# --- reading ---------------------------------------------------------------------------------

def test_resume_auto_falls_back_to_the_newest_checkpoint_that_loads(run, capsys):
    last = run / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a half-written file
    capsys.readouterr()
    assert pretrain_main(run, "--epochs", "3", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "checkpoint-last.pth" in out and "passed over 1" in out, out
    assert f"resumed from {run / 'checkpoint-1.pth'} (epoch 1" in out, out
    assert ckpt.load_checkpoint(last)["epoch"] == 2


def test_resume_auto_with_no_checkpoint_that_loads_is_an_error(run, capsys):
    for path in run.glob("checkpoint-*.pth"):
        path.write_bytes(b"")
    capsys.readouterr()
    assert pretrain_main(run, "--epochs", "3", "--resume", "auto") == 1
    line = one_error_line(capsys)
    assert "no checkpoint" in line and "is empty (0 bytes)" in line, line


def test_after_a_resume_the_log_holds_each_epoch_once(run_dir, tmp_path, monkeypatch):
    real_save = pretrain_module.save_epoch

    def killed_saving_epoch_one(args, model, optimizer, scaler, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 1 was logged, before it was saved
        real_save(args, model, optimizer, scaler, epoch, *rest)

    monkeypatch.setattr(pretrain_module, "save_epoch", killed_saving_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        pretrain_main(tmp_path, "--epochs", "3")
    monkeypatch.undo()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "epo')  # a line the kill cut short
    assert pretrain_main(tmp_path, "--epochs", "3", "--resume", "auto") == 0
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and len(steps) == 6  # 4 steps an epoch, a line every 2


def test_an_empty_file_says_it_is_empty(tmp_path):
    path = tmp_path / "checkpoint-3.pth"
    path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"is empty \(0 bytes\)"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys, trust):
    text = tmp_path / "README.md"
    text.write_text("# mae-kernels\n")
    archive = tmp_path / "photos.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", tmp_path, "README.md")
    for path in (text, archive):
        with pytest.raises(ckpt.CheckpointError, match="is not a checkpoint"):
            ckpt.load_checkpoint(path, trust=trust)
    argv = ["visualize", "--checkpoint", str(text), "--image", str(photo(tmp_path))]
    assert main(argv + ([ckpt.TRUST_FLAG] if trust else [])) == 1
    line = one_error_line(capsys)
    assert f"{text} is not a checkpoint" in line and "could run code" not in line, line


def test_a_truncated_checkpoint_says_it_is_damaged(run):
    last = run / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_checkpoint(last)


# --- a checkpoint of another kind -------------------------------------------------------------

def test_pretrain_resume_of_a_fine_tuning_checkpoint_names_the_command(tmp_path, capsys):
    head = {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10),
            "blocks.0.norm1.weight": torch.ones(192)}
    path = tmp_path / "finetuned.pth"
    torch.save({"model": head, "optimizer": {}, "epoch": 4, "args": {"vit_config": {}}}, path)
    assert pretrain_main(tmp_path / "out", "--epochs", "1", "--resume", str(path)) == 1
    line = one_error_line(capsys)
    assert "holds fine-tuning weights" in line and "mae finetune --resume" in line, line


def test_finetune_resume_of_a_pre_training_checkpoint_says_use_finetune(run):
    state = ckpt.load_checkpoint(run / "checkpoint-1.pth")
    args = argparse.Namespace(command="finetune")
    with pytest.raises(ckpt.CheckpointError, match="holds pre-training weights.*use --finetune"):
        check_resumable(args, state, run / "checkpoint-1.pth")
    check_resumable(argparse.Namespace(command="pretrain"), state, run / "checkpoint-1.pth")


def test_finetune_command_with_a_pre_training_checkpoint_to_resume(run, tmp_path, capsys):
    pytest.importorskip("timm", reason="mae finetune needs timm")
    argv = ["finetune", "--epochs", "1", "--dataset-size", "16", "--val-size", "8",
            "--batch-size", "8", "--input-size", "16", "--patch-size", "4", "--num-workers",
            "0", "--quiet", "--device", "cpu", "--output-dir", str(tmp_path / "ft"),
            "--resume", str(run / "checkpoint-1.pth")]
    for extra in ([], ["--eval"]):
        capsys.readouterr()
        assert main(argv + extra) == 1
        assert "use --finetune" in one_error_line(capsys)


def test_pretrain_resume_of_another_model_is_one_line(tmp_path, capsys):
    path = saved_small(tmp_path / "small.pth")
    state = torch.load(path)
    state.update(optimizer={}, epoch=0)
    torch.save(state, path)
    assert pretrain_main(tmp_path / "out", "--epochs", "1", "--resume", str(path)) == 1
    line = one_error_line(capsys)
    assert "its weights do not fit the model this run builds" in line, line
    assert "of another shape" in line and "in the file" in line, line


def commands(path, tmp_path):
    image = str(photo(tmp_path))
    return {
        "visualize": ["visualize", "--checkpoint", str(path), "--image", image,
                      "-o", str(tmp_path / "v.png")],
        "anomaly": ["anomaly", "--checkpoint", str(path), "--image", image,
                    "-o", str(tmp_path / "a.png"), "--device", "cpu"],
        "linprobe": ["linprobe", "--checkpoint", str(path), "--epochs", "1", "--device", "cpu",
                     "--quiet"],
        "export": ["export", "--checkpoint", str(path), "-o", str(tmp_path / "m.safetensors")],
    }


def test_arguments_that_do_not_fit_the_weights_are_one_line_in_every_command(tmp_path, capsys):
    path = saved_small(tmp_path / "altered.pth", config={**MAE(SMALL).config, "encoder_dim": 64,
                                                         "encoder_heads": 1})
    for name, argv in commands(path, tmp_path).items():
        assert main(argv) == 1, name
        line = one_error_line(capsys)
        assert f"checkpoint {path}: its weights do not fit the model its saved arguments" \
               in line, (name, line)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("args,problem", [
    ("{not json", "metadata 'args' is not JSON"),
    ('{"model": "mae_vit_gigantic_patch16"}', "names an unknown model 'mae_vit_gigantic"),
    ('{"model_config": {"encoder_dim": -1}}', "saved model config is not valid"),
])
def test_safetensors_with_bad_metadata_name_the_file_and_problem(tmp_path, capsys, args,
                                                                 problem):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in MAE(SMALL).state_dict().items()}, str(path),
              metadata={"format": "pt", "args": args})
    assert main(commands(path, tmp_path)["visualize"]) == 1
    line = one_error_line(capsys)
    assert str(path) in line and problem in line, line


# --- mae visualize -----------------------------------------------------------------------------

def test_visualize_errors_are_error_lines(tmp_path, capsys):
    path = saved_small(tmp_path / "small.pth")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["visualize", "--checkpoint", str(path), "--image", str(broken)]) == 1
    assert one_error_line(capsys).startswith(f"error: --image {broken}: cannot read it")


def test_visualize_a_videomae_checkpoint_draws_frames(tmp_path, capsys):
    config = {**SMALL, "num_frames": 4, "tubelet_size": 2}
    model = VideoMAE(config)
    path = tmp_path / "video.pth"
    torch.save({"model": model.state_dict(), "args": {"model_config": model.config}}, path)
    clip = tmp_path / "clip"
    clip.mkdir()
    for t in range(6):
        Image.fromarray(np.full((20, 20, 3), 40 * t, np.uint8)).save(clip / f"{t:03d}.png")
    out = tmp_path / "frames.png"
    assert main(["visualize", "--checkpoint", str(path), "--image", str(clip),
                 "-o", str(out)]) == 0
    with Image.open(out) as figure:  # 4 panels (rows) x 4 frames (columns)
        assert abs(figure.size[0] - figure.size[1]) < 0.2 * figure.size[0], figure.size
    capsys.readouterr()
    assert main(["visualize", "--checkpoint", str(path), "--image", str(photo(tmp_path))]) == 1
    assert "a video file" in one_error_line(capsys)
