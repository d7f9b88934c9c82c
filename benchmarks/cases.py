"""The benchmark cases: each loss family at each size, as kdloss / naive / torch.compile(naive).

Shared by the pytest-benchmark suite (``benchmarks/test_losses.py``) and the standalone runner that
writes the results tables (``benchmarks/run_gpu.py``). The naive baselines are the textbook
formulations of ``tests/naive/``.

Byte counts (the bandwidth floor is ``bytes / measured copy bandwidth``): each input read once, each
output written once; scalars and the loss are ignored.

- logit losses (kd, kd_ce, jsd) over ``(N, C)`` logits of ``e`` bytes per element:
  forward ``2 N C e`` (student + teacher), forward+backward ``3 N C e`` (+ the student gradient),
  plus ``8 N`` for the int64 labels of kd_ce;
- hint + 1x1-conv adapter, student ``(B, Cs, H, W)``, teacher ``(B, Ct, H, W)``, weight ``Ct x Cs``:
  forward ``(B H W (Cs + Ct) + Cs Ct) e``, forward+backward adds ``(B H W Cs + Cs Ct) e`` (the student
  feature's and the weight's gradients). The 1x1 convolution's FLOPs (``2 B H W Cs Ct`` forward,
  3x for forward+backward) are not in the floor: for hint the floor is a bytes floor only;
- attention transfer over pairs ``(B, Cs_i, H_i, W_i)`` / ``(B, Ct_i, H_i, W_i)``: forward
  ``sum_i B H_i W_i (Cs_i + Ct_i) e``, forward+backward adds ``sum_i B H_i W_i Cs_i e``;
- CRD step (float32), batch ``B``, ``K`` negatives, embedding ``d``, feature width ``in``: forward
  ``(2 B (K+1) d + 2 B in + 2 in d + 2 B d) * 4`` (the gathered bank rows dominate), forward+backward
  adds ``(B in + 2 in d) * 4``;
- cohort KD of ``K`` teachers over ``(B, C)`` float32 logits: forward ``(K + 1) B C 4 + 8 B``,
  forward+backward adds ``B C 4``;
- fused linear + KD over ``N`` tokens, vocabulary ``V``, hidden size ``H`` (student and teacher):
  forward ``2 (N H + V H) e`` (hidden states and weights), forward+backward adds ``(N H + V H) e``
  (their gradients). Four ``N x V x H`` matmuls dominate (``8 N V H`` FLOPs forward+backward): for
  this family the bytes floor is far below what is reachable. Its own benchmark, with peak memory
  and Liger-Kernel beside it: ``benchmarks/bench_fused_linear.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdloss import ConvAdapter
from kdloss.functional import attention_loss, fused_linear_kd, hint_loss, kd_ce_loss, soft_kl
from tests import naive

Inputs = dict[str, Any]
LossFn = Callable[[Inputs], Tensor]

TEMPERATURE = 4.0
ALPHA = 0.9
JSD_BETA = 0.5

# Families not in the tables yet (listed under every results table). CRD and cohort KD have their
# own, more detailed suites too: benchmarks/test_bench_crd.py and benchmarks/test_bench_cohort.py.
PENDING_FAMILIES: dict[str, str] = {}


@dataclass
class Case:
    """One loss family at one size: how to make an input set, the implementations, the byte counts."""

    family: str
    size: str
    dtype: torch.dtype
    make: Callable[[torch.device, int], Inputs]
    impls: dict[str, LossFn]
    grads_of: Callable[[Inputs], list[Tensor]]
    bytes_fwd: int
    bytes_fwdbwd: int
    shape: str
    # per implementation, the module whose parameters a forward+backward step differentiates too
    modules: dict[str, nn.Module] = field(default_factory=dict)
    # compare kdloss with the baseline before timing (off for stateful steps whose state diverges)
    check: bool = True

    @property
    def id(self) -> str:
        return f"{self.family}-{self.size}-{str(self.dtype).removeprefix('torch.')}"


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- logit losses


def _logit_inputs(n: int, c: int, dtype: torch.dtype, labels: bool) -> Callable[[torch.device, int], Inputs]:
    def make(device: torch.device, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        s = (torch.randn(n, c, device=device, generator=g) * 2).to(dtype).requires_grad_(True)
        t = (torch.randn(n, c, device=device, generator=g) * 2).to(dtype)
        out: Inputs = {"s": s, "t": t}
        if labels:
            out["y"] = torch.randint(0, c, (n,), device=device, generator=g)
        return out

    return make


def _logit_case(family: str, size: str, n: int, c: int, dtype: torch.dtype) -> Case:
    e = _esize(dtype)
    labels = family == "kd_ce"
    impls: dict[str, LossFn]
    if family == "kd":
        impls = {
            "kdloss": lambda x: soft_kl(x["s"], x["t"], temperature=TEMPERATURE),
            "naive": lambda x: naive.kd_kl_div(x["s"], x["t"], TEMPERATURE),
        }
    elif family == "kd_ce":
        impls = {
            "kdloss": lambda x: kd_ce_loss(x["s"], x["t"], x["y"], alpha=ALPHA, temperature=TEMPERATURE),
            "naive": lambda x: naive.kd_ce(x["s"], x["t"], x["y"], TEMPERATURE, ALPHA),
        }
    elif family == "jsd":
        impls = {
            "kdloss": lambda x: soft_kl(x["s"], x["t"], temperature=TEMPERATURE, direction="jsd", jsd_weight=JSD_BETA),
            "naive": lambda x: naive.jsd(x["s"], x["t"], TEMPERATURE, JSD_BETA),
        }
    else:
        raise ValueError(f"unknown logit family {family!r}")
    return Case(
        family=family,
        size=size,
        dtype=dtype,
        make=_logit_inputs(n, c, dtype, labels),
        impls=impls,
        grads_of=lambda x: [x["s"]],
        bytes_fwd=2 * n * c * e + (8 * n if labels else 0),
        bytes_fwdbwd=3 * n * c * e + (8 * n if labels else 0),
        shape=f"{n}x{c}",
    )


# ----------------------------------------------------------------------------- hint + adapter


def _hint_case(size: str, b: int, cs: int, ct: int, hw: int, dtype: torch.dtype) -> Case:
    e = _esize(dtype)
    adapter = ConvAdapter(cs, ct, stale_check_steps=0)
    plain = nn.Conv2d(cs, ct, 1)
    plain.load_state_dict(adapter.conv.state_dict())

    def make(device: torch.device, seed: int) -> Inputs:
        adapter.to(device=device, dtype=dtype)  # the convolutions live with the inputs
        plain.to(device=device, dtype=dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        s = torch.randn(b, cs, hw, hw, device=device, generator=g).to(dtype).requires_grad_(True)
        t = torch.randn(b, ct, hw, hw, device=device, generator=g).to(dtype)
        return {"s": s, "t": t}

    return Case(
        family="hint",
        size=size,
        dtype=dtype,
        make=make,
        impls={
            "kdloss": lambda x: hint_loss(adapter(x["s"]), x["t"]),
            "naive": lambda x: naive.hint_mse(plain(x["s"]), x["t"]),
        },
        grads_of=lambda x: [x["s"]],
        bytes_fwd=(b * hw * hw * (cs + ct) + cs * ct) * e,
        bytes_fwdbwd=(b * hw * hw * (2 * cs + ct) + 2 * cs * ct) * e,
        shape=f"B={b} {cs}->{ct}ch {hw}x{hw}",
        modules={"kdloss": adapter, "naive": plain},
    )


def grads_of(case: Case, impl: str, x: Inputs) -> list[Tensor]:
    """The tensors whose gradients a forward+backward step computes for this implementation."""
    mod = case.modules.get("naive" if impl == "compiled" else impl)
    return case.grads_of(x) + (list(mod.parameters()) if mod is not None else [])


# ----------------------------------------------------------------------------- attention transfer


def _at_case(size: str, b: int, pairs: list[tuple[int, int, int]], dtype: torch.dtype) -> Case:
    """``pairs``: (student channels, teacher channels, spatial size) for each of the 3 pairs."""
    e = _esize(dtype)

    def make(device: torch.device, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        ss = [
            torch.randn(b, cs, hw, hw, device=device, generator=g).to(dtype).requires_grad_(True) for cs, _, hw in pairs
        ]
        ts = [torch.randn(b, ct, hw, hw, device=device, generator=g).to(dtype) for _, ct, hw in pairs]
        return {"s": ss, "t": ts}

    return Case(
        family="at",
        size=size,
        dtype=dtype,
        make=make,
        impls={
            "kdloss": lambda x: attention_loss(x["s"], x["t"]),
            "naive": lambda x: naive.at_loss(x["s"], x["t"]),
        },
        grads_of=lambda x: list(x["s"]),
        bytes_fwd=sum(b * hw * hw * (cs + ct) for cs, ct, hw in pairs) * e,
        bytes_fwdbwd=sum(b * hw * hw * (2 * cs + ct) for cs, ct, hw in pairs) * e,
        shape=f"B={b} " + ",".join(f"{cs}/{ct}ch@{hw}" for cs, ct, hw in pairs),
    )


# ----------------------------------------------------------------------------- CRD step


def _crd_case(size: str, b: int, k: int, d: int, n_data: int, in_dim: int) -> Case:
    """One CRD step: both heads, scores against both banks for the same given negatives, NCE, bank update.

    Bytes (float32): the ``B (K + 1)`` bank rows of ``d`` floats read from each bank dominate:
    forward ``(2 B (K+1) d + 2 B in + 2 in d + 2 B d) * 4`` (rows, features, head weights, bank
    writes); forward+backward adds ``(B in + 2 in d) * 4`` (feature and head gradients). Not compared
    with the baseline before timing: both update their banks every call (benchmarks/test_bench_crd.py
    checks that they do the same work).
    """
    from kdloss import CRDLoss
    from tests.naive.contrastive import NaiveCRD

    torch.manual_seed(0)
    crd = CRDLoss(in_dim, in_dim, n_data, feat_dim=d, n_negatives=k, validate=False)
    ref = NaiveCRD(in_dim, in_dim, n_data, d, k, update="index_copy")

    def make(device: torch.device, seed: int) -> Inputs:
        crd.to(device)
        ref.to(device)
        g = torch.Generator(device=device).manual_seed(seed)
        return {
            "fs": torch.randn(b, in_dim, device=device, generator=g).requires_grad_(True),
            "ft": torch.randn(b, in_dim, device=device, generator=g),
            "idx": torch.randperm(n_data, device=device, generator=g)[:b],
            "neg": torch.randint(0, n_data, (b, k), device=device, generator=g),
        }

    fwd = (2 * b * (k + 1) * d + 2 * b * in_dim + 2 * in_dim * d + 2 * b * d) * 4
    return Case(
        family="crd_step",
        size=size,
        dtype=torch.float32,
        make=make,
        impls={
            "kdloss": lambda x: crd(x["fs"], x["ft"], x["idx"], negatives=x["neg"]),
            "naive": lambda x: ref(x["fs"], x["ft"], x["idx"], x["neg"]),
        },
        grads_of=lambda x: [x["fs"]],
        bytes_fwd=fwd,
        bytes_fwdbwd=fwd + (b * in_dim + 2 * in_dim * d) * 4,
        shape=f"B={b} K={k} d={d} N={n_data}",
        modules={"kdloss": crd, "naive": ref},
        check=False,
    )


# ----------------------------------------------------------------------------- cohort KD


def _cohort_case(size: str, k: int, b: int, c: int) -> Case:
    """DIH cohort KD: one student against ``K`` teachers (heads) + CE, authors' form, T = 5, alpha = 0.1.

    Baseline: ``tests/naive/cohort.py``'s ``cohort_kl_div`` (one textbook log-softmax + kl_div per teacher).
    Bytes: forward ``(K + 1) B C e + 8 B`` (student and teachers read once, labels), forward+backward
    adds ``B C e``.
    """
    from kdloss import CohortLoss
    from tests.naive.cohort import cohort_kl_div

    loss = CohortLoss(temperature=5.0, alpha=0.1)

    def make(device: torch.device, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        return {
            "s": torch.randn(b, c, device=device, generator=g).requires_grad_(True),
            "t": torch.randn(k, b, c, device=device, generator=g),
            "y": torch.randint(0, c, (b,), device=device, generator=g),
        }

    return Case(
        family="cohort",
        size=size,
        dtype=torch.float32,
        make=make,
        impls={
            "kdloss": lambda x: loss(x["s"], x["t"], x["y"]).total,
            "naive": lambda x: cohort_kl_div(x["s"], list(x["t"].unbind(0)), x["y"], 5.0, 0.1),
        },
        grads_of=lambda x: [x["s"]],
        bytes_fwd=(k + 1) * b * c * 4 + 8 * b,
        bytes_fwdbwd=(k + 2) * b * c * 4 + 8 * b,
        shape=f"K={k} {b}x{c}",
    )


# ----------------------------------------------------------------------------- fused linear + KD


def _fused_linear_case(size: str, n: int, v: int, h: int, dtype: torch.dtype) -> Case:
    """``fused_linear_kd`` (forward KL, T = 1, default chunk size) against materialised logits + ``F.kl_div``."""
    e = _esize(dtype)

    def make(device: torch.device, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        return {
            "hs": torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_(True),
            "ws": (torch.randn(v, h, device=device, generator=g) * h**-0.5).to(dtype).requires_grad_(True),
            "ht": torch.randn(n, h, device=device, generator=g).to(dtype),
            "wt": (torch.randn(v, h, device=device, generator=g) * 2 * h**-0.5).to(dtype),
        }

    return Case(
        family="fused_linear",
        size=size,
        dtype=dtype,
        make=make,
        impls={
            "kdloss": lambda x: fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"]),
            "naive": lambda x: naive.lm_kl_div(x["hs"], x["ws"], x["ht"], x["wt"], 1.0),
        },
        grads_of=lambda x: [x["hs"], x["ws"]],
        bytes_fwd=2 * (n * h + v * h) * e,
        bytes_fwdbwd=3 * (n * h + v * h) * e,
        shape=f"{n}x{v}x{h}",
    )


# ----------------------------------------------------------------------------- the size tables


def gpu_cases() -> list[Case]:
    """The benchmark sizes: CIFAR, ImageNet and LM vocabularies for the logit losses."""
    f32, bf16 = torch.float32, torch.bfloat16
    logit_sizes = [
        ("cifar10", 256, 10, f32),
        ("cifar100", 256, 100, f32),
        ("imagenet", 4096, 1000, f32),
        ("imagenet", 4096, 1000, bf16),
        ("lm32k", 8192, 32000, bf16),
        ("lm128k", 4096, 128256, bf16),
    ]
    cases = [_logit_case(fam, *sz) for fam in ("kd", "kd_ce", "jsd") for sz in logit_sizes]
    cases.append(_hint_case("fitnets", 128, 64, 128, 16, f32))
    cases.append(_hint_case("fitnets", 128, 64, 128, 16, bf16))
    cases.append(_at_case("wrn-cifar", 128, [(16, 32, 32), (32, 64, 16), (64, 128, 8)], f32))
    cases.append(_crd_case("cifar-b64", 64, 16384, 128, 50_000, 256))
    cases.append(_crd_case("cifar-b256", 256, 16384, 128, 50_000, 256))
    cases.append(_cohort_case("dih-k5", 5, 1024, 1000))
    cases.append(_cohort_case("dih-k4", 4, 4096, 100))
    cases.append(_fused_linear_case("lm32k", 4096, 32000, 1024, f32))
    cases.append(_fused_linear_case("lm128k", 8192, 128256, 4096, bf16))
    return cases


def cpu_cases() -> list[Case]:
    """Tiny sizes so that ``pytest benchmarks/`` (each benchmark run once) stays within seconds on CPU."""
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [
        _logit_case(fam, *sz)
        for fam in ("kd", "kd_ce", "jsd")
        for sz in (("cifar100", 256, 100, f32), ("tiny-lm", 64, 2048, bf16))
    ]
    cases.append(_hint_case("tiny", 8, 16, 32, 8, f32))
    cases.append(_at_case("tiny", 8, [(4, 8, 16), (8, 16, 8), (16, 32, 4)], f32))
    cases.append(_crd_case("tiny", 16, 512, 32, 4096, 64))
    cases.append(_cohort_case("tiny", 4, 64, 100))
    cases.append(_fused_linear_case("tiny-lm", 128, 2048, 64, f32))
    return cases


def cases_for(device: torch.device) -> list[Case]:
    return gpu_cases() if device.type == "cuda" else cpu_cases()


@functools.cache
def _compiled(case_id: str, impl: Callable[[Inputs], Tensor]) -> Callable[[Inputs], Tensor]:
    return torch.compile(impl)  # type: ignore[return-value]


def implementation(case: Case, name: str) -> LossFn:
    """``"kdloss"``, ``"naive"`` or ``"compiled"`` (``torch.compile`` of the naive baseline)."""
    if name == "compiled":
        return _compiled(case.id, case.impls["naive"])
    return case.impls[name]


def step(case: Case, impl: str, fn: LossFn, mode: str) -> Callable[[Inputs], Any]:
    """The timed callable: the loss (``"fwd"``, under no_grad) or the loss and its gradients (``"fwdbwd"``)."""
    if mode == "fwd":

        def fwd(x: Inputs) -> Tensor:
            with torch.no_grad():
                return fn(x)

        return fwd

    def fwdbwd(x: Inputs) -> tuple[Tensor, ...]:
        loss = fn(x)
        return (loss, *torch.autograd.grad(loss, grads_of(case, impl, x)))

    return fwdbwd


def reference_check(case: Case, x: Inputs) -> None:
    """kdloss and the naive baseline compute the same value on ``x`` (so a benchmark cannot time a wrong loss)."""
    if not case.check:
        return
    with torch.no_grad():
        a = case.impls["kdloss"](x).float()
        b = case.impls["naive"](x).float()
    tol = 5e-2 if case.dtype != torch.float32 else 1e-4  # the naive baselines compute in the input dtype
    if not torch.allclose(a, b, rtol=tol, atol=tol):
        raise AssertionError(f"{case.id}: kdloss {a.item()} != naive {b.item()}")


__all__ = ["PENDING_FAMILIES", "Case", "cases_for", "cpu_cases", "gpu_cases", "implementation", "step"]
