"""The training step (executor) and the block-selection policies (selection)."""

from .executor import ROLES, StepResult, lora_gradients, run_step

__all__ = ["ROLES", "StepResult", "lora_gradients", "run_step"]
