"""IntermediateHeads, head fine-tuning and the DIH / MHKD / self-distillation pipelines on real models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdloss import (
    CohortLoss,
    FrozenTeacher,
    IntermediateHeads,
    MultiHeadKDLoss,
    SelfDistillationLoss,
    evaluate_heads,
    finetune_heads,
)
from kdloss.functional import cohort_kd

torchvision = pytest.importorskip("torchvision")


# -- models ----------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, 6n+2 layers; n=1 is resnet8): three stages of 16/32/64 channels."""

    def __init__(self, n: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layer1 = nn.Sequential(*[BasicBlock(w[0], w[0], 1) for _ in range(n)])
        self.layer2 = nn.Sequential(BasicBlock(w[0], w[1], 2), *[BasicBlock(w[1], w[1], 1) for _ in range(n - 1)])
        self.layer3 = nn.Sequential(BasicBlock(w[1], w[2], 2), *[BasicBlock(w[2], w[2], 1) for _ in range(n - 1)])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), k


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


# -- torchvision resnet18, k = 4 ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "in_features"),
    [
        ("dih", [64 * 8 * 8, 128 * 4 * 4, 256 * 2 * 2, 512 * 1 * 1]),
        ("gap", [64, 128, 256, 512]),
        ("mhkd", [64, 128, 256, 512]),
        ("tofd", [512, 512, 512, 512]),
    ],
)
def test_heads_on_torchvision_resnet18(resnet18: nn.Module, head: str, in_features: list[int]) -> None:
    model = resnet18.train()  # train mode on purpose: the example forward must not move BN statistics
    before = _snapshot(model)
    heads = IntermediateHeads(
        model, ["layer1", "layer2", "layer3", "layer4"], 10, example_input=torch.randn(2, 3, 32, 32), head=head
    )  # type: ignore[arg-type]
    assert heads.k == 4
    assert [h.fc.in_features for h in heads.heads] == in_features  # type: ignore[union-attr]
    assert model.training  # modes restored
    out = heads(torch.randn(3, 3, 32, 32))
    assert out.cohort().shape == (5, 3, 10)
    assert [f.shape[1] for f in out.head_features] == in_features
    assert not out.logits.requires_grad  # detach=True: the backbone is read as a frozen teacher
    assert all(hl.requires_grad for hl in out.head_logits)
    _assert_identical(model, before)
    assert _no_hooks(model)
    # the heads own their parameters only; the backbone is referenced, not registered
    backbone_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in backbone_ids for p in heads.parameters())
    assert all(k.startswith("heads.") for k in heads.state_dict())


def test_tofd_heads_are_fresh_copies_of_the_remaining_stages(resnet18: nn.Module) -> None:
    heads = IntermediateHeads(resnet18, "layer*", 10, example_input=torch.randn(2, 3, 32, 32), head="tofd")
    assert heads.paths == ["layer1", "layer2", "layer3", "layer4"]
    first = heads.heads[0].body  # type: ignore[union-attr]
    # layer2, layer3, layer4 copies, then the pooling: deep copies with their own, re-drawn weights
    assert [type(m).__name__ for m in first] == ["Sequential", "Sequential", "Sequential", "_PoolFlatten"]
    copy_w, orig_w = first[2][0].conv1.weight, resnet18.layer4[0].conv1.weight
    assert copy_w.shape == orig_w.shape
    assert copy_w is not orig_w
    assert not torch.equal(copy_w, orig_w)
    assert copy_w.requires_grad
    last = heads.heads[3].body  # type: ignore[union-attr]
    assert [type(m).__name__ for m in last] == ["_PoolFlatten"]


