"""`tunelab export cfg.yaml [key=value ...]`: merge a LoRA adapter into its base model and save a standalone model.

    tunelab export model_name_or_path=Qwen/Qwen2.5-7B-Instruct adapter_name_or_path=saves/run checkpoint=best \
        export_dir=models/qwen-merged
    tunelab export cfg.yaml export_base=dequantized export_ollama=true       # a QLoRA adapter, plus an Ollama Modelfile

Prints the export folder and the verification figures on stdout; progress goes to stderr.
"""
from __future__ import annotations

USAGE = "usage: tunelab export [config.yaml] [key=value ...] [--key value ...]"
SECTIONS = ("model", "quantization", "export")


def main(argv: list[str]) -> int:
    from tunelab.commands import command_config

    cfg = command_config(argv, "export", USAGE, SECTIONS)
    if cfg is None:
        return 0
    from tunelab.config.parse import parse_cli_args
    from tunelab.model.loader import use_trained_adapter

    cfg = use_trained_adapter(cfg, "export", set(parse_cli_args(argv)[1]))
    from tunelab.export import run_export

    result = run_export(cfg)
    print(f"merged model: {result.export_dir} ({result.dtype}, {len(result.files)} weight file(s), merge {result.seconds:.1f} s)")
    if result.parity is not None:
        print(f"check vs base + adapter: {result.parity.line()} -> ok (tolerance {result.tolerance:.3g})")
    if result.shift is not None:
        print(f"QLoRA shift, original vs dequantized base: {result.shift.line()}")
    return 0
