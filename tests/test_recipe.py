"""The recipe each training command runs, said out loud (mae/train/recipe.py): every value with
where it came from (flag, config, demo, official, default, checkpoint, derived), printed once and
written to the run's log; and the augmentation knobs behind it, validated like every flag."""
import json

import pytest

from mae.cli import main, parse_args
from mae.train import finetune as finetune_module
from mae.train import linprobe as linprobe_module
from mae.train.recipe import finetune_recipe, linprobe_recipe, pretrain_recipe

from .test_cli import exit_code_and_errors as errors


def sources(recipe: dict) -> dict:
    return {key: entry["source"] for key, entry in recipe.items()}


def test_pretrain_sources_flag_config_demo_official_default(tmp_path):
    from mae.train.pretrain import apply_defaults

    config = tmp_path / "run.yaml"
    config.write_text("decoder_layers: 2\nepochs: 3\n")
    demo = parse_args(["pretrain", "--blr", "1e-3"])
    apply_defaults(demo)
    recipe = sources(pretrain_recipe(demo, 64, 2.5e-4))
    assert recipe["blr"] == "flag" and recipe["epochs"] == "demo"
    assert recipe["weight_decay"] == "default" and recipe["lr"] == "derived"
    official = parse_args(["pretrain", "--model", "mae_vit_base_patch16", "--config",
                           str(config), "--epochs", "5"])
    apply_defaults(official)
    recipe = pretrain_recipe(official, 64, 1e-4)
    assert recipe["epochs"] == {"value": 5, "source": "flag"}  # the flag beats the file
    assert recipe["warmup_epochs"] == {"value": 40, "source": "official"}
    assert recipe["patch_size"]["source"] == "derived"  # the model's own
    from_file = parse_args(["pretrain", "--model", "mae_vit_base_patch16", "--config",
                            str(config)])
    apply_defaults(from_file)
    assert pretrain_recipe(from_file, 64, 1e-4)["epochs"] == {"value": 3, "source": "config"}
    assert from_file.sources["decoder_layers"] == "config"


