"""LoRA and DoRA adapters through PEFT: the base stays frozen, low-rank updates train."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn


def decoder_linears(model) -> list[str]:
    """The names of the linear layers inside the decoder layers (q_proj, ..., down_proj): what
    "all-linear" means there, spelt out because PEFT picks layers only from a list of names."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and ".layers." in f".{name}"})


def peft_config(cfg, model) -> PeftLoraConfig:
    lc = cfg.lora
    targets, layers = lc.target_modules, None
    if lc.from_layer:
        depth = model.config.get_text_config().num_hidden_layers
        layers = list(range(int(depth * lc.from_layer), depth))
        targets = decoder_linears(model) if targets == "all-linear" else targets
    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_rslora=lc.use_rslora,
        use_dora=cfg.method == "dora",
        modules_to_save=lc.modules_to_save,
    )


def prepare_model(model, cfg):
    model = get_peft_model(model, peft_config(cfg, model))
    if cfg.train.freeze_embeddings:
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.requires_grad_(False)
    return model
