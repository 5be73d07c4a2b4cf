"""Run edgequant commands in a separate interpreter and record what each one did to a user.

One child process runs a whole list of command lines through the real CLI entry point (its stderr captured per
command), so the corpus costs one interpreter start, and a segfault or abort in any command kills the child, which
the caller reports instead of crashing the test session.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


def _child(spec_path: str):
    from edgequant.cli import main
    results = []
    for argv in json.loads(Path(spec_path).read_text()):
        out, err = io.StringIO(), io.StringIO()
        rc, tb = 0, None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv, prog_name="edgequant")
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a traceback is exactly what the corpus looks for
                rc, tb = 1, traceback.format_exc()
        results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "traceback": tb})
        # flushed per command: if a later one crashes the process, the earlier results survive
        Path(spec_path + ".out").write_text(json.dumps(results))


def run_commands(argvs: list[list[str]], tmp: Path, timeout: int = 900) -> list[dict]:
    """[{argv, rc, stdout, stderr, traceback}] for each command line; raises if the child process crashed."""
    spec = tmp / "commands.json"
    spec.write_text(json.dumps([[str(a) for a in argv] for argv in argvs]))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    done = json.loads(Path(str(spec) + ".out").read_text()) if Path(str(spec) + ".out").exists() else []
    if p.returncode != 0:
        nxt = argvs[len(done)] if len(done) < len(argvs) else "?"
        raise AssertionError(f"the command process died with code {p.returncode} (signal {-p.returncode} if "
                             f"negative) while running {nxt}\n{p.stderr[-2000:]}")
    return done


def assert_one_line_error(r: dict, *must_name: str):
    """Exit 1 or 2, no traceback, exactly one stderr line, starting 'error:', naming what it should."""
    assert r["traceback"] is None, f"{r['argv']}: traceback\n{r['traceback']}"
    lines = [x for x in r["stderr"].splitlines() if x.strip()]
    assert r["rc"] in (1, 2), f"{r['argv']}: exit {r['rc']}, stderr {r['stderr']!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{r['argv']}: stderr {r['stderr']!r}"
    assert "Traceback" not in r["stderr"] + r["stdout"]
    for word in must_name:
        assert word in lines[0], f"{r['argv']}: {lines[0]!r} does not name {word!r}"


if __name__ == "__main__":
    _child(sys.argv[1])
