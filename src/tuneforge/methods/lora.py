"""LoRA and DoRA adapters through PEFT: the base stays frozen, low-rank updates train."""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from typing import TYPE_CHECKING

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, TuneforgeError
from ..models.loading import grow_embeddings

# PEFT is imported where an adapter is made or read: importing it imports bitsandbytes and with it torch's compiler
# (seconds of CPU in every process), which a run of another method (full, a full-trained student) never uses.
if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig


def text_decoder(model):
    """The text model's decoder: for a model that also reads images (Gemma 3 4B and up), its language
    model, without the vision encoder and projector beside it."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_linear_names(model) -> list[str]:
    """The full names of the linear layers inside the text decoder's layers (model.layers.0.self_attn.q_proj, ...), as
    on the model before PEFT wraps it."""
    names = {module: name for name, module in model.named_modules()}
    # On a model PEFT has wrapped, a layer's own Linear is its base_layer, and its lora_A and lora_B are no layers
    # of the model.
    return [
        names[module].replace(".base_layer", "")
        for name, module in text_decoder(model).named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}" and ".lora_" not in name
    ]


def decoder_linears(model) -> list[str]:
    """The names of the linear layers inside the text decoder's layers (q_proj, ..., down_proj): what
    "all-linear" means there, spelt out because PEFT picks layers only from a list of names."""
    return sorted({name.rsplit(".", 1)[-1] for name in decoder_linear_names(model)})


def within_layer(name: str) -> str:
    """A module's name within its decoder layer (model.layers.3.mlp.experts -> mlp.experts)."""
    return re.sub(r"^(.*\.)?layers\.\d+\.", "", name)


def unadapted_experts(model, first: int) -> list[str]:
    """The routed experts' fused weights (a mixture-of-experts layer holds each of its projections for all its
    experts in one 3-D parameter) and the routers' weights in the text decoder's layers from `first` up that no
    adapter of `model` reads, named within a layer (mlp.experts.down_proj, mlp.gate). Under all-linear PEFT adapts
    them for the models it maps from transformers 4's layout, where they were linear layers (Mixtral, Qwen3-MoE,
    ...); elsewhere (Qwen2-MoE) it reaches the linear layers alone: attention, and a shared expert where there is
    one."""
    from peft.tuners.lora import ParamWrapper

    adapted = {(id(m.get_base_layer()), m.parameter_name) for m in model.modules() if isinstance(m, ParamWrapper)}
    left = set()
    for name, module in text_decoder(model).named_modules():
        # transformers 5's MixtralExperts, Qwen2MoeExperts, ... and TopKRouter: no Linear layers (a 3-D weight of
        # another module, a convolution's, is no expert).
        experts, router = "Experts" in type(module).__name__, type(module).__name__.endswith("Router")
        if (layer := re.match(r"(.*\.)?layers\.(\d+)\.", name)) and int(layer[2]) < first:
            continue
        for key, p in module.named_parameters(recurse=False):
            if ((experts and p.ndim == 3) or (router and key == "weight")) and (id(module), key) not in adapted:
                within = within_layer(name).replace(".base_layer", "")
                left.add(f"{within}.{key}" if p.ndim == 3 else within)
    return sorted(left)


def experts_warning(cfg, model) -> str | None:
    """The warning for an adapter that leaves a mixture-of-experts model's routed experts or router as the base has
    them (`unadapted_experts`) in the layers it adapts (lora.from_layer): under all-linear, or where a
    target_modules list names them, and PEFT adapts only linear layers of that name (Qwen2-MoE's shared expert's
    down_proj); or None."""
    if not cfg.trains_adapters:
        return None
    if not (left := unadapted_experts(model, first_adapted_layer(model, cfg.lora.from_layer))):
        return None
    why = (
        "only for the models it maps from transformers 4 (Mixtral, Qwen3-MoE); to train the experts, use method: full."
    )
    if cfg.lora.target_modules == "all-linear":
        return (
            f"{cfg.key_at('lora.target_modules')}: all-linear adapts the linear layers of this mixture-of-experts "
            f"model ({', '.join(decoder_linears(model))}), but not {', '.join(left)}, which keep the base's weights: "
            f"PEFT adapts fused expert weights under all-linear itself, and {why}"
        )
    named = [wanted for wanted in cfg.lora.target_modules if any(w.endswith(f".{wanted}") for w in left)]
    if not named:
        return None
    linears = sorted({within_layer(name) for wanted in named for name, _ in modules_named(text_decoder(model), wanted)})
    experts = [w for w in left if any(w.endswith(f".{wanted}") for wanted in named)]
    return (
        f"{cfg.key_at('lora.target_modules')}: names {', '.join(named)}, which PEFT adapts in this mixture-of-experts "
        f"model's linear layers of that name ({', '.join(linears)}) but not in its routed experts "
        f"({', '.join(experts)}), which keep the base's weights: PEFT adapts fused expert weights {why}"
    )


