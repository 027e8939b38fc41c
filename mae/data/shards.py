"""WebDataset tar shards: `mae shards DIR OUT` writes them from an image folder, `ShardDataset`
reads them (the `webdataset` library) for either loader.

A shard holds samples `<key>.<ext>` (the file's bytes as they were), `<key>.cls` (the label),
`<key>.name` (the file's path under DIR, for warnings). Beside the shards `<split>-index.json`
records the class names and each shard's sample count: a run knows its steps per epoch
without reading a shard, and each rank reads only its share. The writer shuffles the samples
(seeded) once, so a shard mixes the classes; each epoch shuffles the shard order (seeded by
(seed, epoch): exact resume), then rank r reads the r-th contiguous slice of that sequence,
its DataLoader workers taking its batches in turn, so every sample is used once per epoch (a
training epoch drops the remainder, as `DistributedSampler(drop_last)` does).
"""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import torch

from .gpu import EncodedDataset, collate_encoded, encoded_item
from .images import Augmented, ImageFolderDataset, build_dataset, collate_skipping, read_rgb

INDEX_SUFFIX = "-index.json"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"[\w.-]+\.tar")  # an index's shard names: no folder, no scheme
# webdataset's `pipe:` runs its URL with a shell; its other remote schemes run a fixed
# command (curl, gsutil, ais) with the URL as one argument
URL_SCHEMES = ("file", "http", "https", "sftp", "ftps", "scp", "gs", "hf", "htgs", "ais")


class ShardError(ValueError):
    """A shard that cannot be read or does not match its index. Raised in a DataLoader
    worker it arrives as the worker's traceback (`ExceptionWrapper.reraise` builds the class
    from that text): it keeps the one line it was raised with, for `mae`'s `error:` line."""

    def __init__(self, message: str):
        if message.startswith(f"Caught {type(self).__name__} "):
            lines = [line.partition(f"{type(self).__name__}: ")[2]
                     for line in message.splitlines()]
            message = next((line for line in reversed(lines) if line), message)
        super().__init__(message)


def _scheme(url: str) -> str | None:
    scheme = re.match(r"([A-Za-z][\w+.-]*):", url)
    return scheme[1].lower() if scheme else None


def check_urls(urls: list[str], spec) -> None:
    """Only local files and the schemes that run no shell (`pipe:` would run --data-path)."""
    for url in urls:
        if _scheme(url) not in (None, *URL_SCHEMES):
            raise ValueError(f"--data-path {spec}: {url} is not a file path or a URL of "
                             f"{', '.join(URL_SCHEMES)} (`pipe:` commands are refused)")


def _expand(spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return expand_urls(spec)


def is_shard_spec(data_path) -> bool:
    """--data-path names tar shards: a .tar, a brace pattern of them, or a '::' list."""
    text = str(data_path)
    return ".tar" in text and any(u.endswith(".tar") for u in _expand(text))


def index_path(shard: str) -> str:
    """The index beside a shard: `<dir>/<name>-index.json` for `<dir>/<name>-000012.tar`."""
    head, _, base = shard.rpartition("/")
    stem = re.sub(r"(-\d+)?\.tar$", "", base)
    return f"{head + '/' if head else ''}{stem}{INDEX_SUFFIX}"


def read_index(path: str) -> dict:
    from webdataset import gopen

    try:
        with gopen(path, "rb") as f:
            index = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"--data-path: the shards' index {path} cannot be read "
                                f"({exc}); `mae shards` writes it beside the shards") from exc
    if not isinstance(index, dict) or not isinstance(index.get("shards"), dict):
        raise ValueError(f"--data-path: {path} is not a shard index (no 'shards' counts)")
    bad = next((name for name in index["shards"] if not SHARD_NAME.fullmatch(name)), None)
    if bad is not None:
        raise ValueError(f"--data-path: the shard index {path} names {bad!r}, not a shard "
                         f"file beside it (<name>.tar)")
    bad = next((name for name, count in index["shards"].items()
                if type(count) is not int or count < 0), None)
    if bad is not None:
        raise ValueError(f"--data-path: the shard index {path} gives {bad} the count "
                         f"{index['shards'][bad]!r}, not a number of samples")
    classes = index.get("classes")
    if classes is not None and not (isinstance(classes, list)
                                    and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"--data-path: the shard index {path} has 'classes' {classes!r}, "
                         f"not a list of names")
    return index


