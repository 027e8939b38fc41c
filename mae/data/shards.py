"""WebDataset tar shards: `mae shards DIR OUT` writes them from an image folder, `ShardDataset`
reads them for either loader, each byte once per epoch.

A shard holds samples `<key>.<ext>` (the file's bytes as they were), `<key>.cls` (the label),
`<key>.name` (the file's path under DIR, for warnings). Beside the shards `<split>-index.json`
records the class names, each shard's sample count and each sample's byte offset in its shard:
a run knows its steps per epoch without reading a shard, and a DataLoader worker reads the
bytes of its own batches' samples only (a range of the file, or an HTTP Range request), so a
rank reads its share of the shards once per epoch whatever the worker count.

Training epochs (seeded by (seed, epoch), exact on a resume): the shard order is shuffled and
rank r takes the r-th contiguous slice of that sequence of samples (whole batches: a training
epoch drops the remainder, as `DistributedSampler(drop_last)` does). The slice is cut into
chunks of `chunk_size(batch_size)` consecutive samples of one shard (the cuts move each epoch),
each shard's chunks shuffled, and the chunks of all the shards interleaved in proportion to
their counts (`interleave`), so consecutive chunks come from different shards: each batch of B
mixes about 16 chunks, from at least 8 shards where the slice has 16; then the samples of each
batch are shuffled. Batch j of the epoch is made by worker j % num_workers, so the batches and
their order are the same for any worker count and a mid-epoch resume skips the batches done
without reading them. Evaluation reads each rank's slice in order.
"""
from __future__ import annotations

import http.client
import io
import json
import math
import random
import re
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .gpu import EncodedDataset, collate_packed, worker_item
from .images import Augmented, ImageFolderDataset, build_dataset, collate_skipping, read_rgb

INDEX_SUFFIX = "-index.json"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"[\w.-]+\.tar")  # an index's shard names: no folder, no scheme
# A worker reads byte ranges: of local files, or over HTTP(S) (Range requests, no shell)
URL_SCHEMES = ("file", "http", "https")
CHUNKS_PER_BATCH = 16
READ_TIMEOUT_S = 60
# A batch's runs of consecutive samples (about CHUNKS_PER_BATCH) read from an HTTP(S) server at
# once: an object store's latency per request (tens of ms), not its bandwidth, bounds one read,
# and 16 in a row would cost a worker that many round trips a batch
REMOTE_READS = 8


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
    """Local files and HTTP(S) only: the shards are read in byte ranges (and `pipe:` would run
    --data-path in a shell)."""
    for url in urls:
        if _scheme(url) not in (None, *URL_SCHEMES):
            raise ValueError(f"--data-path {spec}: {url} is not a file path or an http(s):// or "
                             f"file: URL (the shards are read in byte ranges; object stores "
                             f"serve them over HTTPS; `pipe:` commands are refused)")


def _local_path(url: str) -> str | None:
    scheme = _scheme(url)
    if scheme is None:
        return url
    return urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else None


_ignored_ranges: set[str] = set()  # hosts that answered a Range request with the whole file
_ignored_ranges_lock = threading.Lock()  # a batch's reads run in threads: one warning a host
READ_ATTEMPTS = 5  # a remote read failing for a passing reason: again after 1, 2, 4, 8 s


