"""Reading the original checkpoint's tensors and writing the converted ones.

The PLM's safetensors shards are copied byte for byte (so every tensor keeps its name and
its bytes, and a large model never has to fit in memory); the adapters MEFT adds go into a
shard of their own, and an index ties the shards together.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .errors import BadInputError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import numpy as np

    from .templates.families import Family

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    file: Path


@dataclass
class SourceWeights:
    """The original weights: safetensors shards."""

    files: list[Path]
    tensors: dict[str, TensorInfo]


def _index_files(folder: Path, index_name: str) -> list[Path]:
    index = json.loads((folder / index_name).read_text())
    return [folder / name for name in sorted(set(index["weight_map"].values()))]


PICKLE_ONLY = (
    "{folder} has only pickle weights (pytorch_model.bin). meft-convert reads safetensors only: unpickling "
    "can run arbitrary code. Convert the model first, on a machine where you trust it, e.g. "
    "`AutoModel.from_pretrained(folder).save_pretrained(out)` (transformers 5 saves safetensors) with the "
    "model's own Auto class, or use a revision of it that has safetensors"
)


def find_weights(folder: Path) -> SourceWeights:
    """Locates and inspects the safetensors weights in `folder`; raises BadInputError if
    there are none (pickle weights are refused, never unpickled) or they are unreadable."""
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / SAFETENSORS_INDEX).is_file():
        files = _index_files(folder, SAFETENSORS_INDEX)
    elif (folder / "pytorch_model.bin").is_file() or (folder / PICKLE_INDEX).is_file():
        raise BadInputError(PICKLE_ONLY.format(folder=folder))
    else:
        raise BadInputError(
            f"no model weights (model.safetensors or {SAFETENSORS_INDEX}) in {folder}; meft-convert reads "
            "safetensors only (a model with only pytorch_model.bin must be converted to safetensors first)"
        )
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise BadInputError(f"weight shard {file.name} listed in {SAFETENSORS_INDEX} is missing from {folder}")
        try:
            header = read_header(file)
        except (OSError, ValueError) as e:
            raise BadInputError(f"{file} is not a readable safetensors file ({e})") from None
        for key, entry in header.items():
            if key != "__metadata__":
                tensors[key] = TensorInfo(entry["dtype"], tuple(entry["shape"]), file)
    return SourceWeights(files, tensors)


def read_header(file: Path) -> dict:
    """A safetensors file's JSON header (tensor names to dtype, shape and byte range, plus
    `__metadata__`), read without loading any tensor or torch; ValueError if the file is not
    a complete safetensors file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise ValueError("shorter than a header")
        (length,) = struct.unpack("<Q", start)
        if length > size - 8 or length > 100 << 20:
            raise ValueError(f"a header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    data_size = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dim in shape:
                count *= dim
            valid = isinstance(dtype, str) and 0 <= begin <= end <= data_size
            if dtype in _DTYPE_BYTES:
                valid = valid and end - begin == count * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"tensor {key!r} has an invalid entry or lies outside the file's {data_size} data bytes")
    return header


