"""`mae linprobe`: main_linprobe.py's recipe for its flags (LARS, batch 512, the BatchNorm head,
weak augmentation, the cls token) on the training engine (checkpoints, evaluation every epoch,
a stop and its bit-for-bit resume, --eval, two processes), the demo's measured settings without
them, the progress bar."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mae.checkpoints import files as ckpt
from mae.cli import main, parse_args
from mae.data.images import SHAPE_CLASSES, ShapesDataset
from mae.train import linprobe as linprobe_module
from mae.train.optim import LARS

REPO = str(Path(__file__).resolve().parents[1])  # the subprocesses import this checkout
SMALL = "encoder_dim: 64\nencoder_layers: 2\ndecoder_dim: 32\ndecoder_layers: 1\n"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A 2-block, 64-wide MAE pre-trained for one short epoch at 32x32, patch 8."""
    out = tmp_path_factory.mktemp("pre")
    (out / "small.yaml").write_text(SMALL)
    assert main(["pretrain", "--config", str(out / "small.yaml"), "--input-size", "32",
                 "--patch-size", "8", "--batch-size", "32", "--dataset-size", "64",
                 "--num-workers", "0", "--epochs", "1", "--quiet", "--device", "cpu",
                 "--output-dir", str(out)]) == 0
    return out / "checkpoint-last.pth"


def image_folder(root, classes, train: int, val: int):
    """The built-in images of `classes` as DIR/{train,val}/<class>/*.png."""
    for split, n in (("train", train), ("val", val)):
        drawn = ShapesDataset(split=split, length=n)
        for i in range(n):
            if SHAPE_CLASSES[i % 10] in classes:
                folder = root / split / SHAPE_CLASSES[i % 10]
                folder.mkdir(parents=True, exist_ok=True)
                drawn.load(i)[0].save(folder / f"{i}.png")
    return root


def test_official_command_line_parses_as_written():
    """FINETUNE.md's linear-probing command (its --checkpoint spelling is --finetune)."""
    args = parse_args(["linprobe", "--batch_size", "512", "--model", "vit_base_patch16",
                       "--cls_token", "--finetune", "mae_pretrain_vit_base.pth", "--epochs", "90",
                       "--blr", "0.1", "--weight_decay", "0.0", "--dist_eval",
                       "--data_path", "/data/imagenet", "--nb_classes", "1000"])
    assert args.checkpoint == "mae_pretrain_vit_base.pth" and not args.global_pool
    assert (args.batch_size, args.epochs, args.blr, args.weight_decay) == (512, 90, 0.1, 0.0)
    assert args.nb_classes == 1000 and args.warmup_epochs == 10
    assert parse_args(["linprobe", "--checkpoint", "x.pth", "--global_pool"]).global_pool
    assert not parse_args(["linprobe", "--checkpoint", "x.pth"]).global_pool  # cls token


def test_official_flags_get_batch_512_and_the_demo_keeps_256():
    official = parse_args(["linprobe", "--finetune", "x.pth", "--model", "vit_base_patch16"])
    assert linprobe_module.apply_defaults(official) is False and official.batch_size == 512
    folder = parse_args(["linprobe", "--finetune", "x.pth", "--data-path", "/data"])
    assert linprobe_module.apply_defaults(folder) is False and folder.batch_size == 512
    demo = parse_args(["linprobe", "--checkpoint", "x.pth"])
    assert linprobe_module.apply_defaults(demo) is True and demo.batch_size == 256


def test_the_head_is_main_linprobe_s():
    torch.manual_seed(0)
    head = linprobe_module.build_head(256, 10)
    norm, linear = head
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(linear.bias, torch.zeros(10))


@pytest.fixture
def crops(monkeypatch):
    """The keyword arguments of each random_resized_crop the probe's data set draws."""
    seen = []
    real = linprobe_module.random_resized_crop

    def spy(img, size, rng, **kwargs):
        seen.append(kwargs)
        return real(img, size, rng, **kwargs)

    monkeypatch.setattr(linprobe_module, "random_resized_crop", spy)
    return seen


