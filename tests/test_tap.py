"""FeatureTap: hook lifetime, path resolution, memory, graph handling, wrappers and torch.compile."""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kdloss import FeatureTap, FrozenTeacher, unwrap_model

torchvision = pytest.importorskip("torchvision")


def _mlp(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 2))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- hook lifetime ---------------------------------------------------------------------------------


def test_hooks_removed_after_exit(resnet: nn.Module, image: torch.Tensor) -> None:
    assert _hook_count(resnet) == 0
    with FeatureTap(resnet, ["layer3.1", "layer*.0"]) as tap:
        assert _hook_count(resnet) == 1 + 5  # the step-clearing pre-hook + one per module
        assert tap.attached
        resnet(image)
    assert _hook_count(resnet) == 0
    assert not tap.attached


def test_hooks_removed_when_body_raises(resnet: nn.Module, image: torch.Tensor) -> None:
    tap = FeatureTap(resnet, "layer2")

    def body() -> None:
        with tap:
            resnet(image)
            raise ZeroDivisionError("inside the block")

    with pytest.raises(ZeroDivisionError, match="inside the block"):
        body()
    assert _hook_count(resnet) == 0
    assert not tap.attached
    assert "layer2" not in tap  # captured tensors dropped too


def test_hooks_removed_when_forward_raises() -> None:
    net = _mlp()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), FeatureTap(net, "0"):
        net(torch.randn(2, 5))
    assert _hook_count(net) == 0


def test_attach_twice_is_an_error() -> None:
    net = _mlp()
    with FeatureTap(net, "0") as tap, pytest.raises(RuntimeError, match="already attached"):
        tap.attach()
    assert _hook_count(net) == 0


# -- paths -------------------------------------------------------------------------------------------


def test_wrong_path_lists_close_names(resnet: nn.Module) -> None:
    with pytest.raises(KeyError, match=r"path 'layer3\.7' matches no submodule of ResNet; closest names: .*layer3\.1"):
        FeatureTap(resnet, "layer3.7")
    with pytest.raises(KeyError, match=r"'layr2' matches no submodule.*closest names: layer2"):
        FeatureTap(resnet, ["layer1", "layr2"])


def test_wrong_glob_lists_names(resnet: nn.Module) -> None:
    with pytest.raises(KeyError, match=r"'layer9\*' matches no submodule.*closest names: layer"):
        FeatureTap(resnet, "layer9*")


@pytest.mark.parametrize("paths", ["", "   ", [""], []])
def test_empty_path_refused(paths: str | list[str]) -> None:
    with pytest.raises(ValueError, match=r"non-empty submodule name|at least one submodule"):
        FeatureTap(_mlp(), paths)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        FeatureTap(lambda x: x, "0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("layer*.0", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
        ("layer[12].?", ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]),
        ("layer4.*.conv1", ["layer4.0.conv1", "layer4.1.conv1"]),
        ("layer4.**.0", ["layer4.0", "layer4.0.downsample.0"]),
        ("layer[!123].1", ["layer4.1"]),
    ],
)
def test_glob_patterns(resnet: nn.Module, pattern: str, expected: list[str]) -> None:
    assert list(FeatureTap(resnet, pattern).modules) == expected


def test_resnet18_paths_and_shapes(resnet: nn.Module, image: torch.Tensor) -> None:
    r = resnet
    expected = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(image)))))))  # before the tap exists
    with FeatureTap(resnet, ["layer3.1", "layer*.0"], detach=True) as tap:
        out = resnet(image)
        shapes = {p: tuple(tap[p].shape) for p in tap}
        torch.testing.assert_close(tap["layer3.1"], expected)
        assert tap.order == ["layer1.0", "layer2.0", "layer3.0", "layer3.1", "layer4.0"]
    assert out.shape == (2, 1000)
    assert shapes == {
        "layer3.1": (2, 256, 2, 2),
        "layer1.0": (2, 64, 8, 8),
        "layer2.0": (2, 128, 4, 4),
        "layer3.0": (2, 256, 2, 2),
        "layer4.0": (2, 512, 1, 1),
    }


# -- memory ------------------------------------------------------------------------------------------


def test_nothing_retained_across_steps(resnet: nn.Module, image: torch.Tensor) -> None:
    with FeatureTap(resnet, "layer3.1") as tap:
        resnet(image)
        first = weakref.ref(tap["layer3.1"])
        gc.collect()
        assert first() is not None
        resnet(image)  # the next step drops the previous capture
        gc.collect()
        assert first() is None
        last = weakref.ref(tap["layer3.1"])
    gc.collect()
    assert last() is None  # and the exit drops the last one
    assert tap.features == {}


