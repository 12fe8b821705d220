"""Tiny models of every family the matrix covers, each as its users get it from the hub.

A family here is its transformers config class at a few thousand parameters, a tokenizer that
carries the family's special tokens and splits text the family's way (byte-level BPE with the
family's split pattern, or SentencePiece with byte fallback and its `tokenizer.model`), and the
chat template as the model's authors publish it (tests/data/templates). Nothing is downloaded: the
tokenizers are trained on a small corpus in well under a second.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

TEMPLATES = Path(__file__).parent / "data" / "templates"

# The split patterns of Llama 3's and Qwen 2's tokenizer.json: what llama.cpp calls "llama-bpe" and "qwen2".
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = "|".join([_WORDS, r"\p{N}{1,3}", _REST])  # Llama 3 groups digits in threes,
QWEN2_SPLIT = "|".join([_WORDS, r"\p{N}", _REST])  # Qwen 2 one by one


_CORPUS = [
    "You are a helpful assistant. Answer the question briefly.",
    "What is the capital of France? The capital of France is Paris.",
    "What is two plus two? The answer is four. 2 + 2 = 4",
    "Hello, how are you today? I am fine, thank you.",
    "My database is down and production is affected, please help!",
    "How do I reset my password for the web console?",
    "system user assistant model tool Sure. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "You are Qwen, created by Alibaba Cloud. Name three colours: red, green and blue.",
] * 8


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family's tiny model folder, and what its chat turns look like."""

    name: str
    title: str
    build_config: Callable[[object], object]  # tokenizer -> transformers config
    build_tokenizer: Callable[[Path], object]  # folder -> tokenizer (its files written there)
    template: str | None  # file in tests/data/templates; None: the tokenizer's own
    end_of_turn: str
    reply_prefix: str = ""  # what the template writes before a reply's content, inside the trained span
    system_prompt: bool = True  # whether training data may open with a system message
    # Whether the tokenizer transformers rebuilds from the GGUF encodes as this one does. Not for
    # Phi-3: a GGUF cannot say that its chat tokens swallow the whitespace after them (llama.cpp
    # knows it from the model's name, transformers' reader does not).
    gguf_tokenizer_roundtrip: bool = True
    # model -> None: sets weights that the random init leaves degenerate (every prompt answered alike).
    init_weights: Callable[[object], None] | None = None

    def trained_reply(self, content: str) -> str:
        """The text a reply trains on: what the model writes, up to and including its end of turn."""
        return f"{self.reply_prefix}{content}{self.end_of_turn}"


def family_tokenizer(family: TinyFamily, folder: str | Path):
    """`family`'s tokenizer with its chat template (a SentencePiece one writes tokenizer.model into `folder`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = family.build_tokenizer(folder)
    if family.template:
        tokenizer.chat_template = (TEMPLATES / family.template).read_text(encoding="utf-8").removesuffix("\n")
    return tokenizer


def save_family_model(family: TinyFamily, folder: str | Path, *, seed: int = 0, **settings) -> Path:
    """Write `family`'s tiny model, tokenizer, chat template and generation config as a hub folder; `settings`
    change its config (a small `sliding_window`, `layer_types`)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    tokenizer = family_tokenizer(family, folder)
    config = family.build_config(tokenizer)
    for name, value in settings.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if family.init_weights:
        family.init_weights(model)
    stops = [tokenizer.convert_tokens_to_ids(family.end_of_turn), tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=list(dict.fromkeys(stops)),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gemma3_tiny_text_config(vocab_size: int) -> dict:
    """The text settings of the tiny Gemma 3 4B-shaped models below."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=256,
        max_position_embeddings=1024,
    )


def save_gemma3_multimodal_config(folder: str | Path) -> Path:
    """A Gemma 3 4B-shaped folder at tiny sizes: a model that also reads images, its text settings under
    `text_config`, with the Gemma tokenizer and chat template; no weights (the dry run reads none)."""
    from transformers import Gemma3Config

    folder = Path(folder)
    tokenizer = family_tokenizer(FAMILIES["gemma3"], folder)
    tokenizer.save_pretrained(folder)
    text = gemma3_tiny_text_config(len(tokenizer))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28)
    Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4).save_pretrained(folder)
    return folder


def save_gemma3_vision_model(folder: str | Path, *, seed: int = 0, **text_settings) -> Path:
    """A Gemma 3 4B-shaped model that reads images, at tiny sizes and random weights, as the hub has it:
    `Gemma3ForConditionalGeneration` weights, the Gemma tokenizer with its image tokens, Google's chat
    template (an image part is `<start_of_image>`) and the processor (a 28x28 image processor, 4 image
    tokens per image) that `AutoProcessor` loads. `text_settings` change the text model's config."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    folder = Path(folder)
    tokenizer = family_tokenizer(FAMILIES["gemma3"], folder)
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokens = [AddedToken(t, normalized=False, special=True) for t in names.values()]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens=names)
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = Gemma3Processor(image_processor, tokenizer, chat_template=tokenizer.chat_template, image_seq_length=4)
    processor.save_pretrained(folder)
    text = {**gemma3_tiny_text_config(len(tokenizer)), **text_settings}
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # transformers starts the image projection at zero (every image the same to the text model);
    # a trained model's is not.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    model.save_pretrained(folder)
    return folder


