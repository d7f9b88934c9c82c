"""Every module path and public name of earlier versions still imports, and means what it meant.

Modules that moved keep a thin re-export at the old path; the deprecated ones say so with a
``FutureWarning`` when imported. Pickled or checkpointed objects and users' imports refer to these
names, so each is imported here, and checked to be the object at its new home.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings

import pytest

# old module -> (public names it had, where each lives now: module or None for "defined in the shim")
TRAINERS: dict[str, tuple[list[str], str | None]] = {
    "reference_trainers.recipes.cifar_methods": (
        ["METHODS", "Built", "MethodEntry", "MethodSetup", "PhaseTrainer", "get_method", "matching_stage_pairs",
         "register_method", "CohortStep", "CohortTeacher", "DKDStep", "FeatureRelationStep", "HintOnlyStep",
         "LogitStep", "available_methods"],
        "reference_trainers.methods",
    ),
    "reference_trainers.recipes.method_extra": (
        ["FTPretrainStep", "FeatureLossStep", "HeadsStep", "HeadsTeacher", "ParaphrasedTeacher"],
        "reference_trainers.methods",
    ),
    "reference_trainers.recipes.method_crd": (["CRDStep"], "reference_trainers.methods"),
    "reference_trainers.methods": (
        ["AttentionStep", "CEStep", "CosineStep", "HintStep", "KDStep", "TeacherOutputs"],
        "reference_trainers.methods.steps",
    ),
    # the lm-distil recipe defined its steps and teacher sides itself (not deprecated: the recipe stays)
    "reference_trainers.recipes.lm_distil": (
        ["LMCEStep", "LMFusedKDStep", "LMSparseKDStep", "LMStudent", "TeacherHidden", "TeacherTopKSide",
         "student_lm"],
        "reference_trainers.methods",
    ),
}  # fmt: skip
# reference_trainers.engine was one module: every name it had is importable from the package
ENGINE = [
    "BatchSource", "Context", "DistillStep", "RunData", "RunResult", "RunSpec", "StopRequested", "TeacherCache",
    "TrainConfig", "atomic_write_bytes", "check_ranks_agree", "checkpoint_digest", "environment", "evaluate",
    "load_checkpoint", "remove_stale_temps", "save_checkpoint", "setup", "stop_signals", "summarise",
    "teacher_cache", "train_run", "write_reports", "CHECKPOINT_FORMAT", "markdown_table",
]  # fmt: skip
KDLOSS: dict[str, tuple[list[str], str]] = {
    "kdloss.memory": (["ContrastMemory", "NegativeSampling"], "kdloss.parts.contrastive"),
    "kdloss.methods_modules": (
        ["ABConnector", "FTParaphraser", "FTTranslator", "ReviewKDFusion", "VIDRegressor"], "kdloss.parts.feature"
    ),
    "kdloss.adapters": (
        ["Adapter", "ConvAdapter", "LinearAdapter", "PoolAdapter", "adapter_for", "adapter_parameters",
         "check_optimizer"],
        "kdloss.parts.adapters",
    ),
    "kdloss.heads": (
        ["ClassifierHead", "FinetuneResult", "HeadType", "HeadsOutput", "IntermediateHeads", "evaluate_heads",
         "finetune_heads"],
        "kdloss.parts.heads",
    ),
    "kdloss.losses.contrastive": (["CRDEmbed"], "kdloss.parts.contrastive"),
    "kdloss._validate": (["compute_dtype", "pair_up", "reduce_loss"], "kdloss._numerics"),
}  # fmt: skip
STILL_HOME: dict[str, list[str]] = {
    # modules that did not move: every public name of earlier versions is still defined there
    "kdloss._validate": [
        "Reduction", "ShapeError", "check_batch", "check_class_labels", "check_float", "check_int", "check_integer",
        "check_ndim", "check_nonnegative", "check_pair", "check_positive", "check_positive_int", "check_reduction",
        "check_same_device", "check_same_shape", "check_unit_interval", "warn_if_swapped", "check_tensor",
        "is_integer",
    ],
    "kdloss.losses.contrastive": ["CRDLoss", "check_negatives_fit"],
}  # fmt: skip
SHIM_ONLY: dict[str, list[str]] = {
    "reference_trainers.recipes.cifar_methods": ["copy_model"],
    "reference_trainers.recipes.method_extra": [
        "PreActTap", "PreActTeacher", "AB_INIT_SCALE", "CC_WEIGHT", "FT_WEIGHT", "INIT_EPOCHS", "MHKD_HEAD_WEIGHT",
        "REVIEWKD_WARMUP", "REVIEWKD_WEIGHT", "VID_WEIGHT",
    ],
    "reference_trainers.recipes.method_crd": ["CRD_PRESETS", "add_crd_arguments", "crd_options"],
}  # fmt: skip
DEPRECATED = [
    "kdloss.memory",
    "kdloss.methods_modules",
    "kdloss.adapters",
    "kdloss.heads",
    "reference_trainers.recipes.cifar_methods",
    "reference_trainers.recipes.method_extra",
    "reference_trainers.recipes.method_crd",
]


def _fresh_import(name: str) -> object:
    """Import a deprecated shim anew (its warning is raised on import only); nothing imports from shims."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(TRAINERS))
