"""reference_trainers.data: loaders, validation split, batch sources, batched augmentation, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from reference_trainers.data import (
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
