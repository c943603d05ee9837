"""`TunelabTrainer`: the Hugging Face Trainer with tunelab's loss path, NaN guard and complete-checkpoint markers.

What differs from the stock Trainer, and why:
* loss: the fused linear cross-entropy of tunelab.model.kernels when the model fits it (no full logits
  tensor), the model's own loss otherwise. Same value, same normalisation (num_items_in_batch).
* a NaN or infinite loss raises TrainingError with the step number; the checkpoints already written are the
  last good ones and nothing after them is saved (the stock Trainer silently replaces it by an average).
  The check never stalls the GPU: each step's loss is copied to pinned host memory without blocking and read
  once its CUDA event has completed (at the latest before a checkpoint is written and at the end).
* tokens are counted from the collator's CPU-side `num_tokens`, not with the stock per-step `.item()` (a sync).
* every checkpoint ends with a marker file, written after all its files (tunelab.utils.checkpoints), and old
  checkpoints are rotated only after that, so a kill during a save never leaves no resumable checkpoint.
* adapters are saved in safetensors with PEFT's own save_pretrained (loadable by PeftModel.from_pretrained).
* several processes (tunelab.train.distributed): the fused loss runs as the wrapped model's forward (DDP syncs
  gradients there, FSDP2 gathers parameters there); the NaN check reads the loss summed over the ranks, so every
  rank stops at the same step; token counts are summed over the ranks at logs and saves only; a checkpoint's
  marker is written after a barrier, once every rank's files are in.
"""
from __future__ import annotations

import logging
import math

from transformers import Trainer

from tunelab.errors import TrainingError
from tunelab.model.kernels import forward_hidden, fused_linear_cross_entropy
from tunelab.train.distributed import barrier, call_through_wrapper, loss_for_check, sum_across_ranks
from tunelab.utils.checkpoints import mark_complete

logger = logging.getLogger(__name__)


class TunelabTrainer(Trainer):
    def __init__(self, *args, loss_impl: str = "plain", nan_check: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl
        self.nan_check = nan_check
        self._pending_losses: list = []  # (step, host tensor, cuda event or None)
        if loss_impl == "fused":
            self.model_accepts_loss_kwargs = True  # our loss divides by num_items_in_batch itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        loss_rows = inputs.pop("loss_rows", None)
        inputs.pop("num_tokens", None)
        if self.loss_impl == "fused" and not return_outputs and "labels" in inputs:
            # Accelerate puts autocast around the top-level model.forward only; we call the decoder directly, so
            # mixed precision must be entered here (without it the LoRA matmuls would run in fp32).
            with self.accelerator.autocast():
                loss = self._fused_loss(model, inputs, num_items_in_batch, loss_rows)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
                # num_items_in_batch counts the whole global batch, and DDP averages the ranks' gradients: scaled
                # back by the world size, as the stock compute_loss does (else every gradient is 1/world too small)
                loss = loss * self.accelerator.num_processes
            return loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _fused_loss(self, model, inputs, num_items_in_batch, loss_rows):
        """The fused loss of a batch; under DDP / FSDP2 / DeepSpeed it runs as the wrapped model's forward."""
        inner = self.accelerator.unwrap_model(model)

        def loss_of(**batch):
            hidden, weight = forward_hidden(inner, batch)
            return fused_linear_cross_entropy(hidden, weight, batch["labels"], num_items_in_batch, loss_rows=loss_rows)

        if inner is model and not self.is_fsdp_enabled:
            return loss_of(**inputs)
        return call_through_wrapper(model, inner, loss_of, **inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.loss_impl == "fused" and prediction_loss_only and "labels" in inputs:
            import torch

            inputs = self._prepare_inputs(inputs)
            inputs = {k: v for k, v in inputs.items() if k != "num_tokens"}
            loss_rows = inputs.pop("loss_rows", None)
            with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
                loss = self._fused_loss(model, inputs, None, loss_rows)
            return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def training_step(self, model, inputs, num_items_in_batch=None):
        num_tokens = inputs.get("num_tokens")
        if isinstance(num_tokens, int):
            # this rank's tokens; summed over the ranks at each log and save (`_sync_tokens`), never per step
            self._unsynced_tokens = getattr(self, "_unsynced_tokens", 0) + num_tokens
            if self.args.world_size == 1:
                self._sync_tokens()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nan_check:
            self._queue_loss_check(loss_for_check(loss.detach()))
        return loss

    def _sync_tokens(self) -> None:
        pending, self._unsynced_tokens = getattr(self, "_unsynced_tokens", 0), 0
        self.state.num_input_tokens_seen += sum_across_ranks(pending) if self.args.world_size > 1 else pending

    def log(self, logs, *args, **kwargs):
        self._sync_tokens()  # every rank logs at the same steps (the loss is gathered there anyway)
        return super().log(logs, *args, **kwargs)

    def _queue_loss_check(self, loss) -> None:
        import torch

        step = self.state.global_step + 1
        if loss.device.type == "cuda":
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(loss.float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_losses.append((step, host, event))
        else:
            self._pending_losses.append((step, loss.float(), None))
        self._check_losses(wait=False)

    def _check_losses(self, wait: bool) -> None:
        while self._pending_losses:
            step, value, event = self._pending_losses[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending_losses.pop(0)
            if not math.isfinite(float(value)):
                self._pending_losses.clear()
                raise TrainingError(
                    f"the loss became {float(value)} at step {step}: training stopped, and nothing after step {step - 1} "
                    f"was saved. The checkpoints in {self.args.output_dir} are kept; the latest may already hold the "
                    "diverging weights, so resume from an earlier one (resume_from_checkpoint: <its folder>) with a "
                    "lower learning_rate, or use bf16 instead of fp16, or check the data of this step."
                )

    def check_pending_losses(self) -> None:
        """Raise TrainingError if any step's loss (still in flight) was not finite; waits for them."""
        self._check_losses(wait=True)

    def _save_checkpoint(self, model, trial):
        self._check_losses(wait=True)  # never write a checkpoint of weights a NaN step has touched
        self._sync_tokens()  # trainer_state.json holds the count of every rank's tokens
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=trial)
        ckpt = f"{run_dir}/{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        barrier()  # every rank's files (rng_state_<rank>.pth, FSDP / ZeRO shards) are written before the marker
        if self.args.should_save:
            mark_complete(ckpt)
            if limit:
                self._rotate(run_dir, limit)

    def _rotate(self, run_dir: str, limit: int) -> None:
        import shutil

        from tunelab.utils.checkpoints import list_checkpoints

        ckpts = [p for _, p in list_checkpoints(run_dir, complete_only=False)]
        best = self.state.best_model_checkpoint
        keep = set(ckpts[-limit:])
        if best:
            keep.add(best)
        for path in ckpts:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