def outside_the_text_model(model) -> str | None:
    """A regular expression of the modules beside the text decoder and its output layer (a vision
    encoder and its projector), for PEFT's exclude_modules: their linear layers share names with the
    decoder's (q_proj, ...), and text-only training never reaches them, so adapters there would only
    count as trainable, take optimizer state and ship in the adapter. None for a text-only model."""
    decoder, output = text_decoder(model), model.get_output_embeddings()
    names = {module: name for name, module in model.named_modules()}
    if decoder not in names:
        return None
    path = names[decoder].split(".") if names[decoder] else []
    beside = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and module is not output and parts[: len(path)] != path:
            shared = next((i for i, (a, b) in enumerate(zip(parts, path, strict=False)) if a != b), len(path))
            beside.add(".".join(parts[: shared + 1]))
    return f"(?:{'|'.join(re.escape(b) for b in sorted(beside))})(?:\\..*)?" if beside else None


def trained_token_rows(cfg, model, token_ids) -> dict[str, list[int]] | None:
    """PEFT's trainable_token_indices for `model.add_tokens` (`token_ids`): those rows alone train, and are
    saved with the adapter, in the input embeddings and, where it has weights of its own (untied), the output
    layer, so the model also learns to write the tokens. A layer in lora.modules_to_save trains whole instead."""
    if not token_ids:
        return None
    names = {module: name for name, module in model.named_modules()}
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [embeddings]
    if output is not None and output.weight is not embeddings.weight:
        layers.append(output)
    whole = cfg.lora.modules_to_save or []
    return {
        name: list(token_ids)
        for layer in layers
        if (name := names[layer].rsplit(".", 1)[-1]) not in whole and names[layer] not in whole
    } or None


def first_adapted_layer(model, fraction: float) -> int:
    """The lowest text decoder layer that lora.from_layer (`fraction` of the depth) adapts."""
    return int(model.config.get_text_config().num_hidden_layers * fraction)


# The index of the layer a module or parameter sits in, as PEFT's layers_to_transform reads it: the first
# number in its name.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<index>\d+)\.")


def all_linear_as_peft_resolves_it(config: PeftLoraConfig, model) -> PeftLoraConfig:
    """A copy of `config` with target_modules all-linear as PEFT resolves it on `model`: on the mixture-of-experts
    models it maps from transformers 4's layout (Mixtral, Qwen3-MoE), the linear layers by name, and the fused
    expert weights and routers as parameters (target_parameters), gate_up_proj with the rank and alpha of the two
    projections it fuses (rank_pattern, alpha_pattern); elsewhere all-linear as it is."""
    from peft.utils.transformers_weight_conversion import (
        convert_peft_config_for_transformers,
        get_model_conversion_mapping,
    )

    resolved = copy.deepcopy(config)
    resolved.target_modules = "all-linear"
    convert_peft_config_for_transformers(resolved, model, get_model_conversion_mapping(model))
    return resolved


def parameters_named(model, targets) -> list[str]:
    """The full names of `model`'s parameters that PEFT's target_parameters `targets` name (whole or by their last
    parts), as on the model before PEFT wraps it (without its base_layer parts), so that an adapter's own
    target_parameters compare with them."""
    names = [name.replace(".base_layer", "") for name, _ in model.named_parameters()]
    return [name for name in names if any(name == t or name.endswith(f".{t}") for t in targets)]


