"""The real model (slow, by hand): SmolLM2-135M-Instruct W4 g128 RTN exported for the CPU answers coherently, its
greedy tokens match the PyTorch model rebuilt from the checkpoint for 32 tokens, and perplexity through the TVM
runtime agrees with the PyTorch perplexity of the checkpoint to 1%.

    python -m pytest -q -m slow tests/export/test_export_smollm2.py -s
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.tvm]
WIKI = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    from edgequant import api
    from edgequant.export.api import export
    root = tmp_path_factory.mktemp("smollm2")
    ck = api.quantize(None, root / "q4", method="rtn", bits=4, group_size=128, progress=False)
    return ck, export(ck, "cpu", root / "q4-cpu", progress=False)


def test_greedy_tokens_match_pytorch_for_32_tokens(dist):
    from edgequant.artifact import load_quantized_model
    from edgequant.export.runtime import Runner
    ck, d = dist
    runner = Runner(d)
    ids = runner.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    got = runner.generate(list(ids), 32, stop_ids=()).tokens
    ref, _ = load_quantized_model(ck)
    with torch.no_grad():
        want = greedy(ref, ids, 32)
    text = runner.tokenizer.decode(got, skip_special_tokens=True)
    print(f"\nTVM: {text!r}\nmatch {sum(a == b for a, b in zip(got, want))}/32")
    assert "Paris" in text
    assert got == want


def test_perplexity_agrees_with_pytorch(dist):
    from edgequant import api
    from edgequant.export.api import evaluate as evaluate_dist
    ck, d = dist
    tvm_res = evaluate_dist(d, str(WIKI), max_windows=2, progress=False)
    pt_res = api.evaluate(ck, str(WIKI), max_windows=2, progress=False)
    print(f"\nperplexity: tvm {tvm_res['perplexity']:.4f}, pytorch {pt_res['perplexity']:.4f}")
    assert abs(tvm_res["perplexity"] / pt_res["perplexity"] - 1) < 0.01


@torch.no_grad()
def greedy(model, ids, n):
    """Plain argmax decoding with the HF KV cache, not stopping at EOS (generate's min_new_tokens would mask EOS)."""
    out = model(torch.tensor([ids]), use_cache=True)
    toks = []
    for _ in range(n):
        toks.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return toks
