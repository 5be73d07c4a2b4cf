"""The memory plan: exact weights and KV-cache arithmetic, one plan shared by `inspect`, `bench` and `export`'s
target-limit warning."""
from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from edgequant.cli import main
from edgequant.memory import MemoryPlan, Shapes, kv_bytes, memory_plan, over_budget

# SmolLM2-135M's config.json numbers
SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192}


def test_kv_cache_per_1k_tokens_and_total():
    s = Shapes.from_hf_config(SMOLLM2)
    assert s.head_dim == 64 and s.context_window == 8192
    # K and V x 30 layers x 3 KV heads x 64 x 1024 tokens x 2 bytes = 22.5 MiB
    assert kv_bytes(s, 1024) == 2 * 30 * 3 * 64 * 1024 * 2 == 22.5 * 2**20
    p = memory_plan(s, weights_bytes=100 << 20, context=2048)
    assert p.kv_bytes_per_1k_tokens == 22.5 * 2**20 and p.kv_bytes == 45 * 2**20
    # one 256-token chunk: hidden, residual, normed (3 x 576), q 576, k and v 2 x 192, attention out 576, gate and up
    # 2 x 1536, in fp16; plus one fp32 logits row
    assert p.temp_bytes == 256 * (3 * 576 + 576 + 2 * 192 + 576 + 2 * 1536) * 2 + 49152 * 4
    assert p.total_bytes == p.weights_bytes + p.kv_bytes + p.temp_bytes
    assert memory_plan(s, 0).context == 4096          # default: the runner's KV length, capped by the model
    assert memory_plan(s, 0, kv_dtype="float32").kv_bytes == 2 * memory_plan(s, 0).kv_bytes
    assert over_budget(p, 3 << 30, "iphone") is None
    msg = over_budget(memory_plan(s, 3 << 30, context=8192), 3 << 30, "iphone (usual limit)")
    assert msg.startswith("iphone (usual limit): the model needs about 3,255 MiB at 8192 tokens")


def test_inspect_reports_the_plan(owq_checkpoint):
    r = CliRunner().invoke(main, ["inspect", str(owq_checkpoint), "--json", "--context", "512"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    mem = info["memory"]
    files = [p for p in owq_checkpoint.iterdir() if p.suffix == ".safetensors"]
    assert mem["weights_bytes"] == sum(p.stat().st_size for p in files)
    assert mem["context"] == 512 and mem["kv_bytes"] == 2 * 2 * 2 * 16 * 512 * 2   # 2 layers, 2 KV heads, dim 16
    assert mem["total_bytes"] == mem["weights_bytes"] + mem["kv_bytes"] + mem["temp_bytes"]
    text = CliRunner().invoke(main, ["inspect", str(owq_checkpoint), "--no-layers", "--context", "1024"]).output
    assert "memory plan" in text and "per 1K tokens (float16)" in text and "at 1024 tokens of context" in text
    r = CliRunner().invoke(main, ["inspect", str(owq_checkpoint), "--context", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def _fake_dist(folder, target, weight_bytes, functions=()):
    folder.mkdir()
    (folder / "lib.tar").write_bytes(b"")
    model = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
             "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "context_window": 8192}
    # what the DIST reader checks the model block against: the embedding's shape and one tensor per layer
    params = [{"name": "model.embed_tokens.weight", "shape": [49152, 576], "dtype": "float16"}] + [
        {"name": f"model.layers.{i}.input_layernorm.weight", "shape": [576], "dtype": "float16"} for i in range(30)]
    from edgequant.export.dist import RUNNER_FUNCTIONS
    import tvm
    info = {"format_version": 1, "target": target, "device": "metal", "library": "lib.tar", "prefill_chunk_size": 256,
            "tvm_version": tvm.__version__, "functions": list(RUNNER_FUNCTIONS) + list(functions), "weight_bytes": weight_bytes,
            "model": model, "params": params}
    (folder / "edgequant-export.json").write_text(json.dumps(info))
    return folder


def test_export_warns_past_the_targets_usual_limit(tmp_path):
    from edgequant.export.api import memory_plan as dist_plan, memory_warning
    small = _fake_dist(tmp_path / "small", "iphone", 100 << 20)
    assert memory_warning(small) is None
    big = _fake_dist(tmp_path / "big", "iphone", 3 << 30)
    msg = memory_warning(big)
    assert msg and "iphone" in msg and "at 8192 tokens" in msg and "3,072 MiB" in msg   # the limit, 3 GiB
    assert memory_warning(_fake_dist(tmp_path / "mac", "metal", 3 << 30)) is None        # no usual limit on a Mac
    p = dist_plan(big, 1024)
    assert isinstance(p, MemoryPlan) and p.kv_bytes == 22.5 * 2**20 and p.weights_bytes == 3 << 30


def test_a_dist_with_the_one_graph_decode_step_plans_its_second_cache(tmp_path):
    """The CUDA runner keeps a second KV cache for the one-graph decode step (export/graph_decode.py); bench's plan
    printed half the KV memory of such a DIST."""
    from edgequant.export.api import memory_plan as dist_plan
    from edgequant.export.graph_decode import FUNC
    plain = dist_plan(_fake_dist(tmp_path / "plain", "metal", 100 << 20), 1024)
    graph = dist_plan(_fake_dist(tmp_path / "graph", "metal", 100 << 20, [FUNC]), 1024)
    assert plain.kv_caches == 1 and graph.kv_caches == 2 and graph.kv_bytes == 2 * plain.kv_bytes == 45 * 2**20
    assert graph.total_bytes - plain.total_bytes == plain.kv_bytes and "2 caches" in " ".join(graph.lines())


def test_a_quantized_embedding_record_without_dimensions_is_one_error(tmp_path):
    """A DIST with a quantized table (--embed-bits) whose scales record has shape []: IndexError in the reader
    (fourteenth re-run's sweep), now the damaged-file line."""
    import json

    from edgequant.errors import EdgequantError
    from edgequant.export.runtime import read_export_info
    d = _fake_dist(tmp_path / "d", "metal", 100 << 20)
    info = json.loads((d / "edgequant-export.json").read_text())
    info["params"][0:1] = [{"name": "model.embed_tokens.qweight", "shape": [49152, 72], "dtype": "uint32"},
                           {"name": "model.embed_tokens.scales", "shape": [], "dtype": "float16"},
                           {"name": "model.norm.weight", "shape": [576], "dtype": "float16"}]
    (d / "edgequant-export.json").write_text(json.dumps(info))
    with pytest.raises(EdgequantError, match="vocab_size"):
        read_export_info(d)
