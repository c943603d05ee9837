"""`tunelab data` jobs: convert, split, validate, stats, preview, register (one module each).

Everything here sits on the data layer (tunelab.data: registry -> readers -> formats -> template) and adds no
second reader, converter or encoder. `source` holds what the jobs share (resolving NAME|PATH to a local file spec,
streaming conversations, atomic JSON/JSONL writers); `tokens` loads a tokenizer + template and measures samples in
worker processes. The command front is `tunelab.commands.data`.
"""
