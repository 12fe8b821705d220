"""LoRA and DoRA adapters through PEFT: the base stays frozen, low-rank updates train."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model


def peft_config(cfg) -> PeftLoraConfig:
    lc = cfg.lora
    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        use_dora=cfg.method == "dora",
        modules_to_save=lc.modules_to_save,
    )


def prepare_model(model, cfg):
    model = get_peft_model(model, peft_config(cfg))
    if cfg.train.freeze_embeddings:
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.requires_grad_(False)
    return model
