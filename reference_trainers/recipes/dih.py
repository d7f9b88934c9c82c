"""``dih``: intermediate-classifier distillation and its baselines (Asadian et al., DIH, 2021).

The authors' README setting: teacher resnet110, student resnet8, SGD (lr 0.1, momentum 0.9,
weight decay 5e-4), batch 64, 200 epochs, lr x0.1 at epochs 60, 120 and 180, T = 5,
``alpha = 0.1`` (``kd`` is ``0.1 * KL_T^2 + 0.9 * CE``), seeds 30, 50, 67, CIFAR-100 (or
``--dataset cifar10``), crop + flip augmentation. Teachers of the paper: resnet34, resnet18,
vgg11_dih, wrn_28_2, resnet110, resnet20, resnet14, resnet8 (any registered model works).

Methods: ``kd``, ``fitnet2`` (FitNets in two stages: 40 epochs of hint training of the student
up to its guided layer with SGD nesterov, then KD), ``at``, ``ce`` and ``dih`` (k heads
fine-tuned on the frozen teacher with ``kdloss.finetune_heads``, ``--head-epochs``, then the
cohort teaches with ``kdloss.CohortLoss``, authors' form), ``crd`` (alpha 0.1, beta 0.03,
:mod:`reference_trainers.methods.contrastive`) and ``takd`` (``--ta MODEL``,
:mod:`reference_trainers.methods.logit`), and ``mhkd`` and ``tofd`` (paired heads on teacher and
student, :mod:`reference_trainers.methods.cohort`).

Differences from the authors, on purpose: checkpoints are selected on a validation split carved
from the training set, never on the test set (the authors selected on test).
"""

from __future__ import annotations

import argparse

from reference_trainers.recipes.cifar_kd import CifarDefaults, add_cifar_arguments, check_cifar, run_cifar_kd

NAME = "dih"
HELP = "DIH's setting (resnet110 -> resnet8, T 5, alpha 0.1): KD, two-stage FitNets, AT, the DIH cohort"

DEFAULTS = CifarDefaults(
    teacher="resnet110",
    student="resnet8",
    methods=("ce", "kd", "fitnet2", "at", "dih"),
    seeds=(30, 50, 67),
    epochs=200,
    lr=0.1,
    milestones=(60, 120, 180),
    gamma=0.1,
    weight_decay=5e-4,
    batch_size=64,
    temperature=5.0,
    ce_weight=0.9,
    kd_weight=0.1,
    dataset="cifar100",
)

HEADS_PER_TEACHER = {
    "resnet34": 4,
    "resnet18": 4,
    "vgg11_dih": 4,
    "wrn_28_2": 3,
    "resnet110": 3,
    "resnet20": 3,
    "resnet14": 3,
    "resnet8": 3,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_cifar_arguments(p, DEFAULTS)


def check(args: argparse.Namespace) -> None:
    check_cifar(args, NAME)


def run(args: argparse.Namespace) -> int:
    return run_cifar_kd(args, NAME, DEFAULTS, {"heads_k": HEADS_PER_TEACHER.get(args.teacher)})
