"""Tiny randomly initialised models and tokenizers for unit tests (built in about a second).

The tokenizer is a byte-level BPE with SmolLM2's special tokens and ChatML template, so the data
pipeline sees the same structure it sees on the real model, including pad == end-of-turn.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question briefly.",
    "What is two plus two? The answer is four.",
    "My database is down and production is affected, please help!",
    "How do I reset my password for the web console?",
    '{"category": "outage", "priority": "urgent", "product": "database"}',
    "Hello, how are you today? I am fine, thank you.",
    "system user assistant tool",
] * 20


def tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(tokenizer=None, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def tiny_moe(tokenizer=None, *, architecture: str = "MixtralConfig", experts: int = 32, seed: int = 0, **config):
    """A tiny mixture-of-experts model of `architecture` (a transformers config class: MixtralConfig,
    Qwen2MoeConfig, Qwen3MoeConfig) whose tokens each take one of `experts` experts, so that a micro-batch of a
    few hundred tokens routes none to some of them; `config`: further settings of the config (mlp_only_layers)."""
    import torch
    import transformers

    tokenizer = tokenizer or tiny_tokenizer()
    experts_key = "num_local_experts" if architecture == "MixtralConfig" else "num_experts"
    cfg = getattr(transformers, architecture)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=32,  # Mixtral's expert width
        moe_intermediate_size=32,  # Qwen's expert width
        shared_expert_intermediate_size=32,  # Qwen2-MoE's shared expert
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=1,
        **{experts_key: experts},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def save_tiny_model(folder: str | Path, build=tiny_llama, **kw) -> Path:
    """Write a tiny model (`build(tokenizer, **kw)`: `tiny_llama` or `tiny_moe`) + tokenizer as a normal HF
    folder, usable as `base_model:`."""
    from transformers import GenerationConfig

    folder = Path(folder)
    tok = tiny_tokenizer()
    model = build(tok, **kw)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def without_chat_template(model: str | Path, folder: str | Path) -> Path:
    """A copy of the model folder `model` at `folder` whose tokenizer has no chat template (ChatML's fallback)."""
    import shutil

    shutil.copytree(model, folder)
    (Path(folder) / "chat_template.jinja").unlink()
    return Path(folder)


def set_context(folder: str | Path, positions: int) -> Path:
    """The model folder `folder`, its config.json now built for `positions` positions (a shorter context)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return folder


def save_adapter_with_added_tokens(base: str | Path, folder: str | Path, tokens=("<tool>", "</tool>", "<ctx>")) -> Path:
    """A LoRA adapter on the model in `base` trained with `tokens` added, as Axolotl, Unsloth and PEFT's
    own recipe save one: the resized embeddings whole (`modules_to_save`) and the grown tokenizer beside
    it; every adapter weight random, so it answers unlike its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    adapted = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in adapted.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            param.data.add_(torch.randn_like(param) * 0.5)
    adapted.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_to_say(model, prompt_ids: list[int], reply_ids: list[int], *, lr: float, steps: int):
    """`model`, trained in place (Adam at `lr` for `steps` steps, from seed 0) on the one sequence `prompt_ids`
    then `reply_ids`, the loss on the reply alone, until greedy it answers the prompt with that reply."""
    import torch

    ids = torch.tensor([[*prompt_ids, *reply_ids]])
    labels = ids.clone()
    labels[:, : len(prompt_ids)] = -100
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the reply's loss is {loss.item():.3f} after {steps} steps; it is not learnt"
    return model
