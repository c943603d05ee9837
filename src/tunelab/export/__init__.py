"""Export: merge LoRA adapters into their base model (streaming, tensor by tensor), verify, write a standalone model.

    from tunelab.export import run_export
    run_export(load_config("export.yaml"))

Modules: workflow.py (the command's steps), merge.py (shard planning and the streaming merge), lora.py (adapter
tensors and their weight updates), quant.py (the NF4 rounding a QLoRA adapter was trained on), verify.py (logit
parity checks).
"""
from tunelab.export.workflow import ExportResult, run_export

__all__ = ["ExportResult", "run_export"]
