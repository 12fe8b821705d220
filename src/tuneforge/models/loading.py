"""Loading what a `ModelSource` names, and describing it without loading its weights."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import logging.handlers
import pickle
import re
import threading
import warnings
import weakref
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from ..errors import ConfigError, ModelSourceError, complaint, json_kind, key_path
from .architecture import end_of_turn_token
from .convert import cached_registry_folder, context_length, read_record
from .families import family_of, warn_if_untested
from .images import ImageInputs, load_image_inputs
from .registry import REGISTRY
from .sources import ModelSource, resolve, run_config_of, run_config_path

# The fallback for tokenizers without a template. No default system prompt: a model that never
# saw one should not be handed an invented one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The tokenizers `load_tokenizer` gave `fallback_template`, their model having no template of its own.
_GIVEN_CHATML: weakref.WeakSet = weakref.WeakSet()
# The ChatML fallbacks `load_tokenizer` has warned of (`chatml_fallback_warning`): each is said once in a process,
# however many times a command loads that model's tokenizer (train checks its inputs, then sets up). Python's "once"
# filter would not do: its memory is cleared whenever any code changes the filters (`warnings.catch_warnings`).
_SAID_CHATML: set[str] = set()
# The tokens `load_tokenizer` added to each tokenizer for model.add_tokens (those its vocabulary lacked).
_ADDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The image side (`images.ImageInputs`) of each tokenizer whose model reads images.
_IMAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_source(spec: str | ModelSource) -> ModelSource:
    return spec if isinstance(spec, ModelSource) else resolve(spec)


def source_context_length(
    spec: str | ModelSource, rope_scaling: dict | None = None, key: str = "model.rope_scaling"
) -> int | None:
    """`context_length` of a model not loaded, read off its config (its text model's, for one that also reads
    images), with `rope_scaling` (see `base_config`): how many positions a row, or a prompt and its reply, may
    fill."""
    return context_length(base_config(spec, rope_scaling, key).get_text_config())


def base_config(spec: str | ModelSource, rope_scaling: dict | None = None, key: str = "model.rope_scaling"):
    """The transformers config the source's model loads with: its base's, with `rope_scaling` (a
    `RopeScaling.parameters()`, model.rope_scaling) on its rotary positions; for an adapter without it, the
    scaling its run trained with (an adapter folder holds no model config of its own). `key`: where the
    scaling was set, which a refusal names."""
    source = _as_source(spec)
    config = model_config(source.path)
    if rope_scaling is None and source.adapter is not None:
        rope_scaling = trained_rope_scaling(source.adapter)
    if rope_scaling:
        scale_rope(config, rope_scaling, source.name, key)
    return config


# Sizes a config gives that no model has fewer than one of; transformers builds a model with none (layers) or
# fails inside torch (a vocabulary of none) instead of saying so.
_COUNTED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def model_config(folder: Path):
    """The transformers config of the model in `folder`, refused naming its config.json and the field where
    transformers cannot build a model from it (a field of the wrong type, heads that do not divide the hidden
    size, a size below one, a model_type it does not have)."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    path = folder / "config.json"
    with contextlib.suppress(OSError):  # one that cannot be read: transformers says why
        _json_object(path)  # transformers parses it again: AutoConfig reads a folder, not fields parsed already
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as err:
        model_type = _model_config(folder).get("model_type")
        if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
            # Most often a model newer than the installed transformers, which a copy of config.json does not mend.
            raise ModelSourceError(
                f"{path}: model_type {model_type!r} is not an architecture transformers {transformers.__version__} "
                "has. A model newer than this transformers needs a release that has it (pip install --upgrade "
                "transformers); otherwise config.json's model_type was edited: correct it.",
                code="model_load_failed",
            ) from err
        raise _config_refused(path, " ".join(str(err).split())) from err
    text = config.get_text_config()
    prefix = "" if text is config else "text_config."
    for field in _COUNTED_SIZES:
        value = getattr(text, field, None)
        if isinstance(value, int) and value < 1:
            raise _config_refused(path, f"{prefix}{field} is {value}; it must be a whole number of at least 1")
    _refuse_sizes_past_weights(folder, text)
    _refuse_broken_generation_config(folder)
    return config


# The token ids of a generation config, which transformers takes unchecked (a token's text given for its id);
# a negative id is taken: -1 is the pad_token_id (none) of Llama folders transformers 4.28 saved.
_GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# Those transformers also takes as a list of ids (all but pad_token_id).
_LISTED_GENERATION_IDS = ("bos_token_id", "eos_token_id", "decoder_start_token_id")


