"""The training recipe: one loop for every method, readable top to bottom.

    config -> tokenizer + data -> model + method -> optimizer + schedule -> [resume] ->
    for each step: micro-batches -> forward/backward (loss / trained tokens of the whole step)
                   -> clip -> optimizer step -> log -> eval -> checkpoint
    -> final model + full validation + what `eval:` asks for (task scores, forgetting) + summary

The loss of an optimizer step is the mean over its trained tokens (for DPO, its pairs: what the
objective counts) across all micro-batches and ranks. Each micro-batch therefore backpropagates
(its summed loss) / (the step's count), times the world size because DDP averages gradients over ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import data as tfdata
from ..config import Config, auto_epochs, load_config
from ..data.replay import replay_conversations
from ..errors import RunFailed, TuneforgeError
from ..fsio import atomic_file, write_json
from ..methods import (adapter_on_merged_base, batch_items, build_objective, causal_lm, check_inputs, loss_count,
                       prepare_model, reported_sums, trainable_parameters)
from ..models import load_model, load_tokenizer, resolve
from . import batches, checkpoint, distributed
from .attention import per_example_attention, supports_per_example_attention
from .progress import TrainProgress


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    status: str  # "completed" | "interrupted"
    metrics: dict = field(default_factory=dict)


# --- building blocks -----------------------------------------------------------------------------


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without AVX512-BF16/AMX, CPU bf16 matmuls are emulated and slower than fp32.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise TuneforgeError(
            f"train.precision=bf16, but this {device.type} has no native bf16 (it would be emulated and slow). "
            "Use precision: auto or fp32."
        )
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: Config) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors; with `lora.loraplus_lr_ratio`, LoRA's B matrices (of any
    method that trains LoRA adapters) learn at that multiple of the learning rate (LoRA+)."""
    ratio = cfg.lora.loraplus_lr_ratio
    faster = {name for name in params if ratio != 1.0 and "lora_B" in name}

    def decay_groups(chosen: list[torch.nn.Parameter], lr: float) -> list[dict]:
        return [{"params": [p for p in chosen if p.ndim >= 2], "weight_decay": cfg.train.weight_decay, "lr": lr},
                {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]

    groups = decay_groups([p for name, p in params.items() if name not in faster], cfg.train.learning_rate)
    if faster:
        groups += decay_groups([p for name, p in params.items() if name in faster], cfg.train.learning_rate * ratio)
    # fused is fastest where it exists (CUDA, recent CPU builds); foreach otherwise.
    try:
        return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, foreach=True)


@dataclass
class Plan:
    """How many steps the run takes, derived from the data and the config."""

    rows: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    micro_batch_rows: int


def make_plan(cfg: Config, n_examples: int, n_rows: int, world_size: int) -> Plan:
    t = cfg.train
    n_micro = t.grad_accum * world_size
    if t.batch_size % n_micro:
        raise TuneforgeError(
            f"train.batch_size ({t.batch_size}) must be a multiple of grad_accum x processes ({t.grad_accum} x {world_size})."
        )
    per_epoch = batches.steps_per_epoch(n_rows, t.batch_size, n_micro)
    if per_epoch == 0:
        raise TuneforgeError(
            f"{n_rows} training rows are fewer than one step needs (train.batch_size={t.batch_size}); "
            "add data or lower train.batch_size."
        )
    epochs = auto_epochs(n_examples) if t.epochs == "auto" else t.epochs
    total = t.max_steps or epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    warmup = int(t.warmup * total) if t.warmup < 1 else int(t.warmup)
    return Plan(n_rows, epochs, per_epoch, total, warmup, t.batch_size // n_micro)


def row_tokens(row) -> int:
    """The data's tokens in a row (a shared prefix counted per example), padding left out."""
    return row.example_tokens() if isinstance(row, tfdata.PackedRow) else len(row)


def shares_prefixes(cfg: Config, all_per_example: bool) -> bool:
    """Whether packed rows hold a common prefix once (`data.pack`): only where every model of the
    forward attends per example (`training.attention` reads the shared prefix), and not for DPO,
    whose items are pairs already laid out."""
    return (cfg.data.packing and cfg.data.share_prefixes and cfg.method != "dpo"
            and cfg.train.attention == "per_example" and all_per_example)


def to_rows(items, cfg: Config, share_prefixes: bool = False):
    # Rows are max_length long, or as long as the longest item (a DPO pair is two examples end to end).
    if not cfg.data.packing:
        return items
    length = max([cfg.data.max_length, *map(len, items)])
    if cfg.train.replay_loss == "ce":
        return tfdata.pack(items, length, share_prefixes=share_prefixes)
    # Replay learned as the base model's distribution: its rows hold replay alone, so that the base
    # model runs on those rows only.
    groups = [[e for e in items if not e.general], [e for e in items if e.general]]
    return [row for group in groups for row in tfdata.pack(group, length, share_prefixes=share_prefixes)]


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            with atomic_file(path) as f:
                f.write("".join(ln + "\n" for ln in kept))
        self.tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])


