"""What every benchmark candidate shares: the tokenization the harness trusts, the one validation
loss function, the FLOP count, and a description of the machine."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

IGNORE = -100


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Tokenized:
    input_ids: list[int]
    span: tuple[int, int]  # positions [start, end) of the trained tokens: the reply and its end of turn

    def hf_labels(self) -> list[int]:
        """Unshifted labels as transformers' models take them (they shift inside)."""
        s, e = self.span
        return [IGNORE] * s + self.input_ids[s:e] + [IGNORE] * (len(self.input_ids) - e)


def tokenize_chat(rows: list[dict], tokenizer) -> list[Tokenized]:
    """Each conversation's tokens with the model's own chat template, and the span of its last
    assistant reply: the reply's content and the end-of-turn token that closes it, not the newline
    after it (the same tokens tuneforge trains with `train_on: assistant` on single-reply data).

    Independent of tuneforge's renderer on purpose: it is the harness's own yardstick."""
    messages = [r["messages"] for r in rows]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompts = tokenizer.apply_chat_template([m[:-1] for m in messages], tokenize=False, add_generation_prompt=True)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for text, prompt, ids, pids in zip(full, prompts, full_ids, prompt_ids):
        if not text.startswith(prompt) or ids[: len(pids)] != pids:
            raise ValueError("the chat template's prompt is not a prefix of the conversation")
        start = len(pids)
        end = next(i + 1 for i in range(start, len(ids)) if ids[i] == end_id)
        out.append(Tokenized(ids, (start, end)))
    return out


def assistant_ce(model, examples: list[Tokenized], pad_id: int, max_batch_tokens: int = 4096) -> dict:
    """Token-weighted mean cross-entropy over the trained (assistant) tokens of `examples`.

    The one yardstick for every candidate: a plain causal LM (any adapter merged or attached), fp32,
    right-padded batches of similar lengths with an attention mask, the output layer run only on
    the positions that predict a trained token."""
    import torch
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches, cur = [], []
    for i in order:
        n = len(examples[i].input_ids)
        if cur and n * (len(cur) + 1) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            width = max(len(examples[i].input_ids) for i in b)
            ids = torch.full((len(b), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(b), width), dtype=torch.long)
            targets = torch.full((len(b), width), IGNORE, dtype=torch.long)  # targets[j] = token j + 1
            for row, i in enumerate(b):
                ex = examples[i]
                n = len(ex.input_ids)
                ids[row, :n] = torch.tensor(ex.input_ids)
                mask[row, :n] = 1
                s, e = ex.span
                targets[row, s - 1 : e - 1] = torch.tensor(ex.input_ids[s:e])
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            keep = targets != IGNORE
            logits = head(hidden[keep]).float()
            total += F.cross_entropy(logits, targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return {"loss": total / count, "tokens": count}


# --- FLOPs -----------------------------------------------------------------------------------------

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_shapes(config) -> dict:
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    inter = config.intermediate_size
    # (in, out) of each linear layer of one decoder layer
    linears = {
        "q_proj": (d, heads * hd),
        "k_proj": (d, kv * hd),
        "v_proj": (d, kv * hd),
        "o_proj": (heads * hd, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }
    return {
        "layers": config.num_hidden_layers,
        "hidden": d,
        "attn_dim": heads * hd,
        "vocab": config.vocab_size,
        "linears": linears,
    }


def flops_per_example(shapes: dict, rank: int, length: int, trained: int) -> float:
    """Model FLOPs of one LoRA training pass over one example (see `FLOPS_FORMULA`)."""
    n_lin = shapes["layers"] * sum(i * o for i, o in shapes["linears"].values())
    n_lora = shapes["layers"] * sum(rank * (i + o) for i, o in shapes["linears"].values())
    attention = 6 * shapes["layers"] * shapes["attn_dim"] * length**2
    head = 4 * shapes["vocab"] * shapes["hidden"] * trained
    return (4 * n_lin + 6 * n_lora) * length + attention + head


FLOPS_FORMULA = (
    "per example of L tokens, T of them trained: (4·N_lin + 6·N_lora)·L + 6·n_layers·d_attn·L² + 4·V·d·T, where "
    "N_lin = frozen decoder linear weights (forward 2·N_lin·L + activation gradients 2·N_lin·L; no weight "
    "gradients, they are frozen), N_lora = adapter weights (forward, activation gradients and weight gradients: "
    "6·N_lora·L), attention = causal QKᵀ and PV, forward 2·d_attn·L² per layer and backward twice that, each "
    "example attending only to itself (packing does not add useful work), and the output layer forward and "
    "gradient-to-input on the trained positions only (the tied embedding is frozen). Padding, prompt-position "
    "logits and masked-out attention are not counted: they are waste, not model FLOPs."
)


# --- the machine -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    import torch

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "tuneforge"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def result_header(kind: str, command: str, load_before: float) -> dict:
    """The fields every bench result file opens with: what, when, how, on which machine and versions."""
    import datetime

    return {
        "kind": kind,
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().strftime("%H:%M:%S"),
        "command": command,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "versions": versions(),
    }


def write_result(result: dict) -> Path:
    """The result as bench/results/KIND-DATE.json, where `report.py` reads it; a second result of the same kind
    and day goes to KIND-DATE-2.json (and so on), never over the first."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    stem = f"{result['kind']}-{result['date']}"
    path, n = results / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = results / f"{stem}-{n}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values):
    values = sorted(values)
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
