"""Student-step throughput of the reference trainers against a plain fp32 batch-64 loop (the trainers' target).

The target, for ``dih`` / ``benchmark-cifar100`` (resnet32x4 -> resnet8x4 on 32x32 images,
100 classes), for a student step with an online teacher at least 9x a plain fp32 batch-64
loop (at least 40,000 images/s on one H100), and at least 20x with cached teacher outputs.
This script times, in one process, with the rounds interleaved so that drift hits all rows alike:

- ``plain fp32 b64``: the textbook loop. Eager fp32, NCHW, batch 64, the teacher's forward
  under ``no_grad``, the student's forward, the KL (softmax / log_softmax / ``kl_div``) with T^2
  plus CE, backward, and an SGD step.
- ``engine online``: what ``train_run`` does per batch. ``KDStep`` (kdloss's ``KDLoss``) and
  ``TeacherOutputs``; bf16 autocast and channels-last on CUDA; ``--batch``; ``--compile``
  compiles the student as ``--compile`` in the recipes does.
- ``engine cached``: the same with the teacher's logits gathered from a precomputed tensor, as
  the engine's teacher cache does when the pipeline is deterministic.

Images are already on the device (the engine keeps CIFAR on the GPU as uint8), so the data
path is not timed. The augmentation is not timed either: the target is the step's throughput.

    PYTHONPATH=. python benchmarks/test_bench_trainer_step.py --device cuda --batch 64 512 --json tp.json
    PYTHONPATH=. python benchmarks/test_bench_trainer_step.py --device cuda --batch 512 --compile
    PYTHONPATH=. python benchmarks/test_bench_trainer_step.py --device cpu --teacher resnet8 --student resnet8 --steps 3

The test at the bottom runs the CPU form with tiny models, so the script cannot rot in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from reference_trainers.methods import KDStep, TeacherOutputs
from reference_trainers.models import build_model

TEMPERATURE, KD_WEIGHT, CE_WEIGHT = 4.0, 0.9, 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """Models, data on the device and the three step functions for one batch size."""

    def __init__(self, a: argparse.Namespace, batch: int) -> None:
        self.device = torch.device(a.device)
        self.batch = batch
        cuda = self.device.type == "cuda"
        torch.manual_seed(0)
        n = max(batch, a.images)
        self.images = torch.randn(n, 3, a.size, a.size, device=self.device)
        self.labels = torch.randint(0, a.classes, (n,), device=self.device)
        self.n = n

        # the plain loop: its own fp32 models
        self.p_teacher = build_model(a.teacher, a.classes).to(self.device).eval().requires_grad_(False)
        self.p_student = build_model(a.student, a.classes).to(self.device)
        self.p_opt = torch.optim.SGD(self.p_student.parameters(), lr=0.01, momentum=0.9)

        # the engine's step: KDStep + TeacherOutputs, bf16 autocast and channels-last on CUDA
        teacher = build_model(a.teacher, a.classes)
        self.e_teacher = TeacherOutputs(teacher).to(self.device)
        self.e_step = KDStep(
            build_model(a.student, a.classes), temperature=TEMPERATURE, kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT
        ).to(self.device)
        if cuda:
            self.e_teacher.to(memory_format=torch.channels_last)
            self.e_step.to(memory_format=torch.channels_last)
            self.images_cl = self.images.contiguous(memory_format=torch.channels_last)
        else:
            self.images_cl = self.images
        if a.compile:
            self.e_step.student.compile()
        self.e_opt = torch.optim.SGD(self.e_step.parameters(), lr=0.01, momentum=0.9)
        self.amp = cuda and not a.no_amp
        with torch.no_grad(), self._autocast():
            self.cache = torch.cat(
                [self.e_teacher(self.images_cl[i : i + 512])["logits"].float() for i in range(0, n, 512)]
            )
        self._pos = 0

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def _next(self) -> slice:
        if self._pos + self.batch > self.n:
            self._pos = 0
        s = slice(self._pos, self._pos + self.batch)
        self._pos += self.batch
        return s

    def plain(self, batch: int = 64) -> Callable[[], None]:
        def step() -> None:
            if self._pos + batch > self.n:
                self._pos = 0
            s = slice(self._pos, self._pos + batch)
            self._pos += batch
            x, y = self.images[s], self.labels[s]
            with torch.no_grad():
                t = self.p_teacher(x)
            logits = self.p_student(x)
            kd = F.kl_div(
                F.log_softmax(logits / TEMPERATURE, dim=1), F.softmax(t / TEMPERATURE, dim=1), reduction="batchmean"
            )
            loss = KD_WEIGHT * kd * TEMPERATURE**2 + CE_WEIGHT * F.cross_entropy(logits, y)
            self.p_opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.p_opt.step()

        return step

    def engine(self, cached: bool) -> Callable[[], None]:
        def step() -> None:
            s = self._next()
            x, y = self.images_cl[s], self.labels[s]
            if cached:
                t_out = {"logits": self.cache[s]}
            else:
                with torch.no_grad(), self._autocast():
                    t_out = self.e_teacher(x)
            with self._autocast():
                out = self.e_step(x, y, t_out)
            self.e_opt.zero_grad(set_to_none=True)
            out.total.backward()
            self.e_opt.step()

        return step


def images_per_s(fn: Callable[[], None], batch: int, device: torch.device, steps: int) -> float:
    """Images per second over ``steps`` steps after the caller's warm-up (one synchronisation at each end)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def measure(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for batch in a.batch:
        s = Setup(a, batch)
        fns: dict[str, tuple[Callable[[], None], int]] = {
            "plain fp32 b64": (s.plain(64), 64),
            "engine online": (s.engine(cached=False), batch),
            "engine cached": (s.engine(cached=True), batch),
        }
        for fn, _ in fns.values():  # warm-up (and compilation)
            for _ in range(a.warmup):
                fn()
        rates: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.rounds):
            for name, (fn, b) in fns.items():
                rates[name].append(images_per_s(fn, b, s.device, a.steps))
        base = statistics.median(rates["plain fp32 b64"])
        for name, r in rates.items():
            med = statistics.median(r)
            rows.append({"batch": fns[name][1], "impl": name, "images_per_s": med, "vs_plain": med / base})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32, help="image side (32 for CIFAR)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 512], help="batch sizes of the engine's step")
    p.add_argument("--images", type=int, default=4096, help="images held on the device (cycled)")
    p.add_argument("--steps", type=int, default=50, help="steps per timed window")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed windows per row (median)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's student")
    p.add_argument("--no-amp", action="store_true", help="engine rows in fp32 (no bf16 autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU); 0 keeps the default")
    p.add_argument("--json", default="", help="write the rows and the environment to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# student step {a.teacher} -> {a.student}, {a.size}px, {a.classes} classes")
    print(f"# {hw}, torch {torch.__version__}")
    print(f"# compile={a.compile} amp={not a.no_amp and dev.type == 'cuda'}, {a.rounds} rounds x {a.steps} steps")
    rows = measure(a)
    print("| impl | batch | images/s | x plain fp32 b64 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['batch']} | {r['images_per_s']:.0f} | {r['vs_plain']:.2f}x |")
    if a.json:
        meta = {"device": hw, "torch": torch.__version__, "args": vars(a)}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


def test_cpu_form_runs_and_reports_every_row() -> None:
    models = ["--device", "cpu", "--teacher", "resnet8", "--student", "resnet8", "--classes", "10", "--size", "16"]
    rows = main([*models, "--batch", "8", "--images", "16", "--steps", "1", "--rounds", "1", "--warmup", "1"])
    assert [r["impl"] for r in rows] == ["plain fp32 b64", "engine online", "engine cached"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["vs_plain"] == 1.0


if __name__ == "__main__":
    main()
