"""A merged Llama-architecture model as one GGUF file for llama.cpp and Ollama, written with the
`gguf` package, and read back with transformers' GGUF loader to check it.

What llama.cpp expects of a Hugging Face Llama, beyond the weights themselves:
- its own tensor names (`blk.0.attn_q.weight`), which `gguf.get_tensor_name_map` knows;
- the rows of Q and K reordered: HF rotates the two halves of each head, llama.cpp rotates
  neighbouring pairs, so each head's rows are interleaved (first half, second half -> pairs);
- no `output.weight` when the embeddings are tied: the runtime reuses `token_embd.weight`;
- the tokenizer as metadata: tokens in the byte-level spelling, their types, merges, special ids,
  the pre-tokenizer name that selects llama.cpp's split regex, and the chat template. The end of a
  chat turn is the EOS, so a runtime stops where a reply ends; nothing adds a BOS, since the chat
  template writes every marker itself.

Tensors are converted one at a time and written as they go, so memory holds the model and one
converted tensor, not a second copy of the model.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import TuneforgeError
from ..models import end_of_turn_token

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def check_supported(config) -> None:
    """Refuse, before any weights load, a model this writer cannot describe faithfully."""
    architecture = (config.architectures or [config.model_type])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise TuneforgeError(
            f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)} models (SmolLM2, Llama 2/3 and "
            f"their fine-tunes); this model is {architecture}. Export it --format merged instead: "
            "llama.cpp's own convert_hf_to_gguf.py converts that folder for other architectures.",
            code="unsupported_architecture",
        )
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise TuneforgeError(
            f"GGUF export writes plain RoPE only; this model uses rope_type '{rope_type}'. "
            "Export it --format merged instead.",
            code="unsupported_architecture",
        )


def gguf_filename(name: str, dtype: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}-{dtype}.gguf"


def write_gguf(model, tokenizer, path: Path, dtype: str, *, name: str, console: Console) -> None:
    import gguf

    config = model.config
    check_supported(config)
    tensors = _llama_tensors(model)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hyperparameters(writer, config, name, dtype)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        layouts = {gguf_name: _layout(tensor, dtype) for gguf_name, tensor in tensors.items()}
        for gguf_name, tensor in tensors.items():
            quant_type, nbytes = layouts[gguf_name]
            writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=quant_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"Writing {path.name} ({dtype})", total=len(tensors))
            for gguf_name, tensor in tensors.items():
                data = tensor.detach().to(torch.float32).cpu().numpy()
                writer.write_tensor_data(gguf.quants.quantize(data, layouts[gguf_name][0]))
                bar.advance(task)
    finally:
        writer.close()


def _llama_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, Q and K rows in llama.cpp's order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TuneforgeError(
                f"The model has a weight llama.cpp's Llama architecture has no place for: {hf_name}. "
                "Export it --format merged instead.",
                code="unsupported_architecture",
            )
        if ".q_proj." in hf_name:
            tensor = _pair_rotary_halves(tensor, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            tensor = _pair_rotary_halves(tensor, config.num_key_value_heads)
        tensors[gguf_name] = tensor
    return tensors


def _pair_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Within each head, interleave the rows of the first and second half: rows (a0..aN, b0..bN)
    become (a0, b0, a1, b1, ...), which is how llama.cpp's RoPE pairs dimensions."""
    rows_per_half = weight.shape[0] // heads // 2
    halves = weight.reshape(heads, 2, rows_per_half, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def _layout(tensor: torch.Tensor, dtype: str):
    """(GGML type, bytes) for one tensor. Norms and other 1-D tensors stay f32, as llama.cpp keeps
    them; q8_0 needs rows in whole blocks of 32 and falls back to f16 for any that are not."""
    import gguf

    types = gguf.GGMLQuantizationType
    quant_type = {"f32": types.F32, "f16": types.F16, "q8_0": types.Q8_0}[dtype]
    if tensor.ndim < 2:
        quant_type = types.F32
    block, _ = gguf.GGML_QUANT_SIZES[quant_type]
    if tensor.shape[-1] % block:
        quant_type = types.F16
    return quant_type, int(np.prod(gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), quant_type)))


def _add_hyperparameters(writer, config, name: str, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[dtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise TuneforgeError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use); "
            f"this one is {model.get('type')} with a {(tokenizer_json.get('decoder') or {}).get('type')} "
            "decoder. Export it --format merged instead.",
            code="unsupported_tokenizer",
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json.get("pre_tokenizer")))
    tokens, token_types = _token_list(tokenizer, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # gguf's SpecialVocab reads the merges in either tokenizer.json spelling (strings or pairs).
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
        special = gguf.SpecialVocab(folder, load_merges=True, special_token_types=())
    end_of_turn = end_of_turn_token(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else tokenizer.eos_token_id
    special.special_token_ids = {
        kind: token_id
        for kind, token_id in (
            ("bos", tokenizer.bos_token_id),
            ("eos", eos_id),
            ("eot", eos_id),
            ("unk", tokenizer.unk_token_id),
            ("pad", tokenizer.pad_token_id),
        )
        if token_id is not None
    }
    special.add_special_token = {"bos": False, "eos": False}
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token, and its type: added special tokens are CONTROL (llama.cpp never splits
    or prints them), other added tokens USER_DEFINED; ids past the tokenizer are UNUSED padding."""
    import gguf

    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE (its `tokenizer.ggml.pre`)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        # transformers and llama.cpp share these names; the first match is as good as any.
        known = next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern), None)
        if known:
            return known
    raise TuneforgeError(
        f"GGUF export cannot name this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) for llama.cpp, "
        "which would then split text differently from training. Export it --format merged instead.",
        code="unsupported_tokenizer",
    )


def load_gguf(folder: Path, filename: str):
    """The GGUF as transformers reads it (dequantised to fp32), and the tokenizer it rebuilds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=filename)
