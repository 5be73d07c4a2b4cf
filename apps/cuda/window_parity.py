"""Sliding windows and Gemma 2's attention soft-cap on a CUDA export, past the window: tiny random models exported
here for `cuda` and `cpu`, their logits compared on the GPU machine with the PyTorch model's and the cpu export's.

    # here (edgequant, torch, nvcc): export the models, compute the references
    python apps/cuda/window_parity.py prepare STAGE
    # on the GPU machine (only the TVM runtime: ../shared/tools/device-tvm-runtime.sh)
    python3 apps/cuda/window_parity.py check STAGE > result.json

Models (tests/gemma_tiny.py, tests/conftest.py): Gemma 2 (sliding layers alternating with global ones, window 12,
attention soft-cap 4, final soft-cap 8) and Mistral (window 12 on every layer), RTN 4-bit g32. Per model, on SEQ
tokens: every position at once, then prefills in chunks of 12, 11 and 5 tokens followed by decode steps, each
compared as max |a - b| / max |b|; and the greedy continuation of a prompt against PyTorch's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEQ, DECODE, WINDOW, GREEDY = 150, 10, 12, 24   # SEQ: past the window and past two 64-key tiles of the GPU kernels
MODELS = ("gemma2", "mistral")


def _steps(runner, ids):
    """{name: logits} of the paths compared: all positions, then per chunk length the prefill's last position and
    the decode steps after it."""
    import numpy as np
    out = {"all": np.asarray(runner.logits(ids), np.float32)}
    for chunk in (WINDOW, 11, 5):
        runner.chunk = chunk
        runner.new_sequence()
        rows = [runner.prefill(ids[:SEQ - DECODE])]
        rows += [runner.decode(t) for t in ids[SEQ - DECODE:]]
        out[f"chunk{chunk}"] = np.stack([np.asarray(r, np.float32).reshape(-1) for r in rows])
    runner.chunk = WINDOW
    return out


def _torch_steps(want):
    """The PyTorch logits at the positions `_steps` compares."""
    rows = want[SEQ - DECODE - 1:SEQ]
    return {"all": want, **{f"chunk{c}": rows for c in (WINDOW, 11, 5)}}


def prepare(stage: Path):
    import os

    import numpy as np
    import torch
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "export")]
    from conftest import make_tiny_model, make_tokenizer
    from gemma_tiny import make_tiny_gemma

    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.export.api import export
    from edgequant.export.runtime import Runner
    os.environ["EDGEQUANT_ACT_DTYPE"] = "fp16"   # the exact decode path, as the export parity tests
    tok = make_tokenizer()
    for name in MODELS:
        root = stage / name
        hf = root / "hf"
        if name == "gemma2":
            model = make_tiny_gemma("gemma2", seed=4, window=WINDOW)
        else:
            model = make_tiny_model("mistral", seed=6)
            model.config.sliding_window = WINDOW
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        ck = api.quantize(str(hf), str(root / "q"), method="rtn", bits=4, group_size=32, progress=False)
        ref, _ = load_quantized_model(ck)
        ref.set_attn_implementation("eager")
        ids = np.random.default_rng(1).integers(0, ref.config.vocab_size, SEQ).tolist()
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float().numpy()
            seq = ids[:8]
            for _ in range(GREEDY):
                seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
        cpu = _steps(Runner(export(ck, "cpu", root / "dist-cpu", progress=False)), ids)
        export(ck, "cuda", stage / f"dist-{name}", progress=False)
        np.savez(stage / f"ref-{name}.npz", ids=np.array(ids), greedy=np.array(seq),
                 **{f"torch_{k}": v for k, v in _torch_steps(want).items()}, **{f"cpu_{k}": v for k, v in cpu.items()})
        print(name, "cpu export vs torch:", {k: _rel(v, _torch_steps(want)[k]) for k, v in cpu.items()})


def _rel(a, b) -> float:
    import numpy as np
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def check(stage: Path):
    import numpy as np
    sys.path.insert(0, str(ROOT))
    import edgequant   # the checkout is not installed on the GPU machine: map edgequant.export onto export/
    edgequant.__path__.append(str(ROOT))
    from edgequant.export.runtime import Runner
    result = {}
    for name in MODELS:
        ref = np.load(stage / f"ref-{name}.npz")
        runner = Runner(stage / f"dist-{name}", load_tokenizer=False)
        ids = ref["ids"].tolist()
        got = _steps(runner, ids)
        greedy = ref["greedy"].tolist()
        tokens = runner.generate(greedy[:8], GREEDY, stop_ids=()).tokens
        result[name] = {"device": str(runner.dev), "context": runner.context,
                        "vs_torch": {k: _rel(v, ref[f"torch_{k}"]) for k, v in got.items()},
                        "vs_cpu_export": {k: _rel(v, ref[f"cpu_{k}"]) for k, v in got.items()},
                        "cpu_export_vs_torch": {k: _rel(ref[f"cpu_{k}"], ref[f"torch_{k}"]) for k in got},
                        "greedy_tokens_equal": tokens == greedy[8:]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "check"):
        sys.exit("usage: python apps/cuda/window_parity.py prepare|check STAGE")
    {"prepare": prepare, "check": check}[sys.argv[1]](Path(sys.argv[2]))
