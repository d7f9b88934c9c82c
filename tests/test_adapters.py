"""Adapters: shapes, options, adapter_for, optimiser helpers, the stale-weights guard, HintLoss errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdloss import (
    ConvAdapter,
    HintLoss,
    LinearAdapter,
    PoolAdapter,
    ShapeError,
    adapter_for,
    adapter_parameters,
    check_optimizer,
)

# -- ConvAdapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize(("bn", "relu"), [(False, False), (True, False), (False, True), (True, True)])
def test_conv_adapter(kernel_size: int, bn: bool, relu: bool) -> None:
    adapter = ConvAdapter(16, 32, kernel_size, bn=bn, relu=relu)
    x = torch.randn(4, 16, 6, 6)
    out = adapter(x)
    assert out.shape == (4, 32, 6, 6)
    assert adapter.conv.kernel_size == (kernel_size, kernel_size)
    assert (adapter.conv.bias is None) == bn  # BN's shift replaces the conv bias
    assert isinstance(adapter.bn, nn.BatchNorm2d if bn else nn.Identity)
    expected = F.conv2d(x, adapter.conv.weight, adapter.conv.bias, padding=kernel_size // 2)
    if bn:
        expected = F.batch_norm(expected, None, None, adapter.bn.weight, adapter.bn.bias, training=True)
    if relu:
        expected = expected.relu()
        assert (out >= 0).all()
    torch.testing.assert_close(out, expected)


def test_conv_adapter_tutorial_regressor_equals_conv2d() -> None:
    # The PyTorch KD tutorial's regressor: nn.Conv2d(16, 32, kernel_size=3, padding=1).
    torch.manual_seed(0)
    adapter = ConvAdapter(16, 32, kernel_size=3)
    reference = nn.Conv2d(16, 32, kernel_size=3, padding=1)
    reference.load_state_dict(adapter.conv.state_dict())
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(adapter(x), reference(x))


def test_conv_adapter_errors() -> None:
    with pytest.raises(
        ShapeError, match=r"ConvAdapter\(16 -> 32\) expects x of shape \(B, 16, H, W\), got \(2, 8, 4, 4\)"
    ):
        ConvAdapter(16, 32)(torch.randn(2, 8, 4, 4))
    with pytest.raises(ShapeError, match=r"got \(2, 16\)"):
        ConvAdapter(16, 32)(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"kernel_size must be an odd number >= 1 .* got 2"):
        ConvAdapter(16, 32, kernel_size=2)
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        ConvAdapter(0, 32)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ConvAdapter(1, 2)(torch.ones(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="stale_check_steps must be >= 0, got -1"):
        ConvAdapter(1, 2, stale_check_steps=-1)


# -- LinearAdapter, PoolAdapter ----------------------------------------------------------------------------


def test_linear_adapter_flattens() -> None:
    adapter = LinearAdapter(16 * 2 * 2, 10)
    x = torch.randn(3, 16, 2, 2)
    torch.testing.assert_close(adapter(x), F.linear(x.flatten(1), adapter.linear.weight, adapter.linear.bias))
    assert LinearAdapter(4, 2, bias=False).linear.bias is None


def test_linear_adapter_errors() -> None:
    with pytest.raises(ShapeError, match=r"LinearAdapter\(64 -> 10\) expects 64 features per sample, got 12"):
        LinearAdapter(64, 10)(torch.randn(3, 12))
    with pytest.raises(ValueError, match="out_features must be >= 1, got 0"):
        LinearAdapter(4, 0)


def test_pool_adapter_matches_tutorial_avg_pool1d() -> None:
    # The tutorial pools the teacher's 2048 flattened features to 1024 with avg_pool1d(kernel_size=2).
    teacher_features = torch.randn(4, 2048)
    expected = F.avg_pool1d(teacher_features, kernel_size=2)
    torch.testing.assert_close(PoolAdapter(1024)(teacher_features), expected)
    torch.testing.assert_close(PoolAdapter(1024)(teacher_features.view(4, 32, 8, 8)), expected)
    torch.testing.assert_close(PoolAdapter(2048)(teacher_features), teacher_features)
    assert list(PoolAdapter(1024).parameters()) == []


def test_pool_adapter_2d() -> None:
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(PoolAdapter((4, 4))(x), F.adaptive_avg_pool2d(x, (4, 4)))
    assert repr(PoolAdapter((4, 4))) == "PoolAdapter(out_size=(4, 4))"


def test_pool_adapter_errors() -> None:
    with pytest.raises(ShapeError, match=r"PoolAdapter\(1000\) needs a feature count divisible by 1000, got 2048"):
        PoolAdapter(1000)(torch.randn(2, 2048))
    with pytest.raises(ShapeError, match=r"can only pool down: got 512 features, fewer than 1024"):
        PoolAdapter(1024)(torch.randn(2, 512))
    with pytest.raises(ShapeError, match=r"expects a \(B, C, H, W\) map, got \(2, 64\)"):
        PoolAdapter((2, 2))(torch.randn(2, 64))
    with pytest.raises(ValueError, match="out_size must be a positive int or an"):
        PoolAdapter(0)
    with pytest.raises(ValueError, match="out_size must be a positive int or an"):
        PoolAdapter((1, 2, 3))  # type: ignore[arg-type]


# -- adapter_for -------------------------------------------------------------------------------------------------


def test_adapter_for_same_shape_is_identity() -> None:
    assert isinstance(adapter_for(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 4)), nn.Identity)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_adapter_for_channels(kernel_size: int) -> None:
    adapter = adapter_for(torch.zeros(2, 16, 4, 4), torch.zeros(2, 32, 4, 4), kernel_size=kernel_size, bn=True)
    assert isinstance(adapter, ConvAdapter)
    assert adapter.conv.kernel_size == (kernel_size, kernel_size)
    assert isinstance(adapter.bn, nn.BatchNorm2d)
    assert adapter(torch.randn(2, 16, 4, 4)).shape == (2, 32, 4, 4)


def test_adapter_for_larger_student_map_pools() -> None:
    adapter = adapter_for(torch.zeros(2, 16, 8, 8), torch.zeros(2, 32, 4, 4))
    assert isinstance(adapter, nn.Sequential)
    assert [type(m) for m in adapter] == [ConvAdapter, PoolAdapter]
    assert adapter(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)


def test_adapter_for_smaller_student_map_is_an_error() -> None:
    with pytest.raises(ShapeError, match=r"student map \(2, 16, 2, 2\) is spatially smaller than the teacher's"):
        adapter_for(torch.zeros(2, 16, 2, 2), torch.zeros(2, 32, 4, 4))


def test_adapter_for_flat_and_reshaped() -> None:
    flat = adapter_for(torch.zeros(2, 16, 2, 2), torch.zeros(2, 10))
    assert isinstance(flat, LinearAdapter)
    assert (flat.in_features, flat.out_features) == (64, 10)
    seq = adapter_for(torch.zeros(2, 5, 8), torch.zeros(2, 5, 12))
    assert isinstance(seq, nn.Sequential)
    assert seq(torch.randn(2, 5, 8)).shape == (2, 5, 12)


def test_adapter_for_dtype_and_errors() -> None:
    adapter = adapter_for(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64))
    assert adapter(torch.zeros(2, 4, dtype=torch.float64)).dtype == torch.float64
    half = adapter_for(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 6, dtype=torch.bfloat16))
    assert half.linear.weight.dtype == torch.float32  # autocast features, float32 weights
    with pytest.raises(ShapeError, match=r"must share the batch dimension, got \(2, 4\) and \(3, 4\)"):
        adapter_for(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="must share the batch dimension"):
        adapter_for(torch.tensor(1.0), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="teacher_example must be a floating-point tensor"):
        adapter_for(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))


# -- HintLoss with an adapter ------------------------------------------------------------------------------------


def test_hint_loss_reports_an_adapter_that_still_mismatches() -> None:
    adapter = ConvAdapter(16, 24)  # the teacher has 32 channels
    student, teacher = torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 4)
    with pytest.raises(
        ShapeError,
        match=r"student_feature \(after its adapter\) and teacher_feature must have the same shape, "
        r"got \(2, 24, 4, 4\) and \(2, 32, 4, 4\).*adapter_for",
    ):
        HintLoss()(adapter(student), teacher)


def test_hint_loss_trains_the_adapter() -> None:
    student, teacher = torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 4)
    adapter = adapter_for(student, teacher)
    HintLoss()(adapter(student), teacher).backward()
    assert all(p.grad is not None for p in adapter.parameters())


# -- optimiser helpers ---------------------------------------------------------------------------------------------


def test_adapter_parameters_dedups_and_skips_frozen() -> None:
    a, b = ConvAdapter(2, 3), LinearAdapter(4, 5)
    b.linear.bias.requires_grad_(False)
    params = adapter_parameters(a, b, a, nn.Identity())
    assert params == [a.conv.weight, a.conv.bias, b.linear.weight]
    with pytest.raises(TypeError, match=r"adapter_parameters takes nn\.Modules, got Tensor as argument 1"):
        adapter_parameters(a, torch.zeros(1))  # type: ignore[arg-type]


def test_check_optimizer() -> None:
    student, adapter = nn.Linear(2, 2), ConvAdapter(2, 3)
    good = torch.optim.SGD([*student.parameters(), *adapter_parameters(adapter)], lr=0.1)
    check_optimizer(good, adapter)
    groups = torch.optim.SGD([{"params": student.parameters()}, {"params": adapter.parameters(), "lr": 1.0}], lr=0.1)
    check_optimizer(groups, adapter)
    bad = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"optimizer is missing 2 trainable adapter parameter\(s\): ConvAdapter.conv.weight, "
    ):
        check_optimizer(bad, adapter)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        check_optimizer([], adapter)  # type: ignore[arg-type]


# -- the stale-weights guard ---------------------------------------------------------------------------------------


def _train(adapter: nn.Module, opt: torch.optim.Optimizer, steps: int, *, zero_grad_first: bool = True) -> None:
    x, target = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 2, 2)
    for _ in range(steps):
        if zero_grad_first:
            opt.zero_grad()
        F.mse_loss(adapter(x), target).backward()
        opt.step()


def test_stale_weights_warn_when_adapter_not_in_optimizer() -> None:
    student = nn.Linear(2, 2)
    adapter = ConvAdapter(3, 5, stale_check_steps=4)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)  # the adapter was forgotten
    with pytest.warns(RuntimeWarning, match=r"ConvAdapter's weights received gradients but have not changed after 4"):
        _train(adapter, opt, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(adapter, opt, 10)  # warns once only


@pytest.mark.parametrize("zero_grad_first", [True, False])
def test_stale_weights_silent_when_adapter_in_optimizer(zero_grad_first: bool) -> None:
    adapter = ConvAdapter(3, 5, stale_check_steps=4)
    opt = torch.optim.SGD(adapter_parameters(adapter), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(adapter, opt, 8, zero_grad_first=zero_grad_first)


def test_stale_weights_silent_in_eval_and_no_grad() -> None:
    adapter = ConvAdapter(3, 5, stale_check_steps=2)
    x = torch.randn(1, 3, 2, 2)
    adapter(x).sum().backward()  # gradients exist, weights never change
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.eval()
        for _ in range(5):
            adapter(x)
        adapter.train()
        with torch.no_grad():
            for _ in range(5):
                adapter(x)
    assert adapter._forwards == 1  # only the first (training, grad-enabled) forward counted


def test_stale_weights_silent_under_compile() -> None:
    torch._dynamo.reset()
    try:
        adapter = ConvAdapter(3, 5, stale_check_steps=1)
        compiled = torch.compile(adapter, backend="eager")
        opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # the adapter was forgotten
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _train(compiled, opt, 4)
        assert adapter._forwards == 0
    finally:
        torch._dynamo.reset()


def test_stale_guard_disabled_with_zero() -> None:
    adapter = ConvAdapter(3, 5, stale_check_steps=0)
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(adapter, opt, 4)


# -- the direct call of the inner layer ---------------------------------------------------------------


def _module_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    inner = nn.Module._call_impl

    def counting(self: nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(type(self).__name__)
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "_call_impl", counting)
    return calls


@pytest.mark.parametrize(
    "make", [lambda: ConvAdapter(4, 6), lambda: LinearAdapter(4 * 3 * 3, 6)], ids=["conv", "linear"]
)
def test_adapter_calls_its_unhooked_layer_directly(monkeypatch: pytest.MonkeyPatch, make: object) -> None:
    """One nn.Module call (the adapter's own), not two: the inner layer's forward runs directly when
    nothing hooks it (the bookkeeping of a module call costs as much as a small convolution)."""
    adapter = make()  # type: ignore[operator]
    layer = adapter.conv if isinstance(adapter, ConvAdapter) else adapter.linear
    x = torch.randn(2, 4, 3, 3)
    want = layer(x if isinstance(adapter, ConvAdapter) else x.flatten(1))
    calls = _module_calls(monkeypatch)
    got = adapter(x)
    assert calls == [type(adapter).__name__]
    torch.testing.assert_close(got, want)


def test_adapter_runs_the_hooks_of_its_layer_and_global_ones() -> None:
    adapter = ConvAdapter(4, 6)
    x = torch.randn(2, 4, 3, 3)
    seen: list[str] = []
    h1 = adapter.conv.register_forward_hook(lambda m, i, o: seen.append("conv hook"))
    h2 = adapter.conv.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    try:
        torch.testing.assert_close(
            adapter(x), adapter.conv._conv_forward(x * 2, adapter.conv.weight, adapter.conv.bias)
        )
    finally:
        h1.remove()
        h2.remove()
    assert seen == ["conv hook"]
    h3 = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        adapter(x)
    finally:
        h3.remove()
    assert seen == ["conv hook", "Conv2d", "ConvAdapter"]


def test_adapter_casts_to_a_parametrised_weights_dtype() -> None:
    """The dtype the input is cast to comes from the weight, also when it is a parametrisation."""
    from torch.nn.utils import parametrizations

    adapter = ConvAdapter(4, 6).double()
    parametrizations.weight_norm(adapter.conv)
    out = adapter(torch.randn(2, 4, 3, 3, dtype=torch.float32))
    assert out.dtype == torch.float64
