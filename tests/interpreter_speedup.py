"""Triton's CPU interpreter (TRITON_INTERPRET=1), which the suite runs the kernels under, without its
largest overhead: at every call of a @triton.jit helper, in every program of a grid, it scans each
language module with inspect.getmembers for builtins to patch (triton 3.6, runtime/interpreter.py:
_patch_builtin), about a third of an interpreted optimizer step. A module's builtins are patched
all at once and restored all at once, so one of them tells whether the rest are: a module already
patched is skipped, and the names are found once. What runs, and every result, is unchanged."""

import inspect


def install() -> None:
    """Replace the interpreter's _patch_builtin by the same patching, done only where it patches something."""
    import triton.language as tl
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_patch_builtin") or not hasattr(interpreter, "_patch_attr"):
        return  # another Triton: its interpreter as it is
    builtin_names: dict[object, list[str]] = {}

    def patch_builtin(pkg, builder, scope) -> None:
        if pkg not in builtin_names:  # the first call: before any launch, the module as Triton made it
            builtin_names[pkg] = [name for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)]
        names = builtin_names[pkg]
        if not names or not tl.core.is_builtin(getattr(pkg, names[0])):
            return  # patched already (by this launch, or by a helper call that never restores)
        for name in names:
            interpreter._patch_attr(pkg, name, getattr(pkg, name), builder, scope)

    interpreter._patch_builtin = patch_builtin
