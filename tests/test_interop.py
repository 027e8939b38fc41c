"""Export to and import from the layouts researchers use, with the real packages: a Hugging Face
ViTMAE directory (transformers' `from_pretrained`, outputs equal ours for the same noise), a timm
ViT encoder (strict=True), and every checkpoint-taking command reading an HF directory and an
official MAE .pth, saying which it found."""
import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mae import MAE
from mae.checkpoints.files import load_checkpoint
from mae.checkpoints.interop import config_from_hf, from_hf, hf_config, to_hf
from mae.cli import main

from .test_checkpoint import one_error_line, photo
from .test_training import TINY

# a square tiny ViTMAE: 2 encoder blocks, a decoder of another width (the qkv split of each)
CONFIG = {"img_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_layers": 2,
          "encoder_heads": 2, "decoder_dim": 16, "decoder_layers": 1, "decoder_heads": 2,
          "norm_pix_loss": True}


def saved(path, model):
    torch.save({"model": model.state_dict(),
                "args": {"model_config": model.config, "input_size": model.config["img_size"],
                         "command": "pretrain"}}, path)
    return path


@pytest.fixture
def trained(tmp_path):
    """A model whose every weight differs from its initialisation (so a dropped key shows)."""
    torch.manual_seed(0)
    model = MAE(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, saved(tmp_path / "ck.pth", model)


def test_hf_export_loads_in_transformers_and_gives_our_loss_and_logits(trained, tmp_path,
                                                                       capsys):
    transformers = pytest.importorskip("transformers")
    model, ck = trained
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ck), "--format", "hf", "-o", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] \
        and not info["mismatched_keys"], info
    hf.eval()
    torch.manual_seed(1)
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        theirs = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = model.eval().predict(imgs, 0.75, noise)
    torch.testing.assert_close(theirs.logits, pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.loss, loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(theirs.mask, mask)


def test_ours_to_hf_to_ours_is_identical_in_both_hf_key_layouts(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, ck = trained
    ours = model.state_dict()
    back, config = from_hf(to_hf(ours, model.config),
                           json.loads(json.dumps(hf_config(model.config))))
    assert config == model.config
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # what transformers itself saves (its own key names) reads back to the same tensors
    out, resaved = tmp_path / "hf", tmp_path / "resaved"
    assert main(["export", "--checkpoint", str(ck), "--format", "hf", "-o", str(out)]) == 0
    transformers.ViTMAEForPreTraining.from_pretrained(out).save_pretrained(resaved)
    state = load_checkpoint(resaved)
    assert set(state["model"]) == set(ours)
    assert all(torch.equal(state["model"][k], ours[k]) for k in ours)
    assert state["args"]["model_config"] == model.config


@pytest.mark.slow
def test_hf_export_of_a_demo_run_loads_with_from_pretrained(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--epochs", "1", "--output-dir", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run / "checkpoint-0.pth"), "--format", "hf",
                 "-o", str(tmp_path / "hf")]) == 0
    _, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf",
                                                                output_loading_info=True)
    assert not any(info.values()), info


def test_commands_read_an_hf_directory_and_an_official_pth_and_say_which(trained, tmp_path,
                                                                         capsys):
    model, ck = trained
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ck), "--format", "hf", "-o", str(hf)]) == 0
    capsys.readouterr()
    assert main(["visualize", "--checkpoint", str(hf), "--image", str(photo(tmp_path)),
                 "-o", str(tmp_path / "v.png")]) == 0
    assert f"read {hf}: a Hugging Face ViTMAE directory" in capsys.readouterr().out
    assert (tmp_path / "v.png").is_file()
    # an official checkpoint: its args in a Namespace, only the model name and size
    official = tmp_path / "official.pth"
    torch.save({"model": MAE.from_name("mae_vit_tiny_patch16", img_size=32).state_dict(),
                "args": argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32)},
               official)
    assert main(["export", "--checkpoint", str(official), "--format", "hf",
                 "-o", str(tmp_path / "from_official")]) == 0
    assert "an official MAE checkpoint" in capsys.readouterr().out
    back = load_checkpoint(tmp_path / "from_official")
    assert back["args"]["model_config"]["encoder_dim"] == 192
    # pre-training takes training checkpoints only: one line saying what the directory holds
    assert main(["pretrain", *TINY, "--epochs", "1", "--resume", str(hf),
                 "--output-dir", str(tmp_path / "run")]) == 1
    assert "not a training checkpoint" in one_error_line(capsys)


