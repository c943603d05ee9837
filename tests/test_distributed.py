"""Multi-process training on the CPU with real torch.distributed processes (gloo, torchrun on localhost).

Two runs of one tiny 4-bit QLoRA job (16 samples, 4 steps, a checkpoint every 2, global batch 4):
  A  one process, batch 4, in this process (`tunelab.run`);
  B  2 processes x batch 2: first `FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tunelab train b.yaml` (tunelab re-launches
     itself under torchrun), SIGKILLed (torchrun and both workers) after step 3 was logged and checkpoint-2
     completed; then `torchrun --nproc_per_node 2 -m tunelab train b.yaml` (launched by the user) resumes it.
B must hold A's adapter at checkpoint-2 (before the kill) and at the end (after the resume): same global batch,
only the order of the floating-point reductions differs, so atol 2e-6 on values up to ~0.2 (observed: 3e-7). Its
logged losses and gradient norms are A's, its token count is A's, and its files are exactly A's (checkpoints hold
one RNG file per rank). The launcher's decisions, the refusals and the TrainingArguments are checked without
processes. One launch pair and one in-process run keep the CPU cost near a minute on two cores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

import tunelab
from helpers_train import (  # noqa: F401  (fixtures)
    adapter_tensors,
    base_config,
    checkpoint_steps,
    cli_env,
    counting_records,
    isolated_env,
    offline_session,
    read_json,
    read_jsonl,
    tiny_model,
    wait_for_kill_point,
    write_dataset_dir,
)
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.distributed import launch_command, rank_info, trainer_arguments
from tunelab.utils.checkpoints import COMPLETE_MARKER

ATOL = 2e-6  # DDP vs one process: same sums, other reduction order (observed max difference: 3e-7)

PAUSE_HOOK = '''
import os, time
_step = int(os.environ.get("TUNELAB_TEST_PAUSE_AT_STEP", "0"))
if _step and os.environ.get("RANK") == "0":
    import tunelab.utils.io as _io
    _append = _io.append_jsonl

    def append_jsonl(path, record):
        _append(path, record)
        if record.get("current_steps") == _step and "loss" in record:
            open(os.environ["TUNELAB_TEST_PAUSE_FILE"], "w").close()
            time.sleep(600)  # the test kills the whole process group here

    _io.append_jsonl = append_jsonl
'''


def _config(tiny: str, data_dir: str, out: str, batch: int, root) -> dict:
    return base_config(
        tiny, data_dir, out, quantization_bit=4, max_steps=4, save_steps=2, logging_steps=1,
        per_device_train_batch_size=batch, learning_rate=5e-3, lr_scheduler_type="cosine",
        tokenized_path=str(root / f"tok_{os.path.basename(out)}"),
    )


def _write(path, cfg: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def _env(**extra) -> dict:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "FORCE_TORCHRUN"):
        env.pop(var, None)
    env.update(extra)
    return env


def _torchrun(cfg_path: str) -> list[str]:
    from tunelab.train.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "tunelab", "train", cfg_path]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers, each by pid (torchrun starts every worker in a session of its own)."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data_dir = write_dataset_dir(root / "data", {"toy": ("alpaca", counting_records(16))})
    out = {k: str(root / f"run_{k}") for k in "ab"}
    cfg_b = _write(root / "b.yaml", _config(tiny_model, data_dir, out["b"], 2, root))
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK, encoding="utf-8")
    pause = str(root / "paused")

    # B's first launch (tunelab re-launching itself under torchrun) runs while A trains in this process
    env_b = _env(PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), FORCE_TORCHRUN="1",
                 NPROC_PER_NODE="2", TUNELAB_TEST_PAUSE_AT_STEP="3", TUNELAB_TEST_PAUSE_FILE=pause)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", cfg_b], cwd=root, env=env_b,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tunelab.run(_config(tiny_model, data_dir, out["a"], 4, root))
        wait_for_kill_point([pause, os.path.join(out["b"], "checkpoint-2", COMPLETE_MARKER)], proc, run="run C",
                            timeout=240.0, kill=_kill_tree)
        _kill_tree(proc)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    first_stderr = proc.stderr.read()
    killed = {"log_steps": [r["current_steps"] for r in read_jsonl(os.path.join(out["b"], "trainer_log.jsonl"))],
              "checkpoints": checkpoint_steps(out["b"]),
              "final": os.path.exists(os.path.join(out["b"], "adapter_model.safetensors"))}
    # the same job again, launched by the user: torchrun ... -m tunelab train b.yaml
    resumed = subprocess.run(_torchrun(cfg_b), cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return {"out": out, "killed": killed, "first_stderr": first_stderr, "resumed_stderr": resumed.stderr}


def test_the_kill_happened_mid_run(runs):
    killed = runs["killed"]
    assert killed == {"log_steps": [1, 2, 3], "checkpoints": [2], "final": False}
    assert "launching 2 training processes with torchrun" in runs["first_stderr"]
    assert "continuing from" in runs["resumed_stderr"] and "checkpoint-2" in runs["resumed_stderr"]


def test_two_processes_give_the_one_process_adapter(runs):
    """Before the kill (checkpoint-2) and after the resume (the final adapter): A's tensors."""
    for sub in ("checkpoint-2", ""):
        a = adapter_tensors(os.path.join(runs["out"]["a"], sub))
        b = adapter_tensors(os.path.join(runs["out"]["b"], sub))
        assert a.keys() == b.keys() and len(a) == 28
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=ATOL, msg=f"{sub or 'final'} {key}")
        assert max(float(a[k].abs().max()) for k in a) > 100 * ATOL  # the adapter moved: the tolerance means something


