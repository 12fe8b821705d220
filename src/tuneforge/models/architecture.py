"""What a model is, read off its modules, config and tokenizer: the causal LM inside a wrapper, the
positions it was built for, the token that ends its turns and the generation config that stops there."""

from __future__ import annotations


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (adapters are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def context_length(config) -> int | None:
    """How many positions the model was built for, under whichever name its config uses."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def model_context_length(model) -> int | None:
    """`context_length` of a loaded model (of its text model, for one that also reads images): how many
    positions its prompt and reply may fill together."""
    config = causal_lm(model).config
    return context_length(config.get_text_config() if hasattr(config, "get_text_config") else config)


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template closes an assistant reply with, as training labels it (the first
    added token after a reply, else EOS); generation must stop there, not only at the tokenizer's
    end-of-text, or a chat model rambles on into the next turn."""
    from ..data.render import renderer_for  # the renderer imports this package

    end = renderer_for(tokenizer).end_of_turn_id
    return tokenizer.convert_ids_to_tokens(end) if end is not None else None


def chat_generation_config(config, tokenizer):
    """`config` (a GenerationConfig) with the end-of-turn token first among its EOS ids, so that any
    runtime reading it stops where a chat reply ends; the tokenizer's EOS and the ids it had are kept."""
    end_of_turn = end_of_turn_token(tokenizer)
    recorded = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None, tokenizer.eos_token_id, *recorded]
    eos_ids = list(dict.fromkeys(i for i in ids if i is not None))
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids or None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [None])[0]
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return config