def test_heads_on_cifar_resnet_k3_with_finetune_and_cohort_step() -> None:
    """The DIH pipeline in a user's own loop, on a CIFAR ResNet (k = 3 for CIFAR ResNets, as in the DIH paper)."""
    torch.manual_seed(0)
    teacher = CifarResNet(n=1).eval().requires_grad_(False)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    heads = IntermediateHeads(teacher, ["layer1", "layer2", "layer3"], 10, example_input=x[:2])
    assert [h.fc.in_features for h in heads.heads] == [16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8]  # type: ignore[union-attr]
    before = _snapshot(teacher)
    result = finetune_heads(heads, [(x[:8], y[:8]), (x[8:], y[8:])], epochs=2, lr=1e-3)
    assert result.steps == 4
    assert result.backbone_unchanged
    _assert_identical(teacher, before)

    student = CifarResNet(n=1, width=8)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    criterion = CohortLoss(temperature=5.0, alpha=0.1)
    heads.eval()
    with torch.no_grad():
        cohort = heads(x).cohort()
    assert cohort.shape == (4, 16, 10)
    loss, parts = criterion(student(x), cohort, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert sorted(parts) == ["ce", "kd/0", "kd/1", "kd/2", "kd/3", "total"]
    assert student.conv1.weight.grad is not None
    _assert_identical(teacher, before)


# -- fine-tuning on real data --------------------------------------------------------------------
def _cifar_subset() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from reference_trainers.data import load_embedded_cifar10

    data = load_embedded_cifar10()
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(data.train.images.shape[0], generator=g)[:2000]
    te = torch.randperm(data.test.images.shape[0], generator=g)[:500]
    x_tr, x_te = data.train.images[tr].float().div(255), data.test.images[te].float().div(255)
    mean, std = x_tr.mean(dim=(0, 2, 3), keepdim=True), x_tr.std(dim=(0, 2, 3), keepdim=True)
    return (x_tr - mean) / std, data.train.labels[tr], (x_te - mean) / std, data.test.labels[te]


def test_finetune_heads_on_real_cifar10_improves_every_head_and_keeps_backbone_bit_identical() -> None:
    """Random-feature frozen CNN (with BatchNorm), DIH heads on its 3 stages, 2,000 real CIFAR-10 images."""
    x_tr, y_tr, x_te, y_te = _cifar_subset()
    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int = 1) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    backbone = nn.Sequential(
        block(3, 16, stride=2), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)
    )
    backbone.train().requires_grad_(False)  # left in train mode: the helper must still not move BN statistics
    before = _snapshot(backbone)
    heads = IntermediateHeads(backbone, ["0", "1", "2"], 10, example_input=x_tr[:2])
    train = list(zip(x_tr.split(100), y_tr.split(100)))
    test = list(zip(x_te.split(250), y_te.split(250)))
    acc_before = evaluate_heads(heads, test)
    result = finetune_heads(heads, train, epochs=4, lr=2e-3)
    acc_after = evaluate_heads(heads, test)
    _assert_identical(backbone, before)
    assert result.backbone_unchanged
    assert backbone.training
    for i in range(heads.k):
        assert acc_after[i] > 0.2, (acc_before, acc_after)  # chance is 0.1 (500 images: sd 0.013)
        assert acc_after[i] > acc_before[i] + 0.05, (acc_before, acc_after)
    assert acc_after[-1] == acc_before[-1]  # the backbone's own classifier did not move
    assert all(later < earlier for earlier, later in zip([2.31] * 3, result.head_losses))