def test_two_processes_log_the_one_process_losses_and_tokens(runs):
    a = read_jsonl(os.path.join(runs["out"]["a"], "trainer_log.jsonl"))
    b = read_jsonl(os.path.join(runs["out"]["b"], "trainer_log.jsonl"))
    assert [r["current_steps"] for r in b] == [1, 2, 3, 4]  # one record per step: rank 1 wrote none, step 3 not twice
    for ra, rb in zip(a, b):
        # the loss is the global batch's (not a rank's), the gradient norm that of the global-batch gradient
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    res_a, res_b = (read_json(os.path.join(runs["out"][k], "all_results.json")) for k in "ab")
    # both ranks' tokens counted once, and the count of the steps before the kill restored from checkpoint-2
    assert res_b["num_input_tokens_seen"] == res_a["num_input_tokens_seen"] == 826
    resolved = yaml.safe_load(open(os.path.join(runs["out"]["b"], "tunelab_config.yaml"), encoding="utf-8"))["resolved"]
    assert (resolved["world_size"], resolved["parallel"]) == (2, "ddp")


def test_outputs_are_exactly_the_one_process_files(runs):
    a_dir, b_dir = runs["out"]["a"], runs["out"]["b"]
    top = {"README.md", "adapter_config.json", "adapter_model.safetensors", "all_results.json", "chat_template.jinja",
           "checkpoint-2", "checkpoint-4", "tokenizer.json", "tokenizer_config.json", "train_results.json",
           "trainer_log.jsonl", "trainer_state.json", "training_args.bin", "tunelab_config.yaml"}
    assert set(os.listdir(a_dir)) == top
    assert set(os.listdir(b_dir)) == top
    ckpt = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "optimizer.pt",
            "scheduler.pt", "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "training_args.bin",
            COMPLETE_MARKER}
    for step in (2, 4):
        assert set(os.listdir(os.path.join(a_dir, f"checkpoint-{step}"))) == ckpt | {"rng_state.pth"}
        assert set(os.listdir(os.path.join(b_dir, f"checkpoint-{step}"))) == ckpt | {"rng_state_0.pth", "rng_state_1.pth"}


# ---------------------------------------------------------------- without processes


def test_launcher_decisions():
    base = [sys.executable, "-m", "tunelab.train.distributed", "--nnodes", "1", "--node_rank", "0"]
    assert launch_command(["c.yaml"], 0, {}) is None  # CPU, not forced
    assert launch_command(["c.yaml"], 1, {}) is None  # one GPU
    assert launch_command(["c.yaml"], 4, {"LOCAL_RANK": "0", "WORLD_SIZE": "4"}) is None  # already launched
    cmd = launch_command(["c.yaml", "lr=1"], 2, {"MASTER_PORT": "29500"})
    assert cmd == base + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29500",
                          "-m", "tunelab.cli", "train", "c.yaml", "lr=1"]
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "29501"}
    cmd = launch_command(["c.yaml"], 0, env)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "29501"
    cmd = launch_command(["c.yaml"], 8, {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                                         "NPROC_PER_NODE": "4"})
    assert cmd[3:14] == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr", "10.0.0.1",
                         "--master_port", "29500", "-m"]
    one_gpu_sharded = launch_command(["c.yaml"], 1, {"MASTER_PORT": "29500"}, sharded=True)
    assert one_gpu_sharded[one_gpu_sharded.index("--nproc_per_node") + 1] == "1"
    assert launch_command(["c.yaml"], 2, {"MASTER_PORT": "29500"})[3:5] == ["--nnodes", "1"]
    port = launch_command(["c.yaml"], 2, {})
    assert int(port[port.index("--master_port") + 1]) > 0  # a free port when MASTER_PORT is unset


@pytest.mark.parametrize("env, words", [
    ({"NPROC_PER_NODE": "3"}, "more processes than the 2 visible GPUs"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two' is not a whole number"),
    ({"NNODES": "2"}, "needs MASTER_ADDR and MASTER_PORT"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_PORT": "1"}, "NODE_RANK=2 must be below NNODES=2"),
])
def test_launcher_refusals(env, words):
    with pytest.raises(ConfigError, match=words):
        launch_command(["c.yaml"], 2, env)


def test_rank_info_reads_the_launchers_variables():
    info = rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (info.rank, info.local_rank, info.world_size, info.is_main, info.distributed) == (3, 1, 4, False, True)
    assert rank_info({}) == rank_info({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})


def _ds(tmp_path, stage: int) -> str:
    path = tmp_path / f"ds_z{stage}.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": stage}}), encoding="utf-8")
    return str(path)