@torch.no_grad()
def evaluate(objective, rows, pad_id: int, micro_rows: int, world: distributed.World, autocast, *,
             summed: dict[str, str], count, phase: str) -> dict:
    """Each metric of `summed` (name -> the objective's sum) over `rows`, per what `count` counts
    (trained tokens; DPO pairs), summed across ranks. Packing does not change it: the same tokens
    are predicted from the same context either way.

    Each rank runs its share of the rows, which may be none, so the forwards run outside DDP (whose
    forward is a collective that every rank would have to join); the one collective is the sum."""
    objective = getattr(objective, "module", objective)  # DDP's wrapped module
    objective.eval()
    totals = torch.zeros(len(summed) + 1, dtype=torch.float64)
    device = world.device
    for start in range(world.rank * micro_rows, len(rows), micro_rows * world.size):
        batch = {k: v.to(device) for k, v in tfdata.collate(rows[start:start + micro_rows], pad_id).items()}
        with autocast():
            sums = objective(**batch)
        totals += torch.tensor([*(sums[key].item() for key in summed.values()), count(batch)], dtype=torch.float64)
    distributed.all_sum(totals, world, phase)
    objective.train()
    n = max(totals[-1].item(), 1)
    return {name: total / n for name, total in zip(summed, totals[:-1].tolist())}


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- the recipe ----------------------------------------------------------------------------------


