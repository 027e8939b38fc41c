"""The `mae` command as a new user meets it: defaults, config files and dicts, checkpoint cadence,
resume across --amp, missing splits, safe checkpoint loading, export, the ablation grid."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae import MAE, MODEL_CONFIGS, MaskedAutoencoderViT
from mae.checkpoints import files as ckpt
from mae.checkpoints.pretrained import model_from_checkpoint
from mae.cli import main, parse_args
from mae.train.pretrain import apply_defaults

TINY = ["--model", "mae_vit_tiny_patch16", "--input-size", "16", "--patch-size", "4",
        "--batch-size", "8", "--dataset-size", "16", "--num-workers", "0", "--blr", "1e-3",
        "--warmup-epochs", "1", "--quiet", "--device", "cpu"]


def resolved(*argv):
    args = parse_args(["pretrain", *argv])
    apply_defaults(args)
    return args


# --- defaults that never surprise -------------------------------------------------------------

def test_named_official_model_gets_the_official_model_and_recipe():
    args = resolved("--model", "mae_vit_base_patch16", "--input_size", "224")
    assert args.model_config["patch_size"] == 16 and args.model_config["encoder_dim"] == 768
    assert args.blr == 1.5e-4 and args.epochs == 400 and args.warmup_epochs == 40
    assert not args.demo


def test_demo_settings_apply_only_to_the_built_in_demo(tmp_path):
    demo = resolved()
    assert demo.demo and demo.model == "mae_vit_tiny_patch16"
    assert (demo.input_size, demo.model_config["patch_size"], demo.blr) == (32, 8, 5e-3)
    folder = resolved("--data-path", str(tmp_path))  # a user's data: the official defaults
    assert not folder.demo and folder.model == "mae_vit_large_patch16"
    assert folder.input_size == 224 and folder.model_config["patch_size"] == 16
    assert folder.blr == 1.5e-4


def test_checkpoints_keep_the_official_cadence_plus_a_rolling_last(tmp_path, monkeypatch):
    saves, real_save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: saves.append(1) or real_save(obj, f,
                                                                                      **kw))
    assert main(["pretrain", *TINY, "--epochs", "3", "--output-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert names == ["checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 2
    assert ckpt.checkpoints_newest_first(tmp_path)[0].name == "checkpoint-last.pth"
    # an epoch serialises once: its numbered checkpoint is a second name of checkpoint-last
    assert len(saves) == 3
    assert (tmp_path / "checkpoint-2.pth").stat().st_ino == \
        (tmp_path / "checkpoint-last.pth").stat().st_ino
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-0.pth")["epoch"] == 0  # kept its own


@pytest.mark.parametrize("first,second", [("none", "fp16"), ("fp16", "none"), ("bf16", "fp16")])
def test_resume_works_across_amp_changes(tmp_path, capsys, first, second):
    assert main(["pretrain", *TINY, "--epochs", "1", "--amp", first,
                 "--output-dir", str(tmp_path)]) == 0
    assert main(["pretrain", *TINY, "--epochs", "2", "--amp", second, "--resume", "auto",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and ("loss scale" in out or "loss-scaler" in out)
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 1


def test_linprobe_without_a_val_split_is_an_error_naming_it(tmp_path, capsys):
    assert main(["pretrain", *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 0
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(
            tmp_path / "data" / "train" / cls / "0.png")
    code = main(["linprobe", "--checkpoint", str(tmp_path / "run" / "checkpoint-last.pth"),
                 "--data-path", str(tmp_path / "data"), "--epochs", "1", "--device", "cpu"])
    assert code == 1
    assert "no 'val' split" in capsys.readouterr().err


def test_finetune_without_timm_is_a_clear_error_naming_the_extra(monkeypatch):
    import builtins

    from mae.train.finetune import require_timm

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(SystemExit, match=r"\.\[finetune\]"):
        require_timm()
    with pytest.raises(SystemExit, match=r"\.\[finetune\]"):
        main(["finetune", "--device", "cpu"])


# --- flags and config values checked up front ------------------------------------------------

def exit_code_and_errors(argv, capsys):
    """(exit code, the `error:` lines) of `mae ARGV`, whether argparse or our check refused it."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if "error:" in line]


def assert_refused(argv, flag, capsys, out):
    code, errors = exit_code_and_errors(argv, capsys)
    assert code == 2 and len(errors) == 1 and flag in errors[0], (argv, code, errors)
    assert not out.exists(), "a refused run left its output folder"


