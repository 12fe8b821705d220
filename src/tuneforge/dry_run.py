"""`tuneforge validate`: the dry run. Everything that can be checked before training is checked
here, in seconds: the config, the model (config and tokenizer only, no weights), every data row,
one rendered example with its loss mask; then the plan and its cost.

Time and memory are estimates, labelled as such: time from the counted training FLOPs over a
measured matmul throughput of this machine; memory from the weights, optimizer state and a
per-token activation size.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from rich.table import Table
from torch import nn

from . import data as tfdata
from .config import load_config
from .console import new_console, plain
from .data.check import describe_system_prompt, highlight, legend
from .data.prepare import describe_files, told_warnings
from .errors import TuneforgeError
from .eval.after_training import check_eval_inputs, eval_grader
from .methods import (
    adapter_on_merged_base,
    added_token_ids,
    batch_items,
    check_inputs,
    frozen_dtype,
    new_token_ids,
    prepare_items,
    prepare_model,
    unseen_added_tokens_warning,
)
from .methods.dpo import kto_balance_warning
from .methods.lora import experts_warning
from .models import (
    context_length,
    count_parameters,
    meta_model,
    resolve,
    resolve_precision,
    run_tokenizer,
    source_context_length,
)
from .models.attention import supports_per_example_attention
from .models.loading import ADDED_BY_RUNS, base_config, grow_embeddings, largest_shard_bytes, tokens_added
from .training import (
    check_output_dir,
    earlier_run,
    make_plan,
    plan_warnings,
    rows_made,
    shares_prefixes,
    to_rows,
    trackers,
)
from .training.distributed import decoder_layers, sharding_plan, strategy
from .training.step_memory import allocator_warning, step_bytes, step_shape
from .wording import counted

# Share of the measured matmul peak that a training step reaches end to end (measured on the
# bundled model with LoRA on CPU; see BENCHMARKS.md). Used only for the labelled time estimate.
ASSUMED_UTILISATION = 0.5


def matmul_flops_per_s(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def parameter_counts(source, cfg, token_ids=(), new_ids=()) -> tuple[int, int, int, int, object, str | None]:
    """(all, trainable, in the decoder's linear layers, gathered whole under FSDP, hf config, the warning for
    routed experts the adapter leaves, `experts_warning`), counted
    exactly by building the model and its method on the meta device: no memory, no weights, and DoRA
    magnitudes or modules_to_save count as they should. The decoder's linear weights are what
    `model.quantize` quantizes. FSDP (`training.distributed.shard`) gathers its root unit (everything
    outside the decoder layers: embeddings, final norm, output layer) whole for the forward and keeps it
    so through the backward, and beside it a decoder layer computing and the next one prefetched.
    `token_ids`: the ids of `model.add_tokens`; `new_ids`: those the tokenizer did not hold, which the
    embeddings grow to hold."""
    config = base_config(source, cfg.model.rope_parameters(), cfg.key_at("model.rope_scaling"))
    # A reward model is the classifier it trains: its score head in place of the output layer.
    model = meta_model(config, classifier=cfg.method == "reward")
    with torch.device("meta"):
        grow_embeddings(model, new_ids)
        total = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
        linear = sum(
            m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name
        )
        layers = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
        gathered = total - sum(layers) + 2 * max(layers, default=0)
        prepared = prepare_model(model, cfg, token_ids, new_ids)
        trainable = sum(p.numel() for p in prepared.parameters() if p.requires_grad)
    return total, trainable, linear, gathered, config, experts_warning(cfg, prepared)


def context_rows(cfg, source, hf_config) -> list[tuple[str, str]]:
    """The window model.rope_scaling stretches the base to, where it is set."""
    scaling = cfg.model.rope_scaling
    if scaling is None:
        return []
    window = context_length(hf_config.get_text_config())
    return [
        (
            "context window",
            f"{window:,} positions: {source.name}'s {source_context_length(source):,} stretched "
            f"{scaling.factor:g}x ({scaling.rope_type}, model.rope_scaling); memory planned at max_length "
            f"{cfg.data.max_length:,}",
        )
    ]


def added_tokens_rows(cfg, tokenizer, token_ids: list[int], hf_config) -> list[tuple[str, str]]:
    """The plan's lines for model.add_tokens: each token and its id, new, added by a run the model comes from
    (`ADDED_BY_RUNS`: a model trained with these tokens, continued) or in its original vocabulary already, the
    embedding rows the model has for them (`hf_config`, grown by `parameter_counts`), and the rows that train."""
    if not token_ids:
        return []
    added = tokens_added(tokenizer)
    by_runs = tokenizer.init_kwargs.get(ADDED_BY_RUNS) or []

    def held(token: str) -> str:
        if token in added:
            return "new"
        return "added by a run this model comes from" if token in by_runs else "in the vocabulary already"

    tokens = ", ".join(
        f"{token} (id {id_}, {held(token)})" for token, id_ in zip(cfg.model.add_tokens, token_ids, strict=True)
    )
    how = "with every other weight" if not cfg.trains_adapters else "alone beside the adapter, saved with it"
    return [
        ("added tokens", f"{tokens}; {hf_config.get_text_config().vocab_size:,} embedding rows"),
        ("trained token rows", f"{len(token_ids)} (ids {', '.join(map(str, token_ids))}), {how}"),
    ]


def teacher_config(cfg):
    """Distill's teacher's transformers config (its base's, where the teacher is an adapter)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(cfg.distill.teacher).path)


def frozen_copy_parameters(cfg, n: int) -> int:
    """Parameters of the model a run holds frozen beside the one it trains: distill's teacher (merged,
    where it has an adapter), or a copy of the `n`-parameter starting model where every weight trains
    and the objective compares with the start (dpo's sigmoid and ipo, grpo with a KL penalty, train.kl_to_base). An
    adapter method's reference is the trained model with its adapter disabled: no copy."""
    if cfg.method == "distill":
        return count_parameters(teacher_config(cfg))
    compares_with_start = {
        "full": bool(cfg.train.kl_to_base) or cfg.train.replay_loss == "kl_to_base",
        "dpo": cfg.dpo.policy == "full" and cfg.dpo.has_reference,
        "grpo": cfg.grpo.policy == "full" and cfg.grpo.beta > 0,
    }
    return n if compares_with_start.get(cfg.method, False) else 0


def training_seconds(n: int, trainable: int, plan, tokens_per_epoch: int, precision: str) -> dict:
    """The labelled time estimate: counted training FLOPs over this machine's measured matmul rate."""
    tokens = tokens_per_epoch * plan.total_steps / plan.steps_per_epoch
    # Forward 2N per token; backward 2N for activation gradients, plus 2 x trainable for weight gradients.
    flops = tokens * (4 * n + 2 * trainable)
    peak = matmul_flops_per_s(torch.bfloat16 if precision == "bf16" else torch.float32)
    return {"train_flops": flops, "matmul_peak_flops": peak, "seconds": flops / (peak * ASSUMED_UTILISATION)}


# What a training process holds in host memory before its model loads: torch, transformers and peft
# imported (their code, libraries and first allocations), measured as the RSS of such a process on CPU
# (docs/LOG.md, "The memory plan against measured memory"). On a GPU it is host memory, not the device's.
IMPORTED_BYTES = 0.44 * 2**30

# bitsandbytes' bits a weight, the quantization constants included (double quantization stores them in 8 bits).
QUANTIZED_BITS = {("nf4", True): 4.127, ("nf4", False): 4.5, ("fp4", True): 4.127, ("fp4", False): 4.5}


def memory_plan(
    counts: tuple[int, int, int, int],
    config,
    cfg,
    plan,
    max_row_tokens: int,
    precision: str,
    shards: int = 1,
    trained_share: float = 1.0,
    gathered: int = 0,
) -> dict:
    """Bytes a process holds at its peak, by part: frozen weights (in `model.dtype`, quantized as
    `model.quantize` says), trainable weights with their gradients, optimizer state, activations of one
    micro-batch (kept per layer, or only at layer boundaries with gradient checkpointing), the logits
    the loss holds at once (`trained_share` of a micro-batch's tokens train), and a teacher or
    reference copy (`frozen_copy_parameters`, in `model.dtype`, whole on every process). FSDP spreads
    the first three over `shards` processes, and each process gathers the `gathered` parameters whole
    to compute (`parameter_counts`), in bf16 copies where it computes in bf16. Activations and logits
    are sized by the text model's settings (a model that also reads images keeps them in `text_config`)."""
    n, trainable, linear, copy = counts
    frozen_bytes = 2 if frozen_dtype(cfg, precision) == torch.bfloat16 else 4
    quantize = cfg.model.quantize
    if quantize == "none":
        frozen = n * frozen_bytes if cfg.trains_adapters else 0
    else:
        bits = 8 if quantize == "int8" else QUANTIZED_BITS[quantize, cfg.model.double_quant]
        frozen = linear * bits / 8 + (n - linear) * frozen_bytes
    trained = (trainable if cfg.trains_adapters else n) * 4 * 2  # fp32 weights and their gradients
    optimizer = (trainable if cfg.trains_adapters else n) * (8 if cfg.train.optimizer == "adamw" else 2)
    step = step_bytes(config, cfg, plan.micro_batch_rows * max_row_tokens, precision, trained_share)
    activations, logits = step["activations"], step["logits"]
    copy_bytes = copy * frozen_bytes
    if cfg.method == "distill" and cfg.distill.teacher_top_k is not None:
        # The teacher is freed once its top-k are cached, before the first step makes gradients, optimizer
        # state and activations: it adds to the peak only what it holds beyond them.
        copy_bytes = max(0, copy_bytes - (trained / 2 + optimizer) / shards - activations - logits)
    parts = {
        "frozen weights": frozen / shards,
        "trained weights and gradients": trained / shards,
        "optimizer state": optimizer / shards,
    }
    if shards > 1:
        gathered_bytes = 2 if precision == "bf16" else frozen_bytes if cfg.trains_adapters else 4
        parts["gathered to compute"] = gathered * gathered_bytes
    return parts | {"activations": activations, "logits": logits, "teacher or reference copy": copy_bytes}


def loading_plan(cfg, memory: dict, shard: int, shards: int, device: torch.device) -> dict:
    """Bytes a process holds at the peak of its model's load, by part, where that load quantizes the base
    (`model.quantize`) on a CPU: each checkpoint file is read whole in its own precision before its linear
    weights are quantized, so the largest (`shard` bytes, `largest_shard_bytes`) sits beside the frozen
    weights of the whole model (loaded whole on every process, `shards` of them under FSDP). Empty where the
    load holds no more than the weights it keeps: an unquantized base maps its files, and on a GPU the shard
    is read into host memory while the device holds the quantized weights."""
    if cfg.model.quantize == "none" or device.type != "cpu":
        return {}
    imported = {k: v for k, v in memory.items() if k == "torch and transformers imported"}
    return imported | {"frozen weights": memory["frozen weights"] * shards, "checkpoint file read whole": shard}


def available_memory(device: torch.device) -> int:
    """What one process can hold: the accelerator's memory, or the host memory free now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().available


def adapter_start(cfg) -> str:
    """How the adapter starts (lora.init), where it is not PEFT's default."""
    if not cfg.trains_adapters or cfg.lora.init == "default":
        return ""
    if not cfg.lora.changes_base:
        return f"; lora.init: {cfg.lora.init}"
    return (
        f"; lora.init: {cfg.lora.init}, the adapter's start taken out of the base while training, the adapters the "
        f"run writes on the original base (r {cfg.lora.r * 2})"
    )


def validate(config, overrides: list[str] = (), processes: int = 1, machines: int = 1) -> int:
    """The dry run of a run on `processes` processes (all `machines` together). The Python warnings its checks
    raise (loading the model, a library's) are listed and counted with the plan's own; where a check refuses
    the run, they are shown as Python shows them, before its error."""
    try:
        with warnings.catch_warnings(record=True) as raised:
            return dry_run(config, overrides, processes, machines, raised)
    except BaseException:
        for w in raised:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        raise


def dry_run(config, overrides, processes: int, machines: int, raised: list[warnings.WarningMessage]) -> int:
    """`validate`'s checks and plan; `raised`: the Python warnings raised so far, filled as they are."""
    console = new_console()
    started = time.perf_counter()
    cfg = load_config(config, overrides)
    cfg.check_data_files()
    check_output_dir(cfg)
    trackers.check_installed(cfg)
    source = cfg.base_source()
    tokenizer = run_tokenizer(cfg, source)
    token_ids = added_token_ids(cfg, tokenizer)
    counts = parameter_counts(source, cfg, token_ids, new_token_ids(tokenizer))
    n_params, n_trainable, n_linear, n_gathered, hf_config, experts = counts
    # Refuses a combination that cannot work.
    spread = strategy(cfg, processes, saves_merged=adapter_on_merged_base(cfg, source))
    check_inputs(cfg, tokenizer, source)
    check_eval_inputs(cfg)
    # Reading a file of many rows takes minutes: its bar (or log lines) shows the rate and what is left.
    prepared = prepare_items(cfg, tokenizer, log=lambda *a, **k: None, progress=True)
    train_items, valid_items = batch_items(prepared, cfg)  # examples, or for dpo one item per pair
    if not train_items:
        raise TuneforgeError(f"{', '.join(cfg.data.train_files)}: no usable training rows.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # On GPUs each process has its own; on CPUs a machine's processes share its memory.
    sharing = 1 if device.type == "cuda" else processes // machines
    precision = resolve_precision(cfg.train.precision, device)
    # Rows share prefixes where every model of the forward attends per example, as `loop.setup` lays them out:
    # distill's teacher runs on them too.
    forward_configs = [hf_config, *([teacher_config(cfg)] if cfg.method == "distill" else [])]
    every_per_example = all(supports_per_example_attention(c, cfg.data.max_length) for c in forward_configs)
    rows = to_rows(train_items, cfg, shares_prefixes(cfg, every_per_example))
    plan = make_plan(cfg, len(train_items), len(rows), world_size=processes)
    tokens_per_epoch = sum(len(r.input_ids) for r in rows)
    micro_batch_rows, longest, trained_share = step_shape(cfg, rows, plan.micro_batch_rows)
    if cfg.method == "grpo":  # a prompt trains as group_size sampled answers of up to max_new_tokens each
        tokens_per_epoch = (tokens_per_epoch + len(rows) * cfg.grpo.max_new_tokens) * cfg.grpo.group_size
    shards = processes if spread == "fsdp" else 1
    memory = memory_plan(
        (n_params, n_trainable, n_linear, frozen_copy_parameters(cfg, n_params)),
        hf_config,
        cfg,
        replace(plan, micro_batch_rows=micro_batch_rows),
        longest,
        precision,
        shards=shards,
        trained_share=trained_share,
        gathered=n_gathered,
    )
    if device.type == "cpu":  # every process of a CPU run holds its imports in the memory the plan is for
        memory = {"torch and transformers imported": IMPORTED_BYTES} | memory
    loading = loading_plan(cfg, memory, largest_shard_bytes(source.path), shards, device)

    console.rule("one training example, as the model sees it")
    console.print(legend(console))
    console.print(highlight(train_items[0], tokenizer, console))
    data_warnings = told_warnings(prepared.report)
    held = earlier_run(Path(cfg.output_dir))
    needed, free = max(sum(memory.values()), sum(loading.values())) * sharing, available_memory(device)
    run_warnings = []  # counted in the table with the data's, printed after them
    if held:
        run_warnings.append(
            f"{cfg.output_dir} holds an earlier run ({held}): train refuses to start there unless given --resume "
            "(continue it) or --overwrite (start over)."
        )
    run_warnings += plan_warnings(cfg, plan, len(valid_items))
    allocator = allocator_warning(device, memory["activations"] + memory["logits"])
    unseen = unseen_added_tokens_warning(cfg, tokenizer, train_items)
    run_warnings += [w for w in [kto_balance_warning(cfg, prepared.report), experts, unseen, allocator] if w]
    run_warnings += list(
        dict.fromkeys(
            str(w.message) if w.category is UserWarning else f"{w.category.__name__}: {w.message}" for w in raised
        )
    )
    if needed > free:
        loads = sum(loading.values()) > sum(memory.values())
        remedies = (
            f"its peak is the load, which reads the checkpoint's largest file "
            f"({loading.get('checkpoint file read whole', 0) / 2**30:.1f} GiB) whole before quantizing it: save the "
            "base in smaller shards (save_pretrained(..., max_shard_size='1GB')) and point base_model at that folder"
            if loads
            else memory_remedies(cfg)
        )
        run_warnings.append(
            f"the memory plan ({needed / 2**30:.1f} GiB) is more than this {device.type} has free "
            f"({free / 2**30:.1f} GiB): {remedies}."
        )
    table = Table(title=f"plan for {plain(cfg.output_dir)}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    facts = [
        ("model", f"{source.name} ({n_params:,} parameters, {hf_config.model_type})"),
        *context_rows(cfg, source, hf_config),
        ("method", f"{cfg.method}: {n_trainable:,} trainable parameters{adapter_start(cfg)}"),
        *added_tokens_rows(cfg, tokenizer, token_ids, hf_config),
        *data_rows(cfg, prepared.report, train_items, valid_items, rows, plan, processes),
        ("precision", f"{precision}; frozen weights {weights_held(cfg, precision)}"),
        *sharding_plan(cfg, spread, processes, memory),
        ("after training", after_training(cfg)),
        ("time (estimate)", time_row(training_seconds(n_params, n_trainable, plan, tokens_per_epoch, precision))),
        *memory_rows(memory, free, sharing, loading),
        ("warnings", str(len(data_warnings) + len(run_warnings))),
        ("checked in", f"{time.perf_counter() - started:.1f} s"),
    ]
    for key, value in facts:
        table.add_row(key, plain(value))
    console.print(table)
    for w in data_warnings[:10]:
        console.print(f"[yellow]warning:[/] {plain(w if isinstance(w, str) else w.get('message', w))}")
    for w in run_warnings:
        console.print(f"[yellow]warning:[/] {plain(w)}")
    # What still stands between this config and a run here: the verdict names it rather than "ok" alone.
    buts = (["start it with --resume or --overwrite"] if held else []) + (
        ["run it where its memory plan fits, or lower the plan"] if needed > free else []
    )
    if buts:
        console.print(f"[bold yellow]ok, but[/]: {' and '.join(buts)} (the warnings above).")
    else:
        console.print("[bold green]ok[/]: nothing found that would stop this run.")
    return 0


def memory_remedies(cfg) -> str:
    """What lowers this run's memory plan: only what the config has not done yet and accepts (a
    quantized base needs adapters, so a run that trains every weight is offered adapters first)."""
    remedies = []
    if not cfg.trains_adapters:
        remedies.append(f"train adapters instead of every weight ({cfg.trained_what} -> lora)")
        if cfg.train.optimizer == "adamw":
            remedies.append("hold the optimizer state in 8 bits (train.optimizer: adamw_8bit)")
    elif cfg.model.quantize == "none":
        remedies.append("quantize the base (model.quantize: nf4)")
    if not cfg.train.gradient_checkpointing:
        remedies.append("turn on train.gradient_checkpointing")
    return ", ".join(remedies + ["lower data.max_length or the batch"])


def data_rows(cfg, report: dict, train_items, valid_items, rows, plan, processes: int) -> list[tuple[str, str]]:
    """The plan table's lines about the data and the steps."""
    tokens_per_epoch = sum(len(r.input_ids) for r in rows)
    unshared = sum(map(len, train_items))
    trained = sum(len(e.labels) - e.labels.count(tfdata.IGNORE_INDEX) for e in train_items)
    replay = report["counts"].get("general_mix", 0)
    shared = (
        f", shared prefixes: {tokens_per_epoch:,} of {unshared:,} tokens computed"
        if tokens_per_epoch < unshared
        else ""
    )
    epochs = " (from train.max_steps)" if cfg.train.max_steps else " (auto)" if cfg.train.epochs == "auto" else ""
    tokens = f"{tokens_per_epoch:,} ({trained:,} trained)"
    answers = []
    if cfg.method == "grpo":
        # Each prompt trains as group_size sampled answers, each the prompt and up to max_new_tokens: those
        # are the tokens trained.
        g = cfg.grpo
        answers = [
            (
                "sampled answers",
                f"{g.group_size} a prompt, up to {g.max_new_tokens} tokens each "
                "(the time estimate counts their training, not their sampling)",
            )
        ]
        answer_tokens = len(rows) * g.group_size * g.max_new_tokens
        tokens = f"up to {tokens_per_epoch * g.group_size + answer_tokens:,} (up to {answer_tokens:,} trained)"
    if cfg.method == "dpo" and cfg.dpo.loss == "kto":
        counts = report["counts"]
        answers = [
            (
                "rated replies (kto)",
                f"{counts.get('train_desirable', 0):,} desirable (weight {cfg.dpo.desirable_weight:g}), "
                f"{counts.get('train_undesirable', 0):,} undesirable (weight {cfg.dpo.undesirable_weight:g}) "
                "in train",
            ),
            (
                "KL estimate",
                "each rated reply runs beside a mismatched one (its prompt, an earlier row's reply to another "
                "prompt) in the same forward, policy and reference: about twice the tokens of the replies alone, "
                "counted in the tokens and the memory plan",
            ),
        ]
    return answers + [
        (
            {"dpo": "pairs" if cfg.dpo.loss != "kto" else "rated replies", "grpo": "prompts", "reward": "pairs"}.get(
                cfg.method, "examples"
            ),
            f"{len(train_items):,} train, {len(valid_items):,} validation",
        ),
        (
            "general replay",
            f"{counted(replay, 'example', thousands=True)} ({cfg.data.general_mix:.0%}) from {cfg.data.general_replay}"
            if cfg.data.general_mix
            else "none",
        ),
        (
            "rows",
            f"{len(rows):,} ({packing_said(cfg, train_items)}, max_length {cfg.data.max_length}{shared})",
        ),
        *describe_files(report),
        ("system prompt", describe_system_prompt(report)),
        ("tokens per epoch", tokens),
        # The epochs the steps train, fractional where train.max_steps ends one part-way, as the summary gives them.
        ("epochs", f"{round(plan.total_steps / plan.steps_per_epoch, 2):g}{epochs}"),
        ("steps", f"{plan.total_steps:,} ({plan.steps_per_epoch:,} per epoch, warmup {plan.warmup_steps})"),
        ("batch", batch_row(cfg, plan, processes)),
    ]


def batch_row(cfg, plan, processes: int) -> str:
    """What a step trains: its rows, as micro-batches (uneven where they do not divide), and where the
    data makes fewer rows than train.batch_size, that it does."""
    n_micro = cfg.train.grad_accum * processes
    up_to = "up to " if plan.step_rows % n_micro else ""
    on_each = f" on each of {processes} processes" if processes > 1 else ""
    fewer = (
        f" (train.batch_size is {cfg.train.batch_size}, but {rows_made(cfg, plan)})"
        if plan.step_rows < cfg.train.batch_size
        else ""
    )
    step = f"{cfg.train.grad_accum} x {up_to}{plan.micro_batch_rows}{on_each}"
    return f"{counted(plan.step_rows, 'row')} per step = {step}{fewer}"


def weights_held(cfg, precision: str) -> str:
    dtype = "bf16" if frozen_dtype(cfg, precision) == torch.bfloat16 else "fp32"
    if not cfg.trains_adapters:
        return f"none (every weight trains, in fp32; teachers and references in {dtype})"
    quantized = f", decoder linear layers {cfg.model.quantize}" if cfg.model.quantize != "none" else ""
    return f"{dtype}{quantized}"


def after_training(cfg) -> str:
    graded = eval_grader(cfg) if cfg.eval.task else None
    grader = f" and the grader of {graded[2]}" if graded else ""
    asked = (
        [f"{cfg.eval.task}{grader} on {Path(cfg.data.validation).name}, base vs tuned"] if cfg.eval.task else []
    ) + (["forgetting, base vs tuned"] if cfg.eval.forgetting else [])
    asked += [
        f"multiple choice on {Path(b.file).name}{f' ({b.num_fewshot}-shot)' if b.num_fewshot else ''}, base vs tuned"
        for b in cfg.eval.benchmarks
    ]
    return ", ".join(asked) or "nothing (see eval.task, eval.forgetting, eval.benchmarks)"


def time_row(estimate: dict) -> str:
    return (
        f"{estimate['seconds'] / 60:.1f} min: {estimate['train_flops']:.2e} FLOP at {ASSUMED_UTILISATION:.0%} of a "
        f"measured {estimate['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"
    )


def memory_rows(memory: dict, available: int, sharing: int = 1, loading: dict | None = None) -> list[tuple[str, str]]:
    """The memory plan's row: what a process holds at its peak, by part, times the `sharing` processes that
    share the `available` memory. With `loading` (`loading_plan`) the peak is the larger of the load's and
    training's, and the row says which it is and gives both by part."""
    trains = sum(memory.values())
    each = max(trains, sum(loading.values())) if loading else trains
    parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in memory.items())
    if loading:
        load_parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in loading.items())
        peak = "while the quantized base loads" if each > trains else "while training"
        parts = (
            f"peak {peak}; loading {sum(loading.values()) / 2**30:.2f}: {load_parts}; "
            f"training {trains / 2**30:.2f}: {parts}"
        )
    shared = f", {sharing} processes sharing this machine's memory, each {each / 2**30:.1f} GiB" if sharing > 1 else ""
    plan = f"{each * sharing / 2**30:.1f} GiB of {available / 2**30:.1f} GiB free{shared}: {parts} (GiB)"
    return [("memory plan (estimate)", plan)]


def packing_said(cfg, train_items) -> str:
    """How the plan's rows hold the examples: packed, or not (data.packing off, or rows with images)."""
    if not cfg.data.packing:
        return "unpacked"
    return "unpacked: rows with images are not packed" if tfdata.shows_images(train_items) else "packed"