@pytest.mark.parametrize("damage", ["pickle_only", "model_type", "extra_key", "file_target",
                                    "encoder_only"])
def test_bad_hf_directories_and_exports_are_one_error_line(trained, tmp_path, capsys, damage):
    model, ck = trained
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ck), "--format", "hf", "-o", str(hf)]) == 0
    capsys.readouterr()
    if damage == "pickle_only":
        (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
        expected = "pytorch_model.bin, a pickle we do not load"
    elif damage == "model_type":
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
        expected = "not a ViTMAE's"
    elif damage == "extra_key":
        weights = load_file(hf / "model.safetensors")
        save_file({**weights, "vit.pooler.weight": torch.zeros(2)}, hf / "model.safetensors",
                  metadata={"format": "pt"})
        expected = "vit.pooler.weight"
    elif damage == "encoder_only":  # as the official mae_pretrain_vit_*.pth: no decoder
        encoder = {k: v for k, v in model.state_dict().items()
                   if not k.startswith(("decoder", "mask_token"))}
        torch.save({"model": encoder, "args": argparse.Namespace(model_config=model.config)},
                   tmp_path / "encoder.pth")
        assert main(["export", "--checkpoint", str(tmp_path / "encoder.pth"), "--format", "hf",
                     "-o", str(tmp_path / "out")]) == 1
        assert "--format timm" in one_error_line(capsys)
        return
    else:
        (tmp_path / "afile").write_text("x")
        assert main(["export", "--checkpoint", str(ck), "--format", "hf",
                     "-o", str(tmp_path / "afile")]) == 1
        assert "is a file" in one_error_line(capsys)
        return
    assert main(["export", "--checkpoint", str(hf), "-o", str(tmp_path / "x.safetensors")]) == 1
    line = one_error_line(capsys)
    assert str(hf) in line and expected in line, line


def test_timm_export_loads_strictly_into_timms_vit_and_matches_our_encoder(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = MAE.from_name("mae_vit_tiny_patch16", img_size=32, patch_size=8)
    ck, out = saved(tmp_path / "ck.pth", model), tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(ck), "--format", "timm", "-o", str(out)]) == 0
    assert "timm.create_model('vit_tiny_patch16_224'" in capsys.readouterr().out
    weights = load_file(out)
    assert "mask_token" not in weights and not any(k.startswith("decoder") for k in weights)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    vit.load_state_dict(weights, strict=True)
    ours = {k: v for k, v in model.state_dict().items()
            if not k.startswith(("decoder", "mask_token"))}
    theirs = vit.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # through timm's own file loading (its checkpoint filter, which routes mask_token to DINOv2)
    loaded = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8,
                               pretrained=True, pretrained_cfg_overlay={"file": str(out)})
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(imgs), model.encode(imgs).cls_token,
                                   rtol=1e-5, atol=1e-5)


def test_finetuning_starts_from_an_hf_directory(trained, tmp_path):
    pytest.importorskip("timm")
    from mae.train.finetune import build_vit, encoder_of, load_pretrained

    model, ck = trained
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ck), "--format", "hf", "-o", str(hf)]) == 0
    state = load_checkpoint(hf)
    vit = build_vit(encoder_of(state["args"]["model_config"]), 10, 0.0, global_pool=True)
    result = load_pretrained(vit, state, hf)
    assert set(result["missing"]) == {"head.weight", "head.bias", "fc_norm.weight",
                                      "fc_norm.bias"}
    assert torch.equal(vit.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


# an encoder MLP of its own width, not encoder_dim * mlp_ratio (as ViT-g/14's), at a ratio
# (50 / 32) no float rounds to exactly
WIDE = {**CONFIG, "encoder_mlp_dim": 50}


@pytest.mark.parametrize("name, width", [("mae_vit_giant_patch14", 6144),
                                         ("mae_vit_gigantic_patch14", 8192)])
def test_hf_config_and_timm_kwargs_of_the_giant_models_have_their_mlp_width(name, width):
    from mae.checkpoints.interop import timm_model
    from mae.models.image import config_of

    config = config_of(name)
    hf = hf_config(config)
    assert hf["intermediate_size"] == width
    assert hf["decoder_intermediate_size"] == config["decoder_dim"] * 4
    _, kwargs = timm_model(config)
    assert int(config["encoder_dim"] * kwargs["mlp_ratio"]) == width
    assert config_from_hf(json.loads(json.dumps(hf))) == config


def test_an_encoder_mlp_width_round_trips_through_hf_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = MAE(WIDE)
    assert model.blocks[0].mlp.fc1.out_features == 50
    ours = model.state_dict()
    hf = json.loads(json.dumps(hf_config(model.config)))
    assert hf["intermediate_size"] == 50 and hf["decoder_intermediate_size"] == 64
    back, config = from_hf(to_hf(ours, model.config), hf)
    assert config == model.config
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    ck, out = saved(tmp_path / "ck.pth", model), tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ck), "--format", "hf", "-o", str(out)]) == 0
    _, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert load_checkpoint(out)["args"]["model_config"] == model.config


