"""Anomaly maps: every patch masked `coverage` times, maps and scores shaped as documented,
the synthetic defects, `mae anomaly` for an image, a folder and the synthetic evaluation, and
a small pre-training whose maps find the defects (a CI-sized margin)."""
import csv
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mae import MAE
from mae.cli import main
from mae.eval.anomaly import DEFECTS, add_defect, anomaly_maps

SMALL = {"img_size": 32, "patch_size": 8, "encoder_dim": 32, "encoder_layers": 1,
         "decoder_dim": 32, "decoder_layers": 1, "norm_pix_loss": True}


def count_hidden(monkeypatch, model, batch: int) -> torch.Tensor:
    """(batch, L) counts, updated in place, of the passes of `model.predict` that hid each patch."""
    hidden = torch.zeros(batch, model.patch_embed.num_patches)
    predict = model.predict

    def counting(imgs, ratio, noise):
        out = predict(imgs, ratio, noise)
        hidden.add_(out[2])
        return out

    monkeypatch.setattr(model, "predict", counting)
    return hidden


@pytest.mark.parametrize("mask_ratio,coverage", [(0.75, 1), (0.75, 3), (0.6, 2)])
def test_every_patch_is_hidden_coverage_times(monkeypatch, mask_ratio, coverage):
    model = MAE(SMALL)
    hidden = count_hidden(monkeypatch, model, 3)
    maps = anomaly_maps(model, torch.randn(3, 3, 32, 32), mask_ratio, coverage)
    assert hidden.min() >= coverage
    assert maps.patch_scores.shape == (3, 16) and maps.pixel_map.shape == (3, 32, 32)
    assert torch.equal(maps.image_score, maps.patch_scores.amax(dim=1))
    assert (maps.patch_scores > 0).all()


@pytest.mark.parametrize("kind", DEFECTS)
def test_defects_change_the_image_where_their_mask_says(kind):
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    out, mask = add_defect(img, kind, random.Random(1))
    changed = np.any(np.asarray(out) != np.asarray(img), axis=2)
    marked = np.asarray(mask) > 127
    assert marked.sum() >= 10 and (changed <= marked).all()
    assert changed.sum() >= 0.5 * marked.sum()


def test_anomaly_command_for_an_image_and_a_folder(tmp_path):
    assert main(["pretrain", "--config", str(_config(tmp_path)), "--input-size", "32",
                 "--patch-size", "8", "--epochs", "1", "--dataset-size", "16", "--batch-size",
                 "8", "--num-workers", "0", "--quiet", "--device", "cpu",
                 "--output-dir", str(tmp_path / "run")]) == 0
    checkpoint = str(tmp_path / "run" / "checkpoint-last.pth")
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)).save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    assert main(["anomaly", "--checkpoint", checkpoint, "--image", str(folder / "1.png"),
                 "-o", str(tmp_path / "map.png"), "--device", "cpu"]) == 0
    with Image.open(tmp_path / "map.png") as figure:
        assert figure.size[0] > 3 * figure.size[1] / 2
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert main(["anomaly", "--checkpoint", checkpoint, "--data-path", str(folder),
                     "--csv", str(tmp_path / "scores.csv"), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [row["image"].rsplit("/", 1)[1] for row in rows] == ["0.png", "1.png", "2.png"]
    assert all(float(row["score"]) > 0 for row in rows)


@pytest.mark.slow  # a minute of training: in the default CI environment only
def test_maps_of_a_short_pretraining_find_the_synthetic_defects(tmp_path, capsys):
    """The README's demo encoder reaches image AUROC 0.81, pixel AUROC 0.83; a 10-epoch run of
    1024 images (about a minute) is checked for a margin over chance (measured 0.78, 0.80)."""
    pytest.importorskip("sklearn", reason="AUROC needs scikit-learn")
    assert main(["pretrain", "--norm-pix-loss", "--epochs", "10", "--dataset-size", "1024",
                 "--num-workers", "0", "--quiet", "--device", "cpu",
                 "--output-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["anomaly", "--checkpoint", str(tmp_path / "checkpoint-last.pth"),
                 "--synthetic", "200", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["defective"] == 100
    assert result["image_auroc"] > 0.65 and result["pixel_auroc"] > 0.7, result


def _config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("encoder_dim: 32\nencoder_layers: 1\ndecoder_dim: 32\ndecoder_layers: 1\n")
    return path


@pytest.mark.parametrize("mask_type", ["grid", "block"])
def test_every_patch_is_hidden_whatever_mask_the_model_was_trained_with(monkeypatch, mask_type):
    model = MAE({**SMALL, "mask_type": mask_type})
    hidden = count_hidden(monkeypatch, model, 2)
    maps = anomaly_maps(model, torch.randn(2, 3, 32, 32), 0.75, coverage=2)
    assert hidden.min() >= 2 and (maps.patch_scores > 0).all()
    assert model.mask_type == mask_type  # the model's own sampler is back for training


def test_anomaly_writes_into_the_run_folder_the_docs_name(tmp_path):
    """The docs' examples must not overwrite a tracked file (one wrote docs/anomaly/map.png)."""
    from pathlib import Path

    docs = Path(__file__).parents[1] / "docs"
    text = "".join((docs / page).read_text() for page in ("targets.md", "pretraining.md"))
    outputs = re.findall(r"mae anomaly [^\n]*?(?:\\\n[^\n]*?)*-o (\S+)", text)
    assert outputs and all(out.startswith("runs/") for out in outputs), outputs