def _copy_with_progress(src: Path, dst: Path, progress: tqdm) -> None:
    """A byte-for-byte copy in 256 MB steps; inside the kernel (copy_file_range: no bytes pass
    through this process, and file systems that can share blocks do) where it is available."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            while copied := os.copy_file_range(fin.fileno(), fout.fileno(), 256 << 20):
                progress.update(copied)
            return
        except (AttributeError, OSError):  # no copy_file_range here (other OS, some file systems)
            fin.seek(fout.tell())
        while chunk := fin.read(64 << 20):
            fout.write(chunk)
            progress.update(len(chunk))


def _link(src: Path, dst: Path, progress: tqdm) -> None:
    """A hard link to the file `src` names (a hub cache's shards are links to its blobs)."""
    try:
        os.link(os.path.realpath(src), dst)
    except OSError as e:
        raise BadInputError(
            f"could not hard-link {src} into {dst.parent} ({e.strerror}): --link needs both on one file system "
            "that has hard links; leave it out to copy"
        ) from None
    progress.update(dst.stat().st_size)


def _copy_adding_pt_metadata(src: Path, dst: Path, progress: tqdm) -> None:
    """A safetensors file without `format: pt` metadata (transformers wants it): the same file
    with that entry added to its JSON header; the tensor bytes, which the header addresses
    relative to their own start, are copied unchanged in chunks, never loaded."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        (length,) = struct.unpack("<Q", fin.read(8))
        header = json.loads(fin.read(length))
        header["__metadata__"] = {**header.get("__metadata__", {}), "format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads headers with spaces to 8 bytes
        fout.write(struct.pack("<Q", len(raw)) + raw)
        progress.update(8 + length)
        while chunk := fin.read(64 << 20):
            fout.write(chunk)
            progress.update(len(chunk))


def _has_pt_metadata(file: Path) -> bool:
    return (read_header(file).get("__metadata__") or {}).get("format") == "pt"


# the floating-point dtypes (safetensors' names) tensors are stored in, and numpy's for each
# (bfloat16, which numpy lacks, is rounded from float32 by stored_bytes)
FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": None}
# torch's float dtypes by their safetensors names, as str(dtype) writes them (no torch import here)
_TORCH_FLOAT_NAMES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def layer_prefix(keys: Iterable[str], family: Family) -> str | None:
    """The part of the tensor names before the layer list, e.g. 'model.' in
    'model.decoder.layers.0.fc1.weight' (checkpoints differ in whether they carry it)."""
    marker = family.stacks[0].layers + ".0."
    for key in keys:
        start = key.find(marker)
        if start == 0 or (start > 0 and key[start - 1] == "."):
            return key[:start]
    return None


# what a bitsandbytes 4-bit checkpoint stores beside a packed `.weight`: its quantization state,
# whose last entry is named after the quant type (".weight.quant_state.bitsandbytes__nf4")
QUANT_STATE_MARKER = ".weight.quant_state.bitsandbytes__"


def is_bnb_4bit(quantization) -> bool:
    """Whether a config.json's quantization_config is bitsandbytes' 4-bit one (NF4 or FP4), as a
    checkpoint published in 4 bits (*-bnb-4bit) carries it."""
    return (isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes"
            and bool(quantization.get("load_in_4bit")))


def quantized_modules(keys: Iterable[str]) -> dict[str, list[str]]:
    """The modules a 4-bit checkpoint stores packed, by name: the keys of each one's packed weight
    and quantization state (absmax, quant_map, nested ones with double quantization)."""
    keys = list(keys)
    modules = {key.split(QUANT_STATE_MARKER)[0] for key in keys if QUANT_STATE_MARKER in key}
    owned: dict[str, list[str]] = {module: [] for module in modules}
    for key in keys:
        module = key.split(".weight", 1)[0]
        if module in owned:
            owned[module].append(key)
    return owned


def layer_dtype(family: Family, tensors: Mapping) -> str:
    """The dtype of the PLM's layers by its safetensors name ("BF16"): that of the first float
    tensor of the first layer, "F32" if it has none. `tensors`, by name: header entries
    (TensorInfo) or torch tensors (a model's parameters). A quantized layer's state holds its
    packed integers and float32 quantization state; its norms keep the dtype the model computes in.
    The adapters are stored in this dtype, and calibration and verification run in it."""
    layer0 = (layer_prefix(tensors, family) or "") + family.stacks[0].layers + ".0."
    for key, tensor in tensors.items():
        name = tensor.dtype if isinstance(tensor.dtype, str) else _TORCH_FLOAT_NAMES.get(str(tensor.dtype))
        # weights and biases only: a 4-bit checkpoint's layers also hold float32 quantization state
        if key.startswith(layer0) and key.endswith(("weight", "bias")) and name in FLOAT_DTYPES:
            return name
    return "F32"


def stored_bytes(values: np.ndarray, dtype: str) -> bytes:
    """`values` (float32) in `dtype` (one of FLOAT_DTYPES) as safetensors stores them, little
    endian, rounded to nearest-even as torch's casts round (to bfloat16: the top 16 bits of the
    float32 after adding 0x7FFF plus the lowest kept bit; NaN as torch's 0x7FC0)."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype != "BF16":
        with np.errstate(over="ignore", invalid="ignore"):  # beyond the dtype's range: inf, as torch's cast
            return values.astype(FLOAT_DTYPES[dtype]).tobytes()
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0x7FC0), rounded).astype("<u2").tobytes()