def test_finetune_sources_and_every_augmentation_on_or_off(tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("hflip: 0\nscale: [0.5, 1.0]\n")
    args = parse_args(["finetune", "--config", str(config), "--mixup", "0.2", "--data-path", "/d",
                       "--model", "vit_tiny_patch16"])
    finetune_module.apply_defaults(args, None)
    recipe = finetune_recipe(args, 64, 2.5e-4)
    assert recipe["hflip"] == {"value": 0.0, "source": "config", "note": "off"}
    assert recipe["scale"] == {"value": [0.5, 1.0], "source": "config"}
    assert recipe["mixup"] == {"value": 0.2, "source": "flag", "note": "on"}
    assert recipe["cutmix"] == {"value": 1.0, "source": "official", "note": "on"}
    assert recipe["aa"]["note"] == "on" and recipe["aa"]["source"] == "official"
    # main_finetune.py's colour jitter is off by default, and timm skips it under RandAugment
    assert recipe["color_jitter"] == {"value": None, "source": "default", "note": "off"}
    assert recipe["layer_decay"] == {"value": 0.75, "source": "official"}  # by architecture
    assert recipe["smoothing"]["note"] == "in mixup's soft targets"
    assert recipe["ratio"]["source"] == recipe["train_interpolation"]["source"] == "default"
    jitter = parse_args(["finetune", "--color-jitter", "0.4", "--data-path", "/d",
                         "--model", "vit_tiny_patch16"])
    finetune_module.apply_defaults(jitter, None)
    assert "RandAugment" in finetune_recipe(jitter, 64, 1e-4)["color_jitter"]["note"]
    demo = parse_args(["finetune"])
    finetune_module.apply_defaults(demo, None)
    recipe = finetune_recipe(demo, 64, 1e-3)
    assert recipe["mixup"] == {"value": 0.0, "source": "demo", "note": "off"}
    assert recipe["aa"] == {"value": "none", "source": "demo", "note": "off"}


def test_finetune_reads_the_architecture_from_the_checkpoint():
    args = parse_args(["finetune", "--finetune", "tiny.pth", "--data-path", "/d"])
    config = finetune_module.vit_config("vit_tiny_patch16", img_size=32, patch_size=8)
    finetune_module.apply_defaults(args, config)
    recipe = finetune_recipe(args, 64, 1e-3)
    assert recipe["input_size"] == {"value": 32, "source": "checkpoint"}
    assert recipe["patch_size"] == {"value": 8, "source": "checkpoint"}
    assert recipe["model"] == {"value": "12 blocks x 192", "source": "checkpoint"}
    assert "note" not in recipe["blr"]
    given_lr = parse_args(["finetune", "--finetune", "tiny.pth", "--lr", "1e-3"])
    finetune_module.apply_defaults(given_lr, config)
    recipe = finetune_recipe(given_lr, 64, 1e-3)
    assert recipe["lr"] == {"value": 1e-3, "source": "flag"}
    assert recipe["blr"] == {"value": 5e-3, "source": "demo", "note": "unused: --lr is set"}


def test_linprobe_sources_and_the_demo_says_it_does_not_augment():
    config = {"img_size": 32, "patch_size": 8, "encoder_layers": 2, "encoder_dim": 64}
    demo = parse_args(["linprobe", "--checkpoint", "x.pth", "--epochs", "5"])
    linprobe_module.apply_defaults(demo)
    recipe = linprobe_recipe(demo, config, "checkpoint", "SGD", 0.1)
    assert recipe["epochs"]["source"] == "flag" and recipe["batch_size"]["source"] == "demo"
    assert recipe["optimizer"] == {"value": "SGD", "source": "demo"}
    assert recipe["augmentation"]["value"].startswith("none") and "hflip" not in recipe
    official = parse_args(["linprobe", "--checkpoint", "x.pth", "--data-path", "/d",
                           "--hflip", "0"])
    linprobe_module.apply_defaults(official)
    recipe = linprobe_recipe(official, config, "checkpoint", "LARS", 0.2)
    assert recipe["batch_size"] == {"value": 512, "source": "official",
                                    "note": "effective 512"}
    assert recipe["hflip"] == {"value": 0.0, "source": "flag", "note": "off"}
    assert recipe["scale"] == {"value": [0.08, 1.0], "source": "default"}
    assert recipe["blr"]["source"] == "default" and recipe["input_size"]["source"] == "checkpoint"


@pytest.mark.slow
def test_pretrain_prints_the_recipe_once_and_logs_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--input-size", "16", "--patch-size", "4", "--batch-size", "8",
                 "--dataset-size", "8", "--num-workers", "0", "--epochs", "2", "--quiet",
                 "--device", "cpu", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("recipe of mae pretrain") == 1
    assert "[flag]" in printed and "[demo]" in printed
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    logged = [r for r in records if r["kind"] == "recipe"]
    assert len(logged) == 1 and logged[0]["command"] == "pretrain"
    assert logged[0]["recipe"]["patch_size"] == {"value": 4, "source": "flag"}
    assert logged[0]["recipe"]["epochs"] == {"value": 2, "source": "flag"}
    assert logged[0]["recipe"]["mask_ratio"] == {"value": 0.75, "source": "demo"}
    assert json.loads((out / "recipe.json").read_text())["recipe"] == logged[0]["recipe"]


# --- the augmentation knobs: flags and --config keys, checked up front ------------------------

@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_crop_and_flip_flags_parse_with_timm_s_names(command):
    argv = [command, "--checkpoint", "x.pth"] if command == "linprobe" else [command]
    args = parse_args([*argv, "--scale", "0.5", "1", "--ratio", "0.9", "1.1", "--hflip", "0"])
    assert (args.scale, args.ratio, args.hflip) == ([0.5, 1.0], [0.9, 1.1], 0.0)
    default = parse_args(argv)  # torchvision's / main_*.py's
    assert (default.scale, default.ratio, default.hflip) == ([0.08, 1.0], [3 / 4, 4 / 3], 0.5)


@pytest.mark.parametrize("flags, named", [
    (["--scale", "0", "1"], "--scale"),
    (["--scale", "0.9", "0.5"], "--scale"),
    (["--scale", "0.5"], "--scale"),
    (["--ratio", "1.2", "0.8"], "--ratio"),
    (["--hflip", "1.5"], "--hflip"),
    (["--vflip", "-1"], "--vflip"),
    (["--train-interpolation", "cubic"], "--train-interpolation"),
    (["--color-jitter", "-0.1"], "--color-jitter"),
])
def test_bad_augmentation_flag_is_one_error_line(flags, named, capsys, tmp_path):
    code, lines = errors(["finetune", *flags, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, key", [
    ("scale: [0.9, 0.5]\n", "scale"),
    ("scale: 0.5\n", "scale"),
    ("scale: [0.5, true]\n", "scale"),
    ("ratio: [0, 1]\n", "ratio"),
    ("hflip: 2\n", "hflip"),
    ("train_interpolation: cubic\n", "train_interpolation"),
])
def test_bad_augmentation_config_key_is_one_error_line(text, key, capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, lines = errors(["linprobe" if key in ("scale", "hflip") else "finetune",
                          *(["--checkpoint", "x.pth"] if key in ("scale", "hflip") else []),
                          "--config", str(config)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --config") and key in lines[0], lines


# --- the fine-tuning extra: a torchvision built for another torch -----------------------------

@pytest.mark.parametrize("torch_version, torchvision", [
    ("2.11.0", "0.26"), ("2.12.1", "0.27"), ("2.13.0+cpu", "0.28"), ("2.14.1+cu130", "0.29")])
def test_matching_torchvision_of_each_supported_torch(torch_version, torchvision):
    assert finetune_module.matching_torchvision(torch_version) == torchvision


def test_a_mismatched_torchvision_is_one_line_naming_the_matching_one(monkeypatch, capsys):
    """What `import timm` raises when torchvision's C++ ops were built for another torch."""
    import builtins

    import torch

    real_import = builtins.__import__

    def mismatched(name, *args, **kwargs):
        if name == "timm" or name.startswith(("timm.", "torchvision")):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", mismatched)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    with pytest.raises(SystemExit) as raised:
        main(["finetune", "--device", "cpu"])
    message = str(raised.value)
    assert message.startswith("error:") and "\n" not in message
    assert "torchvision::nms does not exist" in message
    assert "torchvision 0.28" in message and "torch 2.13.0" in message
