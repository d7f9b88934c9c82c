"""The trainers' distillation methods: the ready-made steps (:mod:`.steps`) and the method registry."""

from reference_trainers.methods.steps import AttentionStep, CEStep, CosineStep, HintStep, KDStep, TeacherOutputs

__all__ = ["AttentionStep", "CEStep", "CosineStep", "HintStep", "KDStep", "TeacherOutputs"]