def _refuse_broken_generation_config(folder: Path) -> None:
    """Refuse the generation_config.json in `folder` where it is there but not a generation config (a copy cut
    short, a field of the wrong type), naming it and the field: transformers would load the model without it, or
    fail later, and the ids a reply stops at are often its eos_token_id alone (Llama 3's end of turn), so replies
    would run on past their end."""
    from transformers import GenerationConfig

    path = folder / "generation_config.json"
    if not path.is_file():
        return
    fields = _json_object(path)
    for key in _GENERATION_IDS:
        value = fields.get(key)
        takes_list = key in _LISTED_GENERATION_IDS
        ids = value if takes_list and isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            listed = " or a list of them" if takes_list else ""
            raise _generation_config_refused(path, f"{key} is {json.dumps(value)}, not a token id{listed}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns of odd settings again as it loads the model
        try:
            GenerationConfig.from_dict(fields)
        except (ValueError, TypeError) as err:
            refused = next((key for key in fields if not _generation_field_taken(key, fields[key])), None)
            said = f"{refused} is {json.dumps(fields[refused])}" if refused else "its fields"
            raise _generation_config_refused(path, f"{said}, which transformers refuses ({err})") from None


def _generation_field_taken(key: str, value) -> bool:
    """Whether transformers takes a generation config of the one field `key` set to `value`."""
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_dict({key: value})
    except (ValueError, TypeError):
        return False
    return True


def _generation_config_refused(path: Path, reason: str) -> ModelSourceError:
    return ModelSourceError(
        f"{path}: {reason}. Copy generation_config.json again from where the model came from, or correct that field.",
        code="model_load_failed",
    )


def _refuse_sizes_past_weights(folder: Path, text) -> None:
    """Refuse a config whose sizes make a model far larger than the weights files beside it, before a model is
    built from it: transformers takes minutes and gigabytes to build 100,000 layers. The bound is the embedding and
    one weight of `hidden_size` per layer (every decoder has at least that); `load_model` counts the built model's
    weights exactly (`_refuse_past_weights`) before any load."""
    sizes = {field: getattr(text, field, None) for field in ("vocab_size", "hidden_size", "num_hidden_layers")}
    if all(isinstance(size, int) for size in sizes.values()):
        least = sizes["hidden_size"] * (sizes["vocab_size"] + sizes["num_hidden_layers"])
        given = ", ".join(f"{field} {size:,}" for field, size in sizes.items())
        _refuse_past_weights(folder, least, f"its sizes ({given}) make a model of at least {least:,} weights")


def _refuse_past_weights(folder: Path, weights: int, described: str) -> None:
    """Refuse a model of `weights` weights (`described` so in the message) that its folder's config.json makes far
    larger than the weights files beside it, at one bit a weight (the smallest any quantization stores):
    transformers would make every weight the files lack at full size, gigabytes for layers a config.json edited or
    from another model adds."""
    stored = _weights_bytes(folder)
    if stored and weights > 8 * stored:  # no whole weights to compare with: the loader says what is damaged
        raise _config_refused(
            folder / "config.json",
            f"{described}, far more than the {stored:,} bytes of weights files beside it hold; it is from another "
            "model or was edited",
        )


def _weights_bytes(folder: Path) -> int | None:
    """The bytes of the weights files transformers loads from `folder` (`loaded_weight_files`); None where a
    safetensors file among them is not whole (cut short, its header damaged), whose size says nothing of the
    model's."""
    files = loaded_weight_files(folder)
    if not all(_safetensors_whole(file) for file in files if file.suffix == ".safetensors"):
        return None
    return sum(file.stat().st_size for file in files)


def loaded_weight_files(folder: Path) -> list[Path]:
    """The weights files transformers loads the model in `folder` from, picked as it picks them: model.safetensors,
    else the shards its index names, else pytorch_model.bin, else the shards its index names (a folder holding
    both kinds loads only the first found); none where it holds no weights. An index naming shards the folder
    lacks (a download or copy cut short) is refused naming them."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    for single, index_name in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if (folder / single).is_file():
            return [folder / single]
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(_json_object(index).get("weight_map", {}).values()))
            if missing := [name for name in shards if not (folder / name).is_file()]:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise ModelSourceError(
                    f"{index} names {len(missing)} of its {len(shards)} shards that {folder} lacks: "
                    f"{', '.join(missing[:3])}{more}. A download or copy cut short looks like this: copy or download "
                    "them again from where the model came from.",
                    code="model_load_failed",
                )
            return [folder / name for name in shards]
    return []


def _config_refused(path: Path, reason: str) -> ModelSourceError:
    return ModelSourceError(
        f"{path}: {reason}. Copy config.json again from where the model came from, or correct that field.",
        code="model_load_failed",
    )


def trained_rope_scaling(adapter: Path) -> dict | None:
    """The model.rope_scaling (as `RopeScaling.parameters()`) the run of `adapter` (its final/ or a checkpoint)
    trained with, which its base must run with too; None for none, or an adapter from elsewhere."""
    from pydantic import ValidationError

    from ..config import RopeScaling

    run = run_config_of(adapter)
    if recorded := (run.get("model") or {}).get("rope_scaling"):
        try:
            return RopeScaling.model_validate(recorded).parameters()
        except ValidationError as err:  # the run's config.yaml edited since it trained
            said = "; ".join(
                f"{'.'.join(['model.rope_scaling', *key_path(e['loc'])])}: {complaint(e)}" for e in err.errors()
            )
            raise ModelSourceError(
                f"{run_config_path(adapter)}: {said}. Correct it to the scaling the run trained with.",
                code="model_load_failed",
            ) from None
    # A run that went on training an earlier run's adapter (base_model: that run) loaded it with its scaling.
    base = run.get("base_model")
    if base and Path(base).exists() and (earlier := resolve(str(base), pull_missing=False)).adapter is not None:
        if earlier.adapter.resolve() != Path(adapter).resolve():
            return trained_rope_scaling(earlier.adapter)
    return None


def scale_rope(config, scaling: dict, name: str, key: str = "model.rope_scaling") -> None:
    """Stretch `config`'s rotary positions by `scaling` in place, before any weights load: its (text model's)
    `rope_parameters` take the scaling and `max_position_embeddings` grows by its factor. On Gemma 3 the global
    layers scale and the sliding-window ones keep their base, as Gemma 3's own long-context releases do."""
    text = config.get_text_config()
    window = context_length(text)
    rope = getattr(text, "rope_parameters", None)
    if not rope or not window:
        raise ConfigError(
            f"{key}: {name} ({text.model_type}) has no rotary position embeddings to scale; "
            f"remove model.rope_scaling and keep data.max_length to {window or 'its window'} or less."
        )
    nested = text.nested_rope_parameter_keys(rope)
    layers = ["full_attention"] if "full_attention" in rope else nested or [None]
    for layer in layers:
        current = rope[layer] if layer else rope
        if current.get("rope_type", "default") != "default":
            held = {k: v for k, v in current.items() if k != "rope_theta"}
            raise ConfigError(
                f"{key}: {name} already scales its rotary positions ({held}), to {window} positions; "
                "transformers applies one scaling, so none goes on top of it. Remove model.rope_scaling, or "
                f"keep data.max_length to {window} or less."
            )
        scaled = {"rope_theta": current["rope_theta"], **scaling}
        if "partial_rotary_factor" in current:
            scaled["partial_rotary_factor"] = current["partial_rotary_factor"]
        if scaled["rope_type"] in ("yarn", "llama3"):
            scaled.setdefault("original_max_position_embeddings", window)
            if hasattr(text, "original_max_position_embeddings"):
                # Phi-3's config keeps it beside rope_parameters, and transformers reads that one first.
                text.original_max_position_embeddings = scaled["original_max_position_embeddings"]
        if layer:
            rope[layer] = scaled
        else:
            text.rope_parameters = scaled
    text.max_position_embeddings = int(scaling.get("original_max_position_embeddings", window) * scaling["factor"])
    try:
        text.validate_rope()
    except ValueError as err:  # a family whose transformers config takes only its own kind (Phi-3: longrope)
        raise ConfigError(
            f"{key}: transformers' {text.model_type} config takes no rope_type {scaling['rope_type']} ({err}); "
            f"remove model.rope_scaling and keep data.max_length to {window} or less, or start from a long-context "
            "release of the model."
        ) from None