def parameters_for_peft(config: PeftLoraConfig, model, resolved: PeftLoraConfig) -> None:
    """Hand PEFT, as parameters (target_parameters, named in full), what `config` adapts that PEFT would not adapt as
    a module of the name it is given (`resolved`: all-linear as PEFT resolves it on `model`). On the mixture-of-experts
    models PEFT maps from transformers 4's layout, it takes the experts' old names (gate_proj, up_proj, down_proj) out
    of target_modules for the fused expert weights, so the linear layers of those names (a dense layer's MLP, Qwen3-
    MoE's mlp_only_layers) go as parameters, whose adapters PEFT saves, loads and merges as other linear layers'.
    Under all-linear those alone: PEFT adds the fused expert weights and routers itself. A list also hands it the
    fused expert weights and routers it names (mlp.experts.gate_up_proj, mlp.gate), which transformers 5 holds in no
    module of that name, with the ranks all-linear gives them. A name adapts what the model holds under it, whole or
    by its last parts, as PEFT matches names: gate_proj and up_proj name linear layers, the experts' two projections
    being one fused weight, gate_up_proj. Those names leave target_modules, where PEFT would map the experts' old
    names among them (down_proj, gate_proj with up_proj) to the fused expert weights of every layer, below from_layer
    too, and refuse gate_proj without up_proj."""
    kept = resolved.target_modules
    linears = [] if isinstance(kept, str) else decoder_linear_names(model)
    weights = sorted(f"{name}.weight" for name in linears if name.rsplit(".", 1)[-1] not in kept)
    if config.target_modules == "all-linear":
        config.target_parameters = weights or None
        return
    weights = parameters_named(model, resolved.target_parameters or ()) + weights
    listed = {
        wanted: named
        for wanted in config.target_modules
        if (named := [w for w in weights if (n := w.removesuffix(".weight")) == wanted or n.endswith(f".{wanted}")])
    }
    if not listed:
        return
    config.target_modules = config.target_modules - listed.keys()
    names = sorted({w for named in listed.values() for w in named})
    config.target_parameters = names
    config.rank_pattern, config.alpha_pattern = (
        {key: value for key, value in pattern.items() if any(re.match(rf"(.*\.)?({key})$", n) for n in names)}
        for pattern in (resolved.rank_pattern, resolved.alpha_pattern)
    )


def adapted_as_parameters(config: PeftLoraConfig, model) -> list[str]:
    """The weights `config` hands PEFT as parameters (target_parameters; under all-linear, as `get_peft_model` has
    resolved them in it), named within a layer: the fused expert weights and routers (mlp.experts.gate_up_proj,
    mlp.gate.weight), and a dense layer's linear layers (mlp.gate_proj.weight, `parameters_for_peft`)."""
    return sorted({within_layer(name) for name in parameters_named(model, config.target_parameters or ())})


def from_layer_up(config: PeftLoraConfig, model, fraction: float, resolved: PeftLoraConfig) -> None:
    """Limit `config` to the text decoder's layers from `fraction` of its depth up (lora.from_layer). PEFT takes
    layers_to_transform with a list of module names alone, and applies it to modules alone, so all-linear is spelt
    out as PEFT resolves it (`resolved`), and the parameters it adapts (fused expert weights and routers, under
    all-linear or listed) are named in full in these layers."""
    first = first_adapted_layer(model, fraction)
    config.layers_to_transform = list(range(first, model.config.get_text_config().num_hidden_layers))
    if config.target_modules == "all-linear":
        # Only the linear layers PEFT keeps as modules: it would map a name of the fused expert weights (a dense
        # layer's down_proj) to those weights in every layer, the layers below from_layer too.
        kept, linears = resolved.target_modules, set(decoder_linears(model))
        config.target_modules = linears if isinstance(kept, str) else linears & kept
        # Beside a dense layer's linear layers (`parameters_for_peft`), the fused expert weights and routers.
        config.target_parameters = [*(config.target_parameters or ()), *(resolved.target_parameters or ())] or None
        config.rank_pattern, config.alpha_pattern = resolved.rank_pattern, resolved.alpha_pattern
    if config.target_parameters:
        config.target_parameters = sorted(
            name
            for name in parameters_named(model, config.target_parameters)
            if (layer := _LAYER_INDEX.match(name)) and int(layer["index"]) >= first
        )


# PEFT's warning that the rank and alpha pattern keys it gives a mixture-of-experts model's fused gate_up_proj
# (twice the rank: it holds two projections) matched nothing: it checks those keys against the modules it adapts,
# not the parameters (target_parameters), and applies them to the parameters all the same.
_GATE_UP_PATTERN_WARNING = (
    r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: "
    r"\[('[^']*gate_up_proj', )*'[^']*gate_up_proj'\]\.?$"
)


