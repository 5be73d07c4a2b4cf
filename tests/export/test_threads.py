"""export/threads.py: the CPU thread count of `edgequant run/bench` (physical cores unless the user chose), and that
TVM's pool really gets it in a fresh process (its size is fixed at first use)."""
import os
import subprocess
import sys

import pytest


def test_physical_cores_within_affinity():
    from edgequant.export.threads import physical_cores
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_user_choice_wins(monkeypatch):
    from edgequant.export.threads import physical_cores, wanted
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.setenv("EDGEQUANT_THREADS", "3")
    assert wanted() == 3
    monkeypatch.setenv("EDGEQUANT_THREADS", "zero")      # not a count: ignored
    monkeypatch.setenv("TVM_NUM_THREADS", "5")
    assert wanted() == 5
    monkeypatch.delenv("TVM_NUM_THREADS")
    assert wanted() == physical_cores()


@pytest.mark.tvm
def test_pool_size_in_a_fresh_process():
    code = ("from edgequant.export.threads import configure, physical_cores; "
            "print(configure(), physical_cores(), configure(1))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "EDGEQUANT_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    first, cores, lowered = map(int, out.split())
    assert first == cores and lowered == 1    # TVM alone would start hardware threads / 2 on x86
