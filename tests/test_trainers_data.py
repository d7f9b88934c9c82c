"""reference_trainers.data: loaders, validation split, batch sources, batched augmentation, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from reference_trainers.data import (
    Batch,
    DataError,
    FolderBatches,
    TensorAugment,
    TensorBatches,
    TensorSplit,
    load_dataset,
    load_image_folder_tensors,
    load_torchvision_cifar,
    split_indices,
    split_validation,
)


def _split(n: int = 20, size: int = 8) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 3)


def _tree(root: Path, per_class: int = 3, size: int = 8, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    g = torch.Generator().manual_seed(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            data = encode_png(img) if i % 2 else encode_jpeg(img)
            (root / c / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(data.numpy().tobytes())
    return root


# ------------------------------------------------------------------------------------ augmentation


def test_normalise_matches_totensor_normalize() -> None:
    x = _split(4).images
    aug = TensorAugment((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(aug(x), expected)
    assert aug.deterministic


def test_random_crop_is_a_window_of_the_zero_padded_image_and_flip_mirrors() -> None:
    x = _split(16).images
    p = 2
    aug = TensorAugment((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), crop_padding=p, flip=True)
    assert not aug.deterministic
    y = aug(x, torch.Generator().manual_seed(3)).round().to(torch.uint8)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets, flips = set(), 0
    for i in range(len(x)):
        found = [
            (dy, dx, f)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for f in (False, True)
            if torch.equal(y[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy : dy + 8, dx : dx + 8]))
        ]
        assert found, f"sample {i} is not a (flipped) window of its padded image"
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 3
    assert 0 < flips < len(x)


def test_augment_is_reproducible_from_its_generator_and_rejects_float_input() -> None:
    x = _split(8).images
    aug = TensorAugment((0.5,) * 3, (0.5,) * 3, crop_padding=4, flip=True)
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="expected uint8 images"):
        aug(x.float())
    with pytest.raises(ValueError, match="std > 0"):
        TensorAugment((0.5,) * 3, (0.5, 0.0, 0.5))


# ------------------------------------------------------------------------------------ splits, batches


def test_split_validation_is_disjoint_fixed_and_checked() -> None:
    data = TensorSplit(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10))
    train, val = split_validation(data, 3)
    assert val is not None
    assert len(train) == 7
    assert len(val) == 3
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert torch.equal(split_validation(data, 3)[1].labels, val.labels)  # type: ignore[union-attr]
    assert split_validation(data, 0)[1] is None
    with pytest.raises(ValueError, match=r"val_size must be in \[0, 9\].*got 10"):
        split_validation(data, 10)


def test_tensor_batches_shuffle_per_epoch_and_shard_across_ranks() -> None:
    data = _split(20)
    src = TensorBatches(data, 4, shuffle=True, seed=7)
    e0 = torch.cat([b.index for b in src.batches(0)])
    assert sorted(e0.tolist()) == list(range(20))
    assert torch.equal(e0, torch.cat([b.index for b in src.batches(0)]))
    assert not torch.equal(e0, torch.cat([b.index for b in src.batches(1)]))
    b = next(iter(src.batches(0)))
    assert torch.equal(b.images, data.images[b.index])
    assert torch.equal(b.labels, data.labels[b.index])
    shards = [
        torch.cat([b.index for b in TensorBatches(data, 3, shuffle=True, seed=7, rank=r, world_size=3).batches(2)])
        for r in range(3)
    ]
    assert sum(len(s) for s in shards) == 18  # truncated to a multiple of the world size
    assert len(set(torch.cat(shards).tolist())) == 18
    evals = [torch.cat([b.index for b in TensorBatches(data, 3, rank=r, world_size=3).batches()]) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == list(range(20))  # evaluation covers every sample once
    assert len(TensorBatches(data, 6, drop_last=True)) == 3
    with pytest.raises(ValueError, match="rank must be in"):
        TensorBatches(data, 3, rank=2, world_size=2)


# ------------------------------------------------------------------------------------ image folders


def test_image_folder_tensors_and_loader(tmp_path: Path) -> None:
    root = _tree(tmp_path / "train")
    split, classes = load_image_folder_tensors(root)
    assert classes == ["cat", "dog"]
    assert split.images.shape == (6, 3, 8, 8)
    assert split.images.dtype == torch.uint8
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    src = FolderBatches(root, 4, shuffle=True, seed=1)
    seen = torch.cat([b.index for b in src.batches(0)])
    assert sorted(seen.tolist()) == list(range(6))
    first = next(iter(src.all_batches(6)))
    assert torch.equal(first.images, split.images)  # same decoder, same order
    with pytest.raises(DataError, match="has classes"):
        load_image_folder_tensors(root, classes=["a", "b"])


def test_load_dataset_imagefolder_carves_validation(tmp_path: Path) -> None:
    _tree(tmp_path / "train", per_class=5)
    _tree(tmp_path / "test", per_class=2)
    d = load_dataset("auto", tmp_path, val_size=4)
    assert isinstance(d.train, TensorSplit)
    assert isinstance(d.val, TensorSplit)
    assert isinstance(d.test, TensorSplit)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 4, 4)
    assert d.num_classes == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named(tmp_path: Path, workers: int) -> None:
    root = _tree(tmp_path / "train")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"^cannot decode image .*broken\.jpg'") as exc:
        load_image_folder_tensors(root, num_workers=workers)
    assert "Traceback" not in str(exc.value)  # a worker's error comes back as one message


def test_images_of_different_sizes_are_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "train")
    _tree(tmp_path / "other", per_class=1, size=6, classes=("cat",))
    (tmp_path / "other" / "cat" / "0.jpg").rename(root / "cat" / "small.jpg")
    with pytest.raises(DataError, match="different sizes"):
        load_image_folder_tensors(root)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("imagefolder", "must contain train/ and test/"),
        ("cifar10", r"CIFAR-10 not found .*pass --download"),
        ("cifar100", r"CIFAR-100 not found .*cifar-100-python"),
        ("mnist", "unknown dataset 'mnist'"),
    ],
)
def test_missing_or_unknown_data_is_a_clear_error(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(name, tmp_path)


def test_missing_root_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("auto", tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist or is not a directory"):
        load_image_folder_tensors(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder_tensors(tmp_path / "empty")
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("cifar10", None)


def test_torchvision_cifar_reads_a_local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    import torchvision.datasets.cifar as tv

    monkeypatch.setattr(tv, "check_integrity", lambda *a, **k: True)  # our fake files have other checksums
    train, test, classes = load_torchvision_cifar(tmp_path)
    assert train.images.shape == (10, 3, 32, 32)
    assert test.images.shape == (2, 3, 32, 32)
    assert classes[0] == "c0"
    assert train.labels.tolist()[:2] == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_batches_from_cpu_storage_to_the_gpu() -> None:
    data = _split(20)
    src = TensorBatches(data, 8, "cuda", shuffle=True, seed=3, storage="cpu")
    on_gpu = TensorBatches(data, 8, "cuda", shuffle=True, seed=3)
    for a, b in zip(src.batches(1), on_gpu.batches(1)):
        assert a.images.is_cuda
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.index, b.index)


def test_folder_batches_shard_across_ranks(tmp_path: Path) -> None:
    root = _tree(tmp_path / "train", per_class=5)
    evals = [torch.cat([b.index for b in FolderBatches(root, 2, rank=r, world_size=3).batches()]) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == list(range(10))  # every sample once, no padding
    sources = [FolderBatches(root, 2, shuffle=True, rank=r, world_size=2) for r in range(2)]
    train_idx, val_idx = split_indices(10, 3)
    assert sorted([*train_idx.tolist(), *val_idx.tolist()]) == list(range(10))
    val = FolderBatches(root, 8, indices=val_idx)
    assert val.num_samples == 3
    assert torch.equal(next(iter(val.batches())).labels, torch.tensor([0 if i < 5 else 1 for i in val_idx.tolist()]))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        FolderBatches(root, 2, indices=[10])
    train = [torch.cat([b.index for b in src.batches(1)]) for src in sources]
    assert set(train[0].tolist()).isdisjoint(train[1].tolist())


# ------------------------------------------------------------------------------------ decode="device"


def _varied_tree(root: Path, per_class: int = 5) -> Path:
    """JPEGs and one PNG per class, of different sizes (a resizing transform makes them equal)."""
    g = torch.Generator().manual_seed(2)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (3, 8 + i, 10 + 2 * i), dtype=torch.uint8, generator=g)
            data = encode_png(img) if i == 2 else encode_jpeg(img, quality=90)
            (root / c / f"{i}.{'png' if i == 2 else 'jpg'}").write_bytes(data.numpy().tobytes())
    return root


def _resize(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms import v2

    out: torch.Tensor = v2.Resize((7, 9), antialias=True)(x)
    return out


def _assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index)
        assert torch.equal(x.labels, y.labels)
        assert x.images.dtype == y.images.dtype == torch.uint8
        assert torch.equal(x.images, y.images)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("resize", [False, True])
def test_device_decode_on_cpu_gives_the_cpu_paths_batches(
    tmp_path: Path, workers: int, shuffle: bool, resize: bool
) -> None:
    root = _varied_tree(tmp_path / "train") if resize else _tree(tmp_path / "train", per_class=5)
    assert sorted({p.suffix for p in root.rglob("*.*")}) == [".jpg", ".png"]  # a PNG among the JPEGs
    kw = {"shuffle": shuffle, "seed": 5, "num_workers": workers, "transform": _resize if resize else None}
    cpu = FolderBatches(root, 3, decode="cpu", **kw)  # type: ignore[arg-type]
    dev = FolderBatches(root, 3, decode="device", **kw)  # type: ignore[arg-type]
    assert (cpu.decode, dev.decode) == ("cpu", "device")
    assert len(cpu) == len(dev) == 4
    for epoch in (0, 1):
        expected = list(cpu.batches(epoch))
        _assert_same_batches(list(dev.batches(epoch)), expected)
        assert sorted(torch.cat([b.index for b in expected]).tolist()) == list(range(10))
    _assert_same_batches(list(dev.all_batches(4)), list(cpu.all_batches(4)))


@pytest.mark.parametrize("shuffle", [False, True])
def test_device_decode_shards_across_ranks_like_the_cpu_path(tmp_path: Path, shuffle: bool) -> None:
    root = _tree(tmp_path / "train", per_class=5)
    for rank in range(3):
        kw = {"shuffle": shuffle, "seed": 2, "rank": rank, "world_size": 3}
        cpu = list(FolderBatches(root, 2, decode="cpu", **kw).batches(1))  # type: ignore[arg-type]
        _assert_same_batches(list(FolderBatches(root, 2, decode="device", **kw).batches(1)), cpu)  # type: ignore[arg-type]


def test_device_decode_random_transform_is_seeded_per_epoch_not_by_workers(tmp_path: Path) -> None:
    from torchvision.transforms import v2

    root = _varied_tree(tmp_path / "train")
    tf = v2.Compose([v2.RandomResizedCrop(6, antialias=True), v2.RandomHorizontalFlip()])

    def epoch(e: int, workers: int = 0, seed: int = 3) -> torch.Tensor:
        src = FolderBatches(root, 4, shuffle=True, seed=seed, transform=tf, num_workers=workers, decode="device")
        return torch.cat([b.images for b in src.batches(e)])

    state = torch.get_rng_state()
    first = epoch(0)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own random stream is left alone
    assert first.shape == (10, 3, 6, 6)
    assert torch.equal(epoch(0), first)
    assert torch.equal(epoch(0, workers=2), first)
    assert not torch.equal(epoch(1), first)
    assert not torch.equal(epoch(0, seed=4), first)


def test_device_decode_falls_back_when_the_batched_decoder_rejects_a_jpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.io

    root = _varied_tree(tmp_path / "train")
    unsupported = (root / "dog" / "1.jpg").read_bytes()
    real = torchvision.io.decode_jpeg
    calls = {"batched": 0, "alone": 0}

    def picky(data: torch.Tensor | list[torch.Tensor], **kw: object) -> object:
        """Rejects any list holding one JPEG, and that JPEG alone (as nvJPEG may, e.g. for CMYK)."""
        blobs = data if isinstance(data, list) else [data]
        calls["batched" if isinstance(data, list) else "alone"] += 1
        if any(x.numpy().tobytes() == unsupported for x in blobs):
            raise RuntimeError("unsupported by this decoder")
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    dev = list(FolderBatches(root, 4, transform=_resize, decode="device").batches())
    assert calls == {"batched": 3, "alone": 3}  # the batch holding it, then each of its 3 JPEGs alone
    _assert_same_batches(dev, list(FolderBatches(root, 4, transform=_resize, decode="cpu").batches()))


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(
    ("name", "data"),
    [("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("broken.png", b"nope")],
    ids=["jpeg-magic", "no-magic"],
)
def test_device_decode_corrupt_image_is_named(tmp_path: Path, workers: int, name: str, data: bytes) -> None:
    root = _tree(tmp_path / "train")
    (root / "dog" / name).write_bytes(data)
    src = FolderBatches(root, 4, num_workers=workers, decode="device")
    with pytest.raises(DataError, match=rf"^cannot decode image .*{name.replace('.', '[.]')}'") as exc:
        list(src.batches())
    assert "Traceback" not in str(exc.value)  # a worker's error comes back as one message


def test_device_decode_refuses_images_of_different_sizes_like_the_cpu_path(tmp_path: Path) -> None:
    root = _varied_tree(tmp_path / "train")
    errors = []
    for decode in ("cpu", "device"):
        with pytest.raises(DataError, match=r"different sizes in one batch: .*0\.jpg' is \(3, 8, 10\)") as exc:
            list(FolderBatches(root, 4, decode=decode).batches())  # type: ignore[arg-type]
        errors.append(str(exc.value))
    assert errors[0] == errors[1]


def test_decode_option_is_checked_and_auto_follows_the_device(tmp_path: Path) -> None:
    root = _tree(tmp_path / "train")
    with pytest.raises(ValueError, match=r"^decode must be one of 'auto', 'cpu', 'device', got 'gpu'$"):
        FolderBatches(root, 2, decode="gpu")  # type: ignore[arg-type]
    assert FolderBatches(root, 2).decode == "cpu"
    assert FolderBatches(root, 2, "cuda").decode == "device"  # nothing touches CUDA before iterating
    assert FolderBatches(root, 2, "cuda", decode="cpu").decode == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_decode_on_cuda_is_close_to_the_cpu_path(tmp_path: Path) -> None:
    from reference_trainers.recipes.hint_imagenette import make_synthetic_imagefolder

    root = make_synthetic_imagefolder(tmp_path, n_train=12, n_val=2, classes=3, short_side=40) / "train"
    kw = {"shuffle": True, "seed": 1, "transform": _resize}
    cpu = list(FolderBatches(root, 5, decode="cpu", **kw).batches())  # type: ignore[arg-type]
    dev = list(FolderBatches(root, 5, "cuda", num_workers=2, **kw).batches())  # type: ignore[arg-type]
    assert len(dev) == len(cpu)
    for a, b in zip(dev, cpu):
        assert a.images.is_cuda
        assert torch.equal(a.index.cpu(), b.index)
        assert torch.equal(a.labels.cpu(), b.labels)
        diff = (a.images.cpu().float() - b.images.float()).abs()
        assert float(diff.mean()) < 2.0  # nvJPEG's IDCT and upsampling differ slightly from libjpeg's
