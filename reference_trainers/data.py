"""Data sets and fast batch pipelines of the reference trainers.

Loading (each returns :class:`DataSplits`: train / val / test and the class names):

- :func:`load_embedded_cifar10`: the 12,000 real CIFAR-10 images stored in the package
  (``assets/``), no network; what ``demo`` and the tests use.
- :func:`load_torchvision_cifar`: torchvision's CIFAR-10 / CIFAR-100 from a local ``root``
  (``download=True`` fetches it when online; a missing root raises :class:`DataError`).
- :func:`load_image_folder_tensors`: an ``ImageFolder`` tree (``root/train/<class>/*.jpg`` and
  ``root/test/<class>/*.jpg``, e.g. the JPEG copy of CIFAR-10) decoded once into uint8 tensors,
  for data sets that fit in memory; a corrupt image raises :class:`DataError` naming the file.
- :func:`load_dataset`: picks one of the above from ``(name, root)``; this is what the CLI calls.
- :func:`split_validation`: carves a held-out validation split from the training set (a fixed
  generator, independent of the run's seed, so every seed and method sees the same split).

Batching: a *batch source* yields :class:`Batch` objects (uint8 images, int64 labels and the
samples' dataset indices, all on the target device) and says whether every epoch sees the same
images (``TensorBatches``) or not:

- :class:`TensorBatches`: the whole split as one uint8 tensor on the device (CIFAR-10's 50,000
  training images are 150 MB), shuffled per epoch with a generator seeded by ``(seed, epoch)``
  (so a resumed run replays the same order), sharded across DDP ranks.
- :class:`FolderBatches`: a multi-worker ``DataLoader`` over an ``ImageFolder`` tree (uint8
  tensors decoded by ``torchvision.io``; ``DistributedSampler`` under DDP), for data that does not
  fit or has variable image sizes (give a ``transform`` that makes them equal). ``decode="cpu"``
  decodes in the workers; ``decode="device"`` has the workers read the bytes and decodes each
  batch's JPEGs in one call on the device (nvJPEG on CUDA), the transform running there too.

Augmentation and normalisation happen on the batch, on the device: :class:`TensorAugment`
(random crop with zero padding, horizontal flip, mean/std normalisation, channels-last). An
augment with neither crop nor flip is deterministic, which lets the engine cache teacher outputs.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, cast

import torch
from torch import Tensor

from reference_trainers.errors import DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DECODE_MODES",
    "EMBEDDED_PATH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "DataSplits",
    "EmbeddedCIFAR10",
    "FolderBatches",
    "TensorAugment",
    "TensorBatches",
    "TensorSplit",
    "count_images",
    "find_unreadable_images",
    "load_dataset",
    "load_embedded_cifar10",
    "load_image_folder_tensors",
    "load_torchvision_cifar",
    "split_indices",
    "split_validation",
]

EMBEDDED_PATH = Path(__file__).parent / "assets" / "cifar10_subset.pt.gz"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")

DECODE_MODES = ("auto", "cpu", "device")
DecodeMode = Literal["auto", "cpu", "device"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class TensorSplit:
    """Images as a ``(N, 3, H, W)`` uint8 tensor with ``(N,)`` int64 labels."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> TensorSplit:
        """The samples at ``index`` (a 1-D int64 tensor), in that order."""
        return TensorSplit(self.images[index], self.labels[index])


@dataclass(frozen=True)
class EmbeddedCIFAR10:
    """The embedded CIFAR-10 subset: 1,000 train and 200 test real images per class."""

    train: TensorSplit
    test: TensorSplit
    classes: list[str]


@dataclass
class DataSplits:
    """What a recipe trains on: ``train`` / ``val`` / ``test`` (tensor splits, or ImageFolder
    directories for the DataLoader path), the class names and a description for the results."""

    train: TensorSplit | Path
    val: TensorSplit | Path | None
    test: TensorSplit | Path
    classes: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Batch:
    """One batch on the device: uint8 ``images (B, 3, H, W)``, int64 ``labels (B,)`` and the
    samples' indices ``index (B,)`` in their split (the key of the teacher-output cache)."""

    images: Tensor
    labels: Tensor
    index: Tensor