def save_qwen2_5_vl_model(folder: str | Path, *, seed: int = 0, qwen2_vl: bool = False, **vision_settings) -> Path:
    """A Qwen2.5-VL-shaped model at tiny sizes and random weights, as the hub has it:
    `Qwen2_5_VLForConditionalGeneration` weights with M-RoPE (3-D positions), a Qwen tokenizer with
    its vision tokens, Qwen2-VL's chat template (an image part is
    `<|vision_start|><|image_pad|><|vision_end|>`) and the processor `AutoProcessor` loads: an image
    processor of 4-pixel patches merged 2x2, so an image's token count follows its size (20x16: 6).
    `qwen2_vl` builds Qwen2-VL instead (`Qwen2VLForConditionalGeneration`: a LayerNorm vision encoder
    without window attention); `vision_settings` change the vision encoder's config."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = byte_level_bpe(
        QWEN2_SPLIT,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *vision],
        [],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = (TEMPLATES / "qwen2-vl.jinja").read_text(encoding="utf-8").removesuffix("\n")
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32}, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    # As the hub's folders hold it: the image processor's settings, the processor's class beside them
    # (the video processor needs torchvision, which is not installed, so the processor is not built here).
    image_processor.save_pretrained(folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["processor_class"] = "Qwen2VLProcessor" if qwen2_vl else "Qwen2_5_VLProcessor"
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    tokenizer.save_pretrained(folder)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "image_pad", "video_pad")}
    vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if qwen2_vl:
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    else:
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1]
        )
    config_class, model_class = (
        (Qwen2VLConfig, Qwen2VLForConditionalGeneration)
        if qwen2_vl
        else (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
    )
    config = config_class(
        text_config=dict(
            **_SHAPE,
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config={**vision, **vision_settings},
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        tie_word_embeddings=True,
    )
    return _save_image_text_model(model_class, config, tokenizer, folder, seed)


def save_smolvlm_model(folder: str | Path, *, seed: int = 0, smolvlm2: bool = False) -> Path:
    """A SmolVLM-shaped model at tiny sizes and random weights, as the hub has it: a Llama text model behind a
    SigLIP vision encoder whose patches a pixel shuffle (scale_factor 2) merges, SmolLM2's tokenizer with the image
    tokens (`<fake_token_around_image>`, `<image>`, `<global-img>`, `<row_i_col_j>`), the chat template (an image
    part is `<image>`) and the processor settings: an image is resized to a longest side of 64, split into 32x32
    tiles and shown as each tile's 4 `<image>` tokens and the whole image's (20x16: 2x2 tiles; 40x16: 1x2).
    SmolVLM is `Idefics3ForConditionalGeneration` with `Idefics3Processor`; `smolvlm2` builds SmolVLM2 instead,
    `SmolVLMForConditionalGeneration` with SmolVLM2's chat template (which also writes `<video>`) and the
    `SmolVLMProcessor` settings its folders ship (written here as `SmolVLMProcessor.save_pretrained` writes them:
    the processor itself needs num2words and, for its video side, torchvision)."""
    from tiny import tiny_tokenizer
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    image = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokens = [AddedToken(t, normalized=False, special=True) for t in image + tiles]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    tokenizer.eos_token = "<end_of_utterance>"
    if smolvlm2:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    else:
        tokenizer.chat_template = (TEMPLATES / "smolvlm.jinja").read_text(encoding="utf-8").removesuffix("\n")
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sizes = dict(size={"longest_edge": 2 * 32}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    if smolvlm2:
        settings = {
            "image_processor": SmolVLMImageProcessorPil(**sizes).to_dict(),
            "image_seq_len": 4,
            "processor_class": "SmolVLMProcessor",
        }
        (folder / "processor_config.json").write_text(json.dumps(settings, indent=2))
    else:
        processor = Idefics3Processor(
            Idefics3ImageProcessorPil(**sizes), tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
        )
        processor.save_pretrained(folder)
    config = (SmolVLMConfig if smolvlm2 else Idefics3Config)(
        text_config=dict(
            model_type="llama",
            **_SHAPE,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    model_class = SmolVLMForConditionalGeneration if smolvlm2 else Idefics3ForConditionalGeneration
    return _save_image_text_model(model_class, config, tokenizer, folder, seed)


def _save_image_text_model(model_class, config, tokenizer, folder: Path, seed: int) -> Path:
    """`model_class` built from `config` with weights drawn from `seed`, stopping at the tokenizer's end of sequence
    and padding with its pad token, saved to `folder`."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