def save_tensors(tensors: dict[str, np.ndarray], dtype: str, path: Path) -> None:
    """A safetensors file (with transformers' `format: pt` metadata) of float32 `tensors`, stored
    in `dtype`: a JSON header of names, dtypes, shapes and byte ranges, padded with spaces to a
    multiple of 8 bytes, then the tensors' bytes in the order of their names."""
    header, data, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        data.append(stored_bytes(tensors[name], dtype))
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data[-1])]}
        offset += len(data[-1])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for chunk in data:
            f.write(chunk)


class _Cancelled(Exception):
    pass


class _Counter:
    """What the copy functions see as their progress bar: it counts the bytes copied, and each
    update is where a cancelled copy stops (they update after every chunk)."""

    def __init__(self, stop: threading.Event):
        self.stop, self.n = stop, 0

    def update(self, n: int) -> None:
        if self.stop.is_set():
            raise _Cancelled
        self.n += n


class ShardCopy:
    """Copies the PLM's shards (byte for byte, or with `format: pt` added to a header that lacks
    it) into `out` in a thread of its own: the kernel moves the bytes (copy_file_range) without
    holding the interpreter, so a conversion loads torch and plans meanwhile. finish() shows
    the progress, waits and returns the shards' weight map, or raises what stopped the copy;
    cancel() stops it."""

    def __init__(self, source: SourceWeights, out: Path, show_progress: bool = True, link: bool = False):
        self.source, self.out, self.show_progress, self.link = source, out, show_progress, link
        n = len(source.files) + 1
        self.names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self._stop = threading.Event()
        self._copied = _Counter(self._stop)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="meft-convert shard copy", daemon=True)

    def start(self) -> ShardCopy:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for file, name in zip(self.source.files, self.names):
                if _has_pt_metadata(file) and self.link:
                    _link(file, self.out / name, self._copied)
                elif _has_pt_metadata(file):
                    _copy_with_progress(file, self.out / name, self._copied)
                else:
                    _copy_adding_pt_metadata(file, self.out / name, self._copied)
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 (handed to the thread that waits in finish())
            self._error = e

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def finish(self) -> dict[str, str]:
        # the bar only from here on: a conversion refused while the copy ran shows none
        total_bytes = sum(f.stat().st_size for f in self.source.files)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Writing weights", disable=not self.show_progress) as bar:
            while self._thread.is_alive():
                self._thread.join(0.1)
                bar.update(self._copied.n - bar.n)
            bar.update(self._copied.n - bar.n)
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("the copy of the shards was cancelled")
        names = dict(zip(self.source.files, self.names))
        return {key: names[info.file] for key, info in self.source.tensors.items()}


def write_weights(
    source: SourceWeights,
    adapters: dict[str, np.ndarray],
    dtype: str,
    out: Path,
    show_progress: bool = True,
    copy: ShardCopy | None = None,
) -> None:
    """Writes the PLM shards (`copy`, if already started, else copied now) and a shard of the
    (float32) `adapters` stored in `dtype`, plus the index transformers reads to load them together."""
    copy = copy or ShardCopy(source, out, show_progress).start()
    weight_map = copy.finish()
    overlap = sorted(set(adapters) & set(weight_map))
    if overlap:
        raise BadInputError(f"the checkpoint already has tensors named like MEFT adapters: {overlap[:3]}")
    save_tensors(adapters, dtype, out / copy.names[-1])
    weight_map.update({key: copy.names[-1] for key in adapters})
    total_size = sum(_nbytes(info) for info in source.tensors.values()) + sum(
        t.size * _DTYPE_BYTES[dtype] for t in adapters.values()
    )
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _nbytes(info: TensorInfo) -> int:
    count = 1
    for dim in info.shape:
        count *= dim
    return count * _DTYPE_BYTES.get(info.dtype, 1)


def copy_if_present(src_folder: Path, dst_folder: Path, names: list[str]) -> list[str]:
    copied = []
    for name in names:
        if (src_folder / name).is_file():
            shutil.copyfile(src_folder / name, dst_folder / name)
            copied.append(name)
    return copied
