"""`tuneforge validate`: the dry run. Everything that can be checked before training is checked
here, in seconds: the config, the model (config and tokenizer only, no weights), every data row,
one rendered example with its loss mask; then the plan and its cost.

Time and memory are estimates, labelled as such: time from the counted training FLOPs over a
measured matmul throughput of this machine; memory from the weights, optimizer state and a
per-token activation size.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import data as tfdata
from .config import load_config
from .data.check import highlight
from .errors import TuneforgeError
from .eval.after_training import check_eval_inputs
from .methods import adapter_on_merged_base, batch_items, check_inputs, prepare_model
from .models import load_tokenizer, resolve, resolve_precision
from .models.attention import supports_per_example_attention
from .training import make_plan, shares_prefixes, to_rows
from .training.distributed import sharding_plan, strategy

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


def parameter_counts(source, cfg) -> tuple[int, int, object]:
    """(all, trainable, hf config), counted exactly by building the model and its method on the
    meta device: no memory, no weights, and DoRA magnitudes or modules_to_save count as they should."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
        trainable = sum(p.numel() for p in prepare_model(model, cfg).parameters() if p.requires_grad)
    return total, trainable, config


def estimate(
    n: int,
    trainable: int,
    config,
    cfg,
    plan,
    tokens_per_epoch: int,
    max_row_tokens: int,
    precision: str,
    shards: int = 1,
) -> dict:
    tokens = tokens_per_epoch * plan.total_steps / plan.steps_per_epoch
    # Forward 2N per token; backward 2N for activation gradients, plus 2 x trainable for weight gradients.
    flops = tokens * (4 * n + 2 * trainable)
    peak = matmul_flops_per_s(torch.bfloat16 if precision == "bf16" else torch.float32)
    seconds = flops / (peak * ASSUMED_UTILISATION)
    micro_tokens = plan.micro_batch_rows * max_row_tokens
    activations = (
        micro_tokens
        * config.num_hidden_layers
        * config.hidden_size
        * 4
        * (4 if cfg.train.gradient_checkpointing else 24)
    )
    # Per process: FSDP spreads weights, gradients and optimizer state over `shards` processes.
    memory = (n * 4 + trainable * 16) / shards + activations + micro_tokens * config.vocab_size * 4
    return {
        "tokens": int(tokens),
        "train_flops": flops,
        "matmul_peak_flops": peak,
        "seconds": seconds,
        "peak_memory_bytes": memory,
    }


def validate(config, overrides: list[str] = (), processes: int = 1) -> int:
    """The dry run of a run on `processes` processes (all machines together)."""
    console = Console()
    started = time.perf_counter()
    cfg = load_config(config, overrides)
    source = resolve(cfg.base_model)
    n_params, n_trainable, hf_config = parameter_counts(source, cfg)
    # Refuses a combination that cannot work.
    spread = strategy(cfg, processes, saves_merged=adapter_on_merged_base(cfg, source))
    tokenizer = load_tokenizer(source)
    check_inputs(cfg, tokenizer)
    check_eval_inputs(cfg)
    prepared = tfdata.prepare(cfg.data, tokenizer, log=lambda *a, **k: None)
    train_items, valid_items = batch_items(prepared, cfg)  # examples, or for dpo one item per pair
    if not train_items:
        raise TuneforgeError(f"{cfg.data.train}: no usable training rows.")
    precision = resolve_precision(cfg.train.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows = to_rows(
        train_items, cfg, shares_prefixes(cfg, supports_per_example_attention(hf_config, cfg.data.max_length))
    )
    plan = make_plan(cfg, len(train_items), len(rows), world_size=processes)
    tokens_per_epoch = sum(len(r.input_ids) for r in rows)
    unshared_tokens = sum(map(len, train_items))
    est = estimate(
        n_params,
        n_trainable,
        hf_config,
        cfg,
        plan,
        tokens_per_epoch,
        max(len(r.input_ids) for r in rows),
        precision,
        shards=processes if spread == "fsdp" else 1,
    )

    console.rule("one training example, as the model sees it ([bold green]trained[/], [dim]masked[/])")
    console.print(highlight(train_items[0], tokenizer))
    report = prepared.report
    table = Table(title=f"plan for {cfg.output_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    trained = sum(len(e.labels) - e.labels.count(tfdata.IGNORE_INDEX) for e in train_items)
    at_the_end = ([f"{cfg.eval.task} on {Path(cfg.data.validation).name}, base vs tuned"] if cfg.eval.task else []) + (
        ["forgetting, base vs tuned"] if cfg.eval.forgetting else []
    )
    for key, value in [
        ("model", f"{source.name} ({n_params:,} parameters, {hf_config.model_type})"),
        ("method", f"{cfg.method}: {n_trainable:,} trainable parameters"),
        (
            "examples" if cfg.method != "dpo" else "pairs",
            f"{len(train_items):,} train, {len(valid_items):,} validation",
        ),
        (
            "general replay",
            "none"
            if not cfg.data.general_mix
            else f"{report['counts'].get('general_mix', 0):,} examples ({cfg.data.general_mix:.0%}) "
            f"from {cfg.data.general_replay}",
        ),
        (
            "rows",
            f"{len(rows):,} ({'packed' if cfg.data.packing else 'unpacked'}, max_length {cfg.data.max_length}"
            + (
                f", shared prefixes: {tokens_per_epoch:,} of {unshared_tokens:,} tokens computed"
                if tokens_per_epoch < unshared_tokens
                else ""
            )
            + ")",
        ),
        ("tokens per epoch", f"{tokens_per_epoch:,} ({trained:,} trained)"),
        (
            "epochs",
            f"{plan.epochs}"
            + (" (from train.max_steps)" if cfg.train.max_steps else " (auto)" if cfg.train.epochs == "auto" else ""),
        ),
        ("steps", f"{plan.total_steps:,} ({plan.steps_per_epoch:,} per epoch, warmup {plan.warmup_steps})"),
        (
            "batch",
            f"{cfg.train.batch_size} rows per step = {cfg.train.grad_accum} x {plan.micro_batch_rows}"
            + (f" on each of {processes} processes" if processes > 1 else ""),
        ),
        ("precision", precision),
        *sharding_plan(cfg, spread, processes, n_params, n_trainable),
        ("after training", ", ".join(at_the_end) or "nothing (see eval.task, eval.forgetting)"),
        (
            "time (estimate)",
            f"{est['seconds'] / 60:.1f} min: {est['train_flops']:.2e} FLOP at {ASSUMED_UTILISATION:.0%} of a measured "
            f"{est['matmul_peak_flops'] / 1e9:.0f} GFLOP/s",
        ),
        ("peak memory (estimate)", f"{est['peak_memory_bytes'] / 2**30:.1f} GiB"),
        ("warnings", str(len(report.get("warnings", [])))),
        ("checked in", f"{time.perf_counter() - started:.1f} s"),
    ]:
        table.add_row(key, value)
    console.print(table)
    for w in report.get("warnings", [])[:10]:
        console.print(f"[yellow]warning:[/] {w if isinstance(w, str) else w.get('message', w)}")
    console.print("[bold green]ok[/]: nothing found that would stop this run.")
    return 0
