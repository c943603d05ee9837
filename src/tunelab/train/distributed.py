"""Training on several processes (GPUs): who this process is, launching under torchrun, and the few collective
steps the train workflow needs. The engines are the field's own: torch.distributed via torchrun or
`accelerate launch`, DDP / FSDP2 / DeepSpeed through the Hugging Face Trainer; nothing here is a second engine.

    tunelab train cfg.yaml                                   # several visible GPUs: re-launched under torchrun
    CUDA_VISIBLE_DEVICES=0,1 tunelab train cfg.yaml          # the GPUs to use
    FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tunelab train cfg.yaml # torchrun even on one GPU or the CPU (gloo)
    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 tunelab train cfg.yaml   # multi-node
    torchrun --nproc_per_node 2 -m tunelab train cfg.yaml    # launched by the user: no re-launch
    accelerate launch --config_file fsdp2.yaml -m tunelab train cfg.yaml

The environment variables are LLaMA-Factory's launcher's (`llamafactory-cli train`), so its users' commands work.
A process started by torchrun or accelerate carries LOCAL_RANK / WORLD_SIZE and is never re-launched.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "y", "yes")


@dataclass(frozen=True)
class Rank:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info(environ: Mapping[str, str] | None = None) -> Rank:
    """This process's place, from the variables torchrun / accelerate set (one process when they are absent)."""
    env = os.environ if environ is None else environ
    return Rank(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))


def is_launched(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun / accelerate launch / deepspeed (they all set LOCAL_RANK)."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env


def env_enabled(name: str, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(name, "0").strip().lower() in _TRUE


def visible_gpus() -> int:
    """CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _positive_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a whole number.") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} must be at least {minimum}.")
    return value


def launch_command(argv: list[str], gpus: int, environ: Mapping[str, str] | None = None, *, sharded: bool = False) -> list[str] | None:
    """The torchrun command that re-runs `tunelab train argv` with one process per GPU, or None to run here.

    Re-launch when more than one GPU is visible, FORCE_TORCHRUN is set, or the config shards (fsdp / deepspeed
    need a process group even on one GPU), and not when this process is already one of a launched group.
    NPROC_PER_NODE (default: the visible GPUs, at least 1), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1) and
    MASTER_PORT (a free port; set it for several nodes) are read as LLaMA-Factory does.
    """
    env = os.environ if environ is None else environ
    if is_launched(env) or not (env_enabled("FORCE_TORCHRUN", env) or gpus > 1 or (sharded and gpus > 0)):
        return None
    nproc = _positive_int(env, "NPROC_PER_NODE", max(gpus, 1))
    nnodes = _positive_int(env, "NNODES", 1)
    node_rank = _positive_int(env, "NODE_RANK", 0, minimum=0)
    if node_rank >= nnodes:
        raise ConfigError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}.")
    if gpus and nproc > gpus:
        raise ConfigError(
            f"NPROC_PER_NODE={nproc} asks for more processes than the {gpus} visible GPUs (CUDA_VISIBLE_DEVICES); "
            "use at most one process per GPU."
        )
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    if nnodes > 1 and not env.get("MASTER_PORT"):
        raise ConfigError("NNODES > 1 needs MASTER_ADDR and MASTER_PORT, the same on every node.")
    port = _positive_int(env, "MASTER_PORT", 0, minimum=0) or free_port()
    return [
        sys.executable, "-m", "tunelab.train.distributed",  # torch.distributed.run, with failures told in one line
        "--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
        "--master_addr", addr, "--master_port", str(port),
        "-m", "tunelab.cli", "train", *argv,
    ]


def relaunch(argv: list[str], *, sharded: bool = False) -> int | None:
    """Run `tunelab train argv` under torchrun when `launch_command` says so; returns its exit code, else None."""
    cmd = launch_command(argv, visible_gpus(), sharded=sharded)
    if cmd is None:
        return None
    nproc = cmd[cmd.index("--nproc_per_node") + 1]
    logger.info("launching %s training processes with torchrun at %s:%s", nproc, cmd[cmd.index("--master_addr") + 1],
                cmd[cmd.index("--master_port") + 1])
    env = dict(os.environ)
    # LLaMA-Factory's default for its torchrun launch: less fragmentation, no record-stream holds
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    return run_forwarding_signals(cmd, env)


def run_forwarding_signals(cmd: list[str], env: Mapping[str, str]) -> int:
    """Run the launcher and pass SIGTERM / SIGHUP on to it: `kill PID` of `tunelab train` (or a web UI's Stop) must
    reach torchrun, which forwards it to every worker, instead of leaving them running without their parent."""
    import signal

    proc = subprocess.Popen(cmd, env=dict(env))
    forwarded = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum)) for s in forwarded}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same terminal): wait for it to wind down
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- inside a launched process


def init_distributed(device: str, timeout_s: int) -> Rank:
    """Join the process group (NCCL on GPUs, gloo on the CPU) before anything collective runs.

    Done early, before the data is read, so rank 0 can tokenize while the others wait; the Trainer (accelerate,
    DeepSpeed) later finds the group initialized and uses it.
    """
    info = rank_info()
    if not (is_launched() and info.distributed):
        return info
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(info.local_rank)
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if not info.is_main:
        logging.getLogger("tunelab").setLevel(logging.WARNING)  # progress and notes once, from rank 0
    return info


def _group_active() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _group_active():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Each node's local rank 0 runs the block first (tokenizing into that node's cache), the other ranks after."""
    main = rank_info().local_rank == 0
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_ranks(value: int) -> int:
    """The sum of an int over all ranks (the value itself on one process). One small collective: call it only at
    points where the ranks already synchronize (logging, saving)."""
    if not _group_active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t)
    return int(t.item())


def min_across_ranks(value: int) -> int:
    """The smallest of an int over all ranks (e.g. the batch every GPU can hold)."""
    if not _group_active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def loss_for_check(loss):
    """A copy of this rank's loss summed over the ranks: non-finite on every rank as soon as it is on one, so all
    ranks stop at the same step (a NaN on rank 1 would otherwise reach rank 0's next checkpoint through the
    gradient all-reduce). On NCCL the all-reduce is queued on the stream: no host synchronisation."""
    if not _group_active():
        return loss
    import torch.distributed as dist

    total = loss.detach().float().clone()
    dist.all_reduce(total)
    return total


def call_through_wrapper(model, inner, forward: Callable[..., Any], **kwargs):
    """Call `forward(**kwargs)` as the forward of `inner`, reached through its wrapper `model` (DDP, DeepSpeed's
    engine, or an FSDP2 root whose hooks live on `inner` itself).

    The wrapper's forward is where DDP prepares the gradient all-reduce and FSDP2 gathers the root's parameters;
    calling the decoder directly (as the one-process fused loss does) would skip both: gradients silently
    unsynchronised under DDP, sharded weights under FSDP2.
    """
    had = "forward" in inner.__dict__
    saved = inner.__dict__.get("forward")
    inner.forward = forward
    try:
        return model(**kwargs)
    finally:
        if had:
            inner.forward = saved
        else:
            del inner.forward


# ---------------------------------------------------------------- configuration


def check_distributed(cfg, resolved) -> None:
    """Refusals that need the environment (the config layer already refused what no environment can run)."""
    import importlib.util

    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"deepspeed: {cfg.deepspeed} needs the DeepSpeed package, which is not installed: "
            'pip install "tunelab[deepspeed]" (or use fsdp: full_shard, which needs nothing more).'
        )
    sharded = resolved.parallel != "single" and resolved.parallel != "ddp"
    if sharded and resolved.device == "cpu":
        # accelerate applies an FSDP plugin only to GPU process groups: on the CPU (gloo) the Trainer would silently
        # train plain DDP with every rank holding the whole model; DeepSpeed needs GPUs as well
        raise ConfigError(
            f"{'fsdp' if cfg.fsdp else 'deepspeed'} shards the model over GPUs, and this run is on the CPU. Remove the "
            "key to train with plain data parallel (FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tunelab train ...)."
        )
    if sharded and not (is_launched() and rank_info().distributed):
        way = "deepspeed" if cfg.deepspeed else "fsdp"
        raise ConfigError(
            f"{way} shards the model over several processes, but this is a single one: run `tunelab train` (it "
            "starts one process per visible GPU), or torchrun / accelerate launch -m tunelab train."
        )