def train(config, overrides: list[str] = (), *, resume: str | None = None, force: bool = False,
          progress: bool = True) -> TrainResult:
    """Fine-tune as the config says. `resume` is "latest" or a checkpoint folder."""
    from ..eval import after_training  # eval imports training: import it late

    cfg = load_config(config, overrides)
    world = distributed.setup(cfg.train.distributed_timeout)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    device = world.device
    precision = resolve_precision(cfg.train.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    seed_everything(cfg.train.seed)
    log = print if world.is_main else (lambda *a, **k: None)

    # Resume point first: a refused resume must fail before any heavy work.
    resume_from = None
    if resume:
        resume_from = checkpoint.latest(ckpt_root) if resume == "latest" else Path(resume)
        if resume_from is None or not (resume_from / checkpoint.STATE).is_file():
            raise TuneforgeError(f"no checkpoint to resume from at {resume_from or ckpt_root}; start without --resume.")
        saved_hash = json.loads((resume_from / checkpoint.STATE).read_text())["config_hash"]
        if saved_hash != cfg.results_hash() and not force:
            raise TuneforgeError(
                f"{resume_from} was written with a different config (one that changes results). "
                "Resume with the original config, or pass --force to continue anyway."
            )

    # Data: rank 0 prepares (and caches); the other ranks then read the same cache.
    source = resolve(cfg.base_model)
    tokenizer = load_tokenizer(source)
    check_inputs(cfg, tokenizer)
    after_training.check_eval_inputs(cfg)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        general = replay_conversations(cfg, tokenizer, log=log)
        prepared = tfdata.prepare(cfg.data, tokenizer, general=general, report_path=out / "data_report.json", log=log)
    distributed.barrier(world, "preparing data (rank 0 prepares it while the others wait)")
    if not world.is_main:
        general = replay_conversations(cfg, tokenizer, generate=False, log=log)
        prepared = tfdata.prepare(cfg.data, tokenizer, general=general, log=log)
    train_items, valid_items = batch_items(prepared, cfg)

    # Model and method.
    model = prepare_model(load_model(source, dtype=torch.float32), cfg).to(device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    named_params = trainable_parameters(model)
    params = list(named_params.values())
    optimizer = make_optimizer(named_params, cfg)
    reference = None
    replay_kl = cfg.train.replay_loss == "kl_to_base"
    if (cfg.train.kl_to_base or replay_kl) and cfg.method == "full":
        # Full fine-tuning changes every weight: the base distribution needs its own frozen copy.
        reference = load_model(source, dtype=torch.float32).to(device).eval().requires_grad_(False)
    objective = build_objective(model, cfg, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                device=device, reference=reference)
    reported = reported_sums(objective)  # logged as train_NAME and valid_NAME: loss (and token accuracy)
    logged_sums = objective.logged_sums  # the method's own metrics, beside them
    summed = {**reported, **{name: name for name in logged_sums}}
    valid_summed = {k: v for k, v in summed.items() if k not in objective.train_only_sums}
    count = loss_count(objective)  # what the sums are sums over: trained tokens, or DPO pairs
    frozen = objective.frozen  # a teacher or reference copy the objective runs beside the trained model

    # Every model a training forward runs: the trained one, and a teacher or reference copy if any.
    lms = [causal_lm(m) for m in (model, *frozen)]
    per_example = [lm for lm in lms if supports_per_example_attention(lm.config, cfg.data.max_length)]
    if cfg.train.attention == "per_example" and len(per_example) < len(lms):
        log("attention: a model's attention is not plain causal attention over a whole row "
            "(sliding window or soft-capping); it keeps its own attention with a block mask")

    def training_attention():
        return per_example_attention(*per_example) if cfg.train.attention == "per_example" else contextlib.nullcontext()

    # Rows: a shared prefix needs every model of the forward to run per-example attention.
    share = shares_prefixes(cfg, all_per_example=len(per_example) == len(lms))
    train_rows, valid_rows = to_rows(train_items, cfg, share), to_rows(valid_items, cfg, share)
    plan = make_plan(cfg, len(train_items), len(train_rows), world.size)
    lengths = np.array([len(r.input_ids) for r in train_rows])
    if share:
        log(f"data: shared prefixes: {len(train_items)} examples in {len(train_rows)} rows, "
            f"{int(lengths.sum()):,} tokens ({sum(map(len, train_items)):,} without sharing)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.scheduler, plan.warmup_steps, plan.total_steps))

    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler)
        log(f"resumed from {resume_from} at step {state['step']}")
    metrics_log = MetricsLog(out / "metrics.jsonl", state["step"] if resume_from else None, world.is_main)
    if world.size > 1:
        with distributed.phase("setting up the model on every process", world):
            objective = torch.nn.parallel.DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None)
    objective.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def save_checkpoint(step: int) -> Path | None:
        path = None
        if world.is_main:
            state_now = {**state, "step": step, "config_hash": cfg.results_hash()}
            path = checkpoint.save(ckpt_root, step, model, tokenizer, optimizer, scheduler, state_now, cfg.train.keep_checkpoints)
        distributed.barrier(world, f"writing checkpoint step-{step} (rank 0 writes it while the others wait)")
        return path

    def validation_metrics(phase: str) -> dict:
        return evaluate(objective, valid_rows, pad_id, plan.micro_batch_rows, world, autocast, summed=valid_summed,
                        count=count, phase=phase)

    last_metrics: dict = {}
    started = time.perf_counter() - state["elapsed"]
    bar = TrainProgress(plan.total_steps, state["step"], enabled=progress and world.is_main)
    status = "completed"
    with StopRequest() as stop, bar, training_attention():
        for step in range(state["step"], plan.total_steps):
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            order = batches.epoch_order(len(train_rows), cfg.train.seed, epoch)
            micro = batches.step_micro_batches(order, step_in_epoch, cfg.train.batch_size, cfg.train.grad_accum,
                                               world.size, world.rank, lengths)
            real_tokens = sum(row_tokens(train_rows[i]) for idx in micro for i in idx)
            micro = [tfdata.collate([train_rows[i] for i in idx], pad_id, mark_general=replay_kl) for idx in micro]

            phase = f"training step {step + 1}"
            # The step's count (trained tokens, or pairs), over all micro-batches and ranks: the loss denominator.
            step_count = distributed.all_sum(torch.tensor([float(sum(count(b) for b in micro))]), world, phase)
            t0 = time.perf_counter()
            # the objective's sums named in `summed`, then real (non-padding) tokens, then the ranks
            # asked to stop: every rank sees the same sum, so all of them stop after the same step
            totals = torch.zeros(len(summed) + 2, dtype=torch.float64)
            totals[-2] = real_tokens
            with distributed.phase(phase, world):
                for i, batch in enumerate(micro):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    sync = contextlib.nullcontext() if world.size == 1 or i == len(micro) - 1 else objective.no_sync()
                    with sync:
                        with autocast():
                            sums = objective(**batch)
                        (sums["loss"] * (world.size / step_count.to(device))).backward()
                    totals[:-2] += torch.tensor([sums[key].item() for key in summed.values()], dtype=torch.float64)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
            totals[-1] = stop.signal is not None
            distributed.all_sum(totals, world, phase)
            stop_requested = totals[-1].item() > 0
            means = dict(zip(summed, (totals[:-2] / step_count.item()).tolist()))
            train_loss = means["loss"]
            if not math.isfinite(train_loss) or not math.isfinite(float(grad_norm)):
                last = checkpoint.latest(ckpt_root)
                raise RunFailed(
                    f"step {step + 1}: {'loss' if not math.isfinite(train_loss) else 'gradient norm'} is not finite. "
                    "Likely causes: a learning rate too high for this model, or bf16 overflow (try precision: fp32). "
                    f"Last good checkpoint: {last or 'none yet'} (resume with --resume after changing the config and --force)."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_time = time.perf_counter() - t0
            state["step"], state["tokens"] = step + 1, state["tokens"] + int(totals[-2])
            state["elapsed"] = time.perf_counter() - started
            record = {
                "step": step + 1,
                "epoch": round((step + 1) / plan.steps_per_epoch, 4),
                **{f"train_{name}": means[name] for name in reported},
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": state["tokens"],
                "tokens_per_s": totals[-2].item() / step_time,
                "elapsed": round(state["elapsed"], 3),
            }
            record.update({name: means[name] for name in logged_sums})
            is_last = step + 1 == plan.total_steps
            if valid_rows and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not is_last:
                v = validation_metrics(f"validation at step {step + 1}")
                record.update({f"valid_{name}": value for name, value in v.items()})
            if (step + 1) % cfg.train.log_every == 0 or is_last or "valid_loss" in record:
                metrics_log.write(record)
            last_metrics = record
            bar.update(record)

            if stop_requested:
                status = "interrupted"
                path = save_checkpoint(step + 1)
                log(f"\n{stop.signal or 'stop'}: saved {path}; continue with `tuneforge train CONFIG --resume`.")
                break
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and not is_last:
                save_checkpoint(step + 1)

    final_dir = None
    if status == "completed":
        save_checkpoint(plan.total_steps)
        if valid_rows:
            with training_attention():
                v = validation_metrics("final validation")
            full_valid = {f"full_valid_{name}": value for name, value in v.items()}
            last_metrics.update(full_valid)
            metrics_log.write({"step": plan.total_steps, **full_valid})
        if world.is_main:
            final_dir = save_final(model, tokenizer, source, out / "final", merge=adapter_on_merged_base(cfg, source))
        distributed.barrier(world, "writing the final model (rank 0 writes it while the others wait)")
        if world.is_main:
            if cfg.eval.task or cfg.eval.forgetting:
                last_metrics.update(after_training.evaluate_after_training(cfg, out, final_dir, progress=progress))
            write_json(out / "summary.json", {"status": status, "steps": plan.total_steps, "precision": precision,
                                              "epochs": plan.epochs, "metrics": last_metrics})
    if world.is_main:
        bar.summary(last_metrics, out)
    distributed.teardown()
    return TrainResult(out, final_dir, state["step"], status, last_metrics)


def save_final(model, tokenizer, source, final: Path, *, merge: bool = False) -> Path:
    """The trained model as plain transformers/PEFT load it: adapter or full model, tokenizer,
    chat template, and a generation config that stops at the end-of-turn token. `merge` saves an
    adapter merged into its base (an adapter whose base exists only in memory)."""
    from ..fsio import atomic_dir

    if merge:
        model = model.merge_and_unload()
    with atomic_dir(final, replace=True) as tmp:
        if hasattr(model, "peft_config"):
            # Point the adapter at the local base folder so PeftModel.from_pretrained works offline.
            for pc in model.peft_config.values():
                pc.base_model_name_or_path = str(source.path)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None) or getattr(getattr(model, "base_model", None), "generation_config", None)
        if gen is not None:
            gen.eos_token_id = tokenizer.eos_token_id
            gen.pad_token_id = tokenizer.pad_token_id
            gen.save_pretrained(tmp)
    return final
