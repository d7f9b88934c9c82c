"""``benchmark-cifar100``: the community CIFAR-100 KD benchmark (RepDistiller, Tian et al., CRD, ICLR 2020).

SGD (lr 0.05, momentum 0.9, weight decay 5e-4), batch 64, 240 epochs, lr x0.1 at epochs 150,
180 and 210; random crop (4-pixel padding) and horizontal flip; T = 4. ``kd`` is
``0.1 * CE + 0.9 * KL_T^2``; ``fitnet`` is ``CE + 100 * MSE`` on the benchmark's hint layers
with a trainable 3x3 conv-BN-ReLU regressor; ``at`` is ``CE + 1000 * AT`` on every stage pair;
every method of :data:`reference_trainers.methods.METHODS` can be selected
(``--method kd,fitnet,at,dkd``). The teacher is trained once (first seed) with the same
schedule, or loaded with ``--teacher-checkpoint`` (the benchmark's published ``ckpt_epoch_240.pth``
files load as they are). Pairs (``--teacher``/``--student``): resnet110/resnet32,
resnet32x4/resnet8x4 (default), wrn_40_2/wrn_16_2, vgg13/vgg8, resnet56/resnet20.

Differences from the benchmark, on purpose: 5,000 training images are held out for validation
(``--val-size 0`` trains on all 50,000) and the reported test accuracy is the one of the epoch
selected on validation, next to the last epoch's; the benchmark reported the best test epoch.
"""

from __future__ import annotations

import argparse

from reference_trainers.recipes.cifar_kd import CifarDefaults, add_cifar_arguments, check_cifar, run_cifar_kd

NAME = "benchmark-cifar100"
HELP = "the community benchmark on CIFAR-100: KD, FitNet, AT, ... for its teacher/student pairs"

DEFAULTS = CifarDefaults(
    teacher="resnet32x4",
    student="resnet8x4",
    methods=("ce", "kd", "fitnet", "at"),
    seeds=(0, 1, 2),
    epochs=240,
    lr=0.05,
    milestones=(150, 180, 210),
    gamma=0.1,
    weight_decay=5e-4,
    batch_size=64,
    temperature=4.0,
    ce_weight=0.1,
    kd_weight=0.9,
    dataset="cifar100",
)

PUBLISHED = {
    # teacher -> student: teacher / student alone / KD / FitNet / AT / CRD top-1 (%), best epoch, CIFAR-100
    "resnet110->resnet32": {"teacher": 74.31, "ce": 71.14, "kd": 73.08, "fitnet": 71.06, "at": 72.31, "crd": 73.48},
    "resnet32x4->resnet8x4": {"teacher": 79.42, "ce": 72.50, "kd": 73.33, "fitnet": 73.50, "at": 73.44, "crd": 75.51},
    "wrn_40_2->wrn_16_2": {"teacher": 75.61, "ce": 73.26, "kd": 74.92, "fitnet": 73.58, "at": 74.08, "crd": 75.48},
    "vgg13->vgg8": {"teacher": 74.64, "ce": 70.36, "kd": 72.98, "fitnet": 71.02, "at": 71.43, "crd": 73.94},
    "resnet56->resnet20": {
        "teacher": 72.34,
        "ce": 69.06,
        "kd": 70.66,
        "fitnet": 69.21,
        "at": 70.55,
        "crd": 71.16,
        "dkd": 71.97,
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_cifar_arguments(p, DEFAULTS)


def check(args: argparse.Namespace) -> None:
    check_cifar(args, NAME)


def run(args: argparse.Namespace) -> int:
    pair = f"{args.teacher}->{args.student}"
    published = PUBLISHED.get(pair)
    return run_cifar_kd(args, NAME, DEFAULTS, {"pair": pair, "published_top1_best_epoch": published})
