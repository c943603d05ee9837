"""What a compiled decoder layer holds at its backward, read from AOTAutograd's graphs on the CPU (no GPU).

    python tools/estimate_compiled_graph.py [--tokens 2x64] [--quantized]

Builds a 2-layer Qwen2 (hidden 128, intermediate 352, LoRA r=8 on all seven projections; NF4 through bitsandbytes'
CPU backend with --quantized), installs the fast path's fused projections and compiles the checkpointed decoder
layers as tunelab does (tunelab.model.fast.compile), with a backend that keeps AOTAutograd's forward and backward
graphs instead of generating code. For the backward graph (the recompute and the gradient of one layer) it walks
the nodes in order, frees each tensor after its last use, and reports the largest live set: the dense weights
made by a dequantize, tensors that scale with the tokens (bytes per token), and the rest. Inductor may reorder
and fuse what this walk sees in graph order, so this is the graph's own schedule, not inductor's; the GPU
measurements (docs/estimate.md) are the check.
"""
from __future__ import annotations

import argparse
import collections
import json


def build(quantized: bool, hidden: int, inter: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if quantized:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                              quant_storage=torch.bfloat16)
                        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True, quant_storage=torch.bfloat16)
                        if lin.bias is not None:
                            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                        setattr(parent, name, q)
        model = model.to("cpu")  # Params4bit quantizes when moved to a device
    for p in model.parameters():
        p.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))


def _int(d) -> int:
    """A size as an int (a symbolic size of a dynamic graph: its hint, the traced value)."""
    try:
        return int(d)
    except Exception:  # noqa: BLE001
        return int(d.node.hint)


def nbytes(val) -> int:
    import math

    import torch

    if isinstance(val, torch.Tensor):
        return math.prod(_int(d) for d in val.shape) * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(nbytes(v) for v in val)
    return 0


def shape_of(val):
    import torch

    return tuple(_int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def walk(gm, tokens: int, weight_shapes: set, inputs_owned: bool):
    """The largest live set of the graph in node order: (peak bytes, {category: bytes}, [(name, shape, bytes)])."""
    nodes = list(gm.graph.nodes)
    last = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i
    views = {"aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.permute.default", "aten.transpose.int",
             "aten.expand.default", "aten.slice.Tensor", "aten.select.int", "aten.unsqueeze.default", "aten.squeeze.dim",
             "aten.reshape.default", "aten.alias.default", "aten.split.Tensor", "aten.split_with_sizes.default",
             "aten.as_strided.default", "operator.getitem"}
    live, best, best_set = {}, -1, {}
    for i, n in enumerate(nodes):
        if n.op in ("call_function", "placeholder") and "val" in n.meta:
            is_view = n.op == "call_function" and str(n.target) in views
            if not is_view and (n.op != "placeholder" or inputs_owned):
                live[n] = nbytes(n.meta["val"])
        total = sum(live.values())
        if total > best:
            best, best_set = total, dict(live)
        for a in n.all_input_nodes:
            if last.get(a) == i and a in live:
                del live[a]
    cats = collections.Counter()
    rows = []
    for n, b in best_set.items():
        shp = shape_of(n.meta["val"])
        if shp and tuple(shp) in weight_shapes:
            cat = "dense weights"
        elif shp and (tokens in shp or (len(shp) >= 2 and shp[0] * shp[1] == tokens) or tokens // shp[0] in shp[1:]):
            cat = "per token"
        else:
            cat = "other"
        cats[cat] += b
        rows.append((n.name, shp, b, cat))
    return best, dict(cats), rows


def main(argv=None) -> int:
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tunelab.model.fast import patch_lora_layers
    from tunelab.model.fast.compile import compile_decoder_layers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2x56")
    p.add_argument("--quantized", action="store_true")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--inter", type=int, default=352)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    batch, seq = (int(x) for x in args.tokens.split("x"))
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    model = build(args.quantized, args.hidden, args.inter)
    patch_lora_layers(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    compile_decoder_layers(model, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    h, i = args.hidden, args.inter
    q, kv = h, 2 * (h // 4)
    weights = {(q, h), (kv, h), (h, q), (i, h), (h, i)}
    out = {"tokens": batch * seq, "quantized": args.quantized, "graphs": {k: len(v) for k, v in graphs.items()}}
    for kind in ("fw", "bw"):
        gm = graphs[kind][0]
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        peak, cats, rows = walk(gm, batch * seq, weights, inputs_owned=kind == "bw")
        out[kind] = {"peak_bytes": peak, "by_kind": cats, "per_token_bytes": cats.get("per token", 0) / (batch * seq),
                     "dequantize_ops": {k: v for k, v in ops.items() if "dequantize" in k},
                     "live_at_peak": [f"{r[0]} {list(r[1] or [])} {r[2]} B {r[3]}" for r in sorted(rows, key=lambda r: -r[2])[:40]]}
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