def png_data_url(colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> str:
    """A PNG of one colour as the data URL an OpenAI image part holds."""
    import base64

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


# ---- tokenizers ----------------------------------------------------------------------------------


def byte_level_bpe(split: str, specials: list[str], plain_added: list[str], **roles: str | None):
    """A byte-level BPE tokenizer (Llama 3, Qwen) whose pre-tokenizer is `split` then bytes; `roles`
    names bos/eos/pad tokens, and BOS is added in front of encoded text when `roles["bos_token"]` is set."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_special_tokens(specials)
    tok.add_tokens(plain_added)
    bos = roles.get("bos_token")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def sentencepiece_bpe(
    folder: Path,
    *,
    tokenizer_class: str,
    dummy_prefix: bool,
    control: list[str],
    user_defined: list[str],
    roles: dict[str, str],
    add_bos: bool,
):
    """A SentencePiece BPE model with byte fallback written to `folder`/tokenizer.model, as the fast
    tokenizer transformers converts it into. `control` and `user_defined` pieces come right after
    pad, eos, bos and unk (ids 0-3), as in Gemma's and Mistral's vocabularies."""
    import sentencepiece
    from transformers import AutoTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        control_symbols=control,
        user_defined_symbols=user_defined,
        **{f"{kind}_id": i for i, kind in enumerate(("pad", "eos", "bos", "unk"))},
        **{f"{kind}_piece": roles[f"{kind}_token"] for kind in ("pad", "eos", "bos", "unk")},
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": tokenizer_class, "add_bos_token": add_bos, "add_eos_token": False, **roles}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder)


def _llama3_tokenizer(folder: Path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]
    specials += ["<|eot_id|>", "<|python_tag|>"]
    return byte_level_bpe(
        LLAMA3_SPLIT, specials, [], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None
    )


def _qwen_tokenizer(plain_added: list[str]):
    def build(folder: Path):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        return byte_level_bpe(QWEN2_SPLIT, specials, plain_added, eos_token="<|im_end|>", pad_token="<|endoftext|>")

    return build


def _mistral_tokenizer(*control: str) -> Callable[[Path], object]:
    """Mistral's tokenizer with [INST] and [/INST] and these `control` tokens."""

    def build(folder: Path):
        return sentencepiece_bpe(
            folder,
            tokenizer_class="LlamaTokenizer",
            dummy_prefix=True,
            control=["[INST]", "[/INST]", *control],
            user_defined=[],
            roles={"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"},
            add_bos=True,
        )

    return build


def _gemma_tokenizer(folder: Path):
    from tokenizers import AddedToken

    tokenizer = sentencepiece_bpe(
        folder,
        tokenizer_class="GemmaTokenizer",
        dummy_prefix=False,
        control=[],
        user_defined=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        roles={"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"},
        add_bos=True,
    )
    turns = [AddedToken(t, normalized=False, special=True) for t in ("<start_of_turn>", "<end_of_turn>")]
    tokenizer.add_special_tokens({"additional_special_tokens": turns})
    return tokenizer


def _phi3_tokenizer(folder: Path):
    """Llama 2's SentencePiece vocabulary, then Phi-3's chat tokens after it; like Phi-3's own, they
    swallow the whitespace that follows them."""
    from tokenizers import AddedToken, normalizers

    tokenizer = sentencepiece_bpe(
        folder,
        tokenizer_class="LlamaTokenizer",
        dummy_prefix=True,
        control=[],
        user_defined=[],
        roles={"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"},
        add_bos=False,
    )
    chat = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|system|>", "<|end|>", "<|user|>"]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, rstrip=t != "<|endoftext|>", special=True) for t in chat]},
        replace_extra_special_tokens=False,
    )
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    # Phi-3's tokenizer.json marks a word start by a normalizer, not a pre-tokenizer (Llama 2's legacy way).
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.backend_tokenizer.pre_tokenizer = None
    return tokenizer


# ---- configs -------------------------------------------------------------------------------------

