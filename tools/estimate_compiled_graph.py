"""What a compiled decoder layer holds at its backward, read from AOTAutograd's graphs on the CPU (no GPU).

    python tools/estimate_compiled_graph.py --quantized [--no-ckpt] [--partitioner default] [--scale-tokens 2x4096]

Builds a 1-layer Qwen2 (hidden 192, intermediate 352, 6 heads, 2 kv heads, LoRA r=8 on all seven projections;
NF4 through bitsandbytes' CPU backend with --quantized), installs the fast path's fused projections and compiles
the (checkpointed) decoder layers as tunelab does (tunelab.model.fast.compile), with a backend that keeps
AOTAutograd's forward and backward graphs instead of generating code, partitioned as inductor partitions them
(min_cut_rematerialization_partition, whose CSE merges the recompute's dequantize with grad x's). It reports the
dequantizes in each graph, the dense weights the forward saves for backward, and the largest live set of each
graph walked in node order (each tensor freed after the last use of it or of a view of it), also with every size
mapped to --scale-to's (every tiny size is distinct, so each maps to one). Inductor reorders and fuses, so the
walk is the graph's own order, not inductor's schedule; the GPU measurements (docs/estimate.md) are the check.
"""
from __future__ import annotations

import argparse
import collections
import json


def build(quantized: bool, hidden: int, inter: int, heads: int, kv_heads: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=512)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if quantized:
        from tunelab.model.tiny import quantize_decoder_linears_nf4

        quantize_decoder_linears_nf4(model)
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


VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.permute.default", "aten.transpose.int",
         "aten.expand.default", "aten.slice.Tensor", "aten.select.int", "aten.unsqueeze.default", "aten.squeeze.dim",
         "aten.reshape.default", "aten.alias.default", "aten.split.Tensor", "aten.split_with_sizes.default",
         "aten.as_strided.default", "<built-in function getitem>", "aten.detach.default"}


def walk(gm, size, owned) -> tuple[int, dict]:
    """The largest live set of the graph in node order. A tensor lives from its node to the last use of it or of
    any view of it; size(node) gives its bytes; owned(node) says whether a placeholder counts (a gradient coming in)
    or not (parameters and the checkpointed input, counted elsewhere). Returns (bytes, {node name: bytes})."""
    nodes = list(gm.graph.nodes)
    root = {}
    for n in nodes:
        is_view = n.op == "call_function" and str(n.target) in VIEWS and n.all_input_nodes
        root[n] = root[n.all_input_nodes[0]] if is_view else n
    last = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[root[a]] = i
    outputs = [n for n in nodes if n.op == "output"]
    for a in (outputs[0].all_input_nodes if outputs else []):
        last[root[a]] = len(nodes)  # graph outputs live past the graph (saved for backward, or the gradients)
    live, best, best_set = {}, -1, {}
    for i, n in enumerate(nodes):
        if root[n] is n and "val" in n.meta and (n.op == "call_function" or (n.op == "placeholder" and owned(n))):
            live[n] = size(n)
        total = sum(live.values())
        if total > best:
            best, best_set = total, dict(live)
        for a in list(live):
            if last.get(a, -1) <= i and a.op != "output" and last.get(a, -1) != len(nodes):
                del live[a]
    return best, {n.name: b for n, b in best_set.items()}


TINY = dict(hidden=192, inter=352, heads=6, kv_heads=2, batch=5, seq=56)  # every size distinct, so each maps to one 7B size


