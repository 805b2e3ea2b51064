"""The optimizer kernels as a GPU would build them: every kernel compiles for sm_80 and sm_90 with the
argument types of a real launch, without spills, and its ALIGNED build meets bench/kernel_report.py's
targets. The report runs in its own process: the suite's kernels are interpreted (TRITON_INTERPRET=1)."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import optimizers
from conftest import ROOT


def kernels_defined_in_optimizers() -> set[str]:
    """Every Triton kernel the files of optimizers/ define (a jit function named *_kernel), read from the
    modules themselves rather than from the registry."""
    names = set()
    for info in pkgutil.iter_modules(optimizers.__path__):
        module = importlib.import_module(f"optimizers.{info.name}")
        for name, value in vars(module).items():
            function = getattr(value, "fn", None)
            if name.endswith("_kernel") and getattr(function, "__module__", None) == module.__name__:
                names.add(name)
    return names


def test_every_kernel_compiles_for_a100_and_h100_within_the_targets(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernel_report", "--check", f"--out={tmp_path / 'kernels'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "kernels.json").read_text())
    # Every kernel the optimizers' files define is launched by some optimizer, so every one was compiled.
    assert {row["kernel"] for row in report["kernels"]} == kernels_defined_in_optimizers()
    for row in report["kernels"]:
        assert set(row["targets"]) == {"80", "90"}
        for target in row["targets"].values():
            assert target["spill_bytes"] == 0, row["kernel"]
            if row["aligned"]:
                assert target["registers"] <= 64 and target["vector_share"] >= 0.8, (row["kernel"], target)
            else:  # the fallback promises nothing about alignment: no 128-bit access may appear
                assert target["vector_share"] == 0.0, row["kernel"]
    adamw = next(r for r in report["kernels"] if r["kernel"] == "adamw_kernel" and r["aligned"])
    assert adamw["targets"]["90"]["bytes_per_element"] == 28  # p, g, m, v read; p, m, v written: nothing more


PTX = """
    ld.global.b64 { %rd1 }, [ %rd2 + 0 ];
    ld.global.b32 { %r1 }, [ %rd3 + 0 ];
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    @%p2 ld.global.b32 { %r6 }, [ %rd5 + 0 ];
    @%p1 st.global.v4.b32 [ %rd4 + 0 ], { %r2, %r3, %r4, %r5 };
    @!%p3 st.global.b32 [ %rd6 + 0 ], { %r7 };
"""


def test_ptx_accesses_are_split_into_element_bytes_by_width_and_table_reads():
    from bench import kernel_report

    assert kernel_report.global_accesses(PTX) == {"element_bytes_by_width": {16: 32, 4: 8}, "table_reads": 2}
    assert (
        kernel_report.occupancy(32, 8) == 1.0
        and kernel_report.occupancy(48, 8) == 0.625
        and kernel_report.occupancy(220, 8) == 0.125
    )


def test_every_optimizer_launches_the_aligned_build_on_gpt2():
    """A state that is not read element by element (Adam-mini's one second moment per LayerNorm, LW-AS's
    0-dim step size) must not send a gpt2 run's launch to the scalar fallback."""
    from bench import kernel_report

    builds = kernel_report.launched_builds(kernel_report.record_launches("gpt2"))
    assert {b["optimizer"] for b in builds} == set(kernel_report.kernel_optimizers())
    assert [b for b in builds if not b["aligned"]] == []