@contextlib.contextmanager
def gate_up_pattern_warning_unsaid():
    """A block in which PEFT puts an adapter on a model (get_peft_model, PeftModel.from_pretrained) without its
    false warning about the fused gate_up_proj's rank pattern (`_GATE_UP_PATTERN_WARNING`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GATE_UP_PATTERN_WARNING, category=RuntimeWarning)
        yield


def peft_config(cfg, model, token_ids=()) -> PeftLoraConfig:
    from peft import LoraConfig as PeftLoraConfig

    lc = cfg.lora
    reward = cfg.method == "reward"
    config = PeftLoraConfig(
        # A reward model's adapter: PEFT trains and saves its score head whole (modules_to_save).
        task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        use_dora=cfg.method == "dora" or (reward and cfg.reward.trains == "dora"),
        modules_to_save=lc.modules_to_save,
        exclude_modules=outside_the_text_model(model),
        trainable_token_indices=trained_token_rows(cfg, model, token_ids),
        init_lora_weights=True if lc.init == "default" else lc.init,
    )
    resolved = all_linear_as_peft_resolves_it(config, model)
    parameters_for_peft(config, model, resolved)
    if lc.from_layer:
        from_layer_up(config, model, lc.from_layer, resolved)
    return config


# The layers PEFT's LoRA adapts (peft.tuners.lora.layer.dispatch_default; quantized linear layers are nn.Linear's
# subclasses): GPT-2's attention and MLP are transformers' Conv1D.
ADAPTABLE_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def modules_named(model, wanted: str) -> list[tuple[str, nn.Module]]:
    """The modules, with their names, that a lora.target_modules or modules_to_save name matches as PEFT matches
    it: by the module's whole name or its last parts (q_proj, self_attn.q_proj)."""
    return [(name, m) for name, m in model.named_modules() if name == wanted or name.endswith(f".{wanted}")]


def listed_modules(cfg, config) -> list[str]:
    """The names of a lora.target_modules list that `config` hands PEFT as modules' (not those `parameters_for_peft`
    hands it as parameters), in the list's order; none under all-linear."""
    return (
        []
        if cfg.lora.target_modules == "all-linear"
        else [n for n in cfg.lora.target_modules if n in config.target_modules]
    )


def fused_expert_weight(model, wanted: str) -> str | None:
    """The name within a layer (mlp.experts.gate_up_proj) of the routed experts' fused weight that `wanted` names
    on a model PEFT has not wrapped (`unadapted_experts`), or None."""
    return next((w for w in unadapted_experts(model, 0) if w.endswith(f".{wanted}")), None)


def refuse_missing_targets(model, cfg, config) -> None:
    """PEFT skips a modules_to_save name that matches no module, and a target_modules name so long as another one
    matches: a typo would train less than asked, silently. A fused expert weight PEFT does not adapt on this model
    (Qwen2-MoE's) is named as such; where it adapts them, the remedy names them, and gate_up_proj for the experts'
    gate_proj and up_proj, which name linear layers alone (`parameters_for_peft`)."""
    linears = ", ".join(decoder_linears(model))
    unmatched = [m for m in listed_modules(cfg, config) if not modules_named(model, m)]
    for wanted in unmatched:
        if weight := fused_expert_weight(model, wanted):
            raise ConfigError(
                f"{cfg.key_at('lora.target_modules')}: names {wanted}, the routed experts' fused weight ({weight}), "
                "which PEFT adapts only on the mixture-of-experts models it maps from transformers 4 (Mixtral, "
                f"Qwen3-MoE), not this one. Name linear layers it has ({linears}), or use method: full to train the "
                "experts."
            )
    layers = f"linear layers it has ({linears})"
    # Where PEFT maps the fused expert weights (it takes their old names out of target_modules), the remedy for a
    # missing name names them: resolved for that refusal alone.
    if unmatched and not isinstance(all_linear_as_peft_resolves_it(config, model).target_modules, str):
        fused = sorted({name.rsplit(".", 1)[-1] for name in unadapted_experts(model, 0)})
        layers += f" or its routed experts' fused weights and router ({', '.join(fused)}" + (
            "; the experts hold their gate and up projections as one weight, gate_up_proj)"
            if "gate_up_proj" in fused
            else ")"
        )
    unsaved = [m for m in cfg.lora.modules_to_save or [] if not modules_named(model, m)]
    for key, missing, remedy in (
        ("modules_to_save", unsaved, "modules it has (e.g. lm_head, embed_tokens)"),
        ("target_modules", unmatched, layers),
    ):
        if missing:
            raise ConfigError(
                f"{cfg.key_at(f'lora.{key}')}: names {', '.join(missing)}, which this model has no module called. "
                f"Name {remedy}, or leave {key} out."
            )


