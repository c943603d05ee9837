"""FSDP2 on the CPU: two gloo processes shard tunelab's tiny 4-bit QLoRA model with torch's own `fully_shard`
and train one step through tunelab's fused loss; the loss, the gradients and the saved adapter equal one process.

Why torch-level and not `tunelab train fsdp=full_shard`: accelerate (1.15) applies its FSDP plugin only to GPU
process groups, so on the CPU the Trainer would train plain DDP (tunelab refuses fsdp on the CPU for that reason,
tested in test_distributed.py). This test covers what does run on gloo: the model as tunelab's loader builds it
(bitsandbytes NF4 with quant storage = compute dtype, here float32), wrapped the way accelerate's
fsdp2_prepare_model wraps it (each decoder layer, the embedding, [final norm + output head] unresharded, the
root), the fused loss called through the root's forward (`call_through_wrapper`, as TunelabTrainer does), one
AdamW step, and the adapter gathered into a full state dict and saved by rank 0 with PEFT's save_pretrained (what
the Trainer does with FULL_STATE_DICT). The GPU path through the Trainer is tools/multigpu_measure.sh's.

The same launch also checks the two collectives TunelabTrainer adds (token counts summed over the ranks; the NaN
check seeing a NaN of any rank). Run by pytest; torchrun runs this same file as the worker (`python -m torch.distributed.run ... this.py`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers_train import (  # noqa: F401  (fixtures)
    adapter_tensors,
    base_config,
    cli_env,
    counting_records,
    isolated_env,
    offline_session,
    tiny_model,
    write_dataset_dir,
)

BATCH, SEQ = 4, 16


def _worker(cfg_path: str, out: str) -> None:
    import copy

    import torch
    import torch.distributed as dist
    import yaml
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tunelab.config import load_config
    from tunelab.config.resolve import resolve
    from tunelab.model.kernels import forward_hidden, fused_linear_cross_entropy
    from tunelab.model.loader import load_model
    from tunelab.train.distributed import call_through_wrapper

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # the collectives tunelab adds: token counts summed over ranks, the auto batch size agreed on (the smallest),
    # and the NaN check's loss (a NaN on rank 1 must be seen by rank 0, whose own loss is finite)
    from tunelab.train.distributed import loss_for_check, min_across_ranks, sum_across_ranks

    collectives = {"tokens_sum": sum_across_ranks(rank + 1), "batch_min": min_across_ranks(4 - rank),
                   "nan_seen_by_all": not torch.isfinite(loss_for_check(torch.tensor(float("nan") if rank else 2.0))).item()}
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = load_config(yaml.safe_load(fh))
    torch.manual_seed(0)
    model = load_model(cfg, resolve(cfg), for_training=True)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    n_items = int((labels[:, 1:] != -100).sum())

    def step(m, rows, scale, inner):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)

        def loss_of(**b):
            h, w = forward_hidden(inner, b)
            return fused_linear_cross_entropy(h, w, b["labels"], n_items)

        batch = dict(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), labels=labels[rows])
        loss = call_through_wrapper(m, inner, loss_of, **batch) * scale
        loss.backward()
        grads = {k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                 for k, p in m.named_parameters() if p.requires_grad}
        opt.step()
        return loss.detach(), grads

    ref_loss, ref_grads = step(reference, slice(0, BATCH), 1, reference)

    mesh = init_device_mesh("cpu", (world,))
    base = model.get_base_model()
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(base.model.embed_tokens, mesh=mesh)
    fully_shard([base.model.norm, base.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    q = base.model.layers[0].self_attn.q_proj
    shard = q.base_layer.weight  # the 4-bit weight (float32 storage), now a DTensor shard
    facts = {"sharded_type": type(shard).__name__, "local_rows": shard.to_local().shape[0], "full_rows": shard.shape[0],
             "module_quant_state": getattr(q.base_layer, "quant_state", None) is not None, **collectives}
    per_rank = BATCH // world
    loss, grads = step(model, slice(rank * per_rank, (rank + 1) * per_rank), world, model)  # FSDP averages over ranks
    dist.all_reduce(loss)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out, "fsdp"), state_dict=full)
        reference.save_pretrained(os.path.join(out, "single"))
        facts.update(loss=float(loss) / world, ref_loss=float(ref_loss),
                     grad_max_diff=max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads),
                     grad_max=max(float(ref_grads[k].abs().max()) for k in grads), grads=len(grads))
        with open(os.path.join(out, "facts.json"), "w", encoding="utf-8") as fh:
            json.dump(facts, fh)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tiny_model, tmp_path_factory):
    import yaml

    from tunelab.train.distributed import free_port

    root = tmp_path_factory.mktemp("fsdp")
    data_dir = write_dataset_dir(root / "data", {"toy": ("alpaca", counting_records(4))})
    cfg = base_config(tiny_model, data_dir, str(root / "unused"), quantization_bit=4)
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = cli_env(extra_pythonpath=os.path.dirname(__file__))
    env["OMP_NUM_THREADS"] = "1"
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(cfg_path), str(root)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(root / "facts.json", encoding="utf-8") as fh:
        return {"root": root, "facts": json.load(fh)}


def test_the_4bit_weights_are_sharded_and_keep_their_quant_state(fsdp_run):
    f = fsdp_run["facts"]
    assert f["sharded_type"] == "DTensor"
    assert f["local_rows"] * 2 == f["full_rows"]  # each rank holds half of the packed 4-bit rows
    assert f["module_quant_state"]  # bitsandbytes' copy on the module, which its forward uses once gathered


def test_token_counts_and_the_nan_check_span_the_ranks(fsdp_run):
    assert fsdp_run["facts"]["tokens_sum"] == 1 + 2
    assert fsdp_run["facts"]["batch_min"] == 3  # per_device_train_batch_size: auto agrees on the smallest rank's
    assert fsdp_run["facts"]["nan_seen_by_all"] is True  # rank 0's loss was 2.0, rank 1's NaN


def test_fsdp2_loss_gradients_and_adapter_equal_one_process(fsdp_run):
    import torch

    f = fsdp_run["facts"]
    assert f["loss"] == pytest.approx(f["ref_loss"], rel=1e-6)
    assert f["grads"] == 28 and f["grad_max"] > 1e-2
    assert f["grad_max_diff"] <= 2e-6  # reduction order only (observed 2.4e-7)
    sharded = adapter_tensors(fsdp_run["root"] / "fsdp")  # one ordinary PEFT adapter file
    single = adapter_tensors(fsdp_run["root"] / "single")
    assert sharded.keys() == single.keys() and len(single) == 28
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=2e-6, msg=key)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