def shard_urls(data_path, split: str, required: bool) -> list[str] | None:
    """The shards of `split` that --data-path names, or None when it names none: a pattern or
    list (the training shards; their `val` split is the `val-index.json` beside them), or a
    folder holding `<split>-index.json` and no `<split>/` folder."""
    path = Path(str(data_path))
    if path.is_dir():
        index, train = path / f"{split}{INDEX_SUFFIX}", path / f"train{INDEX_SUFFIX}"
        if (path / split).is_dir():
            return None
        if index.is_file():
            return [str(path / name) for name in read_index(str(index))["shards"]]
        if not train.is_file() or (path / "train").is_dir():
            return None  # an image folder
        if required:
            raise FileNotFoundError(f"--data-path {data_path} has no {split!r} split: expected "
                                    f"{index} beside {train.name} (`mae shards` writes it)")
        return [str(path / name) for name in read_index(str(train))["shards"]]
    if not is_shard_spec(data_path):
        return None
    urls = _expand(str(data_path))
    check_urls(urls, data_path)
    local = [u for u in urls if _scheme(u) is None]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"--data-path {data_path}: no shard {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if split == "train":
        return urls
    head = urls[0].rpartition("/")[0]
    head += "/" if head else ""
    other = f"{head}{split}{INDEX_SUFFIX}"
    if index_path(urls[0]) == f"{head}train{INDEX_SUFFIX}" and \
            ("://" in other or Path(other).is_file()):
        return [head + name for name in read_index(other)["shards"]]
    if required:
        raise FileNotFoundError(f"--data-path {data_path} has no {split!r} split: expected "
                                f"{other} beside the train shards (`mae shards` writes it)")
    return urls


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of tar shards, as `Augmented` (Pillow, in the worker: the same (seed, epoch,
    index) augmentation as an image folder, index = the sample's place in the shards) or, with
    `encoded`, bytes-only `EncodedItem`s for `--data-loader gpu`. `split(rank, world_size,
    batch_size, train)` sets this process's share before a loader reads it."""

    def __init__(self, urls: list[str], size, train: bool, seed: int = 0,
                 encoded: bool = False):
        check_urls(urls, urls[0])
        index = read_index(index_path(urls[0]))
        counts = index["shards"]
        unknown = [u for u in urls if u.rsplit("/", 1)[-1] not in counts]
        if unknown:
            raise FileNotFoundError(f"--data-path: shard {unknown[0]} is not in its index "
                                    f"{index_path(urls[0])}")
        self.urls = urls
        self.counts = [int(counts[u.rsplit("/", 1)[-1]]) for u in urls]
        self.first = [sum(self.counts[:i]) for i in range(len(urls))]  # global index of each
        self.classes = list(index.get("classes") or ["images"])
        self.num_classes = len(index["classes"]) if index.get("classes") else None
        self.augment = Augmented(size, train, seed)
        self.image_transform = None
        self.train, self.seed, self.encoded = train, seed, encoded
        self.collate = collate_encoded if encoded else collate_skipping
        self.rank, self.world_size, self.batch_size, self.shuffle = 0, 1, 1, False
        self.epoch = self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch to read; a new one ends a `skip_batches` (set again for the same epoch, as
        the loop's dataset after it was its sampler, the skip stays)."""
        if epoch != self.epoch:
            self.skipped = 0
        self.epoch = self.augment.epoch = epoch

    def with_image_transform(self, transform):
        """Each decoded image through `transform(img)` (a torchvision/timm transform, in the
        worker) instead of the MAE augmentation. Returns self."""
        self.image_transform = transform
        return self

    def split(self, rank: int, world_size: int, batch_size: int, train: bool):
        """This process's share: shards shuffled per epoch and whole batches when `train`, an
        unshuffled slice keeping every sample otherwise. Returns self (the loop's sampler)."""
        self.rank, self.world_size, self.batch_size, self.shuffle = (rank, world_size,
                                                                    batch_size, train)
        return self

    def _share(self) -> tuple[int, int]:
        """[start, stop) of this rank in the epoch's sample sequence."""
        total = sum(self.counts)
        if self.shuffle:
            per_rank = total // self.world_size // self.batch_size * self.batch_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return (self.rank * total // self.world_size,
                (self.rank + 1) * total // self.world_size)

    def __len__(self):
        """The share's length, skipped batches included: the loader's length stays the epoch's
        steps, which the training loop numbers its steps (and draws its crops) by."""
        start, stop = self._share()
        return stop - start

    def order(self) -> list[int]:
        """The epoch's shard order."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def places(self, shard: int) -> list[int] | None:
        """Where each of the shard's samples falls among the shard's places in this epoch (a
        permutation seeded by seed, epoch and shard), or None where the shard is read in
        order: training reshuffles the samples within each shard every epoch, not only the
        shards, so a small set in one shard still gets new batches."""
        if not self.shuffle:
            return None
        places = list(range(self.counts[shard]))
        random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_033 + shard).shuffle(places)
        return places

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Leave out the epoch's first `batches` batches (a mid-epoch resume), until the next
        `set_epoch`; their samples are not decoded."""
        self.skipped = batches

    def worker_samples(self, worker: int, workers: int):
        """(bytes, label, name, global index) of worker `worker`'s batches: every `workers`-th
        batch of this rank's share from the first not skipped, so the DataLoader's round robin
        over its workers yields the share's batches in order (the same whatever the worker
        count, and after a resume). Each worker reads the share's shards; it keeps and decodes
        only its own samples."""
        start, stop = self._share()
        first = start + self.skipped * self.batch_size

        def mine(at: int) -> bool:
            return (at - first) // self.batch_size % workers == worker

        for data, label, name, index, _ in self.samples(first, stop, mine):
            yield data, label, name, index

    def samples(self, start: int, stop: int, wanted=None):
        """(bytes, label, name, global index, place in the epoch) of the epoch's places
        [start, stop) (those `wanted(place)` keeps), reading only the shards that hold them.
        A shuffled shard is read whole and its wanted samples yielded in their epoch order:
        a worker holds its part of one shard's bytes at a time. A shard that cannot be read,
        or holds other than its index's count, is a `ShardError` naming it."""
        from webdataset.tariterators import tarfile_samples

        offset = 0
        for s in self.order():
            count, url = self.counts[s], self.urls[s]
            if offset + count > start and offset < stop:
                places, held, seen = self.places(s), {}, 0
                try:
                    for position, sample in enumerate(tarfile_samples([{"url": url}])):
                        seen = position + 1
                        if position >= count:
                            raise ShardError(f"shard {url} holds more than the {count} samples "
                                             f"its index says")
                        at = offset + (position if places is None else places[position])
                        if places is None and at >= stop:
                            break
                        if at < start or at >= stop or (wanted is not None and not wanted(at)):
                            continue
                        fields = self._fields(sample, url) + (self.first[s] + position, at)
                        if places is None:
                            yield fields
                        else:
                            held[at] = fields
                    else:
                        if seen != count:
                            raise ShardError(f"shard {url} holds {seen} samples, its index "
                                             f"says {count}")
                except ShardError:
                    raise
                except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                    # webdataset appends the stream and URL to args, and " @ <stream>" to the text
                    reason = str(exc.args[0] if exc.args else exc).partition(" @ ")[0]
                    raise ShardError(f"shard {url}: {reason}") from exc
                for at in sorted(held):
                    yield held[at]
            offset += count

    def _fields(self, sample: dict, url: str):
        key = sample["__key__"]
        name = sample.get("name", key.encode()).decode(errors="replace")
        label = sample.get("cls", b"0")
        if not label.strip().isdigit():
            raise ShardError(f"shard {url}: sample {key} has the label {label!r}, not a class "
                             f"number")
        if self.num_classes is not None and int(label) >= self.num_classes:
            raise ShardError(f"shard {url}: sample {key} has the label {int(label)}, but its "
                             f"index names {self.num_classes} classes")
        data = next((v for k, v in sample.items() if not k.startswith("__")
                     and k not in ("cls", "name")), b"")
        return data, int(label), f"{url}:{name}"

    def item(self, data: bytes, label: int, name: str, index: int):
        if self.encoded:
            return encoded_item(data, label, name)
        img = read_rgb(io.BytesIO(data), name)
        if img is None:
            return None
        if self.image_transform is not None:
            return self.image_transform(img), label
        return self.augment.transform(img, index), label

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for data, label, name, index in self.worker_samples(worker, workers):
            yield self.item(data, label, name, index)

    def __getitem__(self, index: int):
        """Sample `index` of the unshuffled shards (reads from the first shard: for previews)."""
        shuffle, self.shuffle = self.shuffle, False
        try:
            for data, label, name, i, _ in self.samples(index, index + 1):
                return self.item(data, label, name, i)
        finally:
            self.shuffle = shuffle
        raise IndexError(f"index {index} is past the shards' {sum(self.counts)} samples")


def open_dataset(data_path, size, split: str, augment: bool, seed: int = 0,
                 length: int | None = None, required: bool = True, loader: str = "pil"):
    """`data.build_dataset` for either loader, and tar shards: the data set a `--data-loader`
    (pil: tensors from the workers; gpu: `EncodedItem`s) reads from --data-path."""
    urls = shard_urls(data_path, split, required) if data_path else None
    if urls is not None:
        return ShardDataset(urls, size, augment, seed, encoded=loader == "gpu")
    dataset = build_dataset(data_path, size, split, augment, seed, length, required)
    return EncodedDataset(dataset) if loader == "gpu" else dataset


def write_shards(source, out, shard_size: int = 1000, seed: int = 0) -> dict[str, str]:
    """Shards of an image folder's train/ and val/ splits (or of the folder as `train`), its
    samples shuffled once (seeded): OUT/<split>-000000.tar ... and OUT/<split>-index.json.
    Returns {split: the --data-path pattern of its shards}."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    splits = [s for s in SPLITS if (source / s).is_dir()] or ["train"]
    try:
        return _write_splits(source, out, splits, shard_size, seed)
    except OSError as exc:  # a full disk, an OUT that is a file, a file that cannot be read
        if exc.filename is None:  # our own errors (no images found) say what they are
            raise
        raise ValueError(f"mae shards: {exc.filename}: {exc.strerror}") from exc


def _write_splits(source: Path, out: Path, splits: list[str], shard_size: int,
                  seed: int) -> dict[str, str]:
    from webdataset import TarWriter

    out.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for split in splits:
        folder = ImageFolderDataset(source, 1, split=split)
        samples = list(folder.samples)
        random.Random(seed).shuffle(samples)
        counts = {}
        for number, at in enumerate(range(0, len(samples), shard_size)):
            name = f"{split}-{number:06d}.tar"
            chunk = samples[at:at + shard_size]
            with TarWriter(str(out / name), encoder=False, mtime=0) as writer:
                for k, (path, label) in enumerate(chunk):
                    writer.write({"__key__": f"{at + k:08d}",
                                  path.suffix.lower().lstrip("."): path.read_bytes(),
                                  "cls": str(label).encode(),
                                  "name": str(path.relative_to(source)).encode()})
            counts[name] = len(chunk)
        index = {"split": split, "classes": folder.classes, "count": len(samples),
                 "shards": counts}
        (out / f"{split}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=1) + "\n")
        last = len(counts) - 1
        patterns[split] = str(out / (f"{split}-000000.tar" if last == 0 else
                                     f"{split}-{{000000..{last:06d}}}.tar"))
    return patterns