# initializer_range: at the default 0.02 a 64-wide output layer cannot make any token likely, so no run
# could teach the model a reply to stop after. Head widths, where a family sets them below, are the
# family's own (Qwen 3: 128, Gemma: 256): transformers' GGUF reader takes them from the config class's
# defaults, not from the file.
_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
)


def _ids(tokenizer) -> dict:
    # No pad_token_id (Phi-3's default is beyond this vocabulary): its embedding row would start at
    # zero, and SmolLM2 pads with its end of turn.
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        max_position_embeddings=1024,
    )


def _config(class_name: str, **kwargs) -> Callable[[object], object]:
    def build(tokenizer):
        import transformers

        return getattr(transformers, class_name)(**_SHAPE, **_ids(tokenizer), **kwargs)

    return build


def _lift_gemma_norms(model) -> None:
    """Gemma scales each input embedding by sqrt(hidden_size) and starts every (1 + weight) norm at 1, so
    the last prompt token's embedding outweighs what two random layers add to it and the tied head
    predicts that token again whatever the prompt (a newline, forever). Scaling what each sublayer adds
    (post-attention and post-feedforward norms: x3) and sharpening Gemma 3's attention (query and key
    norms: x2) lets the prompt, its positions and its mask decide the answer."""
    import torch

    lifts = {"post_attention_layernorm": 2.0, "post_feedforward_layernorm": 2.0, "q_norm": 1.0, "k_norm": 1.0}
    with torch.no_grad():
        for name, param in model.named_parameters():
            lift = next((value for key, value in lifts.items() if f".{key}." in name), None)
            if lift is not None:
                param.fill_(lift)


def _smollm2_tokenizer(folder: Path):
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


FAMILIES: dict[str, TinyFamily] = {
    family.name: family
    for family in (
        TinyFamily(
            "smollm2",
            "SmolLM2 (Llama, ChatML)",
            _config("LlamaConfig", tie_word_embeddings=True),
            _smollm2_tokenizer,
            None,
            "<|im_end|>",
        ),
        TinyFamily(
            "llama3",
            "Llama 3",
            _config("LlamaConfig", tie_word_embeddings=False, rope_theta=500000.0),
            _llama3_tokenizer,
            "llama3.jinja",
            "<|eot_id|>",
        ),
        TinyFamily(
            "qwen2.5",
            "Qwen 2.5",
            _config("Qwen2Config", tie_word_embeddings=True),
            _qwen_tokenizer(["<tool_call>", "</tool_call>"]),
            "qwen2.5.jinja",
            "<|im_end|>",
        ),
        TinyFamily(
            "qwen3",
            "Qwen 3",
            _config("Qwen3Config", tie_word_embeddings=True, head_dim=128),
            _qwen_tokenizer(["<tool_call>", "</tool_call>", "<think>", "</think>"]),
            "qwen3.jinja",
            "<|im_end|>",
            reply_prefix="<think>\n\n</think>\n\n",
        ),
        TinyFamily(
            "mistral",
            "Mistral",
            _config("MistralConfig", tie_word_embeddings=False, sliding_window=None),
            _mistral_tokenizer(),
            "mistral.jinja",
            "</s>",
            reply_prefix=" ",
            system_prompt=False,
        ),
        TinyFamily(
            "gemma2",
            "Gemma 2",
            _config("Gemma2Config", head_dim=256, query_pre_attn_scalar=256, sliding_window=256),
            _gemma_tokenizer,
            "gemma2.jinja",
            "<end_of_turn>",
            system_prompt=False,
            init_weights=_lift_gemma_norms,
        ),
        TinyFamily(
            "gemma3",
            "Gemma 3",
            _config("Gemma3TextConfig", head_dim=256, query_pre_attn_scalar=256, sliding_window=256),
            _gemma_tokenizer,
            "gemma3.jinja",
            "<end_of_turn>",
            init_weights=_lift_gemma_norms,
        ),
        TinyFamily(
            "phi3",
            "Phi-3",
            _config("Phi3Config", tie_word_embeddings=False),
            _phi3_tokenizer,
            "phi3.jinja",
            "<|end|>",
            reply_prefix=" ",  # the normalizer starts every text after a special token with a space
            gguf_tokenizer_roundtrip=False,
        ),
    )
}


# Mistral v0.3's tokenizer, whose tool-call tokens are control tokens as well: decoding drops [TOOL_CALLS].
MISTRAL_V3 = replace(
    FAMILIES["mistral"],
    name="mistral-v3",
    build_tokenizer=_mistral_tokenizer(
        "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"
    ),
)

# Tool definitions as OpenAI's clients send them, for the tests of tool-calling prompts and replies.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