def trainer_arguments(cfg, resolved) -> dict[str, Any]:
    """TrainingArguments for the launched case: the sharding engine and DDP settings (none on one process)."""
    import json

    out: dict[str, Any] = {}
    if resolved.world_size > 1:
        # LoRA trains every adapter in every step: no search for unused parameters (LLaMA-Factory's default too)
        out["ddp_find_unused_parameters"] = False if cfg.finetuning_type == "lora" else None
        if resolved.device == "cpu":
            out["ddp_backend"] = "gloo"
    if cfg.fsdp:
        raw: dict[str, Any] = {}
        if cfg.fsdp_config:
            with open(cfg.fsdp_config, encoding="utf-8") as fh:
                raw = json.load(fh)
        # accelerate-style names (fsdp_version) and plain ones (version) mean the same; the file's values win
        fsdp_config = {k.removeprefix("fsdp_"): v for k, v in raw.items()}
        words = set(cfg.fsdp.replace(",", " ").split())
        fsdp_config.setdefault("version", 2)
        fsdp_config.setdefault("reshard_after_forward", "shard_grad_op" not in words)  # FSDP2's form of the strategy
        if "offload" in words:
            fsdp_config.setdefault("cpu_offload", True)
        # one ordinary PEFT adapter on rank 0 at every save (the sharded format would need a converter to load)
        fsdp_config.setdefault("state_dict_type", "FULL_STATE_DICT")
        out["fsdp"] = True  # the strategy words are translated above (transformers deprecates fsdp as a string)
        out["fsdp_config"] = fsdp_config
    if cfg.deepspeed:
        out["deepspeed"] = cfg.deepspeed
    return out


def torchrun_main(argv: list[str]) -> int:
    """`python -m torch.distributed.run argv`, except that a failed worker ends with one line (the worker has
    already printed its error sentence) instead of torchrun's traceback of the launcher itself."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the earliest: the others are usually torchrun's SIGTERM
        print(f"tunelab train: {len(exc.failures)} training process(es) failed (first: rank {rank}, exit code "
              f"{failure.exitcode}); its error is printed above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(torchrun_main(sys.argv[1:]))