def refuse_unadaptable_targets(model, cfg, config) -> None:
    """Refuse a lora.target_modules name whose modules are none of the layers LoRA adapts (`ADAPTABLE_LAYERS`): a
    block that holds layers (mlp, self_attn) or a norm, which PEFT refuses printing the module whole."""
    for wanted in listed_modules(cfg, config):
        matched = [m for _, m in modules_named(model, wanted)]
        if any(isinstance(m, ADAPTABLE_LAYERS) for m in matched):
            continue
        layers = (name for m in matched for name, c in m.named_modules() if isinstance(c, nn.Linear))
        inside = sorted({name.rsplit(".", 1)[-1] for name in layers})
        kind = f"a {type(matched[0]).__name__}"
        raise ConfigError(
            f"{cfg.key_at('lora.target_modules')}: names {wanted}, which is "
            + (
                f"{kind}, which holds linear layers but is none: name those ({', '.join(inside)})"
                if inside
                else f"{kind}, no linear layer: name linear layers it has ({', '.join(decoder_linears(model))})"
            )
            + ", or write all-linear."
        )


def refuse_targets_beside_the_decoder(model, cfg, config) -> None:
    """Refuse a lora.target_modules name that only the modules beside the text decoder have (a vision encoder's
    fc1), which PEFT's exclude_modules (`outside_the_text_model`) leaves out without a word."""
    if not config.exclude_modules:
        return
    for wanted in listed_modules(cfg, config):
        names = [name for name, _ in modules_named(model, wanted)]
        if names and all(re.fullmatch(config.exclude_modules, name) for name in names):
            raise ConfigError(
                f"{cfg.key_at('lora.target_modules')}: names {wanted}, which only the vision encoder and projector "
                f"beside the text decoder have ({names[0]}, ...), and LoRA adapts the text decoder alone: PEFT would "
                f"leave it untrained. Name linear layers the decoder has ({', '.join(decoder_linears(model))}), or "
                f"leave {wanted} out."
            )


