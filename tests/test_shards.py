"""WebDataset tar shards (mae/data/shards.py): `mae shards` writes them, `ShardDataset` reads them
split across ranks and workers, for both loaders."""
from __future__ import annotations

import io
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mae.cli import main
from mae.data.gpu import WorkerItem
from mae.data.shards import (
    ShardDataset,
    open_dataset,
    sample_offsets,
    shard_urls,
    write_shards,
)

from .test_gpu_loader import smooth_image


def image_folder(root, counts=(("train", 12), ("val", 5))):
    """root/<split>/c<k>/<i>.png|jpg: three classes, small images of varied sizes."""
    files = {}
    for split, n in counts:
        for i in range(n):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i}.{'jpg' if i % 2 else 'png'}"
            Image.fromarray(smooth_image(20 + i, 24 + 2 * i, i)).save(path)
            files[str(path.relative_to(root))] = (path.read_bytes(), i % 3)
    return files


@pytest.fixture
def shards(tmp_path):
    files = image_folder(tmp_path / "data")
    patterns = write_shards(tmp_path / "data", tmp_path / "shards", shard_size=5)
    return files, patterns, tmp_path


def rewrite_shard(shard, samples, counted=None):
    """Writes `samples` (webdataset dicts) as the tar `shard` and puts its count (or `counted`
    samples, over the same bytes) and sample offsets in its index."""
    from webdataset import TarWriter

    with TarWriter(str(shard), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    index_file = shard.parent / "train-index.json"
    index = json.loads(index_file.read_text())
    offsets = sample_offsets(shard)
    if counted is not None:  # the same bytes, said to hold `counted` samples
        offsets = offsets[:counted] + offsets[-1:]
    index["shards"][shard.name] = len(offsets) - 1
    index["offsets"][shard.name] = offsets
    index_file.write_text(json.dumps(index))


def every_sample(dataset, workers: int):
    """(global index, bytes, label, name) of each worker's samples, as the loader sees them."""
    return [(index, data, label, name) for w in range(workers)
            for data, label, name, index in dataset.worker_samples(w, workers)]


def test_shards_round_trip_bytes_and_labels(shards, capsys):
    files, patterns, tmp_path = shards
    assert patterns == {"train": str(tmp_path / "shards" / "train-{000000..000002}.tar"),
                        "val": str(tmp_path / "shards" / "val-000000.tar")}
    index = json.loads((tmp_path / "shards" / "train-index.json").read_text())
    assert index["count"] == 12 and index["classes"] == ["c0", "c1", "c2"]
    assert list(index["shards"].values()) == [5, 5, 2]
    for split, n in (("train", 12), ("val", 5)):
        dataset = ShardDataset(shard_urls(patterns["train"], split, True), 16, False,
                               encoded=True)
        seen = every_sample(dataset, 1)
        assert sorted(i for i, *_ in seen) == list(range(n))
        for _, data, label, name in seen:
            relative = name.rsplit(":", 1)[1]
            assert relative.startswith(split) and (data, label) == files[relative]
    labels = Counter(label for _, _, label, _ in every_sample(
        ShardDataset(shard_urls(patterns["train"], "train", True), 16, False), 1))
    assert labels == Counter({0: 4, 1: 4, 2: 4})
    # the command prints the pattern to pass
    assert main(["shards", str(tmp_path / "data"), str(tmp_path / "again"),
                 "--shard-size", "5"]) == 0
    assert f"--data-path '{tmp_path / 'again' / 'train-{000000..000002}.tar'}'" in \
        capsys.readouterr().out


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(shards, train):
    _, patterns, _ = shards
    urls = shard_urls(patterns["train"], "train", True)
    orders = []
    for epoch in (0, 1):
        read = []
        for rank in (0, 1):
            dataset = ShardDataset(urls, 16, train).split(rank, 2, 3, train)
            dataset.set_epoch(epoch)
            assert len(dataset) == 6
            read += [i for i, *_ in every_sample(dataset, 2)]
        assert sorted(read) == list(range(12))  # 12 = 2 ranks x 2 batches of 3: none dropped
        orders.append(read)
    assert (orders[0] != orders[1]) == train  # shard order reshuffled per epoch when training
    again = ShardDataset(urls, 16, train).split(1, 2, 3, train)
    again.set_epoch(1)
    assert [i for i, *_ in every_sample(again, 2)] == orders[1][6:]  # seeded: the same order


def test_a_training_epoch_drops_the_remainder_as_distributed_sampler_does(shards):
    _, patterns, _ = shards
    urls = shard_urls(patterns["train"], "train", True)
    read = [i for rank in (0, 1) for i, *_ in
            every_sample(ShardDataset(urls, 16, True).split(rank, 2, 4, True), 2)]
    assert len(read) == len(set(read)) == 8  # 12 // 2 ranks = 6 per rank: one batch of 4


def test_loader_round_robin_gives_the_share_in_order_and_resumes_mid_epoch(shards):
    _, patterns, _ = shards
    urls = shard_urls(patterns["train"], "train", True)
    dataset = ShardDataset(urls, 16, True, encoded=True).split(0, 1, 2, True)
    dataset.set_epoch(3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=dataset.collate)
    assert len(loader) == 6
    batches = [batch.names for batch, _, _ in loader]
    in_order = [name for _, _, name, _ in dataset.read(dataset.sequence())]
    assert [n for names in batches for n in names] == in_order
    dataset.skip_batches(4, 2)  # a resume at step 4: the epoch's length, its last 2 batches
    assert len(loader) == 6
    assert [batch.names for batch, _, _ in loader] == batches[4:]


def test_pil_shard_items_are_the_augmented_images(shards):
    files, patterns, _ = shards
    train = open_dataset(patterns["train"], 16, "train", augment=True, seed=2)
    train.set_epoch(1)
    img, label = next(iter(train))
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    data, _, name, index = train.read([0])[0]
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    assert torch.equal(img, train.augment.transform(decoded, index))
    timm_style = open_dataset(patterns["train"], 16, "train", augment=True)
    timm_style.with_image_transform(lambda img: torch.tensor(img.size))
    assert next(iter(timm_style))[0].tolist() == list(decoded.size)
    gpu = open_dataset(patterns["train"], 16, "train", augment=True, loader="gpu")
    assert isinstance(next(iter(gpu)), WorkerItem)
    # the folder holding the shards names them too
    assert shard_urls(str(patterns["train"]).rsplit("/", 1)[0], "val", True) == \
        shard_urls(patterns["train"], "val", True)


def test_bad_shard_input_names_it(shards, tmp_path, capsys):
    _, patterns, _ = shards
    assert main(["shards", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "nowhere is not a directory" in errors[0]
    with pytest.raises(FileNotFoundError, match="no shard .*train-000003.tar"):
        shard_urls(str(tmp_path / "shards" / "train-{000000..000009}.tar"), "train", True)
    (tmp_path / "shards" / "val-index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        shard_urls(patterns["train"], "val", True)
    assert shard_urls(patterns["train"], "val", False) == shard_urls(patterns["train"],
                                                                     "train", True)


@pytest.mark.slow
# ids without "gpu": conftest skips tests keyed "gpu" where there is no CUDA device
@pytest.mark.parametrize("loader", ["pil", "gpu"], ids=["pillow-workers", "bytes-workers"])
def test_pretrain_and_linprobe_on_shards_train_end_to_end(shards, loader, capsys):
    from mae.cli import parse_args
    from mae.train.pretrain import pretrain

    _, patterns, tmp_path = shards
    args = parse_args(["pretrain", "--model", "mae_vit_tiny_patch16", "--input-size", "16",
                       "--patch-size", "4", "--batch-size", "4", "--epochs", "2",
                       "--num-workers", "2", "--warmup-epochs", "1", "--quiet", "--device",
                       "cpu", "--data-path", patterns["train"], "--data-loader", loader,
                       "--output-dir", str(tmp_path / loader)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = pretrain(args)
    assert len(summary["epochs"]) == 2 and all(math.isfinite(r["loss"])
                                               for r in summary["epochs"])
    checkpoint = tmp_path / loader / "checkpoint-last.pth"
    flags = ["linprobe", "--finetune", str(checkpoint), "--data-path", patterns["train"],
             "--data-loader", loader, "--epochs", "2", "--batch-size", "4", "--num-workers",
             "0", "--quiet", "--device", "cpu", "--output-dir", str(tmp_path / f"probe-{loader}")]
    capsys.readouterr()
    if loader == "gpu":  # the official probe's crops are drawn on the device
        assert main(flags) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["val_images"] == 5 and result["train_images"] == 12
    else:
        assert main(flags) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "--data-loader gpu" in errors[0]


def test_finetune_trains_on_shards_through_either_loader(shards):
    """timm's transform in the shard workers (train), either loader for evaluation. Not marked
    slow: it needs timm, so it runs in the row that has it (the slow tests' row has not)."""
    pytest.importorskip("timm", reason="the [finetune] extra (timm, torchvision) is not installed")
    from mae.cli import parse_args
    from mae.train.finetune import finetune

    _, patterns, tmp_path = shards
    for loader in ("pil", "gpu"):
        summary = finetune(parse_args([
            "finetune", "--model", "vit_tiny_patch16", "--input-size", "16", "--patch-size", "4",
            "--batch-size", "4", "--epochs", "1", "--num-workers", "2", "--warmup-epochs", "1",
            "--quiet", "--device", "cpu", "--data-path", str(tmp_path / "shards"),
            "--data-loader", loader, "--output-dir", str(tmp_path / loader)]))
        assert summary["val_images"] == 5 and math.isfinite(summary["loss"])


@pytest.mark.slow
# ids without "gpu": conftest skips tests keyed "gpu" where there is no CUDA device
@pytest.mark.parametrize("loader", ["pil", "gpu"], ids=["pillow-workers", "bytes-workers"])
def test_a_run_stopped_mid_epoch_on_shards_resumes_bit_for_bit(shards, monkeypatch, capsys,
                                                               loader):
    """Stopped by SIGTERM at epoch 1 step 2 of 6 and resumed, through either loader, its
    batches prepared ahead by the loader thread (2 workers): the resumed epoch reads only its
    last 4 batches (set_epoch once skipped them anew, replaying the epoch) and ends where the
    uninterrupted run does."""
    from .test_preemption import assert_same_weights, tiny

    _, patterns, tmp_path = shards

    def run(out, *extra):
        flags = [*tiny(tmp_path, out, *extra), "--data-path", patterns["train"],
                 "--batch-size", "2", "--num-workers", "2", "--data-loader", loader]
        flags.remove("--dataset-size")
        flags.remove("32")
        return main(flags)

    assert run(tmp_path / "straight") == 0
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "7")
    capsys.readouterr()
    assert run(tmp_path / "stopped") == 0
    assert " at epoch 1 step 2; " in capsys.readouterr().out.splitlines()[-1]
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    assert run(tmp_path / "stopped", "--resume", "auto") == 0
    assert_same_weights(tmp_path / "straight" / "checkpoint-1.pth",
                        tmp_path / "stopped" / "checkpoint-1.pth")


def test_a_skip_outlives_setting_the_same_epoch_again(shards):
    _, patterns, _ = shards
    dataset = ShardDataset(shard_urls(patterns["train"], "train", True), 16, True,
                           encoded=True).split(0, 1, 2, True)
    dataset.set_epoch(1)
    dataset.skip_batches(4, 2)
    dataset.set_epoch(1)
    assert len(every_sample(dataset, 2)) == 4
    dataset.set_epoch(2)
    assert len(every_sample(dataset, 2)) == 12


@pytest.mark.slow
def test_a_truncated_shard_is_one_error_line_from_two_workers(shards, capsys):
    _, patterns, tmp_path = shards
    from .test_preemption import tiny

    shard = tmp_path / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut in its second sample's bytes
    flags = [*tiny(tmp_path, tmp_path / "out"), "--data-path", patterns["train"],
             "--batch-size", "2", "--num-workers", "2"]
    capsys.readouterr()
    assert main(flags) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: shard {shard} is cut short: "
                                                     f"its samples "), err
    assert "Traceback" not in err and "worker" not in err, err


def test_a_shard_unlike_its_index_or_with_a_bad_label_is_named(shards):
    _, patterns, tmp_path = shards
    urls = shard_urls(patterns["train"], "train", True)
    index = tmp_path / "shards" / "train-index.json"
    counts = json.loads(index.read_text())
    counts["shards"]["train-000002.tar"] = 3
    index.write_text(json.dumps(counts))
    with pytest.raises(ValueError, match=r"train-index.json has no byte offsets for the 3 "
                                         r"samples of train-000002.tar \(written by an older"):
        ShardDataset(urls, 16, False, encoded=True)
    counts["shards"]["train-000002.tar"] = 2
    index.write_text(json.dumps(counts))
    shard = tmp_path / "shards" / "train-000002.tar"
    rewrite_shard(shard, [{"__key__": key, "png": b"", "cls": b"cat"} for key in "abc"])
    with pytest.raises(ValueError, match=r"^shard .*train-000002.tar: sample a has the label "
                                         r"b'cat', not a class number$"):
        ShardDataset(urls, 16, False, encoded=True).read([10, 11])


def test_shard_urls_that_would_run_a_command_or_leave_the_folder_are_refused(shards, capsys):
    _, patterns, tmp_path = shards
    marker = tmp_path / "ran"
    pipe = f"pipe:touch {marker} && cat {tmp_path}/shards/train-000000.tar"
    for spec in (pipe, f"{pipe}::{patterns['train']}"):
        with pytest.raises(ValueError, match=r"`pipe:` commands are refused"):
            shard_urls(spec, "train", True)
    assert main(["pretrain", "--data-path", pipe, "--output-dir", str(tmp_path / "out"),
                 "--device", "cpu", "--epochs", "1"]) == 1
    assert "`pipe:` commands are refused" in capsys.readouterr().err
    assert not marker.exists()
    index = tmp_path / "shards" / "val-index.json"
    for name in ("../elsewhere.tar", "/etc/x.tar", "pipe:cat x.tar", "val-000000.zip"):
        index.write_text(json.dumps({"shards": {name: 5}}))
        with pytest.raises(ValueError, match=r"val-index.json names .*, not a shard file"):
            shard_urls(patterns["train"], "val", True)


def test_training_reshuffles_the_samples_within_each_shard_every_epoch(tmp_path):
    """One shard holding the whole set: the batches still change from epoch to epoch, each
    epoch reads every sample once, and evaluation reads the shard in order."""
    image_folder(tmp_path / "data", counts=(("train", 12),))
    pattern = write_shards(tmp_path / "data", tmp_path / "one", shard_size=100)["train"]
    urls = shard_urls(pattern, "train", True)
    assert len(urls) == 1
    epochs = []
    for epoch in (0, 1, 2):
        dataset = ShardDataset(urls, 16, True, encoded=True).split(0, 1, 4, True)
        dataset.set_epoch(epoch)
        epochs.append([i for i, *_ in every_sample(dataset, 2)])
        assert sorted(epochs[-1]) == list(range(12))
    batches = [{frozenset(order[k:k + 4]) for k in range(0, 12, 4)} for order in epochs]
    assert batches[0] != batches[1] != batches[2]
    evaluation = ShardDataset(urls, 16, False, encoded=True).split(0, 1, 4, False)
    assert [i for i, *_ in every_sample(evaluation, 1)] == list(range(12))


def test_a_folder_with_only_train_shards_serves_the_preview_and_names_a_missing_val(tmp_path):
    image_folder(tmp_path / "data", counts=(("train", 6),))
    write_shards(tmp_path / "data", tmp_path / "out", shard_size=4)
    train = shard_urls(tmp_path / "out", "train", True)
    assert shard_urls(tmp_path / "out", "val", False) == train  # pretrain's preview
    with pytest.raises(FileNotFoundError, match=r"has no 'val' split: expected .*val-index.json"):
        shard_urls(tmp_path / "out", "val", True)
    assert open_dataset(tmp_path / "out", 16, "val", False, required=False).urls == train


@pytest.mark.parametrize("counts, message", [
    ({"train-000000.tar": None}, "gives train-000000.tar the count None"),
    ({"train-000000.tar": -1}, "gives train-000000.tar the count -1"),
    ({"train-000000.tar": 2.5}, "gives train-000000.tar the count 2.5"),
    ({"train-000000.tar": True}, "gives train-000000.tar the count True"),
])
def test_an_index_count_that_is_no_sample_count_is_named(shards, counts, message):
    _, patterns, tmp_path = shards
    (tmp_path / "shards" / "train-index.json").write_text(json.dumps({"shards": counts}))
    with pytest.raises(ValueError, match=message):
        ShardDataset([str(tmp_path / "shards" / "train-000000.tar")], 16, True)


def test_a_label_past_the_index_classes_or_other_bytes_than_indexed_are_named(shards):
    _, patterns, tmp_path = shards
    urls = shard_urls(patterns["train"], "train", True)
    shard = tmp_path / "shards" / "train-000002.tar"  # the index says 3 classes
    rewrite_shard(shard, [{"__key__": "a", "png": b"", "cls": b"7"}])
    with pytest.raises(ValueError, match=r"^shard .*train-000002.tar: sample a has the label 7, "
                                         r"but its index names 3 classes$"):
        ShardDataset(urls, 16, False, encoded=True).read([10])
    # bytes that hold three samples where the index places two
    rewrite_shard(shard, [{"__key__": key, "png": b"", "cls": b"1"} for key in "abc"], counted=2)
    for train in (False, True):
        dataset = ShardDataset(urls, 16, train, encoded=True).split(0, 1, 1, train)
        with pytest.raises(ValueError, match=r"^shard .*train-000002.tar: bytes 0\.\.\d+ hold 3 "
                                             r"samples, its index says 2 \(0\.\.1\)"):
            dataset.read(dataset.sequence())
    # a shard cut short of the bytes its index places its samples at
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ValueError, match=r"^shard .*train-000002.tar is cut short: its "
                                         r"samples 0\.\.1 are at bytes 0\.\.\d+, as its index "
                                         r"says, but 700 of those \d+ bytes are there"):
        ShardDataset(urls, 16, False, encoded=True).read([10, 11])


def test_a_malformed_sample_and_an_unwritable_output_are_one_error_line(shards, capsys):
    _, patterns, tmp_path = shards
    urls = shard_urls(patterns["train"], "train", True)
    shard = tmp_path / "shards" / "train-000002.tar"
    rewrite_shard(shard, [{"__key__": key, "png": b"", "cls": b"1", "name": b"\xff\xfe"}
                          for key in "ab"])
    names = [name for _, _, name, _ in ShardDataset(urls, 16, False, encoded=True).read([10, 11])]
    assert names[0].endswith("train-000002.tar:\ufffd\ufffd")  # undecodable names replaced
    rewrite_shard(shard, [{"__key__": "a", "png": b"", "cls": b"1"},
                          {"__key__": "b", "png": b"", "PNG": b"", "cls": b"1"}],  # repeated
                  counted=1)
    with pytest.raises(ValueError, match=r"^shard .*train-000002.tar: b.png: duplicate file "):
        ShardDataset(urls, 16, False, encoded=True).read([10])
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()
    assert main(["shards", str(tmp_path / "data"), str(tmp_path / "a-file")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: mae shards: ") and "a-file" in err and "Traceback" not in err


def test_the_online_probe_refuses_shards_in_one_line(shards, capsys):
    _, patterns, tmp_path = shards
    capsys.readouterr()
    assert main(["pretrain", "--data-path", patterns["train"], "--online-probe", "--device",
                 "cpu", "--epochs", "1", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --online-probe scores on an image folder's val/"), err
    assert not (tmp_path / "out").exists()


class RangeServer:
    """A folder over HTTP with Range requests (Python's own handler has none), counting the
    bytes it sends and the most requests it served at once; `ranges=False` answers every
    request with the whole file; with `gather` set, a request is answered once that many are in
    flight (or after 5 s: an object store's latency, which concurrent reads hide)."""

    def __init__(self, folder, ranges: bool = True, failures: int = 0):
        import http.server
        import threading

        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                    server.lock.notify_all()
                    server.lock.wait_for(lambda: server.active >= server.gather, timeout=5)
                try:
                    self.answer()
                finally:
                    with server.lock:
                        server.active -= 1

            def answer(self):
                with server.lock:  # a passing outage: 503, then the real answer
                    failing = server.failures > 0
                    server.failures -= failing
                if failing:
                    self.send_error(503)
                    return
                path = folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                wanted = self.headers.get("Range")
                if wanted and ranges:
                    first, last = wanted.removeprefix("bytes=").split("-")
                    data = data[int(first):int(last) + 1 if last else None]
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                server.sent += len(data)

        self.sent, self.failures = 0, failures
        self.active = self.peak = self.gather = 0
        self.lock = threading.Condition()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def many_shards(tmp_path, images: int, shard_size: int) -> str:
    image_folder(tmp_path / "data", counts=(("train", images),))
    return write_shards(tmp_path / "data", tmp_path / "many", shard_size=shard_size)["train"]


def share_bytes(dataset) -> int:
    """The bytes of this rank's samples this epoch: what it must read, no more."""
    total = 0
    for g in dataset.sequence():
        s = int(np.searchsorted(dataset.first, g, "right")) - 1
        position = int(g - dataset.first[s])
        total += dataset.offsets[s][position + 1] - dataset.offsets[s][position]
    return total


@pytest.mark.parametrize("train", [True, False])
def test_each_rank_reads_its_share_once_per_epoch_over_http(tmp_path, train):
    """2 ranks x 2 DataLoader workers, shards served over HTTP: each rank's epoch fetches its
    share's bytes once (the tar headers of its samples included), whatever the workers."""
    pattern = many_shards(tmp_path, images=96, shard_size=10)
    server = RangeServer(tmp_path / "many")
    try:
        urls = shard_urls(pattern.replace(str(tmp_path / "many"), server.url), "train", True)
        assert urls[0].startswith("http://")
        for epoch in (0, 1):
            for rank in (0, 1):
                dataset = ShardDataset(urls, 16, train, encoded=True).split(rank, 2, 32, train)
                dataset.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=2,
                                                     collate_fn=dataset.collate)
                server.sent = 0
                images = sum(len(batch) for batch, _, _ in loader)
                assert images == len(dataset) == (32 if train else 48)
                assert share_bytes(dataset) <= server.sent <= 1.05 * share_bytes(dataset)
    finally:
        server.close()


def test_a_server_without_range_requests_still_serves_the_right_samples(tmp_path):
    pattern = many_shards(tmp_path, images=12, shard_size=6)
    server = RangeServer(tmp_path / "many", ranges=False)
    try:
        remote = ShardDataset(shard_urls(pattern.replace(str(tmp_path / "many"), server.url),
                                         "train", True), 16, False, encoded=True)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            got = remote.read([3, 4, 10])  # two shards, two reads at once
            again = remote.read([0])
    finally:
        server.close()
    assert [str(w.message) for w in said] == [  # once a host
        f"{server.url.removeprefix('http://')} ignores HTTP Range requests: each read of a shard "
        f"downloads it from its start"]
    local = ShardDataset(shard_urls(pattern, "train", True), 16, False, encoded=True)
    assert [g[:2] for g in got + again] == [g[:2] for g in local.read([3, 4, 10, 0])]


def test_a_remote_read_that_fails_for_a_while_is_tried_again(tmp_path, monkeypatch):
    """A 503 (or a dropped connection) is tried again after 1, 2, 4, 8 s, as webdataset's curl
    reader did (--retry); a 404 is not, and five failures in a row are one error naming the
    shard."""
    from mae.data import shards as shard_module

    waits = []
    monkeypatch.setattr(shard_module.time, "sleep", waits.append)
    pattern = many_shards(tmp_path, images=12, shard_size=6)
    local = ShardDataset(shard_urls(pattern, "train", True), 16, False, encoded=True)
    server = RangeServer(tmp_path / "many", failures=2)
    try:
        remote = shard_urls(pattern.replace(str(tmp_path / "many"), server.url), "train", True)
        dataset = ShardDataset(remote, 16, False, encoded=True)  # its index: read at the 3rd
        assert waits == [1, 2]
        assert [g[:2] for g in dataset.read([0, 7])] == [g[:2] for g in local.read([0, 7])]
        server.failures = 5
        with pytest.raises(ValueError, match=r"^shard http://.*train-000000.tar: HTTP Error "
                                             r"503"):
            dataset.read([1])
        assert waits == [1, 2, 1, 2, 4, 8]
        missing = ShardDataset(remote, 16, False, encoded=True)
        missing.urls = [url.replace("train-000000", "gone") for url in missing.urls]
        with pytest.raises(ValueError, match=r"gone.tar: HTTP Error 404"):
            missing.read([1])
        assert waits == [1, 2, 1, 2, 4, 8]  # not tried again
    finally:
        server.close()


def test_a_batch_s_remote_reads_run_at_once(tmp_path):
    """A batch spread over 16 shards is 16 Range requests; over HTTP(S) REMOTE_READS of them
    are in flight at once (read one after another, the server would see 1 at a time), and the
    samples are those of the local shards, in the batch's order."""
    from mae.data.shards import REMOTE_READS

    pattern = many_shards(tmp_path, images=64, shard_size=4)
    local = ShardDataset(shard_urls(pattern, "train", True), 16, False, encoded=True)
    server = RangeServer(tmp_path / "many")
    try:
        remote = ShardDataset(shard_urls(pattern.replace(str(tmp_path / "many"), server.url),
                                         "train", True), 16, False, encoded=True)
        indices = [61, 0, 4, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 1]
        server.gather, server.peak = REMOTE_READS, 0
        got = remote.read(indices)
        assert server.peak == REMOTE_READS == 8
    finally:
        server.close()
    assert [g[:2] for g in got] == [g[:2] for g in local.read(indices)]
    assert [g[3] for g in got] == indices


def test_a_batch_mixes_at_least_eight_shards_in_a_seeded_order(tmp_path):
    """32 shards of 4: batches of 32 are 16 chunks of 2 samples, interleaved so that each batch
    draws from 8 shards or more; the order is a function of (seed, epoch) alone."""
    pattern = many_shards(tmp_path, images=128, shard_size=4)
    urls = shard_urls(pattern, "train", True)

    def epoch_order(epoch, seed=0):
        dataset = ShardDataset(urls, 16, True, seed=seed, encoded=True).split(0, 1, 32, True)
        dataset.set_epoch(epoch)
        return dataset, dataset.sequence()

    dataset, order = epoch_order(3)
    assert sorted(order.tolist()) == list(range(128))
    shards_per_batch = [len(set(np.searchsorted(dataset.first, batch, "right").tolist()))
                        for batch in order.reshape(-1, 32)]
    assert min(shards_per_batch) >= 8, shards_per_batch
    assert np.array_equal(epoch_order(3)[1], order)
    assert not np.array_equal(epoch_order(4)[1], order)
    assert not np.array_equal(epoch_order(3, seed=1)[1], order)


@pytest.mark.slow
def test_remote_shards_with_only_a_training_split_pre_train(tmp_path, capsys):
    """Only train-index.json beside the shards on the server: the preview comes from the
    training shards, as for local ones."""
    pattern = many_shards(tmp_path, images=16, shard_size=6)
    assert not (tmp_path / "many" / "val-index.json").exists()
    server = RangeServer(tmp_path / "many")
    try:
        remote = pattern.replace(str(tmp_path / "many"), server.url)
        code = main(["pretrain", "--model", "mae_vit_tiny_patch16", "--input-size", "16",
                     "--patch-size", "4", "--batch-size", "4", "--epochs", "1", "--num-workers",
                     "2", "--quiet", "--device", "cpu", "--data-path", remote,
                     "--output-dir", str(tmp_path / "out")])
    finally:
        server.close()
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "reconstruction-000.png").is_file()
