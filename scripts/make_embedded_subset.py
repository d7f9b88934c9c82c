"""Rebuild reference_trainers/assets/cifar10_subset.pt.gz from the JPEG CIFAR-10 archive.

Usage: python scripts/make_embedded_subset.py <extracted cifar10-jpeg dir> [train_per_class] [test_per_class]

Takes the first N files per class (sorted file order) of train/ and test/, keeps the JPEG bytes
as they are (no re-encoding), packs them into one flat uint8 tensor per split with offsets, and
writes a gzip-compressed ``torch.save`` file that loads with ``weights_only=True``.
"""

from __future__ import annotations

import gzip
import io
import os
import sys

import torch


def _take(root: str, split: str, classes: list[str], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blobs, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, split, c)))[:n]:
            with open(os.path.join(root, split, c, f), "rb") as fh:
                blobs.append(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8))
            labels.append(ci)
    lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.cat(blobs), offsets, torch.tensor(labels, dtype=torch.int64)


def main() -> None:
    root = sys.argv[1]
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    n_test = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    classes = sorted(os.listdir(os.path.join(root, "train")))
    tr, tro, trl = _take(root, "train", classes, n_train)
    te, teo, tel = _take(root, "test", classes, n_test)
    obj = {
        "classes": classes,
        "train_bytes": tr,
        "train_offsets": tro,
        "train_labels": trl,
        "test_bytes": te,
        "test_offsets": teo,
        "test_labels": tel,
        "source": "CIFAR-10 (Krizhevsky 2009), JPEG q75 re-encoding; "
        f"first {n_train} train / {n_test} test images per class in sorted file order",
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = os.path.join(os.path.dirname(__file__), "..", "reference_trainers", "assets", "cifar10_subset.pt.gz")
    with gzip.open(out, "wb", compresslevel=9, mtime=0) as f:
        f.write(buf.getvalue())


if __name__ == "__main__":
    main()