def refuse_targets_below_from_layer(model, cfg, config) -> None:
    """Refuse a lora.target_modules name that, under lora.from_layer, PEFT adapts nowhere: a module outside the
    decoder's layers (embed_tokens), which PEFT's layers_to_transform leaves out without a word, unless the name
    is the module's whole name (lm_head), or what only the layers below from_layer hold (a dense layer's gate_proj,
    `parameters_for_peft`)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if not cfg.lora.from_layer or cfg.lora.target_modules == "all-linear":
        return
    first = config.layers_to_transform[0]
    for wanted in cfg.lora.target_modules:
        # The modules it names, and the parameters (fused expert weights, the weights `parameters_for_peft` hands PEFT).
        modules, parameters = modules_named(model, wanted), parameters_named(model, [wanted, f"{wanted}.weight"])
        held = sorted({name for name, _ in modules} | set(parameters))
        if any(check_target_module_exists(config, name) is True for name in held) or any(
            w in held for w in config.target_parameters or ()
        ):
            continue
        where = (
            f"which only the layers below layer {first} hold ({held[0]}, ...), and"
            if any(_LAYER_INDEX.match(f"{name}.") for name in held)
            else "which sits outside the decoder's layers, and"
        )
        raise ConfigError(
            f"{cfg.key_at('lora.target_modules')}: names {wanted}, {where} {cfg.key_at('lora.from_layer')} adapts "
            f"those from layer {first} up alone: PEFT would leave it untrained. Leave {wanted} out, or lora.from_layer "
            "out to adapt it."
        )


def refuse_targets_whose_rows_train(model, cfg, config) -> None:
    """Refuse a lora.target_modules name of a layer whose rows of the tokens model.add_tokens adds train beside the
    adapter (`trained_token_rows`: the input embeddings, an untied output layer): PEFT puts no LoRA adapter on a
    layer it trains rows of, and stops with a TypeError."""
    rows = config.trainable_token_indices or {}
    names = {module: name for name, module in model.named_modules()}
    layers = [layer for layer in (model.get_input_embeddings(), model.get_output_embeddings()) if layer is not None]
    trained = {names[layer] for layer in layers if names[layer].rsplit(".", 1)[-1] in rows}
    for wanted in listed_modules(cfg, config):
        if held := [name for name, _ in modules_named(model, wanted) if name in trained]:
            raise ConfigError(
                f"{cfg.key_at('lora.target_modules')}: names {wanted}, the layer ({held[0]}) whose rows of the "
                f"tokens {cfg.key_at('model.add_tokens')} adds train beside the adapter, and PEFT puts no adapter on "
                f"a layer it trains rows of. Leave {wanted} out of target_modules (the added rows train all the "
                "same), or move it to lora.modules_to_save to train the whole layer."
            )


def refuse_tied_targets(model, cfg, config) -> None:
    """PiSSA and OLoRA write the residual into each target's weight; a weight another module shares (an output
    layer tied to the input embeddings) would change there too, so the run would train on other input embeddings
    than the adapter, converted to the original base, is written for."""
    from peft.tuners.tuners_utils import check_target_module_exists

    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    for names in owners.values():
        targeted = [name for name in names if len(names) > 1 and check_target_module_exists(config, name)]
        if targeted:
            others = [name for name in names if name != targeted[0]]
            raise ConfigError(
                f"{cfg.key_at('lora.target_modules')}: {targeted[0]} shares its weight with {', '.join(others)} "
                f"(tied word embeddings), and lora.init: {cfg.lora.init} takes the adapter's start out of that "
                f"weight, which would change {', '.join(others)} too while training. Leave {targeted[0]} out of "
                "target_modules, or use lora.init: default or gaussian."
            )


def keep_start(model) -> None:
    """Keep the start of a PiSSA or OLoRA adapter (its A and B as PEFT set them, taken out of the base weights)
    beside the model, so that what the run saves is an adapter on the original base (`saving.on_original_base`)."""
    from peft import get_peft_model_state_dict

    start = get_peft_model_state_dict(model)
    model.adapter_start = {k: v.detach().clone() for k, v in start.items() if ".lora_A." in k or ".lora_B." in k}


def weights_apart(model, wanted: PeftLoraConfig, layers: list[int] | None = None) -> str:
    """What the adapter of `model` (a PeftModel) and `wanted` (a target_modules list as `peft_config` gives it, in the
    decoder `layers` alone where given) adapt apart, "" where those are the same: a weight named within a layer
    (mlp.experts.gate_up_proj) where the other side adapts it in no layer, else in full."""
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from peft.tuners.tuners_utils import check_target_module_exists

    has, asked = set(), set(parameters_named(model.get_base_model(), wanted.target_parameters or ()))
    for name, m in model.get_base_model().named_modules():
        name = name.replace(".base_layer", "")
        if isinstance(m, LoraLayer):
            has.add(f"{name}.{m.parameter_name if isinstance(m, ParamWrapper) else 'weight'}")
        elif isinstance(m, ADAPTABLE_LAYERS) and ".lora_" not in name and check_target_module_exists(wanted, name):
            asked.add(f"{name}.weight")
    if layers is not None:
        asked = {n for n in asked if not (layer := _LAYER_INDEX.match(n)) or int(layer["index"]) in layers}

    def named(names: set[str], other: set[str]) -> str:
        within = {within_layer(n) for n in other}
        return ", ".join(sorted({within_layer(n) if within_layer(n) not in within else n for n in names}))

    return ", and not ".join(
        f"{named(names, other)}, {which}"
        for names, other, which in (
            (asked - has, has, "which the adapter leaves as the base has them"),
            (has - asked, asked, "which it adapts"),
        )
        if names
    )


def continue_adapter(model, cfg):
    """A model loaded with an adapter (`base_model` is a LoRA run) trains that adapter further, so the
    final adapter still sits on the run's base. The adapter keeps its own shape: a lora key set to
    another value than its default and the adapter's is an error, not a silent change."""
    loaded = model.peft_config[model.active_adapter]
    wanted = peft_config(cfg, model.get_base_model())
    shape = {
        "r": (loaded.r, wanted.r),
        "alpha": (loaded.lora_alpha, wanted.lora_alpha),
        "use_rslora": (loaded.use_rslora, wanted.use_rslora),
        "from_layer": (loaded.layers_to_transform, wanted.layers_to_transform),
    }
    fields = type(cfg.lora).model_fields
    clashes = [
        key for key, (has, asked) in shape.items() if has != asked and getattr(cfg.lora, key) != fields[key].default
    ]
    if cfg.method in ("lora", "dora") and (cfg.method == "dora") != bool(loaded.use_dora):
        clashes.append("method (lora or dora)")
    # A target_modules list is compared by the weights each side adapts, layer by layer, not by how it names them:
    # q_proj and self_attn.q_proj, or the list all-linear resolved to, name the same weights; and the adapter's own
    # list may adapt other weights where PEFT alone resolved it for the adapter (gate_proj and up_proj: the experts'
    # gate_up_proj there, a dense layer's here). With from_layer left out, the list is read in the adapter's layers.
    layers = loaded.layers_to_transform if cfg.lora.from_layer == fields["from_layer"].default else None
    apart = "" if cfg.lora.target_modules == fields["target_modules"].default else weights_apart(model, wanted, layers)
    said = [f"the config sets another {', '.join(clashes)}"] if clashes else []
    if apart:
        said.append(f"{cfg.key_at('lora.target_modules')} adapts other weights than it: {apart}")
    if said:
        raise TuneforgeError(
            f"base_model is a LoRA adapter that trains on as it is, but {' and '.join(said)} "
            f"(the adapter has r={loaded.r}, alpha={loaded.lora_alpha}, dora={bool(loaded.use_dora)}). Leave those "
            "keys out to continue the adapter, or merge it first (tuneforge export RUN --format merged) and train "
            "a new adapter on the merged model."
        )
    print(
        f"lora: training the adapter of base_model further (r={loaded.r}, alpha={loaded.lora_alpha}, its own "
        "target modules)"
    )
    for name, p in model.named_parameters():
        # trainable_tokens_delta: the rows of tokens the adapter added (model.add_tokens).
        p.requires_grad_("lora_" in name or "modules_to_save" in name or "trainable_tokens_delta" in name)
    return model


