"""What the int8 activations of the 8-bit output-layer GEMV (tvm_schedules/cpu_int8_w8.py) alone cost in perplexity:
the PyTorch model rebuilt from an `--embed-bits 8` checkpoint gives the final (normed) hidden states of a text; its
logits are computed once with the exact hidden states and once with them rounded to int8 per block of 32 as the
kernel rounds them (`cpu_int8.quantize_act_np`), both against the same dequantized table, and the two perplexities
compared. Every other layer stays exact, so this isolates the output layer's share of the int8 path's change (the
whole decode path: benchmarks/decode_int8_quality.py).

    python benchmarks/cpu_w8_head_quality.py CHECKPOINT [--text FILE] [--tokens 512] [--out NAME]

Writes benchmarks/results/<out>.md with the date and command.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default="cpu_w8_head_quality")
    a = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from edgequant.artifact import load_quantized_model
    from edgequant.tvm_schedules.cpu_int8 import quantize_act_np
    model, _ = load_quantized_model(a.checkpoint)
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    ids = tok(Path(a.text).read_text())["input_ids"][:a.tokens]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[-1][0].numpy().astype(np.float16)   # after the final norm, as the export hands it over
    w = model.get_output_embeddings().weight.detach().numpy().astype(np.float32)
    hq = np.stack([(lambda a_d: a_d[0].astype(np.float32) * np.repeat(a_d[1], 32))(quantize_act_np(r)) for r in h])

    def ppl(x):
        lg = x.astype(np.float64) @ w.T.astype(np.float64)
        lg = lg[:-1]
        m = lg.max(axis=1, keepdims=True)
        nll = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=1))) - lg[np.arange(len(lg)), ids[1:]]
        return float(np.exp(nll.mean())), lg.argmax(axis=1)

    (p0, t0), (p1, t1) = ppl(h.astype(np.float32)), ppl(hq)
    row = f"| {Path(a.checkpoint).name} | {len(ids)} | {p0:.3f} | {p1:.3f} | {100 * (p1 / p0 - 1):+.3f}% | " \
          f"{np.mean(t0 == t1):.4f} |"
    print(row)
    lines = ["# The 8-bit output layer's int8 activations alone (tvm_schedules/cpu_int8_w8.py)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- text: first {len(ids)} tokens of {Path(a.text).name}; PyTorch model rebuilt from the checkpoint",
             f"- command: python benchmarks/cpu_w8_head_quality.py {' '.join(sys.argv[1:])}",
             "- exact: logits of the final hidden states (fp16, as exported) times the dequantized table; int8: the "
             "hidden states rounded to int8 per block of 32 first (the kernel's activations)", "",
             "| checkpoint | tokens | ppl, exact head | ppl, int8 head | change | argmax agreement |",
             "|---|---|---|---|---|---|", row]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
