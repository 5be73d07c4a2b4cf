"""The resume state reader (edgequant/calibrate/omniquant/state.py) on files that are not regular files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# in a child process: safetensors' reader blocks in open() holding the GIL, so a hang cannot be timed from a thread
_PROBE = """
import sys
from pathlib import Path
from edgequant.calibrate.omniquant.state import ResumeState, StateMismatch, _load
folder = Path(sys.argv[1])
try:
    _load(folder / "block_0000.safetensors")
except StateMismatch as e:
    print("block:", e)
notes = []
ResumeState(folder / ".out.state", "f" * 64, notify=notes.append)
print("meta:", notes, (folder / ".out.state").exists())
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_in_the_state_folder_are_damage_not_a_hang(tmp_path):
    """A FIFO in place of a block file blocked the resumed run in open() for good, deaf to Ctrl-C and SIGTERM
    (sixteenth re-run, C1); in place of meta.json it would block the fingerprint read the same way."""
    os.mkfifo(tmp_path / "block_0000.safetensors")
    (tmp_path / ".out.state").mkdir()
    os.mkfifo(tmp_path / ".out.state" / "meta.json")
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("blocked opening a FIFO in the state folder")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "block: block_0000.safetensors is not a regular file"
    assert "starting over" in lines[1] and lines[1].endswith(" False")


def test_links_in_the_state_folder_are_not_followed(tmp_path):
    """A block file or meta.json that links out of the state folder was opened and, when it held a valid block,
    resumed from (nineteenth re-run, U16): the folder is the tool's own, so a link is damage."""
    import torch

    from edgequant.calibrate.omniquant.state import META, ResumeState, StateMismatch, _load, _save
    outside = tmp_path / "outside.safetensors"
    _save({"w": torch.ones(2)}, {"block": 0}, outside)
    assert _load(outside)[0]["w"].tolist() == [1.0, 1.0]
    state = tmp_path / ".out.state"
    state.mkdir()
    (state / "block_0000.safetensors").symlink_to(outside)
    with pytest.raises(StateMismatch, match="is a link"):
        _load(state / "block_0000.safetensors")
    (tmp_path / "meta.json").write_text('{"version": 3, "fingerprint": "' + "f" * 64 + '"}')
    (state / META).symlink_to(tmp_path / "meta.json")
    notes = []
    ResumeState(state, "f" * 64, notify=notes.append)
    assert len(notes) == 1 and "is a link" in notes[0] and not state.exists()
    assert outside.is_file() and (tmp_path / "meta.json").is_file()   # the targets are left alone