def load_tokenizer(
    spec: str | ModelSource,
    add_tokens: list[str] | tuple[str, ...] = (),
    template: str | None = None,
    key: str = "model.chat_template",
):
    """The model's fast tokenizer, always with a chat template and a pad token, and `add_tokens`
    (`model.add_tokens`) added whole (`add_whole_tokens`).

    `template` (`model.chat_template`, which `key` names in errors) replaces the tokenizer's own
    template (`chosen_template`). A tokenizer without a chat template gets ChatML, and this warns of it: the one
    place a command says so (a data report records it as `chat_template_missing`, which is not said again).
    One without a pad token pads with end-of-sequence, or without that with the token that ends its
    template's turns: batching needs a pad id, and loss masks come from the chat rendering, never
    from padding, so sharing the id costs nothing.
    """
    source = _as_source(spec)
    tokenizer = _raw_tokenizer(source)
    config = _model_config(source.path)
    _require_embeddings_for_every_token(source, tokenizer, config)
    # Before the ChatML fallback, which ends its turns with <|im_end|> where the vocabulary has it.
    add_whole_tokens(tokenizer, add_tokens)
    if template is not None:
        chosen = chosen_template(tokenizer, template, key)
        own = tokenizer.chat_template
        # Of several named templates, the chosen one is the default the others stay beside.
        tokenizer.chat_template = {**own, "default": chosen} if isinstance(own, dict) else chosen
    elif (own := chat_template(tokenizer)) is not None:
        _refuse_uncompilable_template(own, _tokenizer_folder(source))
    if not tokenizer.chat_template:
        if (said := chatml_fallback_warning(tokenizer)) not in _SAID_CHATML:
            _SAID_CHATML.add(said)
            warnings.warn(said, stacklevel=2)
        tokenizer.chat_template = fallback_template(tokenizer)
        _GIVEN_CHATML.add(tokenizer)
    if isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = text_as_parts(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _pad_token(tokenizer)
    if tokenizer.pad_token is None:
        raise ModelSourceError(
            f"The tokenizer of {source.name} has no pad token, no end-of-sequence token and no end-of-turn "
            "token in its chat template, so batches cannot be padded. Set eos_token (the token that ends "
            f"the model's text) in {source.adapter or source.path}/tokenizer_config.json.",
            code="model_load_failed",
        )
    warn_if_untested(
        source.name,
        (source.adapter or source.path).resolve(),
        config.get("model_type", "unknown"),
        chat_template(tokenizer),
        HeldTokens(tokenizer),
    )
    images = load_image_inputs(source.path, tokenizer)
    if images is not None:
        _IMAGES[tokenizer] = images
    return tokenizer


TEXT_AS_PARTS = (
    "{%- set text_as_parts = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text_as_parts.messages = text_as_parts.messages"
    " + [dict(message, content=[{'type': 'text', 'text': message['content']}])] -%}"
    "{%- else -%}{%- set text_as_parts.messages = text_as_parts.messages + [message] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = text_as_parts.messages %}"
)
"""What a chat template that reads a message's content only as parts gets before it: each message whose content is
a string is given to it as one text part."""


def text_as_parts(tokenizer) -> str:
    """The tokenizer's chat template, and before it `TEXT_AS_PARTS` where it reads a message's content only as
    parts (SmolVLM's: a string's text is left out, so a reply would train on nothing): tuneforge, serve and chat
    give text as a string, and the template then writes it as the same text in a part; content given as parts
    renders as the template alone renders it."""
    from jinja2 import TemplateError

    template = tokenizer.chat_template
    probe = "tuneforge probe text"
    try:
        as_string = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
        as_part = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": probe}]}], tokenize=False
        )
    # A template that refuses the probe, or nests too deeply for Jinja, is refused where it renders.
    except (TemplateError, TypeError, ValueError, RecursionError):
        return template
    if probe in as_string or probe not in as_part:
        return template
    return TEXT_AS_PARTS + template


def generating_class(config):
    """AutoModelForCausalLM, or for a model that reads images and has no causal LM class (Qwen2-VL,
    Qwen2.5-VL) AutoModelForImageTextToText: the same model with its vision encoder."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText


def image_inputs(tokenizer) -> ImageInputs | None:
    """The image side of the model `tokenizer` was loaded for by `load_tokenizer`; None where it reads no images."""
    return _IMAGES.get(tokenizer)


def run_tokenizer(cfg, source: str | ModelSource):
    """The tokenizer a run trains with: `load_tokenizer` with the config's model.add_tokens and
    model.chat_template, an error about the template naming where the config set it."""
    return load_tokenizer(
        source,
        cfg.model.add_tokens,
        cfg.model.chat_template,
        key=cfg.key_at("model.chat_template"),
    )


def chosen_template(tokenizer, template: str, key: str = "model.chat_template") -> str:
    """The template `template` (a model.chat_template, which `key` names) gives `tokenizer`: Jinja
    written out, one of the tokenizer's named templates, chatml (`fallback_template`: ChatML ending its
    turns with a token of the vocabulary), or a template file's text."""
    from ..config import is_jinja  # here: the config module is the one that tells Jinja from a path

    named = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    if is_jinja(template):
        return template
    if template in named:
        return named[template]
    if template == "chatml":
        return fallback_template(tokenizer)
    path = Path(template)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8").removesuffix("\n")
        except UnicodeDecodeError:
            raise ConfigError(f"{key}: {path} is not UTF-8 text; a chat template is a Jinja text file.") from None
        if not text.strip():  # an empty template would be no template: the ChatML fallback, unasked
            raise ConfigError(f"{key}: {path} is empty; write the chat template into it.")
        return text
    names = f"its named templates are {', '.join(sorted(named))}" if named else "it has no named templates"
    raise ConfigError(
        f"{key}: {template} is no file, no Jinja (which holds {{% or {{{{), not chatml, and not a named template of "
        f"the tokenizer of {tokenizer.name_or_path or 'the model'} ({names}). Give the path of a .jinja file "
        "(relative to the config's folder), the template itself, chatml, or one of those names."
    )


ADDED_BY_RUNS = "tuneforge_added_tokens"
"""The tokenizer_config.json key listing the tokens model.add_tokens added in the runs a model comes from."""