def test_no_growth_over_many_steps() -> None:
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    refs = []
    with FeatureTap(net, ["0", "2"]) as tap:
        for _ in range(200):
            out = net(torch.randn(8, 4))
            (out.square().mean() + tap["0"].square().mean()).backward()
            opt.step()
            opt.zero_grad()
            refs.append(weakref.ref(tap["0"]))
            assert [len(v) for v in tap._outputs.values()] == [1, 1]
            assert tap.order == ["0", "2"]
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_clear_by_hand() -> None:
    net = _mlp()
    with FeatureTap(net, "0") as tap:
        net(torch.randn(3, 4))
        assert "0" in tap
        tap.clear()
        assert "0" not in tap
        assert tap.order == []


# -- graph -------------------------------------------------------------------------------------------


def test_detach_true_has_no_graph() -> None:
    net = _mlp()
    with FeatureTap(net, "0", detach=True) as tap:
        net(torch.randn(3, 4))
        assert not tap["0"].requires_grad
        assert tap["0"].grad_fn is None


def test_detach_false_backprops_into_the_model(resnet: nn.Module, image: torch.Tensor) -> None:
    resnet.zero_grad(set_to_none=True)
    with FeatureTap(resnet, "layer3.1") as tap:
        resnet(image)
        feature = tap["layer3.1"]
        assert feature.requires_grad
        feature.square().mean().backward()
    assert resnet.layer3[1].conv2.weight.grad is not None
    assert resnet.layer1[0].conv1.weight.grad is not None
    assert resnet.layer4[0].conv1.weight.grad is None  # after the tap: no gradient flows there
    resnet.zero_grad(set_to_none=True)


# -- repeated calls, outputs ---------------------------------------------------------------------------


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.block(x)))


def test_repeated_calls_recorded_in_order() -> None:
    net = _Shared()
    x = torch.randn(3, 4)
    once, twice = net.block(x), net.block(net.block(x))
    with FeatureTap(net, ["block", "head"], detach=True) as tap:
        net(x)
        first, second = tap.calls("block")
        torch.testing.assert_close(first, once)
        torch.testing.assert_close(second, twice)
        assert tap["block"] is second
        assert tap.order == ["block", "block", "head"]
        net(x)
        assert len(tap.calls("block")) == 2  # cleared per step, not accumulated


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return out


def test_non_tensor_output_and_reading_errors() -> None:
    net = _TupleOut()
    tap = FeatureTap(net, "lstm")
    with tap:
        with pytest.raises(KeyError, match="'lstm' has not been called since the last clear: run the model"):
            tap["lstm"]
        net(torch.randn(2, 5, 4))
        with pytest.raises(TypeError, match=r"the output of 'lstm' is a tuple, not a tensor; use tap.get\('lstm'\)"):
            tap["lstm"]
        out, (h, c) = tap.get("lstm")
        assert out.shape == (2, 5, 3)
        assert h.shape == c.shape == (1, 2, 3)
        with pytest.raises(KeyError, match="'head' is not tapped; tapped paths: lstm"):
            tap.get("head")
        assert list(tap) == ["lstm"]
        assert len(tap) == 1
        assert "attached" in repr(tap)
    with pytest.raises(KeyError, match="dropped when the `with` block exits"):
        tap.get("lstm")


# -- in-place modules ------------------------------------------------------------------------------------


def test_inplace_relu_after_tap_raises_and_clone_fixes_it() -> None:
    net = _mlp(inplace=True)
    x = torch.randn(16, 4)
    expected = net[0](x)
    assert (expected < 0).any()  # the ReLU really changes something
    with FeatureTap(net, "0", detach=True) as tap:
        net(x)
        with pytest.raises(RuntimeError, match=r"captured at '0' was modified in place.*clone=True"):
            tap["0"]
    with FeatureTap(net, "0", detach=True, clone=True) as tap:
        net(x)
        torch.testing.assert_close(tap["0"], expected)


# -- wrappers ----------------------------------------------------------------------------------------------


