"""The TVM runtime's CPU thread pool for exported libraries run in this process (`edgequant run/bench/eval`): one
thread per physical core this process may run on, unless the user chose (EDGEQUANT_THREADS or TVM_NUM_THREADS).

Why: TVM sizes its pool once, when it is first used, from TVM_NUM_THREADS, else from the hardware thread count
halved on x86 (it assumes hyper-threading), and `runtime.config_threadpool` can later only lower that. On a 2-core
VM that is one thread: every earlier CPU benchmark of this project ran single-threaded. Counting physical cores in
the affinity mask (sibling hyper-threads share one core's dot-product units) gives 2 there and never oversubscribes
a container limited to a few cores. Pinning and spinning stay TVM's (TVM_BIND_THREADS, TVM_THREAD_POOL_SPIN_COUNT
in the environment change them).
"""
from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on; the CPU count where sysfs is absent."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def wanted() -> int:
    for var in ("EDGEQUANT_THREADS", "TVM_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return physical_cores()


def configure(threads: int | None = None) -> int:
    """Size the pool before its first use (later calls can only lower it); returns the threads TVM will use."""
    import tvm
    n = threads or wanted()
    os.environ["TVM_NUM_THREADS"] = str(n)   # read by TVM when it creates the pool
    tvm.get_global_func("runtime.config_threadpool")(1, n)
    return int(tvm.get_global_func("runtime.NumThreads")())
