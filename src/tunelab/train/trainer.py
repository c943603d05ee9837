"""`TunelabTrainer`: the Hugging Face Trainer with tunelab's loss path, NaN guard and complete-checkpoint markers.

What differs from the stock Trainer, and why:
* loss: the fused linear cross-entropy of tunelab.model.kernels when the model fits it (no full logits
  tensor), the model's own loss otherwise. Same value, same normalisation (num_items_in_batch).
* a NaN or infinite loss raises TrainingError with the step number; the checkpoints already written are the
  last good ones and nothing after them is saved (the stock Trainer silently replaces it by an average).
* every checkpoint ends with a marker file, written after all its files (tunelab.train.checkpoints), and old
  checkpoints are rotated only after that, so a kill during a save never leaves no resumable checkpoint.
* adapters are saved in safetensors with PEFT's own save_pretrained (loadable by PeftModel.from_pretrained).
"""
from __future__ import annotations

import logging
import math

from transformers import Trainer

from tunelab.errors import TrainingError
from tunelab.model.kernels import forward_hidden, fused_linear_cross_entropy
from tunelab.train.checkpoints import mark_complete

logger = logging.getLogger(__name__)


class TunelabTrainer(Trainer):
    def __init__(self, *args, loss_impl: str = "plain", nan_check: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl
        self.nan_check = nan_check
        if loss_impl == "fused":
            self.model_accepts_loss_kwargs = True  # our loss divides by num_items_in_batch itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_impl == "fused" and not return_outputs and "labels" in inputs:
            hidden, weight = forward_hidden(model, inputs)
            return fused_linear_cross_entropy(hidden, weight, inputs["labels"], num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.loss_impl == "fused" and prediction_loss_only and "labels" in inputs:
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                hidden, weight = forward_hidden(model, inputs)
                loss = fused_linear_cross_entropy(hidden, weight, inputs["labels"])
            return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nan_check and not math.isfinite(float(loss.detach())):
            step = self.state.global_step + 1
            raise TrainingError(
                f"the loss became {float(loss)} at step {step}: training stopped. The last good checkpoint is kept in "
                f"{self.args.output_dir}. Lower learning_rate, use bf16 instead of fp16, or check the data of this step."
            )
        return loss

    def _save_checkpoint(self, model, trial):
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=trial)
        ckpt = f"{run_dir}/{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            mark_complete(ckpt)
            if limit:
                self._rotate(run_dir, limit)

    def _rotate(self, run_dir: str, limit: int) -> None:
        import shutil

        from tunelab.train.checkpoints import list_checkpoints

        ckpts = [p for _, p in list_checkpoints(run_dir, complete_only=False)]
        best = self.state.best_model_checkpoint
        keep = set(ckpts[-limit:])
        if best:
            keep.add(best)
        for path in ckpts:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
