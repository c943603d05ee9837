"""Trainer callbacks: trainer_log.jsonl + the live progress line, and the gradient health check.

trainer_log.jsonl has one JSON object per logging step (and per evaluation) with LLaMA-Factory's keys
(current_steps, total_steps, loss, eval_loss, lr, epoch, percentage, elapsed_time, remaining_time) plus
tokens_per_second, gpu_memory_gib (peak allocated) and gpu_memory_reserved_gib (peak reserved). On resume,
records past the resumed step are dropped so the log reads as one run.

A graceful stop: the first SIGTERM during training (what `kill PID` and the web UI's Stop button send) finishes the
current optimizer step, logs it, saves a complete checkpoint and ends the run with a TrainingError sentence naming
that checkpoint, so running the same command again resumes from it. A second SIGTERM falls back to the previous
handler (by default: terminate at once). Ctrl-C (SIGINT) is unchanged.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time

from transformers import TrainerCallback

from tunelab.errors import TrainingError
from tunelab.utils.io import append_jsonl

logger = logging.getLogger(__name__)


def _fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def gpu_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


def gpu_memory_reserved_gib() -> float | None:
    """Peak memory the caching allocator reserved (what nvidia-smi sees, less the CUDA context)."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return None


class LogCallback(TrainerCallback):
    """Writes trainer_log.jsonl and prints progress (a line per log; an in-place line per step on a terminal)."""

    def __init__(self, output_dir: str, stream=None):
        self.path = os.path.join(output_dir, "trainer_log.jsonl")
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()
        self.start_step = 0
        self.start_tokens = 0
        self.stop_request = StopRequest()

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop_request.install()
        self.start = time.time()
        self.start_step = state.global_step
        self.start_tokens = state.num_input_tokens_seen
        if not state.is_world_process_zero:  # the log is rank 0's file
            return
        if state.global_step > 0 and os.path.isfile(self.path):  # resumed: keep the log of steps up to here
            kept = []
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("current_steps", 0) <= state.global_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
            os.replace(tmp, self.path)
        elif state.global_step == 0 and os.path.isfile(self.path):
            os.remove(self.path)

    def _rates(self, state) -> tuple[float, float, float]:
        elapsed = time.time() - self.start
        steps = max(state.global_step - self.start_step, 0)
        tokens = state.num_input_tokens_seen - self.start_tokens
        remaining = (state.max_steps - state.global_step) * elapsed / steps if steps else 0.0
        return elapsed, remaining, tokens / elapsed if elapsed > 0 else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return
        elapsed, remaining, tps = self._rates(state)
        record = {
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "epoch": round(state.epoch or 0.0, 4),
            "percentage": round(100 * state.global_step / max(state.max_steps, 1), 2),
            "elapsed_time": _fmt_time(elapsed),
            "remaining_time": _fmt_time(remaining),
            "tokens_per_second": round(tps, 1),
            "gpu_memory_gib": gpu_memory_gib(),
            "gpu_memory_reserved_gib": gpu_memory_reserved_gib(),
        }
        if "grad_norm" in logs:
            record["grad_norm"] = logs["grad_norm"]
        record = {k: v for k, v in record.items() if v is not None}
        if state.is_world_process_zero:
            append_jsonl(self.path, record)
            self._print(record)

    def _print(self, r: dict) -> None:
        parts = [f"step {r['current_steps']}/{r['total_steps']} ({r['percentage']:.0f}%)"]
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if "eval_loss" in r:
            parts.append(f"eval_loss {r['eval_loss']:.4f}")
        if "lr" in r:
            parts.append(f"lr {r['lr']:.2e}")
        parts.append(f"{r['tokens_per_second']:.0f} tok/s")
        if "gpu_memory_gib" in r:
            parts.append(f"mem {r['gpu_memory_gib']:.1f} GiB")
        parts.append(f"{r['elapsed_time']} elapsed, {r['remaining_time']} left")
        end = "\n"
        prefix = "\r\033[K" if self.tty else ""
        print(prefix + "[tunelab] " + " | ".join(parts), end=end, file=self.stream, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_request.requested:  # log and checkpoint this step; on_save then ends the run
            control.should_log = control.should_save = control.should_training_stop = True
        # the last step is always logged, even when max_steps is not a multiple of logging_steps
        if state.global_step >= state.max_steps and state.logging_steps and state.global_step % state.logging_steps:
            control.should_log = True
        if self.tty and state.is_world_process_zero:
            elapsed, remaining, tps = self._rates(state)
            print(f"\r\033[K[tunelab] step {state.global_step}/{state.max_steps} | {tps:.0f} tok/s | "
                  f"{_fmt_time(elapsed)} elapsed, {_fmt_time(remaining)} left", end="", file=self.stream, flush=True)


    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # safetensors writes 0600: give the checkpoint the umask's modes
            from tunelab.utils.io import honour_umask

            honour_umask(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if self.stop_request.requested:  # the checkpoint is complete (its marker is written before on_save)
            self.stop_request.restore()
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            raise TrainingError(
                f"stopped on request (SIGTERM) at step {state.global_step} of {state.max_steps}: {ckpt} is saved "
                "and complete; run the same command again to resume from it."
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.stop_request.restore()


class StopRequest:
    """The SIGTERM handler of a training run: the first signal sets `requested`, a second one is the old handler's."""

    def __init__(self):
        self.requested = False
        self.previous = None
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self.installed:  # signals: main thread only
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True

    def restore(self) -> None:
        if self.installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
            self.installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: do what the old handler does (the default terminates now)
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        logger.warning("SIGTERM received: finishing this step and saving a checkpoint (send it again to stop at once)")


class GradientHealthCallback(TrainerCallback):
    """Warns when every trainable gradient is exactly zero in each of the first `steps` optimizer steps.

    That never happens in a working LoRA run (lora_B gets a gradient from the first step), so it points to a
    silent misconfiguration: all labels masked, frozen adapters, a detached loss.
    """

    def __init__(self, steps: int = 3):
        self.steps = steps
        self.zero_steps = 0
        self.checked = 0
        self.warned = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.checked >= self.steps or model is None:
            return
        self.checked += 1
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if all(g is None or not bool(g.abs().sum() > 0) for g in grads):
            self.zero_steps += 1
        if self.checked == self.steps and self.zero_steps == self.steps and not self.warned:
            self.warned = True
            logger.warning(
                "the gradients of all trainable parameters were exactly zero in each of the first %d steps: training "
                "is not changing the model. Check that samples have trained tokens (labels), lora_target and "
                "finetuning_type.", self.steps,
            )