def add_whole_tokens(tokenizer, tokens) -> list[str]:
    """Add `tokens` to `tokenizer` as added tokens that are not special, as Qwen's <tool_call> is: each is
    one id wherever it appears in text, never split, never normalized, and kept in decoded answers (special
    tokens are dropped from them, and refused in trained text). A token the vocabulary already holds keeps
    its id, with a warning naming it unless a run added it (`ADDED_BY_RUNS`: continuing from a run with its
    own model.add_tokens); returns the tokens added."""
    from tokenizers import AddedToken

    vocab = HeldTokens(tokenizer)
    by_runs = list(tokenizer.init_kwargs.get(ADDED_BY_RUNS) or [])
    if present := [t for t in tokens if t in vocab and t not in by_runs]:
        held = ", ".join(f"{t} (id {i})" for t, i in zip(present, tokenizer.convert_tokens_to_ids(present)))
        warnings.warn(
            f"model.add_tokens: the vocabulary of {tokenizer.name_or_path or 'the tokenizer'} already holds "
            f"{held}, so {'it is' if len(present) == 1 else 'they are'} "
            f"not added again; {'its row trains' if len(present) == 1 else 'their rows train'} as the new tokens' do.",
            stacklevel=3,
        )
    added = [t for t in tokens if t not in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if added:
        _ADDED[tokenizer] = added
        # Saved in tokenizer_config.json with the tokenizer (transformers keeps a key it does not know), so a
        # model trained from this one knows these tokens as a run's, not its original vocabulary's.
        tokenizer.init_kwargs[ADDED_BY_RUNS] = by_runs + added
    return added


def tokens_added(tokenizer) -> list[str]:
    """The tokens `load_tokenizer` added to `tokenizer` for model.add_tokens (none that it held already)."""
    return _ADDED.get(tokenizer, [])


def grow_embeddings(model, new_ids) -> None:
    """Give the tokens of `new_ids` (those `load_tokenizer` added, after the tokenizer's own) embedding rows
    (and output rows) that start at the mean of the rows of the tokenizer's own tokens, so a new token starts
    as an average token rather than a random one. The model grows to hold them where it has fewer rows; where
    it has spare rows past its tokenizer already (Qwen pads its vocabulary), those rows hold untrained values
    and are set to the mean too."""
    if not new_ids:
        return
    embeddings = model.get_input_embeddings()
    if max(new_ids) >= embeddings.num_embeddings:
        # Every new row is set below: transformers' own mean would take in the spare rows too.
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
    if model.get_input_embeddings().weight.is_meta:  # no values to take a mean of
        return
    own, ids = min(new_ids), torch.tensor(sorted(new_ids))
    output = model.get_output_embeddings()
    layers = [model.get_input_embeddings()]
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    with torch.no_grad():
        for layer in layers:
            for tensor in (layer.weight, getattr(layer, "bias", None)):
                if tensor is not None:
                    tensor[ids] = tensor[:own].float().mean(0).to(tensor.dtype)


def _require_embeddings_for_every_token(source: ModelSource, tokenizer, config: dict) -> None:
    """Refuse a tokenizer with tokens past the model's embedding rows (tokens added without resizing
    the model; `config` is its config.json): the first example or prompt holding one would fail
    inside the embedding lookup."""
    rows = _vocab_rows(config)
    if isinstance(rows, int) and len(tokenizer) > rows and source.adapter is not None:
        # An adapter that added tokens saves its embeddings whole, or the rows of the tokens it added alone (past
        # `rows`); `load_model` resizes the base to them.
        rows = adapter_embedding_rows(source.adapter, input_embedding_name(model_config(source.path))) or max(
            rows, adapter_token_rows(source.adapter) or 0
        )
    if isinstance(rows, int) and len(tokenizer) > rows:
        beyond = tokenizer.convert_ids_to_tokens(list(range(rows, min(len(tokenizer), rows + 5))))
        raise ModelSourceError(
            f"The tokenizer of {source.name} has {len(tokenizer)} tokens but the model in {source.path} embeds "
            f"only {rows} (vocab_size in config.json): ids {rows} and up ({', '.join(beyond)}"
            f"{', ...' if len(tokenizer) > rows + 5 else ''}) have no embedding. Resize the model to its "
            "tokenizer (model.resize_token_embeddings(len(tokenizer)), then save_pretrained) or use the "
            "tokenizer it was saved with.",
            code="model_load_failed",
        )


def _pad_token(tokenizer) -> str | None:
    """The token `load_tokenizer` pads with: the tokenizer's own, else end-of-sequence, else the token that ends
    its template's turns."""
    return tokenizer.pad_token or tokenizer.eos_token or end_of_turn_token(tokenizer)


def _tokenizer_folder(source: ModelSource) -> Path:
    """The folder the source's tokenizer loads from: a run's final/ and checkpoints save their tokenizer beside the
    adapter (its chat template may have changed), else the base's; one whose tokenizer there has lost
    tokenizer_config.json since is refused."""
    adapter = source.adapter
    own = [name for name in ("tokenizer_config.json", "tokenizer.json") if adapter and (adapter / name).is_file()]
    if own == ["tokenizer.json"]:  # a tokenizer saved beside the adapter that has lost part of its files since
        raise ModelSourceError(
            f"{adapter} holds tokenizer.json but not tokenizer_config.json (its special tokens and chat "
            "template): a copy cut short or a file deleted looks like this. Copy the tokenizer files again from "
            "where the model came from, or use another checkpoint.",
            code="model_load_failed",
        )
    return adapter if own else source.path


def template_compile_problem(template: str) -> str | None:
    """Why Jinja cannot compile the chat template `template` as transformers compiles one (its environment takes
    {% generation %} blocks), with what to do; None where it compiles."""
    from jinja2.exceptions import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as err:
        return f"does not compile at its line {err.lineno}: {err.message}. Fix the template there"
    except RecursionError:  # Jinja's parser and code generator recurse per nested block or bracket
        return (
            "does not compile: it nests more deeply than Jinja's compiler reads. Nest its blocks and brackets less "
            "deeply"
        )
    return None


def _refuse_uncompilable_template(template: str, folder: Path) -> None:
    """Refuse the model's own chat template where Jinja cannot compile it, naming the file it is kept in: every
    conversation would fail."""
    problem = template_compile_problem(template)
    if problem is not None:
        kept = next((folder / name for name in _TEMPLATE_FILES if (folder / name).is_file()), folder)
        raise ModelSourceError(
            f"{kept}: the chat template {problem}, or choose another with model.chat_template (chatml, a .jinja file).",
            code="model_load_failed",
        )


# Where a tokenizer keeps its chat template, in the order transformers reads them.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
# The JSON files transformers reads a tokenizer from, whose damage it reports without naming the file.
_TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def _raw_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    folder = _tokenizer_folder(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, AttributeError, StrictDataclassError) as err:
        model_config(source.path)  # transformers reads it first, and blames the tokenizer
        for name in _TOKENIZER_JSON:
            with contextlib.suppress(OSError):
                _json_object(folder / name)
        if not any(folder.glob("tokenizer*")):
            # transformers' own message then blames sentencepiece or tiktoken, which are not the problem.
            raise ModelSourceError(
                f"{folder} holds no tokenizer (no tokenizer.json, tokenizer_config.json or tokenizer.model): "
                "copy the tokenizer files from where the model came from into it.",
                code="model_load_failed",
            ) from err
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise ModelSourceError(
                f"{folder} holds tokenizer_config.json but not the tokenizer itself (tokenizer.json or "
                "tokenizer.model): a copy cut short or a file deleted looks like this. Copy the tokenizer files "
                "again from where the model came from, or use another checkpoint.",
                code="model_load_failed",
            ) from err
        raise ModelSourceError(f"Could not load the tokenizer in {folder}: {err}", code="model_load_failed") from err
    if not tokenizer.is_fast:
        raise ModelSourceError(
            f"The tokenizer in {folder} has no fast (Rust) version; tuneforge needs one for offsets "
            "and speed. Save it with tokenizer.json.",
            code="model_load_failed",
        )
    return tokenizer


# What transformers and PEFT raise for a folder whose files cannot be loaded.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)

# transformers builds a model by swapping module-wide functions for the length of the build (weight
# initialisation and tying switched off, parameters made on the meta device), so two builds in threads
# of one process (the jobs service's eval thread and its inference, serve's adapter pool) break each
# other: a model comes back with meta tensors or an untied head. One build at a time, process-wide.
MODEL_BUILDING = threading.RLock()


def one_build_at_a_time(build):
    """`build`, holding `MODEL_BUILDING` while it runs."""

    @functools.wraps(build)
    def serialized(*args, **kwargs):
        with MODEL_BUILDING:
            return build(*args, **kwargs)

    return serialized


@one_build_at_a_time
def load_model(
    spec: str | ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    quantization=None,
    device: torch.device | str = "cpu",
    rope_scaling: dict | None = None,
    classifier: bool | None = None,
):
    """An `AutoModelForCausalLM`, wrapped in a `PeftModel` when the source has an adapter, its config
    `base_config(spec, rope_scaling)`; with `classifier` an `AutoModelForSequenceClassification` with one
    output instead (a reward model; its score head is new where the folder is a causal LM). None: a
    classifier where the source is one (`is_sequence_classifier`).

    With `quantization` (`quantization.quantization_config`) the base's linear weights are quantized as
    they load, straight onto `device`: a quantized model cannot move afterwards, and no full-precision
    copy of more than one checkpoint shard is ever held. Without it the model loads on the CPU.
    """
    from transformers import AutoModelForSequenceClassification

    source = _as_source(spec)
    placement = {"quantization_config": quantization, "device_map": {"": str(device)}} if quantization else {}
    if classifier is None:
        classifier = is_sequence_classifier(source)
    # A causal LM's folder loaded as a classifier has no score head: it starts new, as a reward model's does, so
    # transformers' report of the missing `score.weight` says nothing a user should act on.
    quiet = classifier and not classifier_folder(source.path)
    held: list[logging.LogRecord] = []
    try:
        config = base_config(source, rope_scaling)
        if classifier:
            config.num_labels = 1
            if quiet and config.get_text_config().pad_token_id is None:
                # The classifier scores a row at its last token that is not the pad token, where `methods.reward`
                # trains it; a language model's config that names none (Llama 3's) takes the pad token training
                # used, the tokenizer's, which a LoRA run's adapter does not save in any config.
                tokenizer = _raw_tokenizer(source)
                config.get_text_config().pad_token_id = tokenizer.convert_tokens_to_ids(_pad_token(tokenizer))
        auto = AutoModelForSequenceClassification if classifier else generating_class(config)
        weights = count_parameters(config)
        _refuse_past_weights(source.path, weights, f"it describes a model of {weights:,} weights")
        with _held_load_report() as held:
            # A weight of another shape is then listed in the report (mismatched_keys), refused below with both shapes.
            model, report = auto.from_pretrained(
                source.path,
                config=config,
                dtype=dtype,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **placement,
            )
    except LOAD_ERRORS as err:
        raise _load_failed(source.path, err) from err
    _refuse_reshaped_weights(source.path, report["mismatched_keys"])
    # transformers starts a weight the checkpoint lacks at random and goes on; only a new score head may be.
    _refuse_missing_weights(
        source.path, [key for key in report["missing_keys"] if not (quiet and key.startswith("score."))]
    )
    if not quiet:  # a load kept: its report (weights the checkpoint holds that the model leaves out) is shown
        for record in held:
            logging.getLogger(record.name).handle(record)
    if quantization and torch.device(device).type == "cpu":
        own_unquantized_weights(model)
    if source.adapter is None:
        return model
    from peft import PeftConfig, PeftModel

    from ..methods.lora import gate_up_pattern_warning_unsaid

    peft_config = None
    try:
        rows = adapter_embedding_rows(source.adapter, _module_name(model, model.get_input_embeddings()))
        if rows and rows != model.get_input_embeddings().num_embeddings:
            # Tokens added in training (Axolotl, Unsloth and PEFT's own recipe save the resized
            # embeddings with the adapter): the base takes the adapter's vocabulary first, as PEFT asks.
            model.resize_token_embeddings(rows)
        elif (rows := adapter_token_rows(source.adapter)) and rows > model.get_input_embeddings().num_embeddings:
            # Rows of added tokens saved alone (model.add_tokens): the adapter's values replace the new rows whole.
            model.resize_token_embeddings(rows, mean_resizing=False)
        copies, _ = base_weight_copies(model, source.adapter)
        peft_config = PeftConfig.from_pretrained(source.adapter)
        if classifier and not classifier_folder(source.adapter):
            # A language model's adapter (an SFT run that a reward model starts from) on its base loaded as a
            # classifier: PEFT's causal-LM wrapper needs generation the classifier lacks, so its generic model
            # holds the adapter, for `methods.reward` to merge.
            peft_config.task_type = None
        with gate_up_pattern_warning_unsaid():
            return PeftModel.from_pretrained(model, source.adapter, key_mapping=copies, config=peft_config)
    except LOAD_ERRORS as err:
        if peft_config is not None:
            # Checked once a load fails, not before: it builds the adapted model again on the meta device, about
            # half a second more on every adapter's load. It names the damaged file and weight where PEFT does not.
            refuse_damaged_adapter(source.adapter, model.config, peft_config, classifier=classifier)
        raise _load_failed(source.adapter, err, adapter=True) from err


@contextlib.contextmanager
def _held_load_report():
    """transformers' load report (missing, unexpected and mismatched weights) held back inside the block, as the
    log records it yields: a load `load_model` refuses is told in its one message, not beneath a report of the
    same weights, and the report of a load it keeps is shown after."""
    handler = logging.handlers.BufferingHandler(capacity=float("inf"))
    logger = logging.getLogger("transformers.modeling_utils")
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield handler.buffer
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def is_sequence_classifier(source: ModelSource) -> bool:
    """Whether `source` is a sequence classifier (a reward model): its adapter trained one (PEFT's task_type
    SEQ_CLS), or, with no adapter, its folder's architecture is one."""
    return classifier_folder(source.adapter if source.adapter is not None else source.path)


def refuse_reward_model(source: ModelSource, command: str, where: str | None = None) -> None:
    """Refuses a reward model (`is_sequence_classifier`) where `command` (chat, serve, eval, distill generate,
    train for a method that trains a language model from it) needs text, before it loads: a classifier scores a
    conversation and writes no reply, and its folder holds no output layer to start a language model from.
    `where`: the config key that named it, to begin the message."""
    if is_sequence_classifier(source):
        raise ModelSourceError(
            f"{where + ': ' if where else ''}{source.spec} is a reward model (a sequence classifier with a score head, "
            f"method: reward): it scores replies and writes none, so `tuneforge {command}` cannot run it. Score "
            "answers with it as a grader: "
            f'tuneforge eval MODEL DATA --grader \'{{"type": "reward_model", "model": "{source.spec}"}}\', or '
            f"measure it on preference pairs: tuneforge eval {source.spec} PAIRS.jsonl",
            code="reward_model_not_generator",
        )


def classifier_folder(folder: Path) -> bool:
    """Whether the adapter or model in `folder` is a sequence classifier (see `is_sequence_classifier`)."""
    if (folder / "adapter_config.json").is_file():
        try:
            return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        except (OSError, ValueError, AttributeError):
            return False
    return any(name.endswith("ForSequenceClassification") for name in _model_config(folder).get("architectures") or [])


def own_unquantized_weights(model) -> None:
    """Gives the weights a quantized CPU load leaves at full precision (embeddings, norms, an untied output
    layer) their own memory. Loaded in the checkpoint's dtype they are views of its memory-mapped file, and
    that view keeps the whole file mapped: quantizing read every page of it, so the process's resident
    memory would keep the full-precision checkpoint (as large as an unquantized base) beside its quantized
    copy for the whole run."""
    for tensor in [*model.parameters(), *model.buffers()]:
        # bitsandbytes' quantized weights are subclasses of Parameter and own their memory already.
        if type(tensor) in (torch.nn.Parameter, torch.Tensor) and tensor.dtype.is_floating_point:
            tensor.data = tensor.data.clone()


def largest_shard_bytes(folder: Path) -> int:
    """Bytes of the largest weights file of the checkpoint in `folder` (its shards as its index names them, or
    its single file): what a quantizing load (`load_model` with `quantization`) reads whole, in the checkpoint's
    own precision, before it quantizes that file's linear weights. 0 where the folder holds no weights file."""
    return max((file.stat().st_size for file in loaded_weight_files(folder)), default=0)


def adapter_embedding_rows(adapter: Path, embedding_name: str, saved: dict[str, list[int]] | None = None) -> int | None:
    """How many input-embedding rows the adapter in `adapter` saves whole (the base's embeddings,
    `embedding_name` in the model, resized to tokens added in training and saved by PEFT as
    `modules_to_save` or embedding layers), or None when it saves none. `saved`: its `adapter_weight_shapes`, where
    the caller has read them."""
    saved = adapter_weight_shapes(adapter) if saved is None else saved
    rows = [
        shape[0]
        for key, shape in saved.items()
        if f".{embedding_name}." in f".{key}" and "lora_" not in key and "token_adapter" not in key and len(shape) == 2
    ]
    return max(rows) if rows else None


def adapter_weight_shapes(adapter: Path) -> dict[str, list[int]]:
    """The shape of each weight the adapter in `adapter` saves, by its saved name; its weights file refused naming
    it where it cannot be read (cut short, its header damaged)."""
    from safetensors import safe_open

    path = _adapter_weights_file(adapter)
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as weights:
                return {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
        return {key: list(tensor.shape) for key, tensor in torch.load(path, map_location="meta").items()}
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        # torch's own words for a file that is no pickle advise weights_only=False, which loads nothing here either.
        why = "it is no PyTorch file" if isinstance(err, pickle.UnpicklingError) else " ".join(str(err).split())
        raise ModelSourceError(
            f"{path} cannot be read ({why}); a copy cut short looks like this. {_ADAPTER_AGAIN}",
            code="model_load_failed",
        ) from None


_ADAPTER_AGAIN = "Copy the adapter again, or use another checkpoint."


def refuse_damaged_adapter(
    adapter: Path, config, peft_config=None, *, classifier: bool = False, saved: dict[str, list[int]] | None = None
) -> None:
    """Refuse, before its weights load, the adapter in `adapter` whose weights file cannot be read or holds a weight
    of another shape than its adapter_config.json (`peft_config`, where the loader changed it) gives that weight on
    the model `config` describes (`classifier`: as `meta_model` builds it), naming the file and the weight. PEFT
    refuses such a file only as it loads it: serve would start and answer its first request with an error. `saved`:
    as for `adapter_embedding_rows`."""
    from peft import PeftConfig

    saved = adapter_weight_shapes(adapter) if saved is None else saved
    peft_config = copy.deepcopy(peft_config or PeftConfig.from_pretrained(adapter))
    if hasattr(peft_config, "init_lora_weights"):
        peft_config.init_lora_weights = False  # shapes alone: no initialisation (PiSSA's would run an SVD)
    made = _adapted_shapes(config, peft_config, classifier)
    for key, shape in saved.items():
        if key in made and made[key] != shape:
            raise ModelSourceError(
                f"{_adapter_weights_file(adapter)}: {key} has shape {shape}, where adapter_config.json "
                f"makes it {made[key]} on its base. The weights file is damaged or of another adapter, or "
                f"adapter_config.json was edited. {_ADAPTER_AGAIN}",
                code="model_load_failed",
            )


# The shapes `_adapted_shapes` built, by base config, adapter config and classifier (the latest 8): serve checks every
# adapter as it starts, and adapters trained with one recipe on one base share them.
_ADAPTED_SHAPES: dict[tuple[str, str, bool], dict[str, list[int]]] = {}


def _adapted_shapes(config, peft_config, classifier: bool) -> dict[str, list[int]]:
    """The shape of each weight PEFT saves for the adapter `peft_config` on the model `config` describes (as
    `meta_model` builds it), by its saved name: the adapted model built on the meta device, once per distinct pair."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    from ..methods.lora import gate_up_pattern_warning_unsaid

    described = json.dumps(
        peft_config.to_dict(), sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else repr(v)
    )
    key = (config.to_json_string(), described, classifier)
    with MODEL_BUILDING:
        if key not in _ADAPTED_SHAPES:
            with torch.device("meta"), gate_up_pattern_warning_unsaid():
                made = get_peft_model_state_dict(get_peft_model(meta_model(config, classifier=classifier), peft_config))
            if len(_ADAPTED_SHAPES) >= 8:
                del _ADAPTED_SHAPES[next(iter(_ADAPTED_SHAPES))]
            _ADAPTED_SHAPES[key] = {name: list(weight.shape) for name, weight in made.items()}
        return _ADAPTED_SHAPES[key]


def _adapter_weights_file(adapter: Path) -> Path:
    """The file the adapter in `adapter` keeps its weights in: adapter_model.safetensors, else PyTorch's pickle."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    safetensors_file = adapter / SAFETENSORS_WEIGHTS_NAME
    return safetensors_file if safetensors_file.is_file() else adapter / WEIGHTS_NAME


def adapter_token_ids(adapter: Path) -> list[int]:
    """The embedding rows the adapter in `adapter` trains by token id (PEFT's trainable_token_indices,
    `model.add_tokens`), which it saves alone."""
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    indices = config.get("trainable_token_indices") or {}
    return indices if isinstance(indices, list) else [i for listed in indices.values() for i in listed]


def adapter_token_rows(adapter: Path) -> int | None:
    """The embedding rows the base needs under the adapter in `adapter` for the rows it trains by token id:
    up to the highest id, or None when it trains none."""
    ids = adapter_token_ids(adapter)
    return max(ids) + 1 if ids else None


def adapter_trained_rows(source: ModelSource) -> range | set[int]:
    """The embedding rows the adapter of `source` trains as it trains on: every row of the embeddings it saves
    whole, else the rows of the tokens it added."""
    whole = adapter_embedding_rows(source.adapter, input_embedding_name(model_config(source.path)))
    return range(whole) if whole else set(adapter_token_ids(source.adapter))


def base_weight_copies(model, adapter: Path) -> tuple[dict[str, str], list[str]]:
    """The copies of `model`'s own weights that the adapter in `adapter` carries, as PEFT saves them
    beside LoRA on an embedding or output layer (`save_embedding_layers`), in the dtype it trained in.

    PEFT's loader writes such a copy into the base layer, which the base's own answers (the adapter
    switched off), a tied output or input layer and every other adapter on the model share: a bf16
    copy loaded on an fp32 base changes them all. Returns a `key_mapping` for PEFT's loader that
    leaves out each copy equal to the model's weight at the copy's dtype (its keys then load into no
    parameter), and the names of the copies that differ from it (they load as PEFT loads them)."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors import safe_open

    weights_file = Path(adapter) / SAFETENSORS_WEIGHTS_NAME
    if not weights_file.is_file():
        return {}, []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    same: dict[str, str] = {}
    different: list[str] = []
    with safe_open(weights_file, "pt") as weights:
        for key in weights.keys():
            if not key.endswith(".base_layer.weight"):
                continue
            name = key.removeprefix("base_model.model.")
            try:
                # `.weight` also reads a PEFT layer's base weight and a packed layer's plain one.
                weight = base.get_submodule(name.removesuffix(".base_layer.weight")).weight.detach()
            except AttributeError:
                weight = None
            copy = weights.get_tensor(key)
            if weight is not None and weight.shape == copy.shape and torch.equal(weight.to("cpu", copy.dtype), copy):
                same[f"^{re.escape(name)}$"] = f"{name}-copy-of-the-base"
            else:
                different.append(name)
    return same, different


def _module_name(model, module) -> str:
    """`module`'s name inside `model`, without a PEFT wrapper's prefix."""
    return next(name for name, child in model.named_modules() if child is module)


def model_vocab_rows(config) -> int | None:
    """The embedding rows (vocab_size) of the model the transformers `config` describes (its text model's, for one
    that also reads images)."""
    return getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)


def _vocab_rows(config: dict) -> int | None:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def input_embedding_name(config) -> str:
    """The name of the input embeddings of the model the transformers `config` describes, built on the meta device
    (no weights)."""
    model = meta_model(config)
    return _module_name(model, model.get_input_embeddings())


def _load_failed(folder: Path, err: Exception, *, adapter: bool = False) -> ModelSourceError:
    """The error for a base or adapter folder that would not load, naming that folder; a damaged weights file is
    named among those loaded (a model's: `loaded_weight_files`, not a stray copy beside them; an adapter's: every
    safetensors file there)."""
    damaged = ""
    if isinstance(err, SafetensorError):
        loaded = sorted(folder.glob("*.safetensors")) if adapter else loaded_weight_files(folder)
        which = next(
            (path.name for path in loaded if path.suffix == ".safetensors" and not _safetensors_whole(path)), None
        )
        damaged = (
            f". {which or 'A weights file'} there is damaged or was not written whole: copy it again, or use another "
            "checkpoint."
        )
    return ModelSourceError(f"Could not load the model in {folder}: {err}{damaged}", code="model_load_failed")


def _refuse_reshaped_weights(folder: Path, mismatched) -> None:
    """Refuse a load whose weights files hold a weight of another shape than config.json's model gives it
    (`mismatched`: transformers' (name, stored shape, built shape) of each, which it starts at random instead)."""
    if mismatched:
        key, stored, built = min(mismatched)
        raise ModelSourceError(
            f"Could not load the model in {folder}: its weights files hold {key} of shape {list(stored)}, where "
            f"config.json's model has {list(built)}. The weights and config.json are of different models, or "
            "config.json was edited: copy the model again from where it came from.",
            code="model_load_failed",
        )


def _safetensors_whole(path: Path) -> bool:
    """Whether the safetensors file `path` opens: its header reads and its tensors cover the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt"):
            return True
    except (SafetensorError, OSError):
        return False


def _refuse_missing_weights(folder: Path, missing: list[str]) -> None:
    if not missing:
        return
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise ModelSourceError(
        f"Could not load the model in {folder}: its weights files hold no {sorted(missing)[0]}{more}, which its "
        "config.json's model needs (transformers would start them at random). A weights file there was not written "
        "whole or belongs to another model: copy the model again from where it came from.",
        code="model_load_failed",
    )


def load_text_model(spec: str | ModelSource, command: str, *, where: str | None = None, **options):
    """The language model that `command` generates or scores text with: `load_model(spec, **options)` as a causal
    LM, a reward model refused first (`refuse_reward_model`, its message naming `command` and `where`). Every
    loader of a model for text goes through here, so none loads a classifier where it needs a language model."""
    source = _as_source(spec)
    refuse_reward_model(source, command, where)
    return load_model(source, classifier=False, **options)


def load_frozen_model(
    spec: str | ModelSource,
    command: str,
    *,
    where: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    rope_scaling: dict | None = None,
):
    """A model that runs beside the trained one and never trains (a teacher, a reference, a replay
    writer): a plain causal LM in eval mode with no gradients; an adapter is merged, so it costs one
    model's forward. `command` and `where`: see `load_text_model`. `rope_scaling`: the trained model's (see
    `base_config`), which a reference shares."""
    model = load_text_model(spec, command, where=where, dtype=dtype, rope_scaling=rope_scaling)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(device).eval().requires_grad_(False)


def frozen_base(cfg, *, dtype: torch.dtype, device: torch.device | str):
    """The run's `base_model` frozen (`load_frozen_model`), scaled as the trained model is: the reference that full
    fine-tuning keeps beside the policy (DPO, GRPO, the KL to the base)."""
    return load_frozen_model(
        cfg.base_model,
        "train",
        where=cfg.key_at("base_model"),
        dtype=dtype,
        device=device,
        rope_scaling=cfg.model.rope_parameters(),
    )


def generation_eos_ids(path: Path, text_config) -> list[int]:
    """The ids `generate` ends a reply at for the model folder `path`, as transformers reads them: its generation
    config's EOS ids, or where it has none its config's (`text_config`, the text settings)."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        ids = getattr(text_config, "eos_token_id", None)
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def model_info(spec: str | ModelSource) -> dict:
    """What the model is, read from its config and tokenizer; weights are never loaded."""
    from ..generate import reply_end_ids
    from .system_prompt import recorded_system_prompt  # it reads templates with this module's `chat_template`

    source = _as_source(spec)
    try:
        config = base_config(source)  # an adapter's: the window its run trained with (model.rope_scaling)
    except OSError as err:
        raise ModelSourceError(
            f"Could not read the model config in {source.path}: {err}", code="model_load_failed"
        ) from err
    tokenizer = _raw_tokenizer(source)
    template = chat_template(tokenizer)
    # A model that also reads images (Gemma 3 4B and up) keeps its text settings under text_config.
    text = config.get_text_config()
    # What chat, eval and serve stop a reply at: the config's EOS ids and the template's end of turn.
    stop_ids = reply_end_ids(generation_eos_ids(source.path, text), tokenizer)
    record = read_record(source.path) or {}
    info = {
        "name": source.name,
        "spec": source.spec,
        "kind": source.kind,
        "path": str(source.path),
        "adapter": str(source.adapter) if source.adapter else None,
        "architecture": (config.architectures or [config.model_type])[0],
        "model_type": config.model_type,
        "params": count_parameters(config),
        "vocab_size": getattr(text, "vocab_size", None),
        "tokenizer_size": len(tokenizer),
        "context_length": context_length(text),
        "dtype": str(config.dtype).removeprefix("torch.") if getattr(config, "dtype", None) else None,
        **_family_info(config.model_type, template or CHATML_TEMPLATE, tokenizer),
        "chat_template_source": _template_source(source, record),
        "system_prompt": recorded_system_prompt(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "stop_tokens": tokenizer.convert_ids_to_tokens(stop_ids),
        "licence": record.get("licence") or _readme_licence(source.path),
        "source": record.get("source"),
        "sha256": record.get("sha256"),
    }
    if source.adapter:
        info["adapter_info"] = _adapter_info(source.adapter)
    return info


@one_build_at_a_time
def meta_model(config, *, classifier: bool = False):
    """The causal language model `config` describes (with `classifier`, the sequence classifier with one output
    that `load_model` builds on it), built on the meta device: its structure, with no memory and no weights."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            if classifier:
                config = copy.deepcopy(config)
                config.num_labels = 1
                return AutoModelForSequenceClassification.from_config(config)
            return generating_class(config).from_config(config)
    except (ValueError, KeyError) as err:
        raise ModelSourceError(
            f"{config.model_type} is not a causal language model transformers can build ({err}); "
            "tuneforge fine-tunes text generation models.",
            code="model_load_failed",
        ) from err


def count_parameters(config) -> int:
    """Parameters of the model the config describes, built on the meta device: no memory, no weights."""
    # parameters() yields a tied embedding once, which is how the model stores it.
    return sum(p.numel() for p in meta_model(config).parameters())


class HeldTokens:
    """Whether a tokenizer's vocabulary holds a token, asked token by token: `get_vocab()` builds a dict of
    every token (about a second for Gemma 3's 262,144), where a lookup and its way back are two dict reads."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __contains__(self, token: str) -> bool:
        # A token the vocabulary lacks is given the unknown token's id, which reads back as another token.
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return token_id is not None and self.tokenizer.convert_ids_to_tokens(token_id) == token


def chatml_end_of_turn(tokenizer) -> str:
    """The token that ends a ChatML turn for this tokenizer: <|im_end|> where its vocabulary has it, else
    end-of-sequence, which generation stops at (text that only reads <|im_end|> is tokens it never stops at)."""
    if "<|im_end|>" in HeldTokens(tokenizer) or not tokenizer.eos_token:
        return "<|im_end|>"
    return tokenizer.eos_token


def fallback_template(tokenizer) -> str:
    """ChatML, its turns ended by the tokenizer's own end-of-turn token: the template of a model without one."""
    return CHATML_TEMPLATE.replace("<|im_end|>", chatml_end_of_turn(tokenizer))


def given_chatml(tokenizer) -> bool:
    """Whether the tokenizer's chat template is the ChatML `load_tokenizer` gave it for want of the model's own."""
    return tokenizer in _GIVEN_CHATML and chat_template(tokenizer) == fallback_template(tokenizer)


def chatml_fallback_warning(tokenizer) -> str:
    """What a model without a chat template means for a run, and how to give it its own."""
    folder = tokenizer.name_or_path
    return (
        f"{folder or 'the tokenizer'} has no chat template; using ChatML "
        f"(<|im_start|>role ... {chatml_end_of_turn(tokenizer)}), "
        "which the model learns and then needs at inference (tuneforge saves it with the model). If the model "
        "was trained on another format, give that template as model.chat_template (a .jinja file, or the "
        "template written out) or put it in "
        f"{f'{folder}/chat_template.jinja' if folder else 'chat_template.jinja in the model folder'}."
    )


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template, or None (of several named templates, the default one)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # some tokenizers ship several named templates
        template = template.get("default")
    return template if isinstance(template, str) else None


def _json_object(path: Path) -> dict:
    """The JSON object in the model's JSON file `path` (config.json, a tokenizer's), refused saying where if the file
    is not a JSON object (a copy cut short, most often); OSError where it cannot be read."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        problem = (
            f" is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}); a copy cut short looks like this"
        )
    except UnicodeDecodeError:
        problem = " is not valid JSON (not UTF-8); a copy cut short looks like this"
    else:
        if isinstance(value, dict):
            return value
        problem = f": it holds {json_kind(value)}, not an object"
    raise ModelSourceError(
        f"{path}{problem}. Copy {path.name} again from where the model came from.", code="model_load_failed"
    )


def _model_config(folder: Path) -> dict:
    """The model's config.json; {} where there is none to read (the loader then says what is wrong)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _family_info(model_type: str, template: str | None, tokenizer) -> dict:
    """The family (or None), whether the family matrix covers it, and the tokens that end a turn:
    the family's, or for another model the one its template writes after a reply, else EOS."""
    vocab = HeldTokens(tokenizer)
    family = family_of(model_type, template, vocab)
    # A family's tokens its vocabulary holds (it holds one at least: Llama 3.0 has no <|eom_id|>).
    end_of_turn = (
        [t for t in family.end_of_turn if t in vocab]
        if family is not None
        else [end_of_turn_token(tokenizer) or tokenizer.eos_token]
    )
    return {
        "family": family.title if family else None,
        "family_tested": family is not None,
        "end_of_turn_tokens": [t for t in end_of_turn if t],
    }


def _template_source(source: ModelSource, record: dict) -> str:
    """Where the chat template the model is used with comes from."""
    if record.get("chat_template"):
        return f"tuneforge's copy of the family's published template (models/templates/{record['chat_template']})"
    folder = source.adapter if source.adapter and (source.adapter / "tokenizer_config.json").is_file() else source.path
    if (folder / "chat_template.jinja").is_file():
        return f"the model's own ({folder.name}/chat_template.jinja)"
    try:
        if json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"):
            return f"the model's own ({folder.name}/tokenizer_config.json)"
    except (OSError, ValueError):
        pass
    return "none in the model: tuneforge's ChatML fallback"


def _readme_licence(folder: Path) -> str | None:
    """The `license:` of a hub model card's front matter, if the folder has one."""
    import yaml

    from ..config import load_yaml

    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front_matter = load_yaml(text.split("---", 2)[1], str(readme)) or {}
    except (yaml.YAMLError, IndexError, ConfigError):
        return None
    licence = front_matter.get("license") if isinstance(front_matter, dict) else None
    return str(licence) if licence else None


def _adapter_info(adapter: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    weights = adapter / "adapter_model.safetensors"
    params = None
    if weights.is_file():
        params = 0
        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():
                count = 1
                for dim in tensors.get_slice(key).get_shape():
                    count *= dim
                params += count
    return {
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "params": params,
    }


def list_models() -> list[dict]:
    """The registry, with whether each model is already in the cache."""
    rows = []
    for entry in REGISTRY.values():
        folder = cached_registry_folder(entry)
        rows.append(
            {
                "name": entry.name,
                "params": entry.parameters,
                "size": entry.gguf_size,
                "licence": entry.licence,
                "cached": folder is not None,
                "path": str(folder) if folder else None,
                "description": entry.description,
            }
        )
    return rows
