"""Benchmark models the benchmark builds itself: a larger random-weight GGUF and ONNX MLP.

The GGUF has stories260K's architecture (Llama) and tokenizer (its 512-token vocabulary,
copied from the file) with random F16 weights: dim 512, 8 layers, 8 heads, ffn 1376 —
25.8M parameters, enough compute per token for realistic decode speeds on a small box.
The ONNX MLP (256 → 2048 → 2048 → 2048 → 16, FP32) is a model where batch-1 compute, not
HTTP, dominates: each request reads 33 MB of weights, which a batch shares.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

DIM, LAYERS, HEADS, FFN = 512, 8, 8, 1376


def build_gguf(stories: Path, out: Path) -> Path:
    """Write the random-weight Llama GGUF to ``out`` (once; reused when present)."""
    if out.is_file():
        return out
    import gguf

    reader = gguf.GGUFReader(str(stories))
    tokens = [
        bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
        for i in reader.fields["tokenizer.ggml.tokens"].data
    ]
    scores = [
        float(reader.fields["tokenizer.ggml.scores"].parts[i][0])
        for i in reader.fields["tokenizer.ggml.scores"].data
    ]
    types = [
        int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
        for i in reader.fields["tokenizer.ggml.token_type"].data
    ]
    vocab = len(tokens)
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("random-llama-25m")
    writer.add_context_length(2048)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(DIM // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(DIM, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(vocab, DIM))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weight(vocab, DIM))
    for i in range(LAYERS):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", ones)
        writer.add_tensor(blk + "ffn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(blk + name + ".weight", weight(DIM, DIM))
        writer.add_tensor(blk + "ffn_gate.weight", weight(FFN, DIM))
        writer.add_tensor(blk + "ffn_up.weight", weight(FFN, DIM))
        writer.add_tensor(blk + "ffn_down.weight", weight(DIM, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def build_mlp(out: Path) -> Path:
    """A 256 → 2048 → 2048 → 2048 → 16 FP32 MLP with a dynamic batch dimension."""
    if out.is_file():
        return out
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [256, 2048, 2048, 2048, 16]
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out))
    return out
