"""Checkpoint files: lazy access to .safetensors / .pth / .bin tensors (any box of them), the
files that travel with the weights (tokenizer, prompt template), and small JSON/directory helpers."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import zipfile
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from engine.runtime.errors import UserError
from engine.text.prompts import TEMPLATE_FILE
from models.sharding import Box

NATIVE_FORMAT = "cot-engine"
# Files that travel with the weights through every conversion: the tokenizer, and the prompt template
# a trained checkpoint records (engine.text.prompts.TEMPLATE_FILE).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   TEMPLATE_FILE)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(UserError):
    """A user-facing checkpoint problem; the message is one sentence naming the file."""


def intersect(a: Box, b: Box) -> Optional[Box]:
    out = tuple((max(sa, sb), min(ea, eb)) for (sa, ea), (sb, eb) in zip(a, b))
    return None if any(s >= e for s, e in out) else out


def slices(box: Box, origin: Box = None) -> Tuple[slice, ...]:
    origin = origin or tuple((0, 0) for _ in box)
    return tuple(slice(s - o, e - o) for (s, e), (o, _) in zip(box, origin))


class TensorFile:
    """Lazy access to one .safetensors / .pth / .bin file: names, shapes, and slices."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} does not exist")
        if not os.access(path, os.R_OK):
            raise CheckpointError(f"{path} is not readable")
        self.metadata: Dict[str, str] = {}
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                self._st = safe_open(path, framework="pt")
                self.metadata = self._st.metadata() or {}
                self.shapes = {k: tuple(self._st.get_slice(k).get_shape()) for k in self._st.keys()}
            except Exception as e:  # safetensors raises its own error types for bad headers/sizes
                raise CheckpointError(f"{path} is truncated or corrupted ({one_line(e)})") from None
            self._dict = None
        else:
            try:
                try:
                    self._dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    self._dict = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
            except Exception as e:
                raise CheckpointError(f"{path} is truncated or corrupted ({one_line(e)})") from None
            if not isinstance(self._dict, dict):
                raise CheckpointError(f"{path} does not hold a dictionary of tensors")
            self._dict = {k: v for k, v in self._dict.items() if isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}

    def read(self, name: str, box: Optional[Box] = None) -> torch.Tensor:
        try:
            if self._dict is not None:
                t = self._dict[name]
                return (t[slices(box)] if box else t).clone()
            if box is None:
                return self._st.get_tensor(name)
            return self._st.get_slice(name)[slices(box)]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read {name} ({one_line(e)})") from None

    def dtype(self, name: str) -> torch.dtype:
        if self._dict is not None:
            return self._dict[name].dtype
        return _ST_DTYPES[self._st.get_slice(name).get_dtype()]


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def not_weights(path: str) -> Optional[str]:
    """Why a file given as a checkpoint cannot be one (a JSON data file, text, another kind of file), or
    None; read from its name and first bytes, before a loader sees it."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] in (b"{", b"["):
        kind = "a JSON file"
    elif head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "a text file"
    elif not path.endswith(WEIGHT_SUFFIXES):
        kind = f"a {os.path.splitext(path)[1] or 'suffix-less'} file"
    else:
        return None
    return (
        f"{path} is {kind}, not a checkpoint (a directory with params.json or config.json and its weights, "
        f"or a {' / '.join(WEIGHT_SUFFIXES)} file)"
    )


def file_problem(path: str) -> Optional[str]:
    """Why a weight or state file we wrote cannot be whole (cut short by a kill or a full disk), found
    from its structure without reading its tensors; None when it looks whole."""
    try:
        size = os.path.getsize(path)
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if n < 0 or 8 + n > size:
                    return f"{os.path.basename(path)} is truncated (its header is cut)"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                return f"{os.path.basename(path)} is truncated ({size} of {8 + n + end} bytes)"
        elif path.endswith((".pt", ".pth")) and not zipfile.is_zipfile(path):
            return f"{os.path.basename(path)} is truncated or corrupted"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return f"{os.path.basename(path)} is not readable"
    return None


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({one_line(e)})") from None


def shard_files(ckpt_dir: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not files and os.path.exists(os.path.join(ckpt_dir, "consolidated.safetensors")):
        files = [os.path.join(ckpt_dir, "consolidated.safetensors")]  # Mistral's reference release
    for i, path in enumerate(files):
        m = re.search(r"consolidated\.(\d+)\.", os.path.basename(path))
        if m and int(m.group(1)) != i:
            raise CheckpointError(f"{ckpt_dir}: shard {i:02d} is missing (found {os.path.basename(path)})")
    return files


def tokenizer_files_for(path: str) -> List[str]:
    """The files that make up the tokenizer at `path` (a .model / tokenizer.json file or a directory)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files = [] if os.path.isdir(path) else [path]
    if os.path.isdir(path) or path.endswith(".json"):
        files += [os.path.join(directory, n) for n in TOKENIZER_FILES
                  if os.path.exists(os.path.join(directory, n)) and os.path.join(directory, n) not in files]
    return files


def copy_tokenizer(files: Iterable[str], out_dir: str) -> None:
    """Copy under the standard names (a sentencepiece model becomes tokenizer.model)."""
    for p in files:
        name = os.path.basename(p)
        if name not in TOKENIZER_FILES:
            name = "tokenizer.model" if name.endswith(".model") else "tokenizer.json"
        shutil.copyfile(p, os.path.join(out_dir, name))