def read_bytes(url: str, start: int = 0, stop: int | None = None) -> bytes:
    """Bytes [start, stop) of a local file or an HTTP(S) URL (to its end without `stop`); a
    server that ignores the Range header costs the bytes before `start` (said once). A remote
    read that fails for a reason that passes (a dropped connection, a 5xx answer, a short
    read) is tried READ_ATTEMPTS times, as webdataset's curl reader was (--retry)."""
    path = _local_path(url)
    if path is not None:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read() if stop is None else f.read(stop - start)
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_http(url, start, stop)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt + 1 == READ_ATTEMPTS:
                raise
        except (OSError, http.client.HTTPException):
            if attempt + 1 == READ_ATTEMPTS:
                raise
        time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def _read_http(url: str, start: int, stop: int | None) -> bytes:
    headers = {"Range": f"bytes={start}-{'' if stop is None else stop - 1}"} if start or stop \
        else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=READ_TIMEOUT_S) as response:
        if headers and response.status != 206:
            host = urllib.parse.urlparse(url).netloc
            with _ignored_ranges_lock:
                first = host not in _ignored_ranges
                _ignored_ranges.add(host)
            if first:
                warnings.warn(f"{host} ignores HTTP Range requests: each read of a shard "
                              f"downloads it from its start", RuntimeWarning, stacklevel=2)
            response.read(start)
        data = response.read() if stop is None else response.read(stop - start)
    if stop is not None and len(data) != stop - start:  # cut short: tried again
        raise http.client.IncompleteRead(data, stop - start - len(data))
    return data


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
    try:
        index = json.loads(read_bytes(path))
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
    offsets = index.get("offsets")
    for name, count in index["shards"].items():
        at = offsets.get(name) if isinstance(offsets, dict) else None
        if not (isinstance(at, list) and len(at) == count + 1
                and all(type(o) is int for o in at) and at[0] >= 0
                and all(a < b for a, b in zip(at, at[1:]))):
            raise ValueError(f"--data-path: the shard index {path} has no byte offsets for the "
                             f"{count} samples of {name} (written by an older `mae shards`? "
                             f"write the shards again)")
    return index


