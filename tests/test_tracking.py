"""`--log-dir` (TensorBoard, as main_pretrain.py: train_loss and lr at epoch_1000x) and `--wandb`
(offline here) get the numbers log.jsonl gets; a logging flag without its package is one line."""
import importlib.util
import json
from pathlib import Path

import pytest

from mae.cli import main
from mae.train import tracking

from .test_checkpoint import one_error_line
from .test_training import TINY

STEPS_PER_EPOCH = 4  # TINY: 32 images in batches of 8, a log line every 2 steps


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log of protobuf records
    (32 KiB blocks, 7-byte record headers) after the file's own 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow
def test_tensorboard_and_wandb_get_the_logs_numbers_at_epoch_1000x(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, events = tmp_path / "run", tmp_path / "tb"
    assert main(["pretrain", *TINY, "--epochs", "2", "--output-dir", str(run),
                 "--log-dir", str(events), "--wandb", "mae-test"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["kind"] == "step"]
    epochs = [r for r in log if r["kind"] == "epoch"]
    # main_pretrain.py's axis: int((iteration / steps per epoch + epoch) * 1000)
    expected = [int((i / STEPS_PER_EPOCH + e) * 1000) for e in range(2) for i in (1, 3)]
    assert [r["epoch_1000x"] for r in steps] == expected

    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"train_loss", "lr", "images_per_sec", "data_wait_ms",
            "epoch_loss"} <= set(acc.Tags()["scalars"])
    for tag, key in (("train_loss", "loss"), ("lr", "lr"), ("images_per_sec", "images_per_sec"),
                     ("data_wait_ms", "data_wait_ms")):
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == expected
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in steps], rel=1e-6)
    assert [s.step for s in acc.Scalars("epoch_loss")] == [1000, 2000]
    assert [s.value for s in acc.Scalars("epoch_loss")] == \
        pytest.approx([r["loss"] for r in epochs], rel=1e-6)

    (run_file,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    logged = [r for r in rows if "train_loss" in r]
    assert [r["epoch_1000x"] for r in logged] == expected
    assert [r["train_loss"] for r in logged] == pytest.approx([r["loss"] for r in steps])
    assert [r["lr"] for r in logged] == pytest.approx([r["lr"] for r in steps])
    assert [r["epoch_loss"] for r in rows if "epoch_loss" in r] == \
        pytest.approx([r["loss"] for r in epochs])


@pytest.mark.parametrize(("flag", "value", "package"),
                         [("--log-dir", "tb", "tensorboard"), ("--wandb", "proj", "wandb")])
def test_a_logging_flag_without_its_package_is_one_error_line(tmp_path, monkeypatch, capsys,
                                                              flag, value, package):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == package else find_spec(name, *rest))
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--output-dir", str(run), flag,
                 str(tmp_path / value)]) == 2
    line = one_error_line(capsys)
    assert flag in line and f"pip install {package}" in line, line
    assert not run.exists()


@pytest.mark.slow
def test_pretrain_called_from_python_closes_its_event_writer_each_time(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .test_training import run_pretrain

    opened, open_sinks = [], tracking.open_sinks

    def recording(args):
        sinks = open_sinks(args)
        opened.extend(sinks)
        return sinks

    monkeypatch.setattr(tracking, "open_sinks", recording)
    for i in range(2):
        run_pretrain(tmp_path / f"run{i}", "--epochs", "1", "--log-dir", str(tmp_path / f"tb{i}"))
        assert not tracking._OPEN, "a sink is left open after pretrain() returned"
        assert len(opened) == i + 1 and opened[-1].writer is None
        acc = EventAccumulator(str(tmp_path / f"tb{i}"))
        acc.Reload()
        assert [s.step for s in acc.Scalars("train_loss")] == [250, 750]
        assert [s.step for s in acc.Scalars("epoch_loss")] == [1000]


def test_a_sink_closes_once_and_close_all_after_it_is_harmless():
    closed = []

    class Sink:
        def close(self):
            closed.append(self)

    @tracking.closes_sinks
    def run(fail):
        tracking._OPEN.append(Sink())
        if fail:
            raise ValueError("stopped")
        return "done"

    assert run(False) == "done"
    with pytest.raises(ValueError, match="stopped"):
        run(True)
    assert len(closed) == 2 and not tracking._OPEN
    tracking.close_all()
    assert len(closed) == 2


def test_wandb_goes_offline_without_a_key_or_a_network_and_follows_wandb_mode(monkeypatch):
    import socket

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    dialled = []

    def unreachable(address, timeout):
        dialled.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert tracking.wandb_mode() == ("offline", "the W&B server is not reachable")
    assert dialled == [(("api.wandb.ai", 443), 1.5)]

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Connection())
    assert tracking.wandb_mode() == (None, None)
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice: no check at all
    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert tracking.wandb_mode() == (None, None) and len(dialled) == 1
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setattr(tracking, "_wandb_key_known", lambda: False)
    assert tracking.wandb_mode() == ("offline", "no W&B API key")