@pytest.mark.parametrize("flags,named", [
    (["--accum-iter", "0"], "--accum-iter"),
    (["--log-every", "0"], "--log-every"),
    (["--save-every", "0"], "--save-every"),
    (["--epochs", "0"], "--epochs"),
    (["--dataset-size", "0"], "--dataset-size"),
    (["--decoder-depth", "-1"], "--decoder-depth"),
    (["--mask-ratio", "0"], "--mask-ratio"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--blr", "nan"], "--blr"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
])
def test_bad_pretrain_flags_are_one_error_line(tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert_refused(["pretrain", *TINY, "--epochs", "1", *flags, "--output-dir", str(out)],
                   named, capsys, out)


@pytest.mark.parametrize("flags,named", [
    (["--mask-ratio", "0.99"], "--mask-ratio"),  # 16 patches: int(16 * 0.01) = 0 kept
    (["--mask-type", "grid", "--mask-ratio", "0.6"], "mask_ratio"),
    (["--num-frames", "4"], "--video"),
])
def test_flags_the_model_refuses_exit_1_before_anything_is_written(tmp_path, capsys, flags,
                                                                     named):
    out = tmp_path / "out"
    code, errors = exit_code_and_errors(["pretrain", *TINY, *flags, "--output-dir", str(out)],
                                        capsys)
    assert code == 1 and len(errors) == 1 and named in errors[0], errors
    assert not out.exists()


def test_cuda_on_a_cpu_only_torch_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    out = tmp_path / "out"
    assert_refused(["pretrain", *TINY, "--device", "cuda", "--output-dir", str(out)],
                   "--device", capsys, out)
    code, errors = exit_code_and_errors(["linprobe", "--checkpoint", "x.pth", "--device", "cuda"],
                                        capsys)
    assert code == 2 and "CPU-only" in errors[0]


def test_an_output_dir_under_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    for out in (file, file / "run"):
        assert_refused(["pretrain", *TINY, "--output-dir", str(out)], "--output-dir", capsys,
                       file / "run")
    assert_refused(["ablate", "--output-dir", str(file / "run")], "--output-dir", capsys,
                   file / "run")


def test_other_commands_check_their_flags(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, named in ((["anomaly", "--checkpoint", "x.pth", "--mask-ratio", "0"], "--mask-ratio"),
                        (["anomaly", "--checkpoint", "x.pth", "--coverage", "0"], "--coverage"),
                        (["linprobe", "--checkpoint", "x.pth", "--batch-size", "0"],
                         "--batch-size"),
                        (["finetune", "--layer-decay", "0", "--output-dir", str(out)],
                         "--layer-decay"),
                        (["finetune", "--accum-iter", "0", "--output-dir", str(out)],
                         "--accum-iter"),
                        (["ablate", "--epochs", "0", "--output-dir", str(out)], "--epochs")):
        assert_refused(argv, named, capsys, out)


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code, errors = exit_code_and_errors(["pretrain", *TINY, "--data-path",
                                         str(tmp_path / "missing"), "--output-dir", str(out)],
                                        capsys)
    assert code == 1 and len(errors) == 1 and "--data-path" in errors[0]
    assert not out.exists()


def test_decoder_depth_0_builds_the_block_less_decoder(tmp_path):
    """As the official code builds it: decoder embed, norm and head, no blocks."""
    assert main(["pretrain", *TINY, "--epochs", "1", "--decoder-depth", "0",
                 "--output-dir", str(tmp_path)]) == 0
    model, saved = model_from_checkpoint(tmp_path / "checkpoint-last.pth")
    assert saved["model_config"]["decoder_layers"] == 0 and len(model.decoder_blocks) == 0


@pytest.mark.parametrize("text,key,exit_code", [
    ('use_kernels: "false"', "use_kernels", 2),
    ("batch_size: true", "batch_size", 2),
    ("batch_size: 32.7", "batch_size", 2),
    ("epochs: 0", "epochs", 2),
    ("quiet: 'yes'", "quiet", 2),
    ("mask_type: 3", "mask_type", 2),
    ("mlp_ratio: four", "mlp_ratio", 1),  # MAE config keys: the model checks them
    ("encoder_layers: 2.5", "encoder_layers", 1),
])
def test_config_values_are_type_checked_naming_the_key(tmp_path, capsys, text, key, exit_code):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    out = tmp_path / "out"
    code, errors = exit_code_and_errors(["pretrain", "--config", str(path), *TINY,
                                         "--output-dir", str(out)], capsys)
    assert code == exit_code and len(errors) == 1 and key in errors[0], errors
    assert not out.exists()


def test_config_values_of_the_right_type_are_taken(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("use_kernels: false\nbatch_size: 4\nblr: 1e-3\nmlp_ratio: 2\n")
    args = resolved("--config", str(path))
    assert args.no_kernels and args.batch_size == 4 and args.blr == 1e-3
    assert args.model_config["mlp_ratio"] == 2 and args.model_config["use_kernels"] is False


def test_threads_default_leaves_room_for_the_loader_workers(monkeypatch):
    from mae.cli import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert (default_threads(2), default_threads(1), default_threads(0)) == (1, 1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the cores
    assert default_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by the user or torchrun: taken as given
    assert default_threads(2) == 3
    assert parse_args(["pretrain", "--num-workers", "2"]).threads == 3
    assert parse_args(["pretrain", "--threads", "2"]).threads == 2


def test_threads_flag_sets_torch_s_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["pretrain", *TINY, "--epochs", "1", "--threads", "1",
                     "--output-dir", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- the config-dict model and --config ---------------------------------------------------------

def test_config_dict_model_as_the_explainers_show():
    model = MAE({"img_size": 224, "patch_size": 16, "encoder_dim": 768, "decoder_dim": 512,
                 "encoder_layers": 12, "decoder_layers": 8, "mask_ratio": 0.75,
                 "norm_pix_loss": True})
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        loss, reconstructed, mask = model(images)
    assert reconstructed.shape == images.shape and mask.shape == (1, 196)
    assert int(mask.sum()) == 147 and loss.ndim == 0
    assert isinstance(model, MaskedAutoencoderViT) and model.blocks[0].attn.num_heads == 12
    official = MaskedAutoencoderViT(embed_dim=768, depth=12, num_heads=12, norm_pix_loss=True)
    assert model.state_dict().keys() == official.state_dict().keys()
    official.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("bad,match", [
    ({"embed_dim": 64}, "unknown MAE config key"),
    ({"encoder_dim": 100, "encoder_heads": 3}, "not divisible"),
    ({"img_size": 30, "patch_size": 8}, "divisible"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"norm_pix_loss": "yes"}, "norm_pix_loss"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"norm_eps": "1e-6"}, "norm_eps"),
])
def test_config_dict_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        MAE(bad)


def test_cli_checkpoints_load_as_the_config_model(tmp_path):
    assert main(["pretrain", *TINY, "--epochs", "1", "--output-dir", str(tmp_path)]) == 0
    model, saved = model_from_checkpoint(tmp_path / "checkpoint-last.pth")
    assert type(model) is MAE and model.config == saved["model_config"]
    again = MAE(saved["model_config"])
    again.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("mask_type", ["block", "grid"])
def test_pretrain_with_each_mask_sampling(tmp_path, mask_type):
    """--mask-type reaches the model and the checkpoint; the epoch figure draws its masks."""
    assert main(["pretrain", *TINY, "--epochs", "1", "--mask-type", mask_type,
                 "--output-dir", str(tmp_path)]) == 0
    model, saved = model_from_checkpoint(tmp_path / "checkpoint-last.pth")
    assert model.mask_type == mask_type == saved["model_config"]["mask_type"]
    assert (tmp_path / "reconstruction-000.png").exists()


def test_grid_masking_with_another_ratio_is_an_error(capsys):
    assert main(["pretrain", *TINY, "--mask-type", "grid", "--mask-ratio", "0.6"]) == 1
    assert "mask_ratio" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_with_flags_overriding_it(tmp_path, suffix):
    values = {"model": "mae_vit_tiny_patch16", "img_size": 16, "patch_size": 4,
              "encoder_layers": 2, "decoder_dim": 32, "mask_ratio": 0.5, "blr": 2e-4,
              "epochs": 7, "norm_pix_loss": True}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    args = resolved("--config", str(path), "--epochs", "2", "--mask-ratio", "0.6")
    assert args.epochs == 2 and args.blr == 2e-4  # the flag wins; the file fills the rest
    config = args.model_config
    assert config["mask_ratio"] == 0.6 and config["encoder_layers"] == 2
    assert config["decoder_dim"] == 32 and config["encoder_dim"] == 192 and config["norm_pix_loss"]
    assert resolved("--config", str(path), "--no-norm-pix-loss").model_config[
        "norm_pix_loss"] is False
    exponent = tmp_path / "eps.yaml"  # YAML 1.1 reads 1e-5 (no dot) as a string
    exponent.write_text("norm_eps: 1e-5\n")
    assert resolved("--config", str(exponent)).model_config["norm_eps"] == 1e-5


def test_config_file_errors_and_never_runs_code(tmp_path, capsys):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("encoder_depth: 3\n")
    with pytest.raises(SystemExit, match="unknown key 'encoder_depth'"):
        parse_args(["pretrain", "--config", str(unknown)])
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SystemExit, match="evil.yaml"):
        parse_args(["pretrain", "--config", str(evil)])
    assert not marker.exists()


# --- checkpoints never run code -------------------------------------------------------------------

class RunsCode:
    """What a malicious checkpoint holds: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def malicious(tmp_path):
    """A real pre-training checkpoint with a code-running object slipped in."""
    assert main(["pretrain", *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 0
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint-last.pth")
    marker = tmp_path / "code-ran"
    state["args"]["payload"] = RunsCode(f"touch {marker}")
    path = tmp_path / "malicious.pth"
    torch.save(state, path)
    return path, marker


def commands_given(path, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(image)
    return {
        "linprobe": ["linprobe", "--checkpoint", str(path), "--epochs", "1", "--device", "cpu"],
        "visualize": ["visualize", "--checkpoint", str(path), "--image", str(image),
                      "-o", str(tmp_path / "v.png")],
        "export": ["export", "--checkpoint", str(path), "-o", str(tmp_path / "m.safetensors")],
        "pretrain --resume": ["pretrain", *TINY, "--epochs", "2", "--resume", str(path),
                              "--output-dir", str(tmp_path / "resumed")],
        "anomaly": ["anomaly", "--checkpoint", str(path), "--image", str(image),
                    "-o", str(tmp_path / "a.png"), "--device", "cpu"],
    }


def test_a_malicious_checkpoint_runs_no_code_in_any_command(malicious, tmp_path, capsys):
    path, marker = malicious
    for name, argv in commands_given(path, tmp_path).items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err
        assert "could run code" in err and ckpt.TRUST_FLAG in err, (name, err)
        assert not marker.exists(), name


def test_the_trust_opt_out_loads_legacy_pickles(malicious, tmp_path):
    path, marker = malicious
    state = ckpt.load_checkpoint(path, trust=True)  # the loud opt-out: the pickle runs
    assert marker.exists() and state["epoch"] == 0


def test_official_checkpoint_with_namespace_args_loads_safely(tmp_path):
    model = MAE.from_name("mae_vit_tiny_patch16", img_size=32, patch_size=8)
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32, patch_size=8,
                              norm_pix_loss=True, blr=1.5e-4, output_dir="./output_dir")
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 799, "args": args}, path)
    loaded, saved = model_from_checkpoint(path)
    assert saved["model"] == "mae_vit_tiny_patch16" and loaded.config["norm_pix_loss"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_export_safetensors_round_trip(tmp_path):
    assert main(["pretrain", *TINY, "--epochs", "1", "--output-dir", str(tmp_path)]) == 0
    out = tmp_path / "weights.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path / "checkpoint-last.pth"),
                 "-o", str(out)]) == 0
    original, _ = model_from_checkpoint(tmp_path / "checkpoint-last.pth")
    exported, saved = model_from_checkpoint(out)
    assert saved["model_config"] == original.config
    for key, value in original.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(image)
    assert main(["visualize", "--checkpoint", str(out), "--image", str(image),
                 "-o", str(tmp_path / "v.png")]) == 0


# --- the ablation grid ---------------------------------------------------------------------------

def test_ablate_writes_the_tables_and_plot(tmp_path):
    assert main(["ablate", "--mask-ratios", "0.5,0.75", "--decoder-depths", "1",
                 "--mask-types", "random,grid", "--epochs", "1", "--dataset-size", "64",
                 "--probe-epochs", "1",
                 "--probe-val-size", "20", "--num-workers", "0", "--device", "cpu", "--quiet",
                 "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "ablation.json").read_text())
    base_depth = MODEL_CONFIGS["mae_vit_tiny_patch16"]["decoder_layers"]
    assert [(r["mask_ratio"], r["decoder_depth"], r["mask_type"]) for r in results] == [
        (0.5, base_depth, "random"), (0.75, base_depth, "random"), (0.75, 1, "random"),
        (0.75, base_depth, "grid")]
    table = (tmp_path / "ablation.md").read_text()
    assert "| mask ratio |" in table and "| decoder depth |" in table
    assert "| mask sampling |" in table and "\n| grid |" in table and "\n| random |" in table
    assert table.count("\n| 0.75 |") == 1 and "\n| 1 |" in table
    with Image.open(tmp_path / "ablation.png") as img:
        assert img.size[0] > 300


@pytest.mark.parametrize("text,key", [("scale: null", "scale"), ("hflip: null", "hflip"),
                                      ("batch_size: null", "batch_size")])
def test_a_null_config_value_for_a_flag_with_a_default_is_one_error_line(tmp_path, capsys,
                                                                         text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    code, errors = exit_code_and_errors(["finetune", "--config", str(path), "--finetune",
                                         str(tmp_path / "x.pth"), "--device", "cpu"], capsys)
    assert code == 2 and errors == [f"error: --config {path}: {key} must be a value, not null"]
    # null still means "unset" where the flag's default is unset
    path.write_text("nb_classes: null\nresume: null\n")
    args = parse_args(["finetune", "--config", str(path), "--finetune", "x.pth", "--device",
                       "cpu"])
    assert args.nb_classes is None and args.resume is None