def shard_urls(data_path, split: str, required: bool) -> list[str] | None:
    """The shards of `split` that --data-path names, or None when it names none: a pattern or
    list (the training shards; their `val` split is the `val-index.json` beside them), or a
    folder holding `<split>-index.json` and no `<split>/` folder. Without a `val` split the
    training shards serve where one is not `required` (pre-training's preview)."""
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
    local = [u for u in urls if _local_path(u) is not None]
    missing = [u for u in local if not Path(_local_path(u)).is_file()]
    if missing:
        raise FileNotFoundError(f"--data-path {data_path}: no shard {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if split == "train":
        return urls
    head = urls[0].rpartition("/")[0]
    head += "/" if head else ""
    other = f"{head}{split}{INDEX_SUFFIX}"
    if index_path(urls[0]) == f"{head}train{INDEX_SUFFIX}" and \
            (_local_path(other) is None or Path(_local_path(other)).is_file()):
        try:
            return [head + name for name in read_index(other)["shards"]]
        except FileNotFoundError:  # a remote folder without that split
            if required:
                raise
    if required:
        raise FileNotFoundError(f"--data-path {data_path} has no {split!r} split: expected "
                                f"{other} beside the train shards (`mae shards` writes it)")
    return urls


def chunk_size(batch_size: int) -> int:
    """Consecutive samples of one shard read together: CHUNKS_PER_BATCH chunks make a batch."""
    return max(1, batch_size // CHUNKS_PER_BATCH)


def interleave(chunks: list[list[np.ndarray]], rng: np.random.Generator) -> list[np.ndarray]:
    """The chunks of several shards (each shard's list in its order) in one sequence where each
    shard's k-th of n chunks sits at (k + u) / n, u uniform in [0, 1): every shard advances in
    proportion to its size, so consecutive chunks come from different shards (for equal counts
    each round holds one chunk of every shard, in a random order)."""
    keyed = [((k + rng.random()) / len(own), s, k) for s, own in enumerate(chunks)
             for k in range(len(own))]
    return [chunks[s][k] for _, s, k in sorted(keyed)]


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of tar shards, as `Augmented` (Pillow, in the worker: the same (seed, epoch,
    index) augmentation as an image folder, index = the sample's place in the shards) or, with
    `encoded`, the gpu loader's worker items (JPEG bytes for the device where `ship_jpegs`).
    `split(rank, world_size, batch_size, train)` sets this process's share before a loader
    reads it."""

    def __init__(self, urls: list[str], size, train: bool, seed: int = 0,
                 encoded: bool = False, ship_jpegs: bool = False):
        check_urls(urls, urls[0])
        self.index_url = index_path(urls[0])
        index = read_index(self.index_url)
        counts = index["shards"]
        unknown = [u for u in urls if u.rsplit("/", 1)[-1] not in counts]
        if unknown:
            raise FileNotFoundError(f"--data-path: shard {unknown[0]} is not in its index "
                                    f"{self.index_url}")
        self.urls = urls
        names = [u.rsplit("/", 1)[-1] for u in urls]
        self.counts = [int(counts[name]) for name in names]
        # arrays, not lists of ints: each forked worker reads them (copy-on-write would copy
        # the objects' reference counts, page by page)
        self.offsets = [np.asarray(index["offsets"][name], np.int64) for name in names]
        self.first = np.cumsum([0] + self.counts)  # the global index of each shard's sample 0
        self.classes = list(index.get("classes") or ["images"])
        self.num_classes = len(index["classes"]) if index.get("classes") else None
        self.augment = Augmented(size, train, seed)
        self.image_transform = None
        self.train, self.seed, self.encoded, self.ship_jpegs = train, seed, encoded, ship_jpegs
        self.collate = collate_packed if encoded else collate_skipping
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

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Leave out the epoch's first `batches` batches (a mid-epoch resume), until the next
        `set_epoch`; their samples are not read."""
        self.skipped = batches

    def sequence(self) -> np.ndarray:
        """The global indices of this rank's samples in the epoch's order (its batches are
        consecutive runs of `batch_size`)."""
        start, stop = self._share()
        pieces, offset = [], 0
        for s in self.order():  # this rank's slice of the shards, in the epoch's shard order
            lo, hi = max(start, offset), min(stop, offset + self.counts[s])
            if lo < hi:
                pieces.append(self.first[s] + np.arange(lo - offset, hi - offset))
            offset += self.counts[s]
        if not pieces:
            return np.zeros(0, np.int64)
        if not self.shuffle:
            return np.concatenate(pieces)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        size = chunk_size(self.batch_size)
        chunks = []
        for piece in pieces:  # chunks cut at a place drawn per epoch, in a shuffled order
            cuts = list(range(int(rng.integers(size)) or size, len(piece), size))
            own = np.split(piece, cuts)
            chunks.append([own[k] for k in rng.permutation(len(own))])
        order = np.concatenate(interleave(chunks, rng))
        batches = order.reshape(-1, self.batch_size)  # whole batches (the share is)
        return rng.permuted(batches, axis=1).reshape(-1)

    def worker_samples(self, worker: int, workers: int):
        """(bytes, label, name, global index) of worker `worker`'s samples: batch j of the
        share, from the first not skipped, is worker j % `workers`'s, so the DataLoader's round
        robin over its workers yields the batches in order (the same for any worker count)."""
        order = self.sequence()
        B = self.batch_size
        for j in range(self.skipped + worker, math.ceil(len(order) / B), workers):
            yield from self.read(order[j * B:(j + 1) * B])

    def read(self, indices) -> list[tuple[bytes, int, str, int]]:
        """(bytes, label, name, global index) of the samples `indices`, in that order: each run
        of consecutive samples of a shard is one read of its byte range (over HTTP(S), up to
        REMOTE_READS of them at once). A shard that cannot be
        read, or whose bytes do not hold what its index says, is a `ShardError` naming it."""
        indices = np.asarray(indices, dtype=np.int64)
        ordered = np.unique(indices)
        shard = np.searchsorted(self.first, ordered, "right") - 1
        runs = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(shard) != 0)) + 1
        spans = []  # (shard, first, last + 1) of each run
        for run in np.split(np.arange(len(ordered)), runs) if len(ordered) else []:
            s = int(shard[run[0]])
            spans.append((s, int(ordered[run[0]] - self.first[s]),
                          int(ordered[run[-1]] - self.first[s]) + 1))
        remote = [span for span in spans if _local_path(self.urls[span[0]]) is None]
        if len(remote) > 1:  # concurrent requests; the first error (in run order) is raised
            pool = ThreadPoolExecutor(min(len(remote), REMOTE_READS))
            try:
                reads = list(pool.map(lambda span: self._read_range(*span), spans))
            finally:  # after an error, the reads not started are dropped, not waited for
                pool.shutdown(wait=False, cancel_futures=True)
        else:
            reads = [self._read_range(*span) for span in spans]
        got = {}
        for (s, a, _), samples in zip(spans, reads):
            for position, fields in enumerate(samples, a):
                got[int(self.first[s]) + position] = fields
        return [(*got[int(g)], int(g)) for g in indices]

    def _read_range(self, s: int, a: int, b: int):
        """Samples a..b-1 of shard s, from the bytes its index places them at."""
        url = self.urls[s]
        lo, hi = int(self.offsets[s][a]), int(self.offsets[s][b])
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        try:
            data = read_bytes(url, lo, hi)
            if len(data) != hi - lo:
                raise ShardError(f"shard {url} is cut short: its samples {a}..{b - 1} are at "
                                 f"bytes {lo}..{hi}, as its index says, but {len(data)} of those "
                                 f"{hi - lo} bytes are there (truncated, or not the shard the "
                                 f"index was written for)")
            files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data)))
            samples = list(group_by_keys(files))
        except ShardError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError, http.client.HTTPException) as exc:
            # webdataset appends the stream to args, and " @ <stream>" to the text
            reason = str(exc.args[0] if exc.args else exc).partition(" @ ")[0]
            raise ShardError(f"shard {url}: {reason}") from exc
        if len(samples) != b - a:
            raise ShardError(f"shard {url}: bytes {lo}..{hi} hold {len(samples)} samples, its "
                             f"index says {b - a} ({a}..{b - 1}): not the shard the index was "
                             f"written for")
        return [self._fields(sample, url) for sample in samples]

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
            return worker_item(data, label, name, self.ship_jpegs)
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
        """Sample `index` of the unshuffled shards (for previews)."""
        if not 0 <= index < self.first[-1]:
            raise IndexError(f"index {index} is past the shards' {self.first[-1]} samples")
        return self.item(*self.read([index])[0])