# --------------------------------------------------------------------------------------------- loading


def _decode(blob: Tensor, offsets: Tensor) -> Tensor:
    from torchvision.io import decode_jpeg

    chunks = [blob[int(offsets[i]) : int(offsets[i + 1])] for i in range(len(offsets) - 1)]
    return torch.stack(decode_jpeg(chunks))


def load_embedded_cifar10(path: Path = EMBEDDED_PATH) -> EmbeddedCIFAR10:
    """Decode the embedded CIFAR-10 subset (no network; about a second on one core)."""
    with gzip.open(path, "rb") as f:
        obj = torch.load(cast(IO[bytes], f), weights_only=True)  # a GzipFile is a binary file object
    return EmbeddedCIFAR10(
        train=TensorSplit(_decode(obj["train_bytes"], obj["train_offsets"]), obj["train_labels"]),
        test=TensorSplit(_decode(obj["test_bytes"], obj["test_offsets"]), obj["test_labels"]),
        classes=list(obj["classes"]),
    )


def load_torchvision_cifar(
    root: str | os.PathLike[str], *, cifar100: bool = False, download: bool = False
) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """torchvision's CIFAR-10 (or CIFAR-100) as uint8 tensors ``(train, test, classes)``.

    Raises:
        DataError: if ``root`` does not hold the data set and ``download`` is off (or the
            download failed): the message names the root and the folder torchvision expects.
    """
    from torchvision import datasets

    cls = datasets.CIFAR100 if cifar100 else datasets.CIFAR10
    name = "CIFAR-100" if cifar100 else "CIFAR-10"
    folder = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        hint = "the download failed" if download else "pass --download to fetch it (needs network)"
        raise DataError(f"{name} not found under {str(root)!r} (expected {folder}/ there): {hint}; ({e})") from e

    def split(ds: datasets.CIFAR10) -> TensorSplit:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return TensorSplit(images, torch.as_tensor(ds.targets, dtype=torch.int64))

    return split(train), split(test), list(train.classes)