# -- fine-tuning guards -----------------------------------------------------------------------------
def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_finetune_refuses_trainable_backbone_unless_told() -> None:
    net = _tiny()
    heads = IntermediateHeads(net, ["1"], 3, example_input=torch.zeros(2, 3, 4, 4))
    data = [(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ValueError, match=r"must be frozen .* 6 of its parameters still require grad: 0.weight, 0.bias"):
        finetune_heads(heads, data)
    before = _snapshot(net)
    result = finetune_heads(heads, data, allow_trainable_backbone=True)
    assert result.steps == 1
    _assert_identical(net, before)
    net.requires_grad_(False)
    with pytest.raises(ValueError, match=r"optimizer is missing 2 trainable adapter parameter"):
        finetune_heads(heads, data, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        finetune_heads(heads, data, epochs=0)
    with pytest.raises(ValueError, match="yielded no"):
        finetune_heads(heads, [])
    wrapped = IntermediateHeads(FrozenTeacher(_tiny()), ["1"], 3, example_input=torch.zeros(2, 3, 4, 4))
    assert finetune_heads(wrapped, data).steps == 1


class _Counter(nn.Module):
    """Changes a buffer on every forward: what the bit-identity proof must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


def test_finetune_detects_a_backbone_that_changed() -> None:
    net = nn.Sequential(nn.Linear(4, 4), _Counter(), nn.Linear(4, 2)).requires_grad_(False)
    heads = IntermediateHeads(net, ["0"], 2, example_input=torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"backbone changed during head fine-tuning .*\['1.calls'\]"):
        finetune_heads(heads, [(torch.randn(3, 4), torch.tensor([0, 1, 1]))])


# -- bad input -------------------------------------------------------------------------------------
class _TupleStage(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = _TupleStage()
        self.unused = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stage(x)[0])


def test_heads_bad_input(resnet18: nn.Module) -> None:
    ex = torch.zeros(2, 3, 32, 32)
    with pytest.raises(
        KeyError, match=r"path 'layer5' matches no submodule of ResNet; closest names: layer4, layer3, layer2, layer1"
    ):
        IntermediateHeads(resnet18, ["layer1", "layer5"], 10, example_input=ex)
    with pytest.raises(ValueError, match=r"cannot infer the input size of the head at 'stage': its output is a tuple"):
        IntermediateHeads(_TupleNet(), ["stage"], 10, example_input=torch.zeros(2, 4))
    with pytest.raises(
        ValueError, match=r"cannot infer the input size of the head at 'unused': the module was not called"
    ):
        IntermediateHeads(_TupleNet(), ["unused"], 10, example_input=torch.zeros(2, 4))
    with pytest.raises(
        ValueError, match=r"cannot infer the input size of the 'gap' head at 'fc': it needs a \(B, C, H, W\)"
    ):
        IntermediateHeads(resnet18, ["fc"], 10, example_input=ex, head="gap")
    with pytest.raises(
        ValueError, match=r"cannot infer the input size of the 'tofd' head at 'layer1': running its body"
    ):
        IntermediateHeads(resnet18, ["layer1"], 10, example_input=ex, head="tofd", stages=["layer1", "layer3"])
    with pytest.raises(ValueError, match=r"needs every head path among stages.*missing \['layer2'\]"):
        IntermediateHeads(resnet18, ["layer2"], 10, example_input=ex, head="tofd", stages=["layer1", "layer3"])
    with pytest.raises(ValueError, match=r"same classes: the heads predict num_classes=100 but ResNet returns 10"):
        IntermediateHeads(resnet18, ["layer1"], 100, example_input=ex)
    with pytest.raises(RuntimeError, match=r"example forward of ResNet failed on example_input \[\(2, 1, 32, 32\)\]"):
        IntermediateHeads(resnet18, ["layer1"], 10, example_input=torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="head must be one of 'dih', 'gap', 'mhkd', 'tofd', got 'big'"):
        IntermediateHeads(resnet18, ["layer1"], 10, example_input=ex, head="big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        IntermediateHeads(resnet18, ["layer1"], 0, example_input=ex)
    assert _no_hooks(resnet18)


# -- self-distillation and MHKD on torchvision ResNets -------------------------------------------
def test_self_distillation_on_torchvision_resnet18_by_paths() -> None:
    torch.manual_seed(0)
    student = torchvision.models.resnet18(num_classes=10)
    exits = IntermediateHeads(
        student,
        ["layer1", "layer2", "layer3"],
        10,
        example_input=torch.zeros(2, 3, 32, 32),
        head="tofd",
        stages=["layer1", "layer2", "layer3", "layer4"],
        feature_path="avgpool",
        detach=False,
    )
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = exits(x)
    assert out.final_feature is not None
    assert out.final_feature.shape == (4, 512)
    loss, parts = SelfDistillationLoss(temperature=3.0, alpha=0.3, beta=0.03)(
        out.head_logits, out.logits, y, out.head_features, out.final_feature
    )
    loss.backward()
    assert sorted(parts) == [
        "ce/0", "ce/1", "ce/2", "ce/final", "feat/0", "feat/1", "feat/2", "kd/0", "kd/1", "kd/2", "total"
    ]  # fmt: skip
    assert student.conv1.weight.grad is not None  # the exits' losses reach the shared backbone
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0  # type: ignore[union-attr]
    assert all(p.grad is not None for p in exits.parameters())


def test_mhkd_paired_heads_teacher_and_student() -> None:
    torch.manual_seed(0)
    teacher = CifarResNet(n=1, width=16).eval().requires_grad_(False)
    student = CifarResNet(n=1, width=8)
    ex = torch.zeros(2, 3, 32, 32)
    t_heads = IntermediateHeads(teacher, ["layer1", "layer2"], 10, example_input=ex, head="mhkd")
    s_heads = IntermediateHeads(student, ["layer1", "layer2"], 10, example_input=ex, head="mhkd", detach=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t_out = t_heads(x)
    s_out = s_heads(x)
    loss, parts = MultiHeadKDLoss(temperature=4.0, alpha=0.9)(
        [*s_out.head_logits, s_out.logits], [*t_out.head_logits, t_out.logits], y
    )
    loss.backward()
    assert sorted(parts)[:3] == ["ce/0", "ce/1", "ce/2"]
    assert student.conv1.weight.grad is not None
    direct = cohort_kd(s_out.logits.detach(), t_out.cohort(), y, temperature=4.0, alpha=0.9)
    assert torch.isfinite(direct.total)


# -- the reference trainers' models (reference_trainers.models, when present) ---------------------
DIH_K = {  # the DIH paper's k (heads) per teacher
    "resnet34": 4,
    "resnet18": 4,
    "vgg11_dih": 4,
    "wrn_28_2": 3,
    "resnet110": 3,
    "resnet20": 3,
    "resnet14": 3,
    "resnet8": 3,
}


@pytest.mark.parametrize("name", list(DIH_K))
def test_heads_on_reference_trainers_models_with_dih_k(name: str) -> None:
    models = pytest.importorskip("reference_trainers.models")
    torch.manual_seed(0)
    net = models.build_model(name, num_classes=100).requires_grad_(False)
    before = _snapshot(net)
    heads = IntermediateHeads(net, models.head_paths(name), 100, example_input=torch.zeros(2, 3, 32, 32))
    assert heads.k == DIH_K[name]
    assert heads(torch.randn(2, 3, 32, 32)).cohort().shape == (DIH_K[name] + 1, 2, 100)
    _assert_identical(net, before)


def test_docs_cohorts_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Every python block of docs/cohorts.md, in order, in one namespace (the page's own loop)."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "cohorts.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 5
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "True" in printed  # result.backbone_unchanged
    assert "'kd/4'" in printed or "kd/4" in printed
    assert "feat/2" in printed
    assert "'soft_ce/0'" in printed  # the DIH authors' TOFD


def test_clone_protects_stage_outputs_from_inplace_modules() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified in place after capture"):
        IntermediateHeads(net, ["0"], 2, example_input=x)(x)
    heads = IntermediateHeads(net, ["0"], 2, example_input=x, clone=True)
    out = heads(x)
    torch.testing.assert_close(out.head_features[0], net[0](x).flatten(1))  # the pre-ReLU values
