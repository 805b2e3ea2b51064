"""The optimizers: each in its own file with its Triton kernel, its launch, its torch path and its
registry entry (spec.py); registry.py lists them by name; base.py holds what they share; self_check.py
checks the kernels against the torch paths before a run's first step (docs/architecture.md)."""