def prepare_model(model, cfg, token_ids=(), new_ids=()):
    """`token_ids`: the ids of `model.add_tokens`, whose embedding rows train beside the adapter; `new_ids`:
    those of them the tokenizer did not hold, whose rows start at the mean."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model = continue_adapter(model, cfg)
    else:
        grow_embeddings(model, new_ids)
        config = peft_config(cfg, model, token_ids)
        refuse_missing_targets(model, cfg, config)
        refuse_unadaptable_targets(model, cfg, config)
        refuse_targets_beside_the_decoder(model, cfg, config)
        refuse_targets_below_from_layer(model, cfg, config)
        refuse_targets_whose_rows_train(model, cfg, config)
        if cfg.lora.changes_base:
            refuse_tied_targets(model, cfg, config)
        try:
            with gate_up_pattern_warning_unsaid():
                model = get_peft_model(model, config)
        except ValueError as e:  # PEFT's NoMatchingPeftModuleError and its unsupported-module errors
            if "ParamWrapper does not work with" in str(e):  # PEFT's adapters on parameters: no dropout, no DoRA
                weights = (
                    f"the weights of this mixture-of-experts model that lora.target_modules adapts as parameters "
                    f"({', '.join(adapted_as_parameters(config, model))})"
                )
                if "with lora_dropout" in str(e):
                    raise ConfigError(
                        f"{cfg.key_at('lora.dropout')}: {cfg.lora.dropout:g}, but PEFT's adapters on {weights} take "
                        "no dropout; set lora.dropout to 0, or list target_modules without them (such as [q_proj, "
                        "k_proj, v_proj, o_proj])."
                    ) from None
                if "with use_dora" in str(e):
                    raise ConfigError(
                        f"{cfg.key_at('method')}: dora, but PEFT's adapters on {weights} have no DoRA; use method: "
                        "lora, or list target_modules without them (such as [q_proj, k_proj, v_proj, o_proj])."
                    ) from None
            raise ConfigError(
                f"lora.target_modules does not fit this model: {e} The model's linear layers "
                f"are {', '.join(decoder_linears(model))}: give target_modules a list of those, or all-linear."
            ) from None
        if cfg.lora.changes_base:
            keep_start(model)
    if cfg.train.freeze_embeddings:
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.requires_grad_(False)
    return model