def test_an_encoder_mlp_width_loads_strictly_into_timm(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = MAE(WIDE)
    ck, out = saved(tmp_path / "ck.pth", model), tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(ck), "--format", "timm", "-o", str(out)]) == 0
    capsys.readouterr()
    from mae.checkpoints.interop import timm_model

    name, kwargs = timm_model(model.config)
    vit = timm.create_model(name, **kwargs)
    vit.load_state_dict(load_file(out), strict=True)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(imgs), model.eval().encode(imgs).cls_token,
                                   rtol=1e-5, atol=1e-5)


def test_an_hf_config_s_layer_norm_eps_is_honoured(tmp_path, capsys):
    """A ViTMAE whose config.json says its LayerNorms' eps (1e-2 here, where it shows in the
    outputs; transformers' default is 1e-12): imported, our model normalises with it and gives
    transformers' outputs; exported again, it says it; timm's MAE ViTs cannot take it (one
    line). A config.json that does not say it gets transformers' default."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, image_size=16, patch_size=4, layer_norm_eps=1e-2,
        norm_pix_loss=True)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    state = load_checkpoint(tmp_path / "hf")
    config = state["args"]["model_config"]
    assert config["norm_eps"] == 1e-2
    ours = MAE(config).eval()
    ours.load_state_dict(state["model"])
    assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-2}
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        theirs = hf_model(pixel_values=imgs, noise=noise)
        loss, pred, _ = ours.predict(imgs, 0.75, noise)
    torch.testing.assert_close(theirs.logits, pred, rtol=1e-5, atol=1e-6)
    assert hf_config(config)["layer_norm_eps"] == 1e-2
    said = json.loads((tmp_path / "hf" / "config.json").read_text())
    del said["layer_norm_eps"]
    assert config_from_hf(said)["norm_eps"] == 1e-12
    ck = saved(tmp_path / "ck.pth", ours)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ck), "--format", "timm",
                 "-o", str(tmp_path / "timm.safetensors")]) == 0
    assert "norm_layer=functools.partial(torch.nn.LayerNorm, eps=0.01)" in capsys.readouterr().out


def test_a_timm_export_with_another_layer_norm_eps_gives_our_features(tmp_path, capsys):
    """An encoder normalising with eps 1e-2 (an HF ViTMAE's own eps, here where it shows):
    the create_model call `mae export --format timm` prints, run as printed, builds a ViT that
    loads the file and gives our features; the file's metadata says the eps."""
    import functools

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = MAE({**WIDE, "norm_eps": 1e-2}).eval()
    ck, out = saved(tmp_path / "ck.pth", model), tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(ck), "--format", "timm", "-o", str(out)]) == 0
    call = capsys.readouterr().out.strip().splitlines()[-1].partition(": ")[2]
    assert call.startswith("timm.create_model(") and "eps=0.01" in call
    vit = eval(call, {"timm": timm, "functools": functools, "torch": torch}).eval()
    assert {m.eps for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-2}
    with safe_open(out, "pt") as f:
        assert f.metadata()["norm_eps"] == "0.01"
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(imgs), model.encode(imgs).cls_token, rtol=1e-5,
                                   atol=1e-5)
