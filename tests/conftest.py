"""The tests' fixtures: the device / dtype / reduction matrix of every loss, one torch thread, and the
hypothesis profiles. What the tests import (tables, assertion helpers) is in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers import DEVICE_PARAMS, DTYPE_CASES, REDUCTIONS, DtypeCase, single_thread

# Hypothesis: no example database on disk (CI runs from a fresh clone; nothing to replay), and a
# "ci" profile that is deterministic. Per-test ``settings(max_examples=..., deadline=None)`` still
# apply on top. Select with HYPOTHESIS_PROFILE=ci.
settings.register_profile("dev", database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", database=None, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Tests use tiny tensors: with more than one intra-op thread on a shared 2-core CI machine, OpenMP
# spin-waiting makes each small op ~100x slower (15 ms instead of 0.1 ms per soft_kl call, measured).
# Set OMP_NUM_THREADS (or KDLOSS_TEST_THREADS) to override.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(int(os.environ.get("KDLOSS_TEST_THREADS", "1")))


@pytest.fixture(params=DEVICE_PARAMS)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn (``cuda`` is skipped, and marked ``gpu``, without a GPU)."""
    return str(request.param)


@pytest.fixture(params=DTYPE_CASES, ids=lambda c: c.name)
def dtype_case(request: pytest.FixtureRequest) -> DtypeCase:
    """Each row of :data:`DTYPE_CASES` in turn."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=REDUCTIONS)
def reduction(request: pytest.FixtureRequest) -> str:
    """Each reduction in turn."""
    return str(request.param)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test, restored afterwards (tiny tensors; CI's cores are shared).

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    yield from single_thread()
