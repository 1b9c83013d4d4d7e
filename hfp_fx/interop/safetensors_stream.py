"""Safetensors files read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape and the byte range of its data) and the tensors' bytes.  Reading a tensor here is a seek
and one ``readinto`` of its bytes, and writing streams each tensor's bytes after a header built
from the shapes known in advance, so pruning a checkpoint holds one tensor at a time instead of
a whole shard (memory-mapping a 5 GB shard keeps its pages resident while it is open).

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> write_safetensors(path, {"a": ((2, 3), torch.float32)}, lambda key: torch.ones(2, 3))
    24
    >>> SafetensorsCheckpoint(path.rsplit("/", 1)[0]).read("a").sum().item()
    6.0
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

__all__ = ["SafetensorsCheckpoint", "TensorEntry", "write_safetensors", "DTYPES"]

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a checkpoint lies: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int
    stop: int


def _header(path: Path) -> Tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


class SafetensorsCheckpoint(Mapping):
    """The tensors of a checkpoint directory (one ``*.safetensors`` file, or shards listed by
    ``model.safetensors.index.json``), by name; a tensor is read from disk on each lookup."""

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory} holds no safetensors checkpoint (no *.safetensors file "
                                    f"and no {INDEX_NAME}); save the model with save_pretrained(..., "
                                    "safe_serialization=True)")
        self.files = [self.directory / f for f in files]
        self.entries: Dict[str, TensorEntry] = {}
        for path in self.files:
            header, base = _header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which hfp_fx cannot read")
                start, stop = info["data_offsets"]
                self.entries[key] = TensorEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]),
                                                base + start, base + stop)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key``, read into fresh memory (nothing of the file stays mapped)."""
        e = self.entries[key]
        data = torch.empty(e.stop - e.start, dtype=torch.uint8)
        with open(e.file, "rb") as f:
            f.seek(e.start)
            if data.numel() and f.readinto(memoryview(data.numpy())) != data.numel():
                raise OSError(f"{e.file} ends inside tensor {key}")
        return data.view(e.dtype).reshape(e.shape)


def write_safetensors(path, layout: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> int:
    """Write tensors ``layout`` (name -> (shape, dtype), in file order) to ``path``, asking
    ``produce(name)`` for each one only when its turn comes; returns the bytes of tensor data.
    A produced tensor of another shape or dtype is an error (the header is already written)."""
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, (shape, dtype) in layout.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key, (shape, dtype) in layout.items():
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{key}: produced {tuple(t.shape)} {t.dtype}, the header says {tuple(shape)} {dtype}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return offset
