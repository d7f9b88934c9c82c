"""FrozenTeacher: stays in eval mode and gradient-free whatever its parent does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdloss import FrozenTeacher


def _teacher() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5))


class _Distiller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.teacher = FrozenTeacher(_teacher())


def test_parent_train_keeps_teacher_in_eval() -> None:
    parent = _Distiller().train()
    assert parent.student.training
    assert not parent.teacher.training
    assert not any(m.training for m in parent.teacher.modules())
    bn = parent.teacher.module[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.randn(8, 3, 6, 6) * 5 + 3
    first, second = parent.teacher(x), parent.teacher(x)
    torch.testing.assert_close(first, second)  # dropout off: deterministic
    torch.testing.assert_close((bn.running_mean, bn.running_var, bn.num_batches_tracked), stats)  # BN frozen


def test_submodule_switched_to_train_from_outside_is_put_back() -> None:
    teacher = FrozenTeacher(_teacher())
    teacher.module[4].train()  # a wrapper flipping one submodule back
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(teacher(x), teacher(x))
    assert not teacher.module[4].training


def test_no_gradients() -> None:
    teacher = FrozenTeacher(_teacher())
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    assert out.grad_fn is None
    student = nn.Linear(64, 64)
    loss = (student(torch.randn(2, 64)) - out).square().mean()  # usable as a target
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_state_dict_round_trip() -> None:
    teacher = FrozenTeacher(_teacher())
    state = teacher.state_dict()
    assert set(state) == {f"module.{k}" for k in teacher.module.state_dict()}
    other = FrozenTeacher(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout()))
    other.load_state_dict(state)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(other(x), teacher(x))
    plain = _teacher()
    plain.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    torch.testing.assert_close(plain.eval()(x), teacher(x))
    assert not other.training
    assert all(not p.requires_grad for p in other.parameters())


def test_rejects_non_module() -> None:
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got function"):
        FrozenTeacher(lambda x: x)  # type: ignore[arg-type]
