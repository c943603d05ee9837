"""Streaming LoRA merge: base checkpoint shards in, merged safetensors shards out, one tensor in memory at a time.

    stats = merge_weights(base, [adapter], out_dir, dtype="bfloat16", shard_gb=5, device="cpu", rounding=None)

How, and why this way: the usual merge (load the whole 16-bit model, PEFT `merge_and_unload`, `save_pretrained`)
holds the model plus save-time copies, about 2x its size for a 7B model. Here the output shards are planned from
the tensor shapes before any data is read (so file names and the index are known up front), every output file's
safetensors header is written first, then each base tensor is read from its memory-mapped shard, merged
(W += scale * B @ A, in float32, on `device`), cast to the export dtype and appended to its file. Peak memory is
one base shard's mapped pages plus a few tensors, whatever the model size (figures in docs/chat_export.md).
`rounding` (export_base: dequantized) first rounds each quantized base weight the way QLoRA training saw it.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from tunelab.errors import ModelError

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT = {"F32", "F16", "BF16", "F64"}


# ------------------------------------------------------------------------------------------ reading the base
class BaseCheckpoint:
    """The weight files of a model folder (safetensors, or PyTorch .bin read through mmap), without loading them."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.files = _weight_files(folder)
        self.is_safetensors = self.files[0].endswith(".safetensors")
        self.keys: dict[str, list[str]] = {}  # file -> keys in file order
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors dtype names
        for path in self.files:
            with self._open(path) as f:
                names = list(f.keys())
                self.keys[path] = names
                for k in names:
                    self.shapes[k], self.dtypes[k] = f.shape_dtype(k)

    @contextmanager
    def _open(self, path: str) -> Iterator[Any]:
        if self.is_safetensors:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                yield _SafeReader(f)
        else:
            import torch

            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            try:
                yield _DictReader(state)
            finally:
                del state

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """(key, tensor) in file order; one file open (mapped) at a time."""
        for path in self.files:
            with self._open(path) as f:
                for k in self.keys[path]:
                    yield k, f.get(k)


class _SafeReader:
    def __init__(self, f: Any) -> None:
        self.f = f

    def keys(self):
        return self.f.keys()

    def shape_dtype(self, k: str) -> tuple[tuple[int, ...], str]:
        s = self.f.get_slice(k)
        return tuple(s.get_shape()), s.get_dtype()

    def get(self, k: str):
        return self.f.get_tensor(k)


class _DictReader:
    def __init__(self, state: dict) -> None:
        self.state = state

    def keys(self):
        return self.state.keys()

    def shape_dtype(self, k: str) -> tuple[tuple[int, ...], str]:
        t = self.state[k]
        return tuple(t.shape), _ST_DTYPES[str(t.dtype).replace("torch.", "")]

    def get(self, k: str):
        return self.state[k]


def _weight_files(folder: str) -> list[str]:
    """The weight files of a model folder, in index order; a ModelError naming what was found otherwise."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            return [os.path.join(folder, f) for f in dict.fromkeys(weight_map.values())]
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    found = sorted(os.listdir(folder))
    raise ModelError(
        f"base model folder '{folder}' holds no weights: expected model.safetensors (or model-*.safetensors with "
        f"model.safetensors.index.json, or pytorch_model.bin), found {', '.join(found[:10]) or 'nothing'}."
    )


# ------------------------------------------------------------------------------------------ writing shards
@dataclass
class ShardPlan:
    """Which tensors go to which output file, with their output dtype and byte offsets."""

    files: list[str]
    entries: dict[str, list[tuple[str, str, tuple[int, ...], int, int]]]  # file -> [(key, dtype, shape, start, end)]
    total_bytes: int

    def index(self) -> dict[str, Any]:
        weight_map = {k: f for f, rows in self.entries.items() for k, *_ in rows}
        return {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}


def plan_shards(base: BaseCheckpoint, out_dtype: str, shard_bytes: int) -> ShardPlan:
    """Output files of at most shard_bytes (a bigger tensor gets a file of its own), in the base's tensor order."""
    groups: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    total = 0
    for path in base.files:
        for k in base.keys[path]:
            dtype = out_dtype if base.dtypes[k] in _FLOAT else base.dtypes[k]
            n = _ITEMSIZE[dtype]
            for d in base.shapes[k]:
                n *= d
            if groups[-1] and size + n > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((k, dtype, base.shapes[k], n))
            size += n
            total += n
    count = len(groups)
    names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    entries: dict[str, list] = {}
    for name, group in zip(names, groups):
        offset, rows = 0, []
        for k, dtype, shape, n in group:
            rows.append((k, dtype, shape, offset, offset + n))
            offset += n
        entries[name] = rows
    return ShardPlan(names, entries, total)


class _ShardWriter:
    """Writes one planned safetensors file: header first, then each tensor's bytes in plan order."""

    def __init__(self, path: str, rows: list[tuple[str, str, tuple[int, ...], int, int]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for k, dtype, shape, start, end in rows:
            header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
        self.expected = [r[0] for r in rows]
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.written = 0

    def write(self, key: str, tensor) -> None:
        if key != self.expected[self.written]:
            raise RuntimeError(f"shard writer expected {self.expected[self.written]}, got {key}")
        import torch

        self.fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written += 1

    @property
    def done(self) -> bool:
        return self.written == len(self.expected)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


# ------------------------------------------------------------------------------------------ merging
@dataclass
class MergeStats:
    seconds: float = 0.0
    tensors: int = 0
    merged: int = 0  # tensors changed by an adapter
    rounded: int = 0  # tensors rounded through the training quantization
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0


def merge_weights(
    base: BaseCheckpoint,
    adapters: Sequence[Any],
    out_dir: str,
    *,
    dtype: str,
    shard_gb: float,
    device: str = "cpu",
    rounding: Callable | None = None,
    rounded_keys: set[str] | None = None,
) -> MergeStats:
    """Write the merged weights (shards + index) into out_dir. Adapters apply in order, like PEFT's merges."""
    import torch

    start = time.time()
    out_torch = getattr(torch, dtype)
    plan = plan_shards(base, _ST_DTYPES[dtype], int(shard_gb * 1024**3))
    owner = {k: f for f, rows in plan.entries.items() for k, *_ in rows}
    writers: dict[str, _ShardWriter] = {}
    stats = MergeStats(files=list(plan.files), total_bytes=plan.total_bytes)
    try:
        for key, tensor in base.tensors():
            rounds = rounding is not None and key in (rounded_keys or set())
            touched = [a for a in adapters if a.touches(key)]
            if rounds or touched:
                w = tensor.to(device)
                w = rounding(w) if rounds else w.float()
                for adapter in touched:
                    w = adapter.apply(key, w)
                stats.merged += bool(touched)
                stats.rounded += rounds
                out = w.to(out_torch).cpu()
            else:
                out = tensor.to(out_torch) if tensor.is_floating_point() else tensor
            name = owner[key]
            if name not in writers:
                writers[name] = _ShardWriter(os.path.join(out_dir, name), plan.entries[name])
            writers[name].write(key, out)
            stats.tensors += 1
            if writers[name].done:
                writers[name].close()
            del out, tensor
    finally:
        for w in writers.values():
            if not w.fh.closed:
                w.fh.close()
    if len(plan.files) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(plan.index(), fh, indent=2)
    stats.seconds = time.time() - start
    return stats
