"""Trainer subclasses, collators and the papers' training-stage recipes."""

from .region_trainer import (
    RegionTrainer,
    TrainingStage,
    apply_training_stage,
    stage_by_name,
    trainable_parameter_names,
)

__all__ = ["RegionTrainer", "TrainingStage", "apply_training_stage", "stage_by_name", "trainable_parameter_names"]