def open_dataset(data_path, size, split: str, augment: bool, seed: int = 0,
                 length: int | None = None, required: bool = True, loader: str = "pil",
                 ship_jpegs: bool = False):
    """`data.build_dataset` for either loader, and tar shards: the data set a `--data-loader`
    (pil: tensors from the workers; gpu: worker items, JPEG bytes where `ship_jpegs`) reads
    from --data-path."""
    urls = shard_urls(data_path, split, required) if data_path else None
    if urls is not None:
        return ShardDataset(urls, size, augment, seed, encoded=loader == "gpu",
                            ship_jpegs=ship_jpegs)
    dataset = build_dataset(data_path, size, split, augment, seed, length, required)
    return EncodedDataset(dataset, ship_jpegs) if loader == "gpu" else dataset


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


def sample_offsets(shard: Path) -> list[int]:
    """The byte offset of each sample's first member in a tar written by `mae shards`, and the
    end of the last sample's data."""
    from webdataset.tariterators import base_plus_ext

    starts, last, end = [], None, 0
    with tarfile.open(shard) as tar:
        for member in tar:
            key = base_plus_ext(member.name)[0]
            if key != last:
                starts.append(member.offset)
                last = key
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return starts + [end]


def _write_splits(source: Path, out: Path, splits: list[str], shard_size: int,
                  seed: int) -> dict[str, str]:
    from webdataset import TarWriter

    out.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for split in splits:
        folder = ImageFolderDataset(source, 1, split=split)
        samples = list(folder.samples)
        random.Random(seed).shuffle(samples)
        counts, offsets = {}, {}
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
            offsets[name] = sample_offsets(out / name)
        index = {"split": split, "classes": folder.classes, "count": len(samples),
                 "shards": counts, "offsets": offsets}
        (out / f"{split}{INDEX_SUFFIX}").write_text(json.dumps(index) + "\n")
        last = len(counts) - 1
        patterns[split] = str(out / (f"{split}-000000.tar" if last == 0 else
                                     f"{split}-{{000000..{last:06d}}}.tar"))
    return patterns
