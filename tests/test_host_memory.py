"""runtime.host_memory: a CPU run keeps the host memory it frees, so its next step reuses mapped pages."""

import subprocess
import sys

import pytest

from conftest import ROOT
from runtime import host_memory, ranks

# glibc's malloc.h, by hand: M_TRIM_THRESHOLD is -1 and M_MMAP_THRESHOLD is -3
GLIBC_TRIM, GLIBC_MMAP = -1, -3


class FakeLibc:
    def __init__(self, refuse_above: int):
        self.calls, self.refuse_above = [], refuse_above

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 0 if param == GLIBC_MMAP and value > self.refuse_above else 1


@pytest.fixture
def fake_libc(monkeypatch):
    def install(refuse_above=1 << 40):
        libc = FakeLibc(refuse_above)
        monkeypatch.setattr(host_memory, "_retained", False)
        monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
        monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
        monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: libc)
        return libc

    return install


def test_large_blocks_come_from_the_heap_and_the_heap_is_never_trimmed(fake_libc):
    libc = fake_libc()
    assert host_memory.retain_freed_memory()
    assert libc.calls == [(GLIBC_MMAP, 1 << 30), (GLIBC_TRIM, -1)]
    assert host_memory.retain_freed_memory() and len(libc.calls) == 2  # once a process


def test_a_glibc_that_caps_the_mmap_threshold_gets_its_documented_cap(fake_libc):
    libc = fake_libc(refuse_above=32 << 20)
    assert host_memory.retain_freed_memory()
    assert libc.calls == [(GLIBC_MMAP, 1 << 30), (GLIBC_MMAP, 32 << 20), (GLIBC_TRIM, -1)]


def test_another_c_library_is_left_alone(fake_libc, monkeypatch):
    libc = fake_libc()
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert not host_memory.retain_freed_memory() and libc.calls == []


def test_a_cpu_runtime_retains_freed_memory(monkeypatch):
    called = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: called.append(True))
    ranks.init_runtime("cpu")
    assert called == [True]


# 50 blocks of 2 MiB, every page written, freed together, four times over: glibc's default hands the freed
# heap back and each round faults its 100 MiB in again (about 50,000 faults measured); kept, the rounds
# reuse the first round's pages (about 2,500).
ROUNDS = r"""
import resource, sys, torch
from runtime import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
def rounds():
    blocks = [torch.ones(2 << 18) for _ in range(50)]
    del blocks
rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    rounds()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    def faults(mode):
        run = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    default, kept = faults("default"), faults("retain")
    assert kept * 4 < default, (kept, default)