def test_data_parallel_paths_without_prefix() -> None:
    net = _mlp()
    dp = nn.DataParallel(net)
    x = torch.randn(3, 4)
    expected = net[0](x)
    with FeatureTap(dp, ["0", "module.2"], detach=True) as tap:
        dp(x)
        torch.testing.assert_close(tap["0"], expected)
        assert list(tap.modules) == ["0", "2"]
        dp(x)
        assert tap.order == ["0", "2"]  # the DataParallel call clears the previous step
    assert _hook_count(dp) == 0


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_paths_without_prefix() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    fd, store_file = tempfile.mkstemp()
    os.close(fd)
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 1), rank=0, world_size=1)
    try:
        net = _mlp()
        ddp = nn.parallel.DistributedDataParallel(net)
        x = torch.randn(3, 4)
        expected = net[0](x).detach()
        with FeatureTap(ddp, "0") as tap:
            for _ in range(2):
                out = ddp(x)
                torch.testing.assert_close(tap["0"], expected)
                (out.sum() + tap["0"].sum()).backward()
            assert len(tap.calls("0")) == 1
        assert net[0].weight.grad is not None
        assert _hook_count(ddp) == 0
        assert unwrap_model(ddp) is net
    finally:
        dist.destroy_process_group()
        os.remove(store_file)


class _HasModuleChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Linear(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_a_real_submodule_named_module_is_not_stripped() -> None:
    net = _HasModuleChild()
    assert list(FeatureTap(net, "module.0").modules) == ["module.0"]
    assert list(FeatureTap(nn.DataParallel(net), "module.module").modules) == ["module"]


def test_frozen_teacher_and_nested_wrappers() -> None:
    net = _mlp()
    wrapped = nn.DataParallel(FrozenTeacher(net))
    assert unwrap_model(wrapped) is net
    with FeatureTap(wrapped, "2") as tap:
        wrapped(torch.randn(3, 4))
        assert tap["2"].shape == (3, 2)
        assert not tap["2"].requires_grad


# -- torch.compile -------------------------------------------------------------------------------------------
# backend="eager" runs Dynamo (where hooks are traced and guarded) without Inductor's code generation, which
# keeps these tests fast; docs/featuretap.md records that Inductor behaves the same.


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_tap_entered_before_first_call() -> None:
    net = _mlp()
    compiled = torch.compile(net, backend="eager")
    with FeatureTap(compiled, "_orig_mod.0") as tap, warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported order warns about nothing
        assert list(tap.modules) == ["0"]
        for step in range(3):
            x = torch.randn(3, 4) + step
            compiled(x)
            torch.testing.assert_close(tap["0"], x @ net[0].weight.T + net[0].bias)
            assert len(tap.calls("0")) == 1
        net.zero_grad()
        tap["0"].sum().backward()  # the captured copy keeps the graph into the model
        torch.testing.assert_close(net[0].bias.grad, torch.full((8,), 3.0))
    assert _hook_count(net) == 0
    compiled(torch.randn(3, 4))  # hooks gone: recompiled without them, the old tap stays empty
    assert tap.order == []


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_tap_per_step_with_block() -> None:
    net = _mlp()
    compiled = torch.compile(net, backend="eager")
    for _ in range(3):
        x = torch.randn(3, 4)
        with FeatureTap(compiled, "0") as tap:
            compiled(x)
            torch.testing.assert_close(tap["0"], x @ net[0].weight.T + net[0].bias)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.skipif(
    not getattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False),
    reason="this torch guards on module hooks, so hooks added after compiling are seen",
)
def test_compile_tap_entered_after_first_call_warns_then_reset_fixes() -> None:
    # torch 2.15 compiles with skip_nnmodule_hook_guards=True (the default): a module compiled
    # without hooks is not re-checked when hooks are added, so they are silently skipped.
    net = _mlp()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(3, 4)
    expected = net[0](x)
    compiled(x)  # compiled without hooks
    with FeatureTap(compiled, "0") as tap:
        with pytest.warns(RuntimeWarning, match="captured nothing during a call of the compiled Sequential"):
            compiled(x)
        assert "0" not in tap  # torch skipped the hook: this is what the warning is about
        with pytest.raises(KeyError, match="nothing was captured in the compiled model: enter the FeatureTap before"):
            tap["0"]
        torch._dynamo.reset()  # the documented way out
        compiled(x)
        torch.testing.assert_close(tap["0"], expected)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_inplace_relu_gives_pre_relu_values() -> None:
    net = _mlp(inplace=True)
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(16, 4)
    expected = net[0](x)
    with FeatureTap(compiled, "0", detach=True) as tap:
        compiled(x)
        torch.testing.assert_close(tap["0"], expected)  # a copy is stored inside compiled graphs


@pytest.mark.usefixtures("fresh_dynamo")
def test_module_compile_in_place_tap_after_first_call() -> None:
    net = _mlp()
    x = torch.randn(3, 4)
    expected = net[0](x)
    net.compile(backend="eager")
    net(x)  # compiled without hooks; the tap's pre-hook on the model itself is guarded, so it recompiles
    with FeatureTap(net, "0") as tap:
        net(x)
        torch.testing.assert_close(tap["0"], expected)
