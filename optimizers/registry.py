"""Every optimizer a config can name, one line each: its name, and where its OptimizerSpec is declared
(module:attribute, in the optimizer's own file). The specs are imported when first asked for, so that
reading a config's choices imports neither torch nor Triton. Adding an optimizer is its own file and one
line here (docs/architecture.md); tests/test_registry.py holds every entry to its spec.
"""

import importlib

OPTIMIZERS = {
    "adamw": "optimizers.adamw:ADAMW",
    "lion": "optimizers.lion:LION",
    "sophiag": "optimizers.sophiag:SOPHIAG",
    "adam_mini": "optimizers.adam_mini:ADAM_MINI",
    "sgdm_lw": "optimizers.lwas:SGDM_LW",
    "adamw_lw": "optimizers.lwas:ADAMW_LW",
    "adamw_torch": "optimizers.adamw:ADAMW_TORCH",
    "muon": "optimizers.muon:MUON",
}


def spec(name: str):
    """The OptimizerSpec registered under `name` (the config has checked that it is registered)."""
    module, attribute = OPTIMIZERS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def module_of(name: str) -> str:
    """The module that declares the optimizer: its code, and (with what it imports) its source files."""
    return OPTIMIZERS[name].split(":")[0]
