"""Shared pieces of the CPU benchmark scripts (cpu_gemv_bits.py, cpu_kernels.py, decode_cpu_steps.py,
cpu_interleaved.py): TVM set up for the int8 kernels, process CPU time, the machine line, the results header (machine, date, load, command) and
writing the results file. Tables go through `edgequant.report.table`.
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_seconds() -> float:
    """User + system time of this process, all threads: on a shared machine it moves far less with other processes'
    load than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPUs this process may use; call it before TVM's thread pool pins the process (1 thread: to one core)."""
    return len(os.sched_getaffinity(0))


def int8_cpu(threads: int):
    """TVM on this CPU for the int8 kernels with `threads` threads: (host target, its integer-dot ISA, device, usable
    cores, load averages before measuring); exits with one line where the CPU has no integer dot products."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    n_cores = cores()   # before TVM's pool pins this thread
    import tvm

    from edgequant.export.threads import configure
    from edgequant.tvm_schedules import cpu_int8
    configure(threads)
    load0 = os.getloadavg()
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    isa = cpu_int8.target_isa(host)
    if isa is None:
        sys.exit("error: this CPU has no integer dot products (AVX2, VNNI or dotprod); nothing to compare")
    return host, isa, tvm.cpu(), n_cores, load0


def _loads(v) -> str:
    return " / ".join(f"{x:.2f}" for x in v)


def header(title: str, machine: str, load0, notes: list[str]) -> list[str]:
    """The results file's first lines: title, machine, date with the load averages at the start (`load0`) and now,
    the command that ran (this script and its arguments), then `notes` as further bullets."""
    return [f"# {title}", "", f"- machine: {machine}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load averages {_loads(load0)} at the "
            f"start, {_loads(os.getloadavg())} at the end",
            f"- command: python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}",
            *[f"- {n}" for n in notes], ""]


def table(head: list[str], rows: list[list[str]]) -> str:
    """Markdown table of already formatted cells (edgequant.report.table)."""
    from edgequant.report import table as report_table
    keys = [str(i) for i in range(len(head))]
    return report_table([dict(zip(keys, r)) for r in rows], list(zip(keys, head)))


def write(out: str | None, lines: list[str]) -> None:
    """Print the results and, with `out`, write them to benchmarks/results/<out>.md."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{out}.md").write_text(text)