def test_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match="quantization_bit: 8 cannot be sharded with FSDP.*quantization_bit: 4"):
        load_config({"quantization_bit": 8, "fsdp": "full_shard"})
    with pytest.raises(ConfigError, match="cannot be sharded with DeepSpeed ZeRO-3"):
        load_config({"quantization_bit": 8, "deepspeed": _ds(tmp_path, 3)})
    assert load_config({"quantization_bit": 8, "deepspeed": _ds(tmp_path, 2)}).deepspeed  # ZeRO-2 keeps whole weights
    assert load_config({"quantization_bit": 4, "fsdp": "full_shard"}).fsdp == "full_shard"
    with pytest.raises(ConfigError, match="fsdp and deepspeed are both set"):
        load_config({"fsdp": "full_shard", "deepspeed": _ds(tmp_path, 2)})
    with pytest.raises(ConfigError, match="deepspeed: config file 'nope.json' does not exist"):
        load_config({"deepspeed": "nope.json"})
    with pytest.raises(ConfigError, match="fsdp_config is set but fsdp is not"):
        load_config({"fsdp_config": _ds(tmp_path, 2)})
    with pytest.raises(ConfigError, match="fsdp: 'full' is not understood"):
        load_config({"fsdp": "full"})


def test_training_arguments_for_sharding(tmp_path):
    from tunelab.config.resolve import resolve

    fsdp_json = tmp_path / "fsdp.json"
    fsdp_json.write_text(json.dumps({"fsdp_reshard_after_forward": False}), encoding="utf-8")
    cfg = load_config({"fsdp": "full_shard", "fsdp_config": str(fsdp_json)})
    out = trainer_arguments(cfg, resolve(cfg))
    assert out == {"fsdp": True, "fsdp_config": {"reshard_after_forward": False, "version": 2,
                                                 "state_dict_type": "FULL_STATE_DICT"}}  # the file's value wins
    cfg = load_config({"fsdp": "shard_grad_op offload"})
    assert trainer_arguments(cfg, resolve(cfg))["fsdp_config"] == {
        "version": 2, "reshard_after_forward": False, "cpu_offload": True, "state_dict_type": "FULL_STATE_DICT"}
    cfg = load_config({"deepspeed": _ds(tmp_path, 3)})
    resolved = resolve(cfg)
    assert resolved.parallel == "deepspeed-zero3"
    assert trainer_arguments(cfg, resolved) == {"deepspeed": cfg.deepspeed}
    assert trainer_arguments(load_config({}), resolve(load_config({}))) == {}  # one process: nothing added


def test_run_time_refusals(tiny_model, tmp_path, capsys):
    """Through the CLI, before anything heavy: DeepSpeed missing names the extra; FSDP on the CPU is refused
    (accelerate would silently train plain DDP there)."""
    import importlib.util

    from tunelab.cli import main

    data_dir = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", counting_records(4))})
    cfg = base_config(tiny_model, data_dir, str(tmp_path / "out"))
    if importlib.util.find_spec("deepspeed") is None:
        assert main(["train", _write(tmp_path / "ds.yaml", dict(cfg, deepspeed=_ds(tmp_path, 3)))]) == 1
        assert 'pip install "tunelab[deepspeed]"' in capsys.readouterr().err
    assert main(["train", _write(tmp_path / "fsdp.yaml", dict(cfg, fsdp="full_shard"))]) == 1
    err = capsys.readouterr().err
    assert "fsdp shards the model over GPUs, and this run is on the CPU" in err
    assert not os.path.exists(tmp_path / "out")


def test_a_failing_worker_ends_with_its_sentence_not_a_traceback(tiny_model, tmp_path):
    """An error inside the launched processes (here: a dataset name the registry lacks, found by each worker)."""
    data_dir = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", counting_records(4))})
    cfg = _write(tmp_path / "bad.yaml", base_config(tiny_model, data_dir, str(tmp_path / "out"), dataset="nope"))
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", cfg], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"), timeout=300)
    assert proc.returncode == 1
    assert "tunelab train: error:" in proc.stderr and "'nope'" in proc.stderr
    assert re.search(r"training process\(es\) failed \(first: rank [01], exit code 1\); its error is printed above\.", proc.stderr)
    assert "Traceback" not in proc.stderr


def test_the_launcher_passes_sigterm_on(tmp_path):
    """`kill PID` of the launching process reaches the launched one (torchrun then forwards it to its workers)."""
    import signal
    import threading

    from tunelab.train.distributed import run_forwarding_signals

    got = tmp_path / "got_sigterm"
    child = ("import signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda s, f: (open({str(got)!r}, 'w').close(), sys.exit(7)))\n"
             f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
             "time.sleep(60)\n")

    def kill_when_ready():
        deadline = time.time() + 30
        while not (tmp_path / "ready").exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process, which runs the launcher part

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_when_ready, daemon=True).start()
    assert run_forwarding_signals([sys.executable, "-c", child], dict(os.environ)) == 7
    assert got.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the forwarding handler is gone again
