import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# The optimizer tests' device: cpu, where the Triton kernels run through the interpreter (set before
# triton is imported), or cuda on a GPU machine (bench/gpu_check.sh), where they run compiled.
TEST_DEVICE = os.environ.get("LWLR_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist each worker gets its share of the cores, for torch's threads and the runs it starts:
# two workers of two threads each on two cores spin against each other (a test took 5x its time).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
# Runs that keep the default lwlr_cache_dir (the benchmarks' and sweeps' tests) cache measured
# multipliers in a folder of this test run's, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lwlr-test-cache-")

import numpy as np  # noqa: E402 (after the environment above, as everything the tests import)
import pytest  # noqa: E402

import interpreter_speedup  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter_speedup.install()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from data.tokenfile import write_tokens  # noqa: E402

# The slowest tests (20 to 55 s each on 2 cores: --durations), handed out first. xdist deals tests out in
# collection order, so one of these dealt last keeps a worker busy while the other has nothing left to do.
SLOWEST_FIRST = (
    "test_train.py::test_bfloat16_autocast_and_torch_compile_compose",
    "test_fsdp.py::",
    "test_reliability.py::test_stop_and_resume_equals_a_straight_run_under_ddp",
    "test_bench.py::test_bench_precision",
    "test_operations.py::test_a_run_resumes_on_another_number_of_processes",
    "test_muon.py::test_muon_under_ddp",
    "test_failures.py::test_a_rank_killed",
    "test_failures.py::test_a_killed_rank",
    "test_reliability.py::test_a_diverging_run",
    "test_eval.py::test_hellaswag_agrees_with_lm_evaluation_harness",
    "test_stopping.py::",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        where = item.nodeid.split("/")[-1]
        return next((i for i, prefix in enumerate(SLOWEST_FIRST) if where.startswith(prefix)), len(SLOWEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def token_dir(tmp_path):
    """train.bin and val.bin of random GPT-2 ids: enough for gpt2-tiny runs, no prepare step."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    write_tokens(str(data / "train.bin"), rng.integers(0, 50257, 20_000), 50257)
    write_tokens(str(data / "val.bin"), rng.integers(0, 50257, 4_000), 50257)
    return data


@pytest.fixture
def gpt2_dir(tmp_path):
    """A Hugging Face GPT-2 directory, offline: a randomly initialized GPT2LMHeadModel of gpt2-tiny's shape
    saved by transformers itself."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    path = tmp_path / "hf-gpt2-tiny"
    model.save_pretrained(path)
    return path


def tiny_run_args(out_dir, data_dir, **overrides) -> list[str]:
    """A few-second train.py run of gpt2-tiny on CPU, in fp32 on any CPU: the tests compare against fp32
    references (dtype=auto's choice has tests of its own)."""
    values = dict(
        out_dir=out_dir,
        data_dir=data_dir,
        model="gpt2-tiny",
        block_size=32,
        micro_batch_size=4,
        tokens_per_step=256,
        max_steps=6,
        warmup_steps=2,
        eval_interval=3,
        eval_steps=2,
        log_interval=1,
        device="cpu",
        compile="false",
        dtype="float32",
        lr=1e-3,
        lwlr_T=2,
        lwlr_cache_dir="none",
    )
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def tree_digest(folder) -> dict[str, str]:
    """Every file's SHA-256 and every folder under folder, to compare a folder before and after a run."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(pathlib.Path(folder).rglob("*"))
    }


def read_log(out_dir, kind) -> list[dict]:
    """The records of one kind ("start", "train", "eval") from a run's log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def root_on_path(**env) -> dict:
    """The environment with the repository first on PYTHONPATH (a script run by path, or from torchrun,
    imports the project's packages), the caller's PYTHONPATH after it; env's entries on top."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **env}


def torchrun(nproc, args, timeout=300, script="train.py", env=None) -> subprocess.CompletedProcess:
    """A script (train.py by default) under torchrun with nproc CPU processes (gloo), one thread each, the
    project's root on the import path (a script in tests/ imports the project as train.py does); env adds
    to the environment."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        *args,
    ]
    return subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=root_on_path(OMP_NUM_THREADS="1", **(env or {})),
    )
