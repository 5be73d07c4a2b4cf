"""Export parity with per-module schemes and quantized vocabulary tables (`--embed-bits`): the cpu library's logits
against the PyTorch model rebuilt from the same checkpoint, tied and untied, on the exact fp path and on the default
int8 path (the output layer then runs the int8 GEMV/GEMM, an 8-bit table the GEMV of
tvm_schedules/cpu_int8_w8.py; the embedding always the gather of tvm_schedules/gather.py).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from test_export_parity import assert_greedy_tokens_match, parity_errors

pytestmark = pytest.mark.tvm

# (arch, tied, embed bits): each case mixes per-module schemes in one checkpoint (a fused q/k/v at 2 bits, an
# o_proj at 3 bits g16, a down_proj per channel) on a W4 g32 base
CASES = [("llama", False, 8), ("llama", True, 4), ("qwen2", True, 8)]
MIXED = {"model.layers.0.self_attn.{}_proj": (2, 32, False), "model.layers.1.self_attn.o_proj": (3, 16, False),
         "model.layers.1.mlp.down_proj": (4, -1, True)}


def mixed_checkpoint(root, tokenizer, arch, tie, embed_bits):
    from conftest import make_tiny_model
    from edgequant.artifact import save_checkpoint
    from edgequant.calibrate.rtn import quantize_rtn
    from edgequant.quantizer import quantize_weight
    from edgequant.schemes import QuantScheme
    from edgequant.tables import quantize_tables, table_scheme
    model = make_tiny_model(arch, seed=embed_bits, tie=tie)
    base = QuantScheme(4, 32)
    q, _ = quantize_rtn(model, base, progress=False)
    for pattern, s in MIXED.items():
        for name in {pattern.format(p) for p in "qkv"}:
            q[name] = quantize_weight(model.get_submodule(name).weight.detach(), QuantScheme(*s))
    q.update(quantize_tables(model, table_scheme(embed_bits, 32)))
    return save_checkpoint(root / "q", model, tokenizer, q, base, "rtn")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    from edgequant.export.api import export
    cache = {}

    def get(case, act):
        if (case, act) not in cache:
            root = tmp_path_factory.mktemp(f"{case[0]}-{case[1]}-{case[2]}-{act}")
            ck = mixed_checkpoint(root, tokenizer, *case)
            old = os.environ.get("EDGEQUANT_ACT_DTYPE")
            os.environ["EDGEQUANT_ACT_DTYPE"] = act
            try:
                cache[(case, act)] = (ck, export(ck, "cpu", root / "dist", progress=False))
            finally:
                os.environ.pop("EDGEQUANT_ACT_DTYPE") if old is None else os.environ.update(EDGEQUANT_ACT_DTYPE=old)
        return cache[(case, act)]

    return get


@pytest.mark.parametrize("act", ["fp16", "int8"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}-e{c[2]}")
def test_mixed_schemes_and_quantized_tables_match_pytorch(exported, case, act):
    from edgequant.artifact import load_quantized_model
    from edgequant.export.runtime import Runner
    ckpt, dist = exported(case, act)
    meta = json.loads((dist / "edgequant-export.json").read_text())
    names = {p["name"] for p in meta["params"]}
    # the tables are stored packed (tied: one table), no fp16 copy
    assert "model.embed_tokens.qweight" in names and "model.embed_tokens.weight" not in names
    assert ("lm_head.qweight" in names) == (not case[1]) and "lm_head.weight" not in names
    if act == "int8" and case[2] == 8:   # the 8-bit output layer's decode runs its own int8 GEMV where the ISA has one
        from edgequant.export.targets import get_preset, tvm_target
        from edgequant.tvm_schedules.cpu_int8 import target_isa
        w8 = target_isa(tvm_target(get_preset("cpu"))) == "vnni"
        assert (b"int8_decode_gemv_w8" in (dist / "lib.so").read_bytes()) == w8
    ref, _ = load_quantized_model(ckpt)
    runner = Runner(dist)
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, 40).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    errs = parity_errors(runner, ids, want, prefill=30, decode=6)
    print(f"\n{case} {act}: max |tvm - torch| / max |torch| " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < (1e-2 if act == "fp16" else 4e-2)
    if act == "fp16":   # greedy tokens on the exact path
        assert_greedy_tokens_match(runner, ref, ids[:8], 10)


def test_fused_members_with_different_schemes_are_refused(tmp_path, tokenizer):
    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    ck = mixed_checkpoint(tmp_path, tokenizer, "llama", False, 8)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["overrides"].pop("model.layers.0.self_attn.k_proj")
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception):   # k_proj's 2-bit tensors no longer match the 4-bit base: the reader refuses
        open_source(ck).plans()
    # same bits and shapes, only the group differs: the reader accepts it, export refuses to fuse the two schemes
    from edgequant.artifact import save_checkpoint
    from edgequant.quantizer import quantize_weight
    from edgequant.schemes import QuantScheme
    from conftest import make_tiny_model
    model = make_tiny_model("llama")
    from edgequant.calibrate.rtn import quantize_rtn
    q, _ = quantize_rtn(model, QuantScheme(4, 32), progress=False)
    q["model.layers.0.mlp.up_proj"] = quantize_weight(model.model.layers[0].mlp.up_proj.weight.detach(),
                                                      QuantScheme(4, 16))
    ck2 = save_checkpoint(tmp_path / "q2", model, tokenizer, q, QuantScheme(4, 32), "rtn")
    with pytest.raises(EdgequantError, match="different schemes"):
        open_source(ck2).plans()