def test_old_trainer_paths_export_the_same_objects(old: str) -> None:
    names, home = TRAINERS[old]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = importlib.import_module(old)
    new = importlib.import_module(home) if home is not None else module
    for name in names:
        assert getattr(module, name) is getattr(new, name), f"{old}.{name}"
    for name in SHIM_ONLY.get(old, []):
        assert getattr(module, name) is not None, f"{old}.{name}"


def test_every_name_of_the_former_engine_module_is_importable() -> None:
    engine = importlib.import_module("reference_trainers.engine")
    for name in ENGINE:
        assert getattr(engine, name) is not None, name
    assert engine.CHECKPOINT_FORMAT == "reference_trainers.checkpoint/2"
    assert set(ENGINE) <= set(engine.__all__)


@pytest.mark.parametrize("old", sorted(KDLOSS))
def test_old_kdloss_paths_export_the_same_objects(old: str) -> None:
    names, home = KDLOSS[old]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = importlib.import_module(old)
    new = importlib.import_module(home)
    for name in names:
        assert getattr(module, name) is getattr(new, name), f"{old}.{name}"
    for name in STILL_HOME.get(old, []):
        assert getattr(module, name) is not None, f"{old}.{name}"


def test_a_pickle_of_an_earlier_version_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle records its class's module path; one written when ContrastMemory lived in kdloss.memory loads."""
    import pickle

    import kdloss

    memory = kdloss.ContrastMemory(10, 4, n_negatives=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        importlib.import_module("kdloss.memory")
    with monkeypatch.context() as mp:
        mp.setattr(kdloss.ContrastMemory, "__module__", "kdloss.memory")  # where earlier versions defined it
        data = pickle.dumps(memory)
    assert b"kdloss.memory" in data
    assert b"kdloss.parts" not in data
    back = pickle.loads(data)
    assert type(back) is kdloss.ContrastMemory
    assert bool((back.bank_student == memory.bank_student).all())


@pytest.mark.parametrize("old", DEPRECATED)
def test_deprecated_paths_say_where_to_go(old: str) -> None:
    with pytest.warns(FutureWarning, match=re.escape(old) + " is deprecated: import from"):
        _fresh_import(old)


def test_the_old_constants_are_the_typed_defaults() -> None:
    from reference_trainers.methods import CohortOptions, FeatureOptions, MethodSetup, RelationalOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        extra = _fresh_import("reference_trainers.recipes.method_extra")
    assert extra.CC_WEIGHT == RelationalOptions().cc_weight == 0.02  # type: ignore[attr-defined]
    assert extra.VID_WEIGHT == FeatureOptions().vid_weight == 1.0  # type: ignore[attr-defined]
    assert extra.FT_WEIGHT == FeatureOptions().ft_weight == 200.0  # type: ignore[attr-defined]
    assert extra.MHKD_HEAD_WEIGHT == CohortOptions().mhkd_head_weight == 0.5  # type: ignore[attr-defined]
    assert (extra.REVIEWKD_WEIGHT, extra.REVIEWKD_WARMUP) == (1.0, 20.0)  # type: ignore[attr-defined]
    assert extra.INIT_EPOCHS == 30  # type: ignore[attr-defined]
    assert MethodSetup("a", "b", None, 10, 4.0, 1.0, 0.9).init_epochs == 30  # type: ignore[arg-type]


def test_the_untyped_options_of_earlier_versions_still_configure_a_method() -> None:
    import torch

    from reference_trainers.methods import MethodSetup, get_method
    from reference_trainers.models import build_model

    teacher = build_model("resnet8", 10).eval()
    with pytest.warns(FutureWarning, match=r"MethodSetup\(options=\{\.\.\.\}\) is deprecated"):
        setup = MethodSetup(
            "resnet8", "resnet8", teacher, 10, 4.0, 1.0, 0.9,
            options={"hint_weight": 7.0, "steps_per_epoch": 3, "crd_nce_t": 0.1, "crd_feat_dim": None},
        )  # fmt: skip
    assert (setup.hint.weight, setup.steps_per_epoch) == (7.0, 3)
    assert (setup.contrastive.temperature, setup.contrastive.feat_dim) == (0.1, 128)  # None: the default
    assert dict(setup.options) == {}
    step = get_method("fitnet").make(setup).build()
    assert step.objective.weights["hint"] == 7.0  # type: ignore[index, union-attr]
    with pytest.raises(TypeError, match=r"MethodSetup options \['hint_weigth'\] are not method options"):
        MethodSetup("resnet8", "resnet8", teacher, 10, 4.0, 1.0, 0.9, options={"hint_weigth": 7.0})
    assert torch.is_tensor(next(iter(step.state_dict().values())))


@pytest.mark.parametrize("old", sorted(m for m in KDLOSS if m in DEPRECATED))
def test_a_deprecated_kdloss_module_lists_its_names_and_refuses_others(old: str) -> None:
    names, _ = KDLOSS[old]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = _fresh_import(old)
        star: dict[str, object] = {}
        exec(f"from {old} import *", star)  # a fixed module name
    assert set(names) <= set(dir(module))
    assert set(names) <= set(star)
    with pytest.raises(AttributeError, match=f"module '{re.escape(old)}' has no attribute 'Nope'"):
        module.Nope  # type: ignore[attr-defined]
