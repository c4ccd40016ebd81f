"""Recovery: LoRA fine-tuning of a pruned checkpoint merged back into it (``training``), distillation
from the dense model (``distill``), and pruning in steps with recovery between them (``iterative``)."""