def scale_map(target: str, batch: int, seq: int) -> dict[int, int]:
    """Each size of the tiny layer -> the same size of `target` at batch x seq (head_dim, heads, kv heads, the
    kv group, hidden, kv width, intermediate, batch, seq, tokens, LoRA rank 8)."""
    from tunelab.estimate import model_shape

    s = model_shape(target)
    t = TINY
    hd = t["hidden"] // t["heads"]
    return {1: 1, 8: 8, hd: s.head_dim, t["heads"]: s.heads, t["kv_heads"]: s.kv_heads, t["heads"] // t["kv_heads"]: s.heads // s.kv_heads,
            t["hidden"]: s.hidden, t["kv_heads"] * hd: s.kv_dim, t["inter"]: s.intermediate, t["batch"]: batch, t["seq"]: seq,
            t["batch"] * t["seq"]: batch * seq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantized", action="store_true", help="NF4 base (bitsandbytes' CPU backend); default 16-bit")
    p.add_argument("--partitioner", choices=("mincut", "default"), default="mincut",
                   help="mincut: inductor's (min_cut_rematerialization_partition, with its CSE of the joint graph); default: AOTAutograd's plain split")
    p.add_argument("--no-ckpt", action="store_true", help="without gradient checkpointing")
    p.add_argument("--scale-to", default="Qwen/Qwen2.5-7B", help="report the live sets at this model's sizes")
    p.add_argument("--scale-tokens", default="4x1024", help="batch x seq for --scale-to")
    args = p.parse_args(argv)
    print(json.dumps(analyse(args.quantized, not args.no_ckpt, args.partitioner, args.scale_to, args.scale_tokens), indent=1))
    return 0


def analyse(quantized: bool = True, ckpt: bool = True, partitioner: str = "mincut", scale_to: str = "Qwen/Qwen2.5-7B",
            scale_tokens: str = "4x1024") -> dict:
    """Compile the tiny model's layers, run one step, and read the graphs (the module docstring)."""
    import math

    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tunelab.model.fast import patch_lora_layers
    from tunelab.model.fast.compile import compile_decoder_layers

    args = argparse.Namespace(quantized=quantized, no_ckpt=not ckpt, partitioner=partitioner, scale_to=scale_to,
                              scale_tokens=scale_tokens)
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    model = build(args.quantized, TINY["hidden"], TINY["inter"], TINY["heads"], TINY["kv_heads"])
    patch_lora_layers(model)
    if not args.no_ckpt:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    extra = {}
    if args.partitioner == "mincut":
        from functorch.compile import min_cut_rematerialization_partition

        extra["partition_fn"] = min_cut_rematerialization_partition
    compile_decoder_layers(model, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"), **extra))
    ids = torch.randint(0, 512, (TINY["batch"], TINY["seq"]), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    b7, t7 = (int(x) for x in args.scale_tokens.split("x"))
    dims = scale_map(args.scale_to, b7, t7)
    h, i, kv = TINY["hidden"], TINY["inter"], TINY["kv_heads"] * (TINY["hidden"] // TINY["heads"])
    weights = {(h, h), (kv, h), (i, h), (h, i)}
    tokens = (TINY["batch"] * TINY["seq"], TINY["batch"], TINY["seq"])
    unmapped = set()

    def shp(n):
        return shape_of(n.meta["val"]) or ()

    def tiny(n):
        return nbytes(n.meta["val"])

    def scaled(n):
        val = n.meta["val"]
        if not isinstance(val, torch.Tensor):
            return 0
        sizes = []
        for d in shp(n):
            if d not in dims:
                unmapped.add((n.name, shp(n)))
            sizes.append(dims.get(d, d))
        return math.prod(sizes) * val.element_size()

    def kind_of(n):
        if shp(n) in weights:
            return "dense weights"
        return "activations" if any(d in tokens for d in shp(n)) else "other"

    def owned(n):
        return n.name.startswith("tangents")

    out = {"quantized": args.quantized, "partitioner": args.partitioner, "checkpointing": not args.no_ckpt,
           "graphs": {k: len(v) for k, v in graphs.items()}, "scaled_to": f"{args.scale_to} {args.scale_tokens}"}
    for kind in ("fw", "bw"):
        gm = graphs[kind][0]
        by_name = {n.name: n for n in gm.graph.nodes}
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        rec = {"dequantize_4bit": ops.get("bitsandbytes.dequantize_4bit.default", 0)}
        for label, fn in (("tiny", tiny), ("scaled", scaled)):
            peak, live = walk(gm, fn, owned)
            cats = collections.Counter()
            for name, nb in live.items():
                cats[kind_of(by_name[name])] += nb
            rec[label] = {"peak_gib" if label == "scaled" else "peak_bytes": round(peak / 2**30, 3) if label == "scaled" else peak,
                          "by_kind" + ("_gib" if label == "scaled" else ""): {k: (round(v / 2**30, 3) if label == "scaled" else v) for k, v in cats.items()}}
        if kind == "fw":
            outs = [n for n in gm.graph.nodes if n.op == "output"][0].all_input_nodes
            saved = [n for n in outs if "val" in n.meta and isinstance(n.meta["val"], torch.Tensor)]
            rec["saved_for_backward"] = {"dense_weights": sum(1 for n in saved if kind_of(n) == "dense weights"),
                                         "dense_weights_scaled_gib": round(sum(scaled(n) for n in saved if kind_of(n) == "dense weights") / 2**30, 3),
                                         "activations_scaled_gib": round(sum(scaled(n) for n in saved if kind_of(n) == "activations") / 2**30, 3)}
        out[kind] = rec
    out["unmapped_shapes"] = sorted(str(u) for u in unmapped)[:10]  # the quant state's small vectors (absmax): not scaled
    return out


if __name__ == "__main__":
    raise SystemExit(main())
