"""Training runs started from the web UI: an ordinary `tunelab train <output_dir>/tunelab_webui.yaml` process.

    run = start_run({"model_name_or_path": ..., "output_dir": "saves/a", ...}, saves_dir="saves")
    state = run_state("saves/a")          # running?, pid, log records, the end (done / stopped / failed)
    stop_run("saves/a")                   # SIGTERM: the run finishes its step, saves a checkpoint, exits
    find_live_runs("saves")               # runs still training (reattach after a page reload, a second browser)

Nothing here needs the page to stay open: the YAML, the process's output and a run file (pid, device, start time)
live in output_dir, so a reload, a second browser or a restarted server finds the run again, and the same folder
resumes from the command line (`tunelab train saves/a/tunelab_webui.yaml`) and vice versa. A second start while a
run trains on the same device (GPU, or the CPU) is refused with a sentence. No Gradio import here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.utils.io import atomic_write_json, atomic_write_text, read_jsonl

CONFIG_FILE = "tunelab_webui.yaml"
RUN_FILE = "tunelab_webui_run.json"
OUTPUT_FILE = "tunelab_webui_train.log"
_lock = threading.Lock()  # one start at a time in this server: the busy check and the start are one step


def current_device() -> str:
    """What a run started now trains on: 'cuda:<CUDA_VISIBLE_DEVICES>' (or 'cuda:all'), else 'cpu'."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        cuda = False
    if not cuda:
        return "cpu"
    return "cuda:" + (os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or "all")


def same_device(a: str, b: str) -> bool:
    if a == b:
        return True
    return a.startswith("cuda:") and b.startswith("cuda:") and "all" in (a[5:], b[5:])


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) `tunelab train` process."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError, OSError):
        return False
    proc = f"/proc/{pid}"
    if os.path.isdir(proc):  # Linux: reject zombies and a reused pid of another program
        try:
            with open(f"{proc}/stat", encoding="utf-8") as fh:
                if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return False
            with open(f"{proc}/cmdline", "rb") as fh:
                return b"tunelab" in fh.read()
        except OSError:
            return False
    return True


def read_run_file(output_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def find_live_runs(saves_dir: str, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run files of live runs in the run folders under saves_dir (one level down) and in `extra` folders."""
    folders = list(extra)
    if os.path.isdir(saves_dir):
        folders += [os.path.join(saves_dir, n) for n in sorted(os.listdir(saves_dir))]
    found, seen = [], set()
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        info = read_run_file(folder)
        if info and pid_alive(int(info.get("pid", -1))):
            found.append({**info, "output_dir": folder})
    return sorted(found, key=lambda r: r.get("started", 0), reverse=True)


def start_run(config: dict[str, Any], saves_dir: str, *, busy_message=None) -> dict[str, Any]:
    """Write config as output_dir/tunelab_webui.yaml and start `tunelab train` on it; returns the run file.

    Raises ConfigError when a run already trains on this device (busy_message(run) gives its sentence)."""
    import yaml

    output_dir = str(config.get("output_dir") or "")
    if not output_dir:
        raise ConfigError("output_dir is not set: give the folder the run writes to.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir '{output_dir}' is a file, not a folder: choose another output_dir.")
    device = current_device()
    with _lock:
        for run in find_live_runs(saves_dir, extra=(output_dir,)):
            if same_device(run.get("device", ""), device) or os.path.realpath(run["output_dir"]) == os.path.realpath(output_dir):
                raise ConfigError(busy_message(run) if busy_message else
                                  f"A run is already training on {run.get('device')} ({run['output_dir']}, pid {run.get('pid')}).")
        os.makedirs(output_dir, exist_ok=True)
        yaml_path = os.path.join(output_dir, CONFIG_FILE)
        atomic_write_text(yaml_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        out = open(os.path.join(output_dir, OUTPUT_FILE), "w", encoding="utf-8")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", os.path.abspath(yaml_path)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # its own session: a Ctrl-C of the server leaves it running
        out.close()
        info = {"pid": proc.pid, "device": device, "started": time.time(), "yaml": yaml_path,
                "command": f"tunelab train {yaml_path}"}
        atomic_write_json(os.path.join(output_dir, RUN_FILE), info)
    threading.Thread(target=_reap, args=(proc, output_dir), daemon=True).start()
    return info


def _reap(proc: subprocess.Popen, output_dir: str) -> None:
    """Wait for the process (no zombie) and record its exit status in the run file."""
    code = proc.wait()
    info = read_run_file(output_dir) or {}
    if info.get("pid") == proc.pid:
        atomic_write_json(os.path.join(output_dir, RUN_FILE), {**info, "returncode": code, "ended": time.time()})


def stop_run(output_dir: str) -> bool:
    """Send SIGTERM to the run training in output_dir (graceful: checkpoint kept); False when none is running."""
    info = read_run_file(output_dir)
    if not info or not pid_alive(int(info.get("pid", -1))):
        return False
    os.kill(int(info["pid"]), signal.SIGTERM)
    return True


@dataclass
class RunState:
    output_dir: str
    running: bool = False
    pid: int | None = None
    records: list[dict[str, Any]] = field(default_factory=list)  # trainer_log.jsonl
    end: str | None = None  # "done", "stopped", "failed" or None (running / never started)
    message: str = ""  # the run's last error line (failed / stopped)
    stopped_step: int | None = None
    output_tail: str = ""

    @property
    def last(self) -> dict[str, Any]:
        return next((r for r in reversed(self.records) if "loss" in r), self.records[-1] if self.records else {})


def run_state(output_dir: str) -> RunState:
    """What the run in output_dir is doing, from its files alone (so any server or browser reads the same)."""
    state = RunState(output_dir)
    if not output_dir or not os.path.isdir(output_dir):
        return state
    state.records = read_jsonl(os.path.join(output_dir, "trainer_log.jsonl"))
    state.output_tail = _tail(os.path.join(output_dir, OUTPUT_FILE))
    info = read_run_file(output_dir)
    if info and pid_alive(int(info.get("pid", -1))):
        state.running, state.pid = True, int(info["pid"])
        return state
    errors = [line for line in state.output_tail.splitlines() if line.startswith("tunelab train: error:")]
    if errors and "stopped on request" in errors[-1]:
        state.end, state.message = "stopped", errors[-1].split("error:", 1)[1].strip()
        state.stopped_step = max((int(r.get("current_steps", 0)) for r in state.records), default=0)
    elif errors or (info and info.get("returncode") not in (None, 0)):
        state.end = "failed"
        code = (info or {}).get("returncode")
        if errors:
            state.message = errors[-1].split("error:", 1)[1].strip()
        elif isinstance(code, int) and code < 0:  # ended by a signal before training began (no handler yet)
            state.message = f"the process was ended by signal {signal.Signals(-code).name} before its first step."
        else:
            state.message = _last_line(state.output_tail)
    elif os.path.isfile(os.path.join(output_dir, "all_results.json")):
        state.end = "done"
    return state


def _tail(path: str, limit: int = 6000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "the process ended without output"
