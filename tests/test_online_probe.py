"""`mae pretrain --online-probe`: the probe never changes the MAE (weights bitwise equal with and
without it), its top-1 reaches the log, TensorBoard and the epoch line, it rises over epochs on
the built-in data; `mae plot` draws a run's curves (and every pre-training run ends with them)."""
import json

import pytest
import torch

from mae.cli import main

from .test_checkpoint import one_error_line
from .test_training import TINY

PNG = b"\x89PNG\r\n\x1a\n"


def records(run, kind):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def test_the_probe_leaves_the_mae_bitwise_unchanged_and_reports_top1(tmp_path, capsys):
    with_probe, without = tmp_path / "probe", tmp_path / "plain"
    extra = ["--epochs", "2", "--save-every", "1", "--probe-val-size", "16"]
    assert main(["pretrain", *TINY, *extra, "--output-dir", str(without)]) == 0
    capsys.readouterr()
    assert main(["pretrain", *TINY, *extra, "--output-dir", str(with_probe), "--online-probe",
                 "--log-dir", str(tmp_path / "tb")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "online probe top-1" in out
    for name in ("checkpoint-0.pth", "checkpoint-1.pth"):  # after the probe's first evaluation
        a = torch.load(with_probe / name, weights_only=False)
        b = torch.load(without / name, weights_only=False)
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        moments = [(s["exp_avg"], t["exp_avg"]) for s, t in
                   zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())]
        assert moments and all(torch.equal(s, t) for s, t in moments)
    assert [r["loss"] for r in records(with_probe, "step")] == \
        [r["loss"] for r in records(without, "step")]
    epochs = records(with_probe, "epoch")
    assert all(0 <= r["probe_top1"] <= 100 and r["probe_loss"] > 0 for r in epochs)
    assert not any("probe_top1" in r for r in records(without, "epoch"))
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("probe_top1")] == \
        [(1000 * (r["epoch"] + 1), pytest.approx(r["probe_top1"])) for r in epochs]
    assert (with_probe / "curves.png").read_bytes().startswith(PNG)  # written as the run ends


@pytest.mark.slow
def test_the_online_probe_accuracy_rises_over_epochs_on_the_built_in_data(tmp_path):
    """A 4-block, 128-wide encoder at 32x32 in 4x4 patches (the probe's features are the mean
    of 16 kept tokens; with 8x8 patches, 4 tokens, it barely learns in so short a run), 5 epochs
    of 1024 images, scored on 256 val images; measured: 10.5, 9.4, 12.1, 14.1, 15.6 (4 epochs
    reached only 12.9)."""
    config = tmp_path / "small.yaml"
    config.write_text("encoder_dim: 128\nencoder_layers: 4\ndecoder_dim: 64\n"
                      "decoder_layers: 1\n")
    assert main(["pretrain", "--config", str(config), "--input-size", "32", "--patch-size", "4",
                 "--blr", "5e-3", "--warmup-epochs", "1", "--norm-pix-loss", "--batch-size",
                 "32", "--dataset-size", "1024", "--epochs", "5", "--num-workers", "0",
                 "--quiet", "--device", "cpu", "--online-probe", "--probe-val-size", "256",
                 "--output-dir", str(tmp_path / "run")]) == 0
    top1 = [r["probe_top1"] for r in records(tmp_path / "run", "epoch")]
    print(f"online probe top-1 by epoch: {top1}")
    assert top1[-1] >= top1[0] + 3 and top1[-1] > 13, top1


@pytest.mark.parametrize("flags", [["--video"], ["--data-path", "FLAT"]])
def test_a_run_the_probe_cannot_serve_is_one_error_line(tmp_path, capsys, flags):
    if "FLAT" in flags:  # images without class folders: no labels to probe
        from PIL import Image

        flat = tmp_path / "flat"
        flat.mkdir()
        for i in range(8):
            Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(flat / f"{i}.png")
        flags = ["--data-path", str(flat)]
    assert main(["pretrain", *TINY, *flags, "--online-probe",
                 "--output-dir", str(tmp_path / "run")]) == 1
    assert "--online-probe" in one_error_line(capsys)


def test_plot_draws_a_runs_curves_and_a_folder_without_a_log_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "recipe", "command": "pretrain", "recipe": {}}]
    for epoch in range(3):
        lines += [{"kind": "step", "epoch": epoch, "step": 2 * epoch + i, "loss": 1.0 / (epoch + 1),
                   "lr": 1e-3, "images_per_sec": 10.0, "epoch_1000x": 1000 * epoch + 500 * i}
                  for i in range(2)]
        lines.append({"kind": "epoch", "epoch": epoch, "loss": 1.0 / (epoch + 1),
                      "probe_top1": 10.0 * epoch})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut')
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes().startswith(PNG)
    assert f"wrote {run / 'curves.png'}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert str(tmp_path) in line and "no log.jsonl" in line


def test_the_probe_scores_a_seeded_subset_of_a_folders_val_split_with_the_run_s_workers(
        tmp_path, monkeypatch):
    from mae.cli import parse_args
    from mae.models.image import MAE
    from mae.train import online_probe

    from .test_linprobe import image_folder

    data = image_folder(tmp_path / "data", ("circle", "square", "triangle"), 6, 30)
    args = parse_args(["pretrain", *TINY, "--data-path", str(data), "--online-probe",
                       "--probe-val-size", "5", "--num-workers", "1", "--output-dir",
                       str(tmp_path / "run")])
    model = MAE.from_name("mae_vit_tiny_patch16", img_size=16, patch_size=4)
    loaders, DataLoader = [], online_probe.DataLoader

    def recording(dataset, **kwargs):
        loaders.append((len(dataset), kwargs["num_workers"]))
        return DataLoader(dataset, **kwargs)

    monkeypatch.setattr(online_probe, "DataLoader", recording)
    picked = []
    for _ in range(2):
        probe, val = online_probe.start_probe(args, model, torch.device("cpu"), 8)
        picked.append(val.indices)
        assert 0 <= probe.evaluate(val, 0.75, args.seed, 4) <= 100
        probe.close()
    assert len(set(picked[0])) == 5 and picked[0] == picked[1]  # 5 of the 9, the same each time
    assert loaders == [(5, 1), (5, 1)]