def _scan_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class sub-directories (expected root/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    empty: list[str] = []
    for label, c in enumerate(classes):
        n = len(samples)
        for dirpath, _, files in sorted(os.walk(root / c)):
            samples += [(Path(dirpath) / f, label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if len(samples) == n:
            empty.append(c)
    if not samples:
        raise DataError(f"image folder {str(root)!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    if empty:  # a class that is never seen would still get a label and an output (as torchvision refuses it)
        raise DataError(
            f"image folder {str(root)!r} has class directories without images ({IMAGE_EXTENSIONS}): {empty}; "
            "add their images or remove the directories"
        )
    return samples, classes


def count_images(root: str | os.PathLike[str]) -> int:
    """The images of an ``ImageFolder`` tree (``root/<class>/<image>``), counted without reading them.

    Raises:
        DataError: as the loaders do, for a missing tree, no class directories or no images.
    """
    return len(_scan_folder(Path(root))[0])


# The first bytes of the formats IMAGE_EXTENSIONS names (WebP: RIFF....WEBP; PPM/PGM/PBM: P1-P6).
# torchvision decodes by content, so any of them is fine under any of the extensions.
_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    *(f"P{i}".encode() for i in range(1, 7)),
)


def _looks_like_an_image(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def find_unreadable_images(root: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """Files of an ``ImageFolder`` tree that cannot be images, found from their first bytes only.

    Reads 12 bytes of every file with an image extension under ``root`` (every sub-tree, e.g.
    ``train/`` and ``val/``), so a whole Imagenette tree takes about a second: empty files, files
    that cannot be opened, and files that start like none of the formats (an HTML error page
    saved as ``.jpg``, random bytes) are returned with the reason. A file that starts right but
    is damaged further in is only found when it is decoded (then the run stops with a
    :class:`DataError` naming it).
    """
    bad: list[tuple[Path, str]] = []
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / name
            try:
                with open(path, "rb") as f:
                    head = f.read(12)
            except OSError as e:
                bad.append((path, f"cannot be opened ({e.strerror or e})"))
                continue
            if not head:
                bad.append((path, "empty file"))
            elif not _looks_like_an_image(head):
                bad.append((path, f"not an image (starts with {head[:8]!r})"))
    return bad


def _cannot_decode(path: Path, e: Exception) -> DataError:
    return DataError(f"cannot decode image {str(path)!r}: {e}")


def _read_image(path: Path) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image: Tensor = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        return image
    except Exception as e:  # torchvision raises RuntimeError for undecodable data
        raise _cannot_decode(path, e) from e


_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


def _is_jpeg(data: Tensor) -> bool:
    """Whether the file bytes ``data`` (1-D uint8) start like a JPEG (``FF D8 FF``)."""
    return data.numel() >= 3 and tuple(data[:3].tolist()) == _JPEG_MAGIC


def _from_workers(loader: Iterable[_T]) -> Iterator[_T]:
    """Re-raise a DataError from a DataLoader worker with its own message, not the worker's traceback."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DataError as e:
            text = str(e)
            marker = "DataError: "
            raise DataError(text[text.rindex(marker) + len(marker) :] if marker in text else text) from None
        yield item


class _FolderDataset(torch.utils.data.Dataset[tuple[Tensor, int, int]]):
    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[i]
        img = _read_image(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label, i


def _check_same_size(images: Sequence[Tensor], index: Sequence[int], paths: list[tuple[Path, int]]) -> None:
    """Raise a DataError naming two files when the images of one batch differ in shape."""
    first = tuple(images[0].shape)
    for x, i in zip(images, index):
        if tuple(x.shape) != first:
            raise DataError(
                f"images of different sizes in one batch: {str(paths[index[0]][0])!r} is {first}, "
                f"{str(paths[i][0])!r} is {tuple(x.shape)}; give a transform that resizes them"
            )


def _collate(items: Sequence[tuple[Tensor, int, int]], paths: list[tuple[Path, int]]) -> tuple[Tensor, Tensor, Tensor]:
    _check_same_size([x for x, _, _ in items], [i for _, _, i in items], paths)
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items], dtype=torch.int64),
        torch.tensor([i for _, _, i in items], dtype=torch.int64),
    )


class _Collate:
    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples

    def __call__(self, items: Sequence[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        return _collate(items, self.samples)


# What a worker hands over when decoding happens on the device, one shared tensor per batch (a
# tensor per image would cost a file descriptor each on the way back): ``blob`` holds every
# sample's bytes back to back, sample ``k`` at ``blob[offsets[k]:offsets[k + 1]]``: a JPEG's file
# bytes (``shapes[k]`` is None; decoded later, in one batched call) or, for other formats, the
# image already decoded on the CPU, flattened (``shapes[k]`` is its ``(3, H, W)``); then the
# labels and the indices, as in the CPU path.
_EncodedBatch = tuple[Tensor, list[int], list[tuple[int, ...] | None], Tensor, Tensor]


class _FolderBytes(torch.utils.data.Dataset[tuple[Tensor, tuple[int, ...] | None, int, int]]):
    """The samples as ``(data, shape, label, index)``: a JPEG's file bytes (shape None), any other
    image decoded on the CPU and flattened (shape ``(3, H, W)``)."""

    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, tuple[int, ...] | None, int, int]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        path, label = self.samples[i]
        try:
            data: Tensor = read_file(str(path))
            if _is_jpeg(data):
                return data, None, label, i
            image: Tensor = decode_image(data, mode=ImageReadMode.RGB)
        except Exception as e:  # torchvision raises RuntimeError for unreadable or undecodable data
            raise _cannot_decode(path, e) from e
        return image.reshape(-1), tuple(image.shape), label, i


def _collate_encoded(items: Sequence[tuple[Tensor, tuple[int, ...] | None, int, int]]) -> _EncodedBatch:
    offsets = [0]
    for x, _, _, _ in items:
        offsets.append(offsets[-1] + x.numel())
    return (
        torch.cat([x for x, _, _, _ in items]),  # a new tensor (read_file's may map the file)
        offsets,
        [shape for _, shape, _, _ in items],
        torch.tensor([y for _, _, y, _ in items], dtype=torch.int64),
        torch.tensor([i for _, _, _, i in items], dtype=torch.int64),
    )


def load_image_folder_tensors(
    root: str | os.PathLike[str], *, num_workers: int = 0, classes: list[str] | None = None
) -> tuple[TensorSplit, list[str]]:
    """Decode a whole ``ImageFolder`` tree (``root/<class>/<image>``, equal image sizes) into uint8 tensors.

    Labels follow the sorted class-directory names, as in ``torchvision.datasets.ImageFolder``.

    Args:
        root: the tree's root.
        num_workers: decoding processes (0 decodes in this process).
        classes: the class names expected (e.g. the training split's, when loading the test split).

    Raises:
        DataError: a missing root, no class directories or images, classes that differ from
            ``classes``, an undecodable image (named), or images of different sizes.
    """
    samples, found = _scan_folder(Path(root))
    if classes is not None and found != classes:
        raise DataError(f"image folder {str(root)!r} has classes {found}, expected {classes}")
    loader = torch.utils.data.DataLoader(
        _FolderDataset(samples), batch_size=512, num_workers=num_workers, collate_fn=_Collate(samples)
    )
    images: list[Tensor] = []
    labels: list[Tensor] = []
    for x, y, _ in _from_workers(loader):
        if images and x.shape[1:] != images[0].shape[1:]:
            raise DataError(
                f"images of different sizes under {str(root)!r}: {tuple(x.shape[1:])} and "
                f"{tuple(images[0].shape[1:])}; use the DataLoader path (FolderBatches) with a transform"
            )
        images.append(x)
        labels.append(y)
    return TensorSplit(torch.cat(images), torch.cat(labels)), found


def split_validation(train: TensorSplit, val_size: int, *, seed: int = 0) -> tuple[TensorSplit, TensorSplit | None]:
    """Carve ``val_size`` random samples out of ``train``: ``(train_rest, val)``; ``val`` is None for 0.

    The split uses its own generator seeded with ``seed`` (not the run's seed), so all methods
    and seeds of a recipe share one validation split.

    Raises:
        ValueError: if ``val_size`` is negative or leaves no training sample.
    """
    if val_size == 0:
        split_indices(len(train), 0)
        return train, None
    train_idx, val_idx = split_indices(len(train), val_size, seed=seed)
    return train.subset(train_idx), train.subset(val_idx)


def split_indices(n: int, val_size: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted ``(train_indices, val_indices)`` of a fixed random split of ``range(n)``.

    What :func:`split_validation` uses; for the DataLoader path pass each part as
    ``FolderBatches(..., indices=...)``.

    Raises:
        ValueError: if ``val_size`` is negative or leaves no training sample.
    """
    if val_size < 0 or val_size >= n:
        raise ValueError(f"val_size must be in [0, {n - 1}] for a training set of {n} images, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 0,
    download: bool = False,
    num_workers: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> DataSplits:
    """Load a data set by name as tensors, with a validation split carved from its training set.

    Args:
        name: ``"embedded"`` (the package's CIFAR-10 subset, ``root`` ignored), ``"cifar10"`` /
            ``"cifar100"`` (torchvision's format under ``root``), ``"imagefolder"``
            (``root/train`` and ``root/test`` trees), or ``"auto"``: embedded without a root, an
            ImageFolder when ``root/train`` exists, else CIFAR-10 in torchvision's format.
        root: the data directory.
        val_size: images held out from training for validation (0: none).
        download: let torchvision download CIFAR when it is missing.
        num_workers: decoding processes for ImageFolder trees.
        train_subset / test_subset: keep only the first ``k`` images of a random (fixed-seed)
            permutation of each split, for quick runs; ``None`` keeps all.

    Raises:
        DataError: an unknown name, a missing root, or any error of the loaders above.
    """
    if name == "auto":
        if root is None:
            name = "embedded"
        elif (Path(root) / "train").is_dir():
            name = "imagefolder"
        elif not Path(root).exists():
            raise DataError(f"data root {str(root)!r} does not exist")
        else:
            name = "cifar10"
    if name == "embedded":
        emb = load_embedded_cifar10()
        train, test, classes = emb.train, emb.test, emb.classes
        desc = "embedded CIFAR-10 subset (10,000 train / 2,000 test real images)"
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(f"dataset {name!r} needs --data-root (a directory for torchvision's files)")
        train, test, classes = load_torchvision_cifar(root, cifar100=name == "cifar100", download=download)
        desc = f"torchvision {name} at {str(root)!r}"
    elif name == "imagefolder":
        if root is None:
            raise DataError("dataset 'imagefolder' needs --data-root (a directory with train/ and test/ trees)")
        if not (Path(root) / "train").is_dir() or not (Path(root) / "test").is_dir():
            raise DataError(f"image folder root {str(root)!r} must contain train/ and test/ directories")
        train, classes = load_image_folder_tensors(Path(root) / "train", num_workers=num_workers)
        test, _ = load_image_folder_tensors(Path(root) / "test", num_workers=num_workers, classes=classes)
        desc = f"ImageFolder at {str(root)!r}"
    else:
        raise DataError(f"unknown dataset {name!r}; expected one of auto, embedded, cifar10, cifar100, imagefolder")
    try:
        train, val = split_validation(train, val_size)
    except ValueError as e:
        raise DataError(f"--val-size: {e}") from None
    if train_subset is not None and train_subset < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:train_subset])
    if test_subset is not None and test_subset < len(test):
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(2))[:test_subset])
    desc += f"; {len(train)} train / {len(val) if val is not None else 0} val / {len(test)} test"
    return DataSplits(train=train, val=val, test=test, classes=classes, description=desc)


# --------------------------------------------------------------------------------------------- batching


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class TensorBatches:
    """Batches of a :class:`TensorSplit` held on ``device`` as one uint8 tensor.

    Args:
        split: the images and labels (moved to ``device`` once).
        batch_size: per-process batch size.
        device: where the data lives and batches are produced.
        shuffle: a new order every epoch, drawn from a generator seeded with ``(seed, epoch)``.
        drop_last: drop the last incomplete batch.
        seed: the shuffle seed.
        rank / world_size: DDP sharding: every process takes every ``world_size``-th sample of
            the epoch's order (truncated to a multiple of ``world_size`` when shuffled; unshuffled
            evaluation shards cover every sample exactly once).
        storage: where the uint8 split is kept (default ``device``); the CPU (pinned) when it
            does not fit in GPU memory, batches are then copied to ``device`` one at a time.

    ``deterministic`` is True: every epoch holds the same samples (possibly in another order).
    """

    deterministic = True

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        storage: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.device = torch.device(device)
        self.storage = torch.device(storage) if storage is not None else self.device
        self.images = split.images.to(self.storage)
        self.labels = split.labels.to(self.storage)
        if self.storage.type == "cpu" and self.device.type == "cuda":
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size

    @property
    def num_samples(self) -> int:
        """Samples in the whole split (all ranks)."""
        return int(self.labels.shape[0])

    def _order(self, epoch: int) -> Tensor:
        n = self.num_samples
        if self.shuffle:
            order = torch.randperm(n, generator=_epoch_generator(self.seed, epoch))
            order = order[: n - n % self.world_size] if self.world_size > 1 else order
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        k = len(self._order(0))
        return k // self.batch_size if self.drop_last else math.ceil(k / self.batch_size)

    def all_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every sample of the split (all ranks' shards) once, in index order (for the teacher cache)."""
        for start in range(0, self.num_samples, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.num_samples), device=self.storage)
            yield self._batch(idx)

    def _batch(self, idx: Tensor) -> Batch:
        if self.storage == self.device:
            return Batch(self.images[idx], self.labels[idx], idx)
        nb = self.device.type == "cuda"
        return Batch(
            self.images[idx].to(self.device, non_blocking=nb),
            self.labels[idx].to(self.device, non_blocking=nb),
            idx.to(self.device, non_blocking=nb),
        )

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (its shuffle order depends on ``epoch`` and ``seed`` only)."""
        order = self._order(epoch).to(self.storage)
        for b in range(len(self)):
            yield self._batch(order[b * self.batch_size : (b + 1) * self.batch_size])


class FolderBatches:
    """Batches of an ``ImageFolder`` tree through a multi-worker ``DataLoader`` (the path for big data).

    ``decode="cpu"``: images are decoded to uint8 ``(3, H, W)`` tensors by ``torchvision.io`` in the
    workers and ``transform`` (uint8 tensor to uint8 tensor, e.g.
    ``torchvision.transforms.v2.RandomResizedCrop``) is applied there; batches are moved to
    ``device`` (pinned, non-blocking on CUDA).

    ``decode="device"``: the workers only read the files' bytes; this process decodes each batch's
    JPEGs in one ``torchvision.io.decode_jpeg(list, device=device)`` call (batched nvJPEG on CUDA;
    on the CPU the same call decodes on the CPU), then applies ``transform`` image by image on
    ``device`` and stacks. Files that are not JPEGs (by their first bytes, ``FF D8 FF``) are decoded
    on the CPU by the workers; a JPEG the batched decoder rejects is retried alone, then decoded on
    the CPU. A random ``transform`` draws from the global CPU generator re-seeded for every batch
    from ``(seed, epoch, rank, batch)`` inside :func:`torch.random.fork_rng` (the run's own
    random stream is left as it was), so it does not depend on ``num_workers``. nvJPEG's pixels
    may differ from the CPU decoder's by a few levels (another IDCT); the order, labels and
    indices of the batches are the CPU path's.

    Under DDP a ``DistributedSampler`` shards the shuffled training data (its epoch is set on
    every call of :meth:`batches`); unshuffled (evaluation) data are split ``rank::world_size``,
    every sample once. Both decode modes use the same samplers.

    Args:
        root: the tree (``root/<class>/<image>``).
        batch_size, shuffle, drop_last, seed, rank, world_size: as for :class:`TensorBatches`.
        transform: per-image transform (in the workers, or on ``device`` with ``decode="device"``);
            random transforms make the source non-deterministic (``deterministic=False``), which
            turns the teacher cache off.
        num_workers: processes that read (and with ``decode="cpu"`` decode) the files.
        classes: expected class names (raises :class:`DataError` when they differ).
        indices: keep only these samples (positions in the sorted file list), e.g. one part of
            :func:`split_indices`; batch indices then count within this selection.
        decode: ``"cpu"``, ``"device"`` or ``"auto"`` (``"device"`` when ``device`` is CUDA, else
            ``"cpu"``); the mode chosen is in :attr:`decode`.

    Raises:
        ValueError: an unknown ``decode``, or ``indices`` out of range.
        DataError: a missing or empty tree, classes that differ from ``classes``; while iterating,
            an undecodable image (named) or images of different sizes in one batch.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Tensor], Tensor] | None = None,
        deterministic: bool = True,
        num_workers: int = 0,
        classes: list[str] | None = None,
        indices: Sequence[int] | Tensor | None = None,
        decode: DecodeMode = "auto",
    ) -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(map(repr, DECODE_MODES))}, got {decode!r}")
        samples, found = _scan_folder(Path(root))
        if classes is not None and found != classes:
            raise DataError(f"image folder {str(root)!r} has classes {found}, expected {classes}")
        if indices is not None:
            idx = [int(i) for i in indices]
            bad = [i for i in idx if not 0 <= i < len(samples)]
            if bad:
                raise ValueError(f"indices must be in [0, {len(samples)}) for {str(root)!r}, got {bad[:5]}")
            samples = [samples[i] for i in idx]
        self.classes = found
        self.samples = samples
        self.device = torch.device(device)
        if decode == "auto":
            decode = "device" if self.device.type == "cuda" else "cpu"
        self.decode: Literal["cpu", "device"] = decode
        self.deterministic = deterministic
        self.transform = transform
        self.dataset: _FolderDataset | _FolderBytes
        self.dataset = _FolderDataset(samples, transform) if decode == "cpu" else _FolderBytes(samples)
        self.sampler: torch.utils.data.DistributedSampler[int] | None = None
        self.shard: list[int] | None = None
        if world_size > 1 and shuffle:
            self.sampler = torch.utils.data.DistributedSampler(
                self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
        elif world_size > 1:  # evaluation: every sample exactly once over the ranks (no padding)
            self.shard = list(range(rank, len(samples), world_size))
        self.shuffle, self.seed, self.rank = shuffle, seed, rank
        self.batch_size, self.drop_last, self.num_workers = batch_size, drop_last, num_workers
        self._collate: Callable[[Any], Any] = _Collate(samples) if decode == "cpu" else _collate_encoded

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def _new_loader(
        self,
        batch_size: int,
        drop_last: bool,
        *,
        sampler: Iterable[int] | None = None,
        shuffle: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.utils.data.DataLoader[Any]:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            # file bytes are read by the decoder on the host: only decoded batches are worth pinning
            pin_memory=self.device.type == "cuda" and self.decode == "cpu",
            drop_last=drop_last,
            generator=generator,
            persistent_workers=False,
        )

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader[Any]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            return self._new_loader(self.batch_size, self.drop_last, sampler=self.sampler)
        if self.shard is not None:
            return self._new_loader(self.batch_size, self.drop_last, sampler=self.shard)
        gen = _epoch_generator(self.seed, epoch) if self.shuffle else None
        return self._new_loader(self.batch_size, self.drop_last, shuffle=self.shuffle, generator=gen)

    def __len__(self) -> int:
        return len(self._loader(0))

    def all_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every sample once, in index order, whatever the rank (for the teacher cache)."""
        loader = self._new_loader(batch_size, False, shuffle=False)
        if self.decode == "device":
            yield from self._device_batches(loader, -1)
            return
        for x, y, i in _from_workers(loader):
            yield Batch(x.to(self.device), y.to(self.device), i.to(self.device))

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (shuffled by ``(seed, epoch)``, or by the DistributedSampler)."""
        if self.decode == "device":
            yield from self._device_batches(self._loader(epoch), epoch)
            return
        nb = self.device.type == "cuda"
        for x, y, i in _from_workers(self._loader(epoch)):
            yield Batch(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), i.to(self.device))

    # ----------------------------------------------------------------------------- decode="device"

    def _device_batches(self, loader: Iterable[_EncodedBatch], epoch: int) -> Iterator[Batch]:
        nb = self.device.type == "cuda"
        # One seed per batch for a random transform, from (seed, epoch, rank): reproducible, and
        # the same whatever the number of workers.
        seeds = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_009 + self.rank + 13) % 2**63)
        for blob, offsets, shapes, y, i in _from_workers(loader):
            index = i.tolist()
            images = self._decode_on_device(blob, offsets, shapes, index)
            if self.transform is not None:
                transform = self.transform
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))
                    images = [transform(x) for x in images]
            _check_same_size(images, index, self.samples)
            yield Batch(torch.stack(images), y.to(self.device, non_blocking=nb), i.to(self.device, non_blocking=nb))

    def _decode_on_device(
        self, blob: Tensor, offsets: list[int], shapes: list[tuple[int, ...] | None], index: list[int]
    ) -> list[Tensor]:
        """The batch's images on the device: the JPEGs in one batched call, the others (CPU-decoded) moved."""
        from torchvision.io import ImageReadMode, decode_jpeg

        nb = self.device.type == "cuda"
        parts = [blob[offsets[k] : offsets[k + 1]] for k in range(len(shapes))]
        images: list[Tensor | None] = [
            None if shape is None else x.view(shape).to(self.device, non_blocking=nb) for x, shape in zip(parts, shapes)
        ]
        jpegs = [k for k, shape in enumerate(shapes) if shape is None]
        if jpegs:
            decoded: list[Tensor]
            try:
                decoded = decode_jpeg([parts[k] for k in jpegs], mode=ImageReadMode.RGB, device=self.device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # one bad or unsupported file fails the whole call: find it
                decoded = [self._decode_one(parts[k], index[k]) for k in jpegs]
            for k, image in zip(jpegs, decoded):
                images[k] = image
        return cast(list[Tensor], images)

    def _decode_one(self, data: Tensor, i: int) -> Tensor:
        """One JPEG the batched decoder rejected: alone on the device, else on the CPU, else a DataError."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        try:
            image: Tensor = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            return image
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
        try:
            image = decode_image(data, mode=ImageReadMode.RGB)
        except Exception as e:  # torchvision raises RuntimeError for undecodable data
            raise _cannot_decode(self.samples[i][0], e) from e
        return image.to(self.device)


class TensorAugment:
    """Batched augmentation and normalisation of uint8 images on their device.

    ``x`` uint8 ``(B, 3, H, W)`` -> float ``(B, 3, H, W)``: random crop of the zero-padded image
    (``crop_padding`` pixels each side, as ``RandomCrop(H, padding=p)``), horizontal flip with
    probability 1/2, then ``(x / 255 - mean) / std``; channels-last memory format when asked.
    Random draws come from the ``generator`` passed to :meth:`__call__` (on the images' device).

    Args:
        mean / std: per-channel normalisation.
        crop_padding: 0 turns the crop off.
        flip: random horizontal flips.
        channels_last: return a channels-last tensor.

    Example:
        >>> import torch
        >>> aug = TensorAugment((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_padding=4, flip=True)
        >>> x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
        >>> y = aug(x, torch.Generator().manual_seed(0))
        >>> y.shape, y.dtype, float(y.max())
        (torch.Size([2, 3, 8, 8]), torch.float32, 1.0)
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must hold 3 values with std > 0, got mean={mean}, std={std}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_padding, self.flip, self.channels_last = crop_padding, flip, channels_last
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def deterministic(self) -> bool:
        """True when the output depends on the input only (no crop, no flip)."""
        return self.crop_padding == 0 and not self.flip

    def normalise(self, x: Tensor) -> Tensor:
        """``(x / 255 - mean) / std`` in float32 (channels-last if configured), no randomness."""
        if x.device not in self._stats:  # made once per device: a host-to-device copy per batch would sync
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            self._stats[x.device] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._stats[x.device]
        out = x.float() * scale - shift
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        b, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), device=x.device, generator=generator)
            ox = torch.randint(0, 2 * p + 1, (b,), device=x.device, generator=generator)
            rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, 3, h, w + 2 * p)
            x = padded.gather(2, rows)
            cols = (ox[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, 3, h, w)
            x = x.gather(3, cols)
        if self.flip:
            mask = torch.rand(b, device=x.device, generator=generator) < 0.5
            x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
        return self.normalise(x)