def test_augmentation_is_a_random_resized_crop_and_flip_per_epoch(crops):
    seen = crops
    train = linprobe_module.ProbeTrainSet(ShapesDataset(split="train", length=4), 16, seed=0)
    first, label = train[1]
    assert first.shape == (3, 16, 16) and label == 1
    # torchvision's default area and aspect ranges, not MAE's pre-training 0.2
    assert seen == [{"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}]
    assert torch.equal(train[1][0], first)  # the same draw for the same (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[1][0], first)


def test_crop_and_flip_follow_scale_ratio_and_hflip(crops):
    seen = crops
    base = ShapesDataset(split="train", length=8)
    whole = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}  # the whole square image, resized
    never = linprobe_module.ProbeTrainSet(base, 16, seed=0, hflip=0.0, **whole)
    always = linprobe_module.ProbeTrainSet(base, 16, seed=0, hflip=1.0, **whole)
    for i in range(8):
        assert torch.equal(always[i][0], never[i][0].flip(-1))
    assert seen[0] == whole
    linprobe_module.ProbeTrainSet(base, 16, seed=0, scale=(0.5, 1.0), ratio=(0.9, 1.1))[0]
    assert seen[-1] == {"scale": (0.5, 1.0), "ratio": (0.9, 1.1)}


@pytest.mark.slow
def test_the_flags_reach_the_probe_s_augmentation(encoder, tmp_path, monkeypatch):
    made = []
    real = linprobe_module.ProbeTrainSet

    def recorded(*args):
        made.append(args[3:])
        return real(*args)

    monkeypatch.setattr(linprobe_module, "ProbeTrainSet", recorded)
    data = image_folder(tmp_path / "data", {"h-stripes", "v-stripes"}, train=40, val=20)
    config = tmp_path / "probe.yaml"
    config.write_text("ratio: [0.8, 1.25]\n")
    linprobe_module.linprobe(parse_args([
        "linprobe", "--finetune", str(encoder), "--data-path", str(data), "--config",
        str(config), "--scale", "0.5", "1", "--hflip", "0", "--batch-size", "4", "--epochs", "1",
        "--warmup-epochs", "0", "--num-workers", "0", "--quiet", "--device", "cpu",
        "--output-dir", str(tmp_path / "probe")]))
    assert made == [([0.5, 1.0], [0.8, 1.25], 0.0)]


def test_an_augmentation_flag_for_the_demo_is_an_error(encoder, capsys):
    """The demo probes features extracted once from the images as they are: nothing to flip."""
    assert main(["linprobe", "--checkpoint", str(encoder), "--hflip", "0", "--epochs", "1",
                 "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --hflip") and "demo" in err[0]


@pytest.mark.slow  # 40 epochs; LARS's step itself: test_lars_is_mae_s_lars
def test_official_recipe_trains_with_lars_and_learns(encoder, tmp_path):
    """On two of the built-in classes in an image folder (--data-path: the official recipe):
    LARS, augmented images through the frozen encoder each step. The official absolute lr is
    0.1 * 16384 / 256 = 6.4; LARS scales each step to 1e-3 of the weights, so it needs steps:
    measured, the loss went from 0.91 (first epoch) to 0.63 (chance: ln 2 = 0.69) in 40 epochs
    of 15 steps."""
    data = image_folder(tmp_path / "data", {"h-stripes", "v-stripes"}, train=600, val=300)
    result = linprobe_module.linprobe(parse_args([
        "linprobe", "--finetune", str(encoder), "--data-path", str(data), "--lr", "6.4",
        "--batch-size", "8", "--epochs", "40", "--warmup-epochs", "1", "--num-workers", "0",
        "--quiet", "--device", "cpu", "--output-dir", str(tmp_path / "probe")]))
    assert result["recipe"] == "official" and result["optimizer"] == "LARS"
    assert result["num_classes"] == 2 and result["train_images"] == 120
    losses = result["epoch_losses"]
    assert losses[-1] < math.log(2) - 0.03 and losses[-1] < losses[0] - 0.03, losses


def test_demo_keeps_its_settings_and_shows_a_progress_bar(encoder, capsys):
    argv = ["linprobe", "--checkpoint", str(encoder), "--epochs", "2", "--train-size", "64",
            "--val-size", "20", "--num-workers", "0", "--device", "cpu"]
    result = linprobe_module.linprobe(parse_args(argv))
    assert (result["recipe"], result["optimizer"], result["batch_size"]) == ("demo", "SGD", 256)
    captured = capsys.readouterr()
    assert "linprobe (demo)" in captured.err  # tqdm's bar
    assert captured.out.count("recipe of mae linprobe") == 1
    assert result["recipe_values"]["epochs"] == {"value": 2, "source": "flag"}
    linprobe_module.linprobe(parse_args([*argv, "--quiet"]))
    assert "linprobe" not in capsys.readouterr().err


def test_model_that_does_not_match_the_checkpoint_is_an_error(encoder, capsys):
    assert main(["linprobe", "--finetune", str(encoder), "--model", "vit_base_patch16",
                 "--epochs", "1", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--model vit_base_patch16" in err


def lars_reference_step(layer, lr, weight_decay, trust=1e-3):
    """One step from zero momentum, written out: the matrix gets weight decay and the trust
    ratio, the bias neither."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    update = layer.weight.grad + weight_decay * weight
    ratio = trust * weight.norm() / update.norm()
    return weight - lr * ratio * update, bias - lr * layer.bias.grad


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_is_mae_s_lars(weight_decay):
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    nn.functional.cross_entropy(layer(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
    want_weight, want_bias = lars_reference_step(layer, 0.5, weight_decay)
    LARS(layer.parameters(), lr=0.5, weight_decay=weight_decay).step()
    torch.testing.assert_close(layer.weight.detach(), want_weight)
    torch.testing.assert_close(layer.bias.detach(), want_bias)


def test_lars_matches_timm_lars_set_up_as_mae_s():
    """timm.optim.Lars with MAE's choices (momentum 0.9, the ratio on matrices always, biases
    plain SGD, no eps) takes the same steps when there is no weight decay."""
    timm_optim = pytest.importorskip("timm.optim")
    torch.manual_seed(0)
    ours, theirs = nn.Linear(8, 3), nn.Linear(8, 3)
    theirs.load_state_dict(ours.state_dict())
    optimizers = [LARS(ours.parameters(), lr=0.5),
                  timm_optim.Lars([{"params": [theirs.weight], "always_adapt": True},
                                   {"params": [theirs.bias]}], lr=0.5, momentum=0.9, eps=0.0)]
    for _ in range(5):
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def probe_run(encoder, data, out, *extra):
    """The official recipe on a small image folder: 20 training images of 2 classes, batch 4
    (5 steps an epoch), 3 epochs, evaluated on 10 after each."""
    return ["linprobe", "--finetune", str(encoder), "--data-path", str(data), "--lr", "1.0",
            "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "1", "--num-workers", "0",
            "--log-every", "2", "--quiet", "--device", "cpu", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data"), {"h-stripes", "v-stripes"},
                        train=100, val=50)


def epoch_records(out) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]


@pytest.mark.slow
def test_official_recipe_checkpoints_each_epoch_and_resumes_a_stop_bit_for_bit(
        encoder, two_classes, tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = parse_args(probe_run(encoder, two_classes, straight))
    # the runs below go through main, which sets torch's threads: so does this one (another
    # test may have left another count, and a reduction's sums depend on it)
    torch.set_num_threads(args.threads)
    result = linprobe_module.linprobe(args)
    # evaluated after every epoch, on every val image, as main_linprobe.py logs it
    logged = epoch_records(straight)
    assert [r["epoch"] for r in logged] == [0, 1, 2] == [r["epoch"] for r in result["epochs"]]
    assert all(r["val_images"] == 10 and 0 <= r["val_top1"] <= 100 for r in logged)
    assert result["top1"] == logged[-1]["val_top1"]
    assert result["max_top1"] == max(r["val_top1"] for r in logged)
    # the checkpoints hold the head and its optimizer, not the frozen encoder (--finetune's)
    state = ckpt.load_checkpoint(straight / "checkpoint-2.pth")
    assert sorted(state["model"]) == ["head.0.num_batches_tracked", "head.0.running_mean",
                                      "head.0.running_var", "head.1.bias", "head.1.weight"]
    assert state["args"]["command"] == "linprobe" and (straight / "recipe.json").exists()

    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "6")  # epoch 1, after its second step
    capsys.readouterr()
    assert main(probe_run(encoder, two_classes, stopped)) == 0
    last = stopped / "checkpoint-last.pth"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"stopped by SIGTERM at epoch 1 step 2; saved {last}; resume with --resume auto")
    assert ckpt.load_checkpoint(last)["step"] == 7
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    assert main(probe_run(encoder, two_classes, stopped, "--resume", "auto")) == 0
    a = ckpt.load_checkpoint(straight / "checkpoint-2.pth")
    b = ckpt.load_checkpoint(stopped / "checkpoint-2.pth")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [(r["epoch"], r["loss"], r["val_top1"]) for r in epoch_records(stopped)] == \
        [(r["epoch"], r["loss"], r["val_top1"]) for r in logged]
    # resumed after its last epoch: nothing to train, the summary is the whole run's
    again = linprobe_module.linprobe(parse_args(probe_run(encoder, two_classes, stopped,
                                                          "--resume", "auto")))
    assert [r["epoch"] for r in again["epochs"]] == [0, 1, 2]
    assert (again["top1"], again["max_top1"]) == (result["top1"], result["max_top1"])

    # --eval: the saved probe's accuracy, as the run measured it after its last epoch; of a
    # path, or of the run's newest checkpoint
    stats = linprobe_module.linprobe(parse_args(probe_run(
        encoder, two_classes, tmp_path / "eval", "--eval", "--resume",
        str(straight / "checkpoint-2.pth"))))
    assert stats["top1"] == logged[-1]["val_top1"] and stats["images"] == 10
    newest = linprobe_module.linprobe(parse_args(probe_run(
        encoder, two_classes, straight, "--eval", "--resume", "auto")))
    assert newest["top1"] == stats["top1"]
    assert newest["checkpoint"] == str(straight / "checkpoint-last.pth")

    # the head continues only on the encoder and features it was trained on
    capsys.readouterr()
    for flags, said in ((["--random-init"], "trained its head on another encoder"),
                        (["--global-pool"], "on the features of --cls-token: pass --cls-token")):
        assert main(probe_run(encoder, two_classes, straight, "--resume", "auto", "--epochs", "4",
                              *flags)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    # and a probe's checkpoint is no other command's
    assert main(["pretrain", "--resume", str(straight / "checkpoint-2.pth"), "--epochs", "1",
                 "--device", "cpu", "--output-dir", str(tmp_path / "pre")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --resume {straight / 'checkpoint-2.pth'} is a `mae linprobe` run, not `mae "
        f"pretrain`")


def test_resuming_what_is_not_a_probe_run_is_an_error(encoder, two_classes, tmp_path, capsys):
    assert main(probe_run(encoder, two_classes, tmp_path / "run", "--resume",
                          str(encoder))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume {encoder} is not a `mae linprobe` run (it is a `mae "
                   f"pretrain` one): the encoder to probe is --finetune"]


def test_an_output_dir_holding_another_command_s_run_is_refused(encoder, two_classes, capsys):
    """`mae pretrain` then `mae linprobe`, both at one --output-dir (the default ./output_dir):
    the probe would overwrite the checkpoint-last.pth it reads."""
    before = encoder.read_bytes()
    assert main(probe_run(encoder, two_classes, encoder.parent)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output-dir {encoder.parent} holds a "
                                               f"`mae pretrain` run"), err
    assert encoder.read_bytes() == before


@pytest.mark.parametrize("flag", [["--resume", "auto"], ["--output-dir", "somewhere"],
                                  ["--eval"], ["--amp", "bf16"]])
def test_a_run_flag_for_the_demo_is_an_error(encoder, flag, capsys):
    assert main(["linprobe", "--checkpoint", str(encoder), *flag, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag[0]} is for the official recipe")


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_two_processes_under_torchrun_split_the_steps_and_the_evaluation(encoder, tmp_path):
    data = image_folder(tmp_path / "data", {"h-stripes", "v-stripes"}, train=100, val=56)
    val_images = len(list((data / "val").rglob("*.png")))
    assert val_images % 2  # an odd split: one rank scores one image more
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "mae.cli", *probe_run(encoder, data, out, "--epochs", "2")],
        capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    # 20 images, 2 processes x batch 4: 2 steps an epoch each (the last 4 dropped, as
    # DistributedSampler + drop_last do); every val image scored once, none twice
    state = ckpt.load_checkpoint(out / "checkpoint-1.pth")
    assert (state["steps_per_epoch"], state["step"]) == (2, 4)
    logged = epoch_records(out)
    assert [r["val_images"] for r in logged] == [val_images, val_images]
    # scored with the head rank 0 saved (its BatchNorm statistics): one process agrees
    alone = linprobe_module.linprobe(parse_args(probe_run(
        encoder, data, tmp_path / "eval", "--eval", "--resume", str(out / "checkpoint-1.pth"))))
    assert (alone["top1"], alone["top5"]) == (logged[-1]["val_top1"], logged[-1]["val_top5"])
    assert alone["loss"] == pytest.approx(logged[-1]["val_loss"], rel=1e-5)


def test_random_init_draws_its_encoder_from_the_seed(encoder):
    def drawn(seed):
        args = parse_args(["linprobe", "--checkpoint", str(encoder), "--random-init", "--seed",
                           str(seed)])
        return linprobe_module.load_encoder(args)[0].state_dict()["patch_embed.proj.weight"]

    assert torch.equal(drawn(0), drawn(0)) and not torch.equal(drawn(0), drawn(1))


@pytest.mark.slow
def test_sigterm_ends_the_demo_at_once(encoder):
    """The demo saves nothing, so a stop signal ends it as any program (the official recipe
    stops after the step and saves it)."""
    proc = subprocess.Popen([sys.executable, "-m", "mae.cli", "linprobe", "--checkpoint",
                             str(encoder), "--epochs", "100000", "--train-size", "64",
                             "--val-size", "20", "--num-workers", "0", "--quiet", "--device",
                             "cpu"], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        for line in proc.stdout:
            if line.startswith("recipe of mae linprobe"):
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
