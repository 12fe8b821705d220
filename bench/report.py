"""Regenerate BENCHMARKS.md from the raw results in bench/results/*.json.

    python bench/report.py

The newest file of each kind is shown in full (training throughput, profile, data preparation);
every file is listed under "All runs". Figures are only ever copied from the JSON, never typed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import median

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "BENCHMARKS.md"

TARGETS = {"speedup_vs_hf": 2.0, "speedup_vs_trl": 1.3, "valid_loss": 0.02, "mfu": 0.5}


def load(kind: str) -> list[tuple[Path, dict]]:
    runs = []
    for path in sorted(RESULTS.glob(f"{kind}-*.json")):
        try:
            runs.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    # Oldest first; results of one day by the time they were written (files from before it kept none).
    return sorted(runs, key=lambda r: (r[1].get("date", ""), r[1].get("time", ""), r[0].name))


def f(x, spec=".1f", none="–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def rel(path: Path) -> str:
    return str(path.relative_to(HERE.parent))


def throughput_section(path: Path, r: dict) -> list[str]:
    m, v, s = r["machine"], r["versions"], r["setup"]
    c = r["candidates"]
    threads = s.get("threads") or m.get("torch_threads")
    lines = [
        f"## Training throughput: tuneforge vs HF Trainer + PEFT vs TRL SFTTrainer ({threads} torch thread(s) each)",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}` (`make bench` runs `bench/run.py` with its "
        "defaults).",
        "",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, torch ISA {m['isa']}, AVX-512 {'yes' if m['avx512'] else 'no'}, "
        f"native bf16 (AVX512-BF16/AMX) **{'yes' if m['native_bf16'] else 'no'}**, {m['memory_gib']} GiB; "
        f"tuneforge `precision: auto` picks **{m['tuneforge_auto_precision']}** here. "
        f"Shared machine: 1-minute load average during the run median {f(r['load_average']['median'])} "
        f"(min {f(r['load_average']['min'])}, max {f(r['load_average']['max'])}) on {m['cores']} cores, so absolute "
        "figures are low and noisy; the ratios are what this run measures (candidates take turns step by step).",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- **Setup**: SmolLM2-135M-Instruct, LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} dropout "
        f"{s['lora']['dropout']} on all linear layers, lr {s['lr']}, {s['scheduler']}, seed {s['seed']}, "
        f"{threads} torch thread(s) per candidate, one epoch over the same {s['train_rows']} conversations ({r['data']['train']['tokens']:,} real tokens, "
        f"{r['data']['train']['trained_tokens']:,} of them trained) for every candidate. A step is "
        f"{s['batch_sequences']} sequences for padded candidates, {s['batch_packed_rows']} packed row of up to "
        f"{s['packed_row_tokens']} tokens for packed ones. Each candidate in its own process; they take turns step by "
        f"step; the first {s['warmup_steps_excluded']} step(s) of each are not timed. A step is timed from the moment "
        "its turn starts to the end of the optimizer step: batch fetching and collation included.",
    ]
    d = r["data"]["distribution_2000_rows"]
    t = d["tokens"]
    lines.append(
        f"- **Data**: `{r['data']['generator']}`, seeded synthetic single-turn chats (system, user, assistant). "
        f"Measured token lengths (SmolLM2 chat template, 2,000 rows): p10 {t['p10']}, median {t['p50']}, "
        f"p90 {t['p90']}, p99 {t['p99']}, max {t['max']}, mean {t['mean']}; assistant tokens "
        f"{d['assistant_share']:.0%} of all. Train set: median {r['data']['train']['lengths']['p50']}, "
        f"max {r['data']['train']['lengths']['max']}."
    )
    lines.append(
        f"- **Validation loss**: one shared function (`bench/common.py: assistant_ce`) on each saved adapter: "
        f"token-weighted mean cross-entropy over the assistant tokens of {s['valid_rows']} held-out "
        f"conversations ({r['valid_tokens']:,} tokens), fp32. Base model before training: "
        f"{f(r['base_valid_loss'], '.4f')}."
    )
    lines += [
        "",
        "| candidate | real tokens/s (median; min-max) | vs HF Trainer | vs TRL | peak RSS (MiB) | RSS vs HF | "
        "valid loss | vs HF | MFU | steps | real tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in c.values():
        lines.append(
            f"| {x['label']} | {f(x['tokens_per_s'])} ({f(x['tokens_per_s_min'])}-{f(x['tokens_per_s_max'])}) | "
            f"{f(x.get('speedup_vs_hf'), '.2f')}x | {f(x.get('speedup_vs_trl'), '.2f')}x | {f(x['peak_rss_mib'], '.0f')} | "
            f"{f(x.get('rss_vs_hf'), '.2f')}x | {f(x['valid_loss'], '.4f')} | {f(100 * x['valid_loss_vs_hf'] if 'valid_loss_vs_hf' in x else None, '+.1f')}% | "
            f"{f(100 * x['mfu'] if 'mfu' in x else None, '.1f')}% | {x['steps']} | {x['real_tokens']:,} |"
        )
    lines.append("")
    lines.append(
        "Real tokens are non-padding tokens (prompt and reply); tokens/s is the median over the timed steps of "
        "(real tokens in the step / step time). Aggregate over the timed steps (total tokens / total time): "
        + ", ".join(f"{n} {f(x['tokens_per_s_aggregate'])}" for n, x in c.items())
        + "."
    )
    tf = c.get("tuneforge")
    if tf and "speedup_vs_hf" in tf:
        lines += ["", "### Targets", "", "| target | measured | met? |", "|---|---|---|"]
        hf_runs = {
            (True, True): "fp32 and bf16 run",
            (True, False): "bf16 not run, see below",
            (False, True): "bf16 run, the HF Trainer's faster mode here",
        }[("hf_trainer" in c, "hf_trainer_bf16" in c)]
        lines.append(
            f"| >= 2x HF Trainer + PEFT tokens/s (better of fp32/bf16; {hf_runs}) | "
            f"{f(tf['speedup_vs_hf'], '.2f')}x | {'yes' if tf['speedup_vs_hf'] >= 2 else 'no'} |"
        )
        if "speedup_vs_trl" in tf:
            lines.append(
                f"| >= 1.3x TRL SFTTrainer (packing) tokens/s | {f(tf['speedup_vs_trl'], '.2f')}x | "
                f"{'yes' if tf['speedup_vs_trl'] >= 1.3 else 'no'} |"
            )
        others = {n: x for n, x in c.items() if n in ("hf_trainer", "hf_trainer_bf16", "trl_sft")}
        rss_ok = all(tf["peak_rss_mib"] <= x["peak_rss_mib"] for x in others.values())
        lines.append(
            f"| peak RSS not above HF Trainer's or TRL's | {f(tf['peak_rss_mib'], '.0f')} MiB vs "
            + ", ".join(f"{n} {f(x['peak_rss_mib'], '.0f')}" for n, x in others.items())
            + f" | {'yes' if rss_ok else 'no'} |"
        )
        worst = max(abs(tf["valid_loss"] / x["valid_loss"] - 1) for x in others.values())
        lines.append(
            f"| validation loss within 2% of theirs | largest gap {100 * worst:.1f}% | {'yes' if worst <= 0.02 else 'no'} |"
        )
        if "mfu" in tf:
            lines.append(
                f"| MFU >= 50% of the measured fp32 matmul peak | {100 * tf['mfu']:.1f}% | "
                f"{'yes' if tf['mfu'] >= 0.5 else 'no'} |"
            )
    p = r.get("probe")
    if p:
        lines += [
            "",
            "### The machine's limit and MFU",
            "",
            f"Matmul throughput measured by a probe that takes a turn in every round of the run above (so under the "
            f"same load), `F.linear` on [tokens, in] x [in, out] with the model's shapes, median over "
            f"{p['rounds']} rounds:",
            "",
            "| shape | fp32 GFLOP/s |",
            "|---|---|",
        ]
        lines += [f"| {shape} | {f(g)} |" for shape, g in p["fp32_gflops_by_shape"].items()]
        lines.append("")
        lines.append(
            f"fp32 peak (best base-layer shape, median over rounds): **{f(p['fp32_peak_gflops'])} GFLOP/s** "
            f"(best single round {f(p['fp32_peak_gflops_max'])})."
        )
        native = r["machine"].get("native_bf16")
        if p.get("bf16_gflops_by_shape"):
            lines.append(
                ("bf16 (native on this CPU): " if native else "bf16 (emulated: no native bf16 on this CPU): ")
                + ", ".join(f"{shape} {f(g)} GFLOP/s" for shape, g in p["bf16_gflops_by_shape"].items())
                + "."
            )
        b = p.get("bf16_step")
        if b:
            ratio = b["bf16_seconds"] / b["fp32_seconds"]
            lines.append(
                f"Whole-model probe, one LoRA forward+backward on {b['tokens']} tokens: fp32 "
                f"{f(b['fp32_seconds'], '.2f')} s, bf16 autocast {f(b['bf16_seconds'], '.2f')} s "
                f"({f(ratio, '.1f')}x the fp32 time; one pass each, so noisy on a loaded machine)."
            )
        lines.append(
            "On this CPU tuneforge's `precision: auto` picks bf16, so its MFU against the fp32 peak can pass 100%; "
            "`--candidates hf_trainer_bf16` adds the HF Trainer with bf16 autocast, the fair baseline here."
            if native
            else "tuneforge's `precision: auto` picks fp32 on a CPU without native bf16 and refuses `precision: bf16` "
            "there, so no tuneforge bf16 candidate can run; the bf16 baselines (HF Trainer `bf16=True`, TRL's "
            "default bf16) are not run by default for the reason the figures above give (emulated bf16 "
            "matmuls are several times slower than fp32); `--candidates hf_trainer_bf16` runs one."
        )
        lines += [
            "",
            f"MFU = achieved model FLOP/s / fp32 peak. Achieved = model FLOPs per real token "
            f"({r['flops']['per_real_token'] / 1e6:.0f} M, averaged over the training set) x real tokens/s. "
            f"Model FLOPs, {r['flops']['formula']}",
        ]
        lines.append("")
        lines.append("| candidate | achieved GFLOP/s | MFU |")
        lines.append("|---|---|---|")
        lines += [
            f"| {x['label']} | {f(x['achieved_gflops'])} | {f(100 * x['mfu'] if 'mfu' in x else None, '.1f')}% |"
            for x in c.values()
        ]
    return lines


def profile_section(path: Path, r: dict) -> list[str]:
    threads = r.get("threads")
    lines = [
        f"## Where a tuneforge step's time goes (profile{f', {threads} torch thread(s)' if threads else ''})",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. {r.get('what', '')}",
        "",
    ]
    lines += [
        "Each operator's self time, sorted into parts by the rules in `bench/profile_step.py` (matmuls by shape; "
        'backward = inside `loss.backward()`). "Python and framework overhead" is step time spent in no operator: '
        "Python, the autograd engine, the profiler's own bookkeeping.",
        "",
    ]
    lines += ["| part | seconds / step | share |", "|---|---|---|"]
    total = r["step_seconds"]
    for part, sec in r["categories"].items():
        lines.append(f"| {part} | {sec:.2f} | {100 * sec / total:.1f}% |")
    lines.append(f"| **step wall time** | {total:.2f} | 100% |")
    lines += notes(r)
    if r.get("top_ops"):
        lines += [
            "",
            "Top operators by self time (with shapes):",
            "",
            "| op | shapes | calls | self s |",
            "|---|---|---|---|",
        ]
        lines += [f"| {o['name']} | {o['shapes']} | {o['calls']} | {o['self_s']:.2f} |" for o in r["top_ops"]]
    return lines


def data_prep_section(path: Path, r: dict) -> list[str]:
    prep, stream = r.get("prepare", {}), r.get("streaming", {})
    load = (prep.get("load_average") or [None])[0]
    lines = [
        "## Data preparation",
        "",
        f"From `{rel(path)}` ({r.get('date')}), made by `bench/data_prep.py` "
        f"(SmolLM2 tokenizer; 1-minute load average {f(load)} when it ran). Target: at least 5,000 rows/s on 2 cores, "
        "memory flat however large the file.",
        "",
    ]
    if prep:
        cpu = prep.get("cpu_us_per_row", {})
        lines.append(
            f"- `prepare` (validate, render, tokenize, dedup, split): {prep.get('rows', 0):,} typical chat rows, "
            f"**{f(prep.get('rows_per_s'), ',.0f')} rows/s** (best of 3), {f(prep.get('tokens_per_s'), ',.0f')} "
            f"tokens/s; CPU per row {f(cpu.get('process'), '.0f')} us, {f(cpu.get('main_thread'), '.0f')} us of "
            "it on the thread that reads and renders (the tokenizer runs beside it)."
        )
    if stream:
        lines.append(
            f"- Streaming read of {stream.get('rows', 0):,} rows ({f(stream.get('file_mib'), '.0f')} MiB): "
            f"{f(stream.get('read_rows_per_s'), ',.0f')} rows/s, RSS grew {f(stream.get('rss_growth_mib'), '.1f')} MiB."
        )
    if "max_rss_mib" in r:
        lines.append(f"- Peak RSS {f(r['max_rss_mib'], '.0f')} MiB.")
    return lines


def serve_section(path: Path, r: dict) -> list[str]:
    s, m, ratios, targets = r["setup"], r["machine"], r["ratios"], r["targets"]
    batch1, concurrent, agree = r["batch1"], r["concurrent"], r["same_text_as_hf"]

    def met(ratio: str, target: str) -> str:
        return "yes" if ratios[ratio] >= targets[target] else "no"

    def row(name: str, what: str, target: str = "", done: str = "") -> str:
        figures = batch1[name]
        return (
            f"| {what} | {f(figures['tokens_per_s'])} | {f(ratios.get(f'{name}_vs_llama_cpp', 1.0), '.2f')}x | "
            f"{f(figures['first_token_seconds'], '.3f')} s | {target} | {done} |"
        )

    concurrency = [n for n in concurrent if n.isdigit()]
    lines = [
        f"## Serving: `tuneforge serve` against transformers `generate` and llama.cpp ({s['threads']} threads each)",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. Model: `{s['model']}`, exported once by "
        f"`tuneforge export` as a merged folder (for transformers and `tuneforge serve`) and as `{s['gguf']}` "
        f"(f16, for llama.cpp {r['versions'].get('llama_cpp_python')}). {m['cpu']}, {m['cores']} cores "
        f"(native bf16: {'yes' if m['native_bf16'] else 'no'}); greedy, up to {s['max_tokens']} new tokens per "
        f"request, {s['rounds']} rounds taking turns, two prompts each. Shared machine: 1-minute load average "
        f"median {f(r['load_average']['median'])} (min {f(r['load_average']['min'])}, max "
        f"{f(r['load_average']['max'])}), so absolute figures are noisy; the ratios are what this run measures.",
        "",
        "Ratios pair each run with llama.cpp's run of the same prompt in the same round (median over runs), so "
        "load that changes between rounds does not skew them.",
        "",
        "| contender, batch 1 | tokens/s (median) | vs llama.cpp | first token (median) | target | met? |",
        "|---|---|---|---|---|---|",
        row("llama_cpp", "llama.cpp on the f16 GGUF (`Llama.generate`, in process)"),
        row("hf_generate", "transformers `model.generate`, fp32 (the path `serve` took before)"),
        row(
            "serve",
            f"`tuneforge serve` (`--precision auto`: {r['serve_dtype']}), one streaming request (HTTP SSE)",
            f">= {targets['serve_vs_llama_cpp']:.1f}x",
            met("serve_vs_llama_cpp", "serve_vs_llama_cpp"),
        ),
        row("serve_fp32", "`tuneforge serve --precision fp32`, one streaming request (HTTP SSE)"),
        "",
        "| `tuneforge serve`, concurrent streaming requests | aggregate tokens/s (median) | vs llama.cpp batch 1 "
        "| target | met? |",
        "|---|---|---|---|---|",
    ]
    for n in concurrency:
        key = f"concurrent_{n}_vs_llama_cpp"
        target = targets.get(key)
        lines.append(
            f"| {n} at once | {f(concurrent[n]['tokens_per_s'])} | {f(ratios[key], '.2f')}x | "
            + (f">= {target:.1f}x | {met(key, key)} |" if target else "| |")
        )
    lines += [
        "",
        "Greedy texts equal to transformers fp32's: "
        + ", ".join(f"{name} {a['agree']} of {a['of']}" for name, a in agree.items())
        + f". Largest batch the server decoded: {concurrent['largest_batch']}. A request is timed from sending it "
        "to its last token (`data: [DONE]` for the server, HTTP included), the prompt's forward included; "
        "tokens count the end-of-turn token.",
    ]
    return lines


def decode_step_section(path: Path, r: dict) -> list[str]:
    s, m, steps = r["setup"], r["machine"], r["step_ms"]
    lines = [
        f"## Decoding step: eager against `torch.compile` ({s['threads']} threads, {s['dtype']})",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. SmolLM2-135M-Instruct with two LoRA "
        f"adapters, decoded through `generate.Batch` on {m['cpu']} ({m['cores']} cores), 1-minute load average "
        f"median {f(r['load_average']['median'])}. Compiled: the causal LM's forward under "
        "`torch.compile(dynamic=True)`.",
        "",
        f"Batch 1, ms a step (median of rounds taken in turns): eager **{f(steps['eager']['median'])}**, compiled "
        f"**{f(steps['compiled']['median'])}**.",
        "",
        "| phase, in order | compiled: first pass (s) | graphs compiled | recompiles | eager: first pass (s) |",
        "|---|---|---|---|---|",
    ]
    for phase, compiled in r["first_passes"]["compiled"].items():
        eager = r["first_passes"]["eager"][phase]
        lines.append(
            f"| {phase} | {f(compiled['first_pass_seconds'])} | {compiled['graphs_compiled']} | "
            f"{compiled['recompiles']} | {f(eager['first_pass_seconds'])} |"
        )
    return lines


def prefix_cache_section(path: Path, r: dict) -> list[str]:
    s, m = r["setup"], r["machine"]
    on, off = r["second_first_token_seconds"]["on"], r["second_first_token_seconds"]["off"]
    prompt = median([x["prompt_tokens"] for x in r["rounds"]])
    cached = median([x["on"]["second"]["cached_tokens"] for x in r["rounds"]])
    same = sum(x["same_text"] for x in r["rounds"])
    lines = [
        "## Prefix caching: time to first token of a request sharing a long system prompt",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. Two `tuneforge serve` processes on "
        f"{s['model']} (`--precision auto`, {s['threads']} threads each), the prefix cache on (its default size) and "
        f"off (`--prefix-cache-mb 0`), taking turns; each round a system prompt of about {s['system_tokens']} tokens "
        f"of its own, a first request with it (fills the cache), then a second one with another question, timed from "
        f"sending it to its first streamed text. {s['rounds']} rounds, medians.",
        "",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, torch ISA {m['isa']}, native bf16 "
        f"{'yes' if m['native_bf16'] else 'no'}, {m['memory_gib']} GiB; 1-minute load average {f(m['load_average_before'])} "
        f"before, {f(m['load_average_after'])} after. CPU flags (lscpu) for vector math: "
        f"{', '.join(s['simd_flags'])}.",
        f"- **Versions**: {', '.join(f'{k} {v}' for k, v in r['versions'].items() if v)}",
        "",
        "| prefix cache | second request's time to first token (s) | prompt tokens | of them from the cache | first request's (s) |",
        "|---|---|---|---|---|",
        f"| on | {f(on, '.3f')} | {prompt} | {cached} | {f(r['first_first_token_seconds']['on'], '.3f')} |",
        f"| off | {f(off, '.3f')} | {prompt} | 0 | {f(r['first_first_token_seconds']['off'], '.3f')} |",
        "",
        f"Off / on, the median of the rounds' ratios: **{f(r['ratio'], '.2f')}x**. The second replies' text was the "
        f"same with and without the cache in {same} of {len(r['rounds'])} rounds (bf16 rounds differently at other "
        "prefill shapes, so a near-tie may go the other way; in fp32 greedy answers are equal, tested).",
    ]
    if "turn_ratio" in r:
        turns = {
            name: {
                key: median([x[name]["turn"][key] for x in r["rounds"]]) for key in ("prompt_tokens", "cached_tokens")
            }
            for name in ("on", "off")
        }
        replies = median([x[name]["reply_tokens"] for x in r["rounds"] for name in ("on", "off")])
        # The reply's tokens the next turn took from the cache: past the first turn's prompt, all of which it holds.
        reused = median([x["on"]["turn"]["cached_tokens"] - x["on"]["reply"]["prompt_tokens"] for x in r["rounds"]])
        lines += [
            "",
            f"A conversation's next turn, in the same rounds: a request with the same system prompt asks for a long "
            f"reply (at most {s['reply_tokens']} tokens; {replies:g} generated, median), then the next sends the "
            "conversation back, that server's reply included, with one more question, timed to its first streamed "
            f"text. Of the reply's tokens, {reused:g} (median) came from the cache: a reply is reused up to the first "
            "token where encoding its text again gives other tokens than the model generated (a tokenizer may split "
            "a token the model picked, as SmolLM2's encodes the one '\\n\\n' before a list as two), and the rest "
            "runs again.",
            "",
            "| prefix cache | next turn's time to first token (s) | prompt tokens | of them from the cache |",
            "|---|---|---|---|",
            *(
                f"| {name} | {f(r['turn_first_token_seconds'][name], '.3f')} | {turns[name]['prompt_tokens']} "
                f"| {turns[name]['cached_tokens']} |"
                for name in ("on", "off")
            ),
            "",
            f"Off / on, the median of the rounds' ratios: **{f(r['turn_ratio'], '.2f')}x**. The next turn's text was "
            f"the same with and without the cache in {sum(x['turn_same_text'] for x in r['rounds'])} of "
            f"{len(r['rounds'])} rounds.",
        ]
    return lines


def notes(r: dict) -> list[str]:
    """A result's notes (what its figures need said beside them), one bullet each, after a blank line."""
    return [""] + [f"- {n}" for n in r["notes"]] if r.get("notes") else []


def distill_section(path: Path, r: dict) -> list[str]:
    s, m, models, speed, training = r["setup"], r["machine"], r["models"], r["speed"], r["training"]
    teacher, sft = models["teacher"], models["student_sft"]
    lines = [
        f"## Distillation: a SmolLM2 student of {len(r['kept_layers'])} of its teacher's {r['teacher_layers']} layers, "
        f"distilled vs plain SFT ({m['torch_threads']} torch thread)",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. Teacher: SmolLM2-135M-Instruct with LoRA on "
        f"the upper half of its layers (the quickstart's recipe, {training['teacher']['steps']} steps). Student: "
        f"`tuneforge distill init --every {s['keep_every']}`, teacher layers {', '.join(map(str, r['kept_layers']))} "
        f"({sft['parameters'] / 1e6:.1f}M of {teacher['parameters'] / 1e6:.1f}M parameters). Both students start "
        f"from that same init and train the same way (full fine-tuning, {s['student_steps']} steps of "
        f"{s['batch_size']} packed rows of up to {s['max_length']} tokens, lr {s['student_learning_rate']}, cosine, "
        f"seed {s['seed']}, the demo task's training tickets); only the objective differs: SFT is the cross-entropy "
        f"on the labels, distill is {s['alpha']} x CE + {1 - s['alpha']:g} x T^2 x {s['divergence']} at "
        f"T = {s['temperature']}. Machine: {m['cpu']}, {m['cores']} cores shared with other work (1-minute load "
        f"average {f(m['load_average_before'])} before the measurements, {f(m['load_average_after'])} after), so "
        "times are noisy.",
        "",
        f"Held-out test tickets (first {s['test_tickets']}, phrasings training never saw), greedy, up to "
        f"{s['max_new_tokens']} new tokens:",
        "",
        "| model | parameters | layers | all three fields right | valid JSON | category | priority | product | "
        "loss on reference answers | training s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("teacher", "teacher"), ("student, plain SFT", "student_sft"), ("student, distilled", "student_distill")]
    if "student_distill_cached" in models:
        rows.append((f"student, distilled from the cached top-{s['teacher_top_k']}", "student_distill_cached"))
    for name, key in rows:
        row, sc = models[key], models[key]["scores"]
        lines.append(
            f"| {name} | {row['parameters'] / 1e6:.1f}M | {row['layers']} | **{sc['exact']:.1%}** | "
            f"{sc['valid_json']:.1%} | {sc['category']:.1%} | {sc['priority']:.1%} | {sc['product']:.1%} | "
            f"{f(row['loss'], '.4f')} | {f(training[key]['seconds_per_step'], '.1f')} |"
        )
    d = training["student_distill"]
    tickets = sft["scores"]["n"]
    apart = round(abs(sft["scores"]["exact"] - models["student_distill"]["scores"]["exact"]) * tickets)
    lines += [
        "",
        f"The two students' share of all three fields right differs by {apart} of {tickets} tickets.",
        "",
        f"During distillation the divergence per trained token went from {f(d['first_divergence'], '.4f')} to "
        f"{f(d['last_divergence'], '.4f')} and top-1 agreement with the teacher from {d['first_teacher_agreement']:.1%} "
        f"to {d['last_teacher_agreement']:.1%} (first and last step). A distillation step also runs the teacher's "
        "forward pass, hence its longer steps.",
        *cached_teacher_lines(training),
        "",
        f"Generation speed, the same {s['speed_prompts']} test prompts, batches of {s['speed_batch_size']}, up to "
        f"{s['max_new_tokens']} new tokens, greedy, the two models taking turns for {s['speed_rounds']} rounds "
        "(median tokens/s over rounds, every generated token counted):",
        "",
        "| model | tokens/s | vs teacher |",
        "|---|---|---|",
        f"| teacher | {f(speed['teacher']['tokens_per_s'])} | 1.00x |",
        f"| student (distilled) | {f(speed['student']['tokens_per_s'])} | {f(speed['student_vs_teacher'], '.2f')}x |",
    ]
    return lines


def student_cut(setup: dict) -> str:
    """The `distill init` options the benchmark's student was cut with."""
    if "most_influential" in setup:
        return f"--most-influential {setup['most_influential']} --data train.jsonl"
    return f"--every {setup['keep_every']}"


def compared_tokens(setup: dict) -> str:
    """Where the recipe compares the student with the teacher (distill.positions)."""
    if setup["recipe"]["distill"].get("positions", "answers") == "all":
        return "at every token of the row"
    return "on the answers' tokens"


def distill_recipe_section(path: Path, r: dict) -> list[str]:
    m, t, summary, speed = r["machine"], r["teacher"], r["summary"], r["speed"]
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    lines = [
        f"## Distillation that pays? The `distill_triage` recipe over {len(r['setup']['seeds'])} seed(s)",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. Teacher: the quickstart's tuned "
        f"SmolLM2-135M ({t['parameters'] / 1e6:.1f}M parameters, {t['layers']} layers). Students: "
        f"`tuneforge distill init {student_cut(r['setup'])}` of it, trained in full by the recipe "
        f"(distilled: 0.5 x CE on the answers + 0.5 x T^2 x forward KL {compared_tokens(r['setup'])}, the teacher's "
        f"cached top-64) or by the same config as plain SFT (`method: full`){recipe_training(r['setup'], m)}"
        f"{teacher_answers_data(r['setup'])}. Machine: "
        f"{m['cpu']}, {m['cores']} cores (1-minute load average {f(m['load_average_before'])} before, "
        f"{f(m['load_average_after'])} after).",
        "",
        f"First {r['setup']['test_tickets']} held-out test tickets, greedy:",
        "",
        "| model | seed | all three fields right | category | priority | product | training s | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("teacher", "–", t["scores"], None)] + [
        (
            "student, distilled" if run["method"] == "distill" else "student, plain SFT",
            run["seed"],
            run["scores"]["scores"],
            run["training"],
        )
        for run in r["runs"].values()
    ]
    for name, seed, sc, tr in rows:
        fields = sc["fields"]
        seconds = (f(tr["seconds"], ".0f"), f(tr["seconds_per_step"], ".2f")) if tr else ("–", "–")
        lines.append(
            f"| {name} | {seed} | **{pct(sc['exact'])}** | {pct(fields['category'])} | {pct(fields['priority'])} | "
            f"{pct(fields['product'])} | {seconds[0]} | {seconds[1]} |"
        )
    lines += [
        "",
        f"Mean exact: distilled {pct(summary['distill_exact_mean'])}, plain SFT {pct(summary['sft_exact_mean'])}, "
        f"teacher {pct(summary['teacher_exact'])}: the distilled student keeps {pct(summary['share_of_teacher'])} of "
        f"the teacher's score (target 85%) and is {summary['points_over_sft'] * 100:+.1f} points over SFT "
        f"(target +10). It generates {f(speed['student_vs_teacher'], '.2f')}x the teacher's tokens/s "
        f"({f(speed['student']['tokens_per_s'])} against {f(speed['teacher']['tokens_per_s'])}; target 2x).",
    ]
    lines += notes(r)
    return lines


def distill_families_section(path: Path, r: dict) -> list[str]:
    m, t, summary, speed, answers = r["machine"], r["teacher"], r["summary"], r["speed"], r["teacher_answers"]
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    first = next(iter(r["runs"].values()))["scores"]
    lines = [
        f"## Distillation across families: Gemma 3 270M teaches SmolLM2-135M (`{r['setup']['recipe']}`, "
        f"{len(r['setup']['seeds'])} seed(s))",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. Teacher: `tuneforge quickstart --model "
        f"gemma3-270m`'s tuned model ({t['parameters'] / 1e6:.1f}M parameters, {t['layers']} layers, a 262k-token "
        f"vocabulary). Student: SmolLM2-135M-Instruct ({first['parameters'] / 1e6:.1f}M, {first['layers']} layers, "
        "49k tokens) with the quickstart's LoRA settings, trained on the teacher's answers to the quickstart's 1,000 "
        f"unlabelled tickets alone (`distill generate`, {answers['seconds'] / 60:.1f} min; no label reaches the "
        f"student): sequence-level distillation, the vocabularies being different. Of those answers "
        f"{pct(answers['scores']['exact'])} have all three fields right (scored against the generator's labels, "
        f"which the recipe never reads). Machine: {m['cpu']}, {m['cores']} cores (1-minute load average "
        f"{f(m['load_average_before'])} before, {f(m['load_average_after'])} after).",
        "",
        f"First {r['setup']['test_tickets']} held-out test tickets, greedy:",
        "",
        "| model | seed | all three fields right | valid JSON | category | priority | product | training s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("teacher (Gemma 3 270M)", "–", t["scores"], None)] + [
        ("student (SmolLM2-135M)", run["seed"], run["scores"]["scores"], run["training"]) for run in r["runs"].values()
    ]
    for name, seed, sc, tr in rows:
        fields = sc["fields"]
        lines.append(
            f"| {name} | {seed} | **{pct(sc['exact'])}** | {pct(sc['valid_json'])} | {pct(fields['category'])} | "
            f"{pct(fields['priority'])} | {pct(fields['product'])} | {f(tr['seconds'], '.0f') if tr else '–'} |"
        )
    lines += [
        "",
        f"Mean exact: student {pct(summary['student_exact_mean'])}, teacher {pct(summary['teacher_exact'])} "
        f"({pct(summary['share_of_teacher'])} of it). The student generates {f(speed['student_vs_teacher'], '.2f')}x "
        f"the teacher's tokens/s ({f(speed['student']['tokens_per_s'])} against "
        f"{f(speed['teacher']['tokens_per_s'])}).",
    ]
    return lines


def teacher_answers_data(setup: dict) -> str:
    """What both students train on besides the training tickets, where the run recorded it."""
    seconds = setup.get("teacher_answers_seconds")
    if seconds is None:
        return "; data: the 2,000 training tickets"
    return (
        "; data: the 2,000 training tickets and the teacher's answers to the quickstart's 1,000 unlabelled tickets "
        f"(`distill generate`, {seconds / 60:.1f} min), the same rows for both students"
    )


def recipe_training(setup: dict, machine: dict) -> str:
    """How the recipe trains both students, where the run recorded it."""
    recipe = setup.get("recipe")
    if recipe is None:
        return ""
    precision = recipe["precision"]
    if precision == "auto":
        precision = f"auto: {'bf16 autocast' if machine['native_bf16'] else 'fp32'} on this CPU"
    return (
        f", {recipe['max_steps']} steps of {recipe['batch_size']} packed rows, lr {recipe['learning_rate']:g} "
        f"{recipe['scheduler']}, precision {precision}"
    )


def cached_teacher_lines(training: dict) -> list[str]:
    """What the cached teacher (`distill.teacher_top_k`) saves, where the run measured it."""
    cached = training.get("student_distill_cached")
    if cached is None:
        return []
    online = training["student_distill"]
    return [
        "",
        f"With the teacher's top-k logits computed once ({f(cached.get('teacher_pass_seconds'), '.1f')} s for one "
        f"pass over the rows, before the first step), a distillation step took {f(cached['seconds_per_step'], '.2f')} s "
        f"against {f(online['seconds_per_step'], '.2f')} s with the teacher's forward pass at every step "
        f"({f(online['seconds_per_step'] / cached['seconds_per_step'], '.2f')}x).",
    ]


def dpo_section(path: Path, r: dict) -> list[str]:
    s, m, t, pairs = r["setup"], r["machine"], r["training"], r["heldout_pairs"]
    before, after = r["generation"]["before"]["scores"], r["generation"]["after"]["scores"]
    styles = ", ".join(f"{name} {n}" for name, n in sorted(r["rejected_styles"]["train"].items()))
    lines = [
        f"## Preference tuning (DPO): the demo task's answer format, SmolLM2 + LoRA ({m['torch_threads']} torch thread)",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. SmolLM2-135M-Instruct, `method: dpo` with LoRA "
        f"(r {s['lora_r']}, upper {1 - s['lora_from_layer']:.0%} of the layers), beta {s['beta']}, sigmoid loss, "
        f"{t['steps']} steps of {s['batch_size']} pairs, lr {s['learning_rate']}, seed {s['seed']}; the reference is "
        f"the model with its adapter disabled. {s['train_pairs']} training pairs from the demo task's training "
        "tickets: chosen = the reference JSON answer, rejected = the same labels in another form "
        f"({styles}). Held-out: {pairs['pairs']} pairs made the same way from the test split (phrasings training "
        f"never saw). Training took {f(t['seconds'] / 60)} min ({f(t['seconds_per_step'])} s/step) on {m['cpu']}, "
        f"{m['cores']} cores shared with other work (1-minute load average {f(m['load_average_before'])} before, "
        f"{f(m['load_average_after'])} after).",
        "",
        "| held-out pairs | before (reference) | after (policy) |",
        "|---|---|---|",
        f"| reward accuracy: chosen's log-ratio to the reference above rejected's | – (every margin is 0) | "
        f"**{pairs['reward_accuracy_after']:.1%}** |",
        f"| log p(chosen) > log p(rejected) | {pairs['logp_chosen_gt_rejected_before']:.1%} | "
        f"**{pairs['logp_chosen_gt_rejected_after']:.1%}** |",
        f"| log p(chosen) > log p(rejected), per reply token | {pairs['logp_per_token_chosen_gt_rejected_before']:.1%} | "
        f"**{pairs['logp_per_token_chosen_gt_rejected_after']:.1%}** |",
        f"| mean log p(chosen) | {pairs['mean_logp_chosen']['before']:.1f} | {pairs['mean_logp_chosen']['after']:.1f} |",
        f"| mean log p(rejected) | {pairs['mean_logp_rejected']['before']:.1f} | {pairs['mean_logp_rejected']['after']:.1f} |",
        "",
        f"Generating greedily on the first {s['generation_tickets']} held-out tickets (up to {s['max_new_tokens']} new "
        "tokens):",
        "",
        "| model | valid JSON (the whole answer) | JSON somewhere in it | valid labels | all three fields right |",
        "|---|---|---|---|---|",
    ]
    for name, sc in (("before (SmolLM2-135M-Instruct)", before), ("after DPO", after)):
        lines.append(
            f"| {name} | **{sc['valid_json']:.1%}** | {sc['contains_json']:.1%} | {sc['valid_labels']:.1%} | "
            f"{sc['exact']:.1%} |"
        )
    first, last = t["first"], t["last"]
    lines += [
        "",
        f"Training, mean of the first and last {t['window_steps']} steps: loss {first['train_loss']:.3f} -> "
        f"{last['train_loss']:.3f}, rewards/margins {first['rewards/margins']:.3f} -> {last['rewards/margins']:.3f}, "
        f"rewards/accuracies {first['rewards/accuracies']:.1%} -> {last['rewards/accuracies']:.1%}. Chosen and "
        "rejected carry the same labels, so the pairs contrast the form only.",
        "",
        f"First held-out answer before: `{r['generation']['before']['samples'][0]['prediction'][:120]!r}`; after: "
        f"`{r['generation']['after']['samples'][0]['prediction'][:120]!r}`.",
    ]
    return lines


def grpo_section(path: Path, r: dict) -> list[str]:
    m, sft, seeds, o = r["machine"], r["sft_test"], r["seeds"], r["settings"]
    kept = r.get("sft_general_questions_kept")
    sft_minutes = r["sft_train_seconds"] / 60 if "sft_train_seconds" in r else None
    skipping = "trained on the groups whose answers scored differently, " if o.get("skip_uniform_groups") else ""
    lines = [
        "## Reinforcement fine-tuning (GRPO) on the quickstart's SFT model: the demo task",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. The recipe `{r['recipe']}`: the quickstart's "
        "LoRA run merged in and used as the reference, a fresh LoRA on its upper half, "
        f"{o['max_steps']} steps of {o['batch_size']} training tickets x {o['group_size']} answers sampled at "
        f"temperature {o['temperature']:g}, {skipping}the json_fields grader (category, priority, product), "
        f"loss {o['loss']}, beta {o['beta']:g}, lr {o['learning_rate']:g}. Scored greedily on the first "
        f"{r['tickets']} test tickets (`support_triage`). {m['cpu']}, {m['cores']} cores (native bf16: "
        f"{'yes' if m['native_bf16'] else 'no'}); 1-minute load average {f(m['load_average_before'])} before, "
        f"{f(m['load_average_after'])} after. Training times come from each run's own summary"
        + (
            f"; the quickstart's SFT run took {f(sft_minutes)} min, the budget a GRPO run is held to."
            if sft_minutes
            else "."
        ),
        "",
        "| model | exact | category | priority | product | valid JSON | general questions kept | training |",
        "|---|---|---|---|---|---|---|---|",
        f"| SFT (the quickstart's run) | {sft['exact']:.1%} | {sft['category']:.1%} | {sft['priority']:.1%} | "
        f"{sft['product']:.1%} | {sft['valid_json']:.1%} | {f'{kept:.1%}' if kept is not None else '–'} | "
        f"{f'{sft_minutes:.1f} min' if sft_minutes else ''} |",
    ]
    for s in seeds:
        t = s["test"]
        lines.append(
            f"| GRPO, seed {s['seed']} | **{t['exact']:.1%}** | {t['category']:.1%} | {t['priority']:.1%} | "
            f"{t['product']:.1%} | {t['valid_json']:.1%} | {s['general_questions_kept']:.1%} | "
            f"{f(s['train_seconds'] / 60)} min |"
        )
    exact = [s["test"]["exact"] for s in seeds]
    gains = [round((e - sft["exact"]) * r["tickets"]) for e in exact]
    lines += [
        "",
        f"Exact match over {len(seeds)} seed(s): {min(exact):.1%} to {max(exact):.1%} (mean "
        f"{sum(exact) / len(exact):.1%}), against the SFT model's {sft['exact']:.1%}: "
        + ", ".join(f"{g:+d}" for g in gains)
        + f" of {r['tickets']} tickets. Final mean reward of the sampled answers: "
        + ", ".join(f"{s['final_reward']:.3f}" for s in seeds)
        + ".",
    ]
    lines += notes(r)
    return lines


def fsdp_section(path: Path, r: dict) -> list[str]:
    m, s = r["machine"], r["setup"]
    lines = [
        "## Full fine-tuning on several processes: FSDP2 vs DDP vs one process",
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`. SmolLM2-135M-Instruct, `method: full`, "
        f"{s['steps']} steps of {s['batch_size']} packed rows of up to {s['max_length']} tokens (one process "
        f"accumulates two micro-batches, two processes take one each), precision `{s['precision']}`. Machine: "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; 1-minute load average {f(m['load_average_before'])} "
        f"before and {f(m['load_average_after'])} after, on a shared machine: the processes of a run share its "
        "cores, and the figures are noisy. Peak RSS is that of the run's largest process (the kernel's figure for "
        f"the launcher's process tree); tokens per second are all processes' together, over the steps after the "
        f"first {s['skip']}.",
        "",
        "| run | peak RSS, largest process (MiB) | tokens/s | s/step | last loss |",
        "|---|---|---|---|---|",
    ]
    for name, c in r["candidates"].items():
        lines.append(
            f"| {name} | {f(c['peak_rss_mib'], '.0f')} | {f(c['tokens_per_s'])} | {f(c['seconds_per_step'], '.2f')} "
            f"| {f(c['losses'][-1], '.4f')} |"
        )
    return lines


def memory_section(path: Path, r: dict) -> list[str]:
    m = r["machine"]
    gib = lambda b: f(b / 2**30, ".2f") if b is not None else "–"  # noqa: E731
    on_gpu = r.get("device") == "cuda"
    # On a GPU the memory compared is the GPU's; the host's anonymous memory otherwise.
    peak_key, load_key = ("peak_device", "load_peak_device") if on_gpu else ("peak_anonymous", "load_peak_anonymous")
    machine = (
        f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']}) on {m['cpu']}, {m['cores']} cores"
        if on_gpu
        else f"{m['cpu']}, {m['cores']} cores, torch ISA {m['isa']}, native bf16 "
        f"**{'yes' if m['native_bf16'] else 'no'}**, {m['memory_gib']} GiB"
    )
    memory = (
        "- **Memory**: the GPU's, the most torch held allocated on it (`torch.cuda.max_memory_allocated`), "
        "after the load and over the whole run; the peak RSS is the host process's."
        if on_gpu
        else "- **Memory**: the peak of the process's anonymous memory (sampled every 20 ms; what it allocated), "
        "while loading and over the whole run, and its RSS high-water mark (which also counts checkpoint pages "
        "mapped from disk, page cache the kernel takes back under pressure). A bf16 base read from bf16 shards "
        "stays mapped from its files, so its weights count in the RSS, not in the allocated peak; fp32 weights "
        "(converted on load) and nf4 ones (quantized on load) are allocated. The 8B shape in fp32 is not run: its "
        "weights alone (32 GB) pass this machine's memory."
    )
    lines = [
        "## Big models on small memory: LoRA on fp32, bf16 and nf4 bases (tuneforge vs HF Trainer + PEFT)"
        + (", on a GPU" if on_gpu else ""),
        "",
        f"From `{rel(path)}` ({r['date']}), made by `{r['command']}`.",
        "",
        f"- **Machine**: {machine}.",
        f"- **Setup**: LoRA r 16, alpha 32 on every linear layer of the decoder, rows of {r['row_tokens']} tokens, "
        f"one row a step, gradient checkpointing, {r['steps']} steps; speed over the steps after the first. "
        "tuneforge: `model.dtype`/`model.quantize` as the mode says (nf4 with double quantization), precision "
        "auto. HF: `from_pretrained` in the mode's dtype (nf4: `BitsAndBytesConfig` and PEFT's "
        "`prepare_model_for_kbit_training`), `get_peft_model`, `Trainer` (bf16 autocast unless fp32).",
        memory,
        "- **Allocator**: glibc's malloc unless the mode says `on jemalloc` (both candidates then run with "
        "jemalloc preloaded, `--allocator jemalloc`); each is compared with HF on the same allocator.",
        "",
        "| model | mode | candidate | peak memory (GiB) | load peak (GiB) | peak RSS (GiB) | tokens/s | memory vs HF "
        "| speed vs HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs = r["runs"]
    allocated = lambda x: (x["shape"], x["mode"], x.get("allocator", "glibc"))  # noqa: E731
    hf = {allocated(x): x for x in runs if x.get("candidate") == "hf_peft" and "failed" not in x}
    for x in runs:
        if x.get("skipped"):
            lines.append(f"| {x['shape']} | {x['mode']} | not run | – | – | – | – | – | – |")
            continue
        if "failed" in x:
            lines.append(f"| {x['shape']} | {x['mode']} | {x['candidate']} | failed: {x['failed'][:160]} | | | | | |")
            continue
        rerun = " †" if "rerun" in x else ""
        base = hf.get(allocated(x))
        mem = f(x[peak_key] / base[peak_key], ".2f") + "x" if base else "–"
        speed = f(x["tokens_per_s"] / base["tokens_per_s"], ".2f") + "x" if base else "–"
        peak = gib(x[peak_key])
        if "repeats" in x:  # the median, and the range over the runs
            peaks = [run[peak_key] for run in x["repeats"]]
            peak += f" ({gib(min(peaks))}–{gib(max(peaks))})"
        mode = x["mode"] + (f" on {x['allocator']}" if x.get("allocator", "glibc") != "glibc" else "")
        lines.append(
            f"| {x['shape']}{rerun} | {mode} | {x['candidate']} | {peak} | "
            f"{gib(x[load_key])} | {gib(x['peak_rss'])} | {f(x['tokens_per_s'], '.1f')} | {mem} | {speed} |"
        )
    reruns = {json.dumps(x["rerun"], sort_keys=True): x["rerun"] for x in runs if "rerun" in x}
    for again in reruns.values():
        lines += ["", f"† From `{again['command']}` ({again['date']}, {again['steps']} steps): {again['why']}."]
    if any("repeats" in x for x in runs):
        lines += [
            "",
            "Where a row ran more than once (the candidates taking turns), its figures are the medians, and the "
            "peak's range over the runs follows in brackets.",
        ]
    return lines


# The scripts `make bench` runs (the Makefile's bench target).
MAKE_BENCH = ("data_prep.py", "serve.py", "run.py")


def main() -> None:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py` from the raw JSON in `bench/results/`; do not edit by hand. "
        f"`make bench` measures again what {', '.join(f'`bench/{s}`' for s in MAKE_BENCH)} measure, in that order; "
        "every other section names the command that made it, and `bench/README.md` says what each script does.",
        "",
    ]
    sections = (
        ("train_throughput_1thread", throughput_section),
        ("train_throughput", throughput_section),
        ("train_throughput_bf16", throughput_section),
        ("profile", profile_section),
        ("profile_fast", profile_section),
        ("profile_2threads", profile_section),
        ("data_prep", data_prep_section),
        ("serve", serve_section),
        ("decode_step", decode_step_section),
        ("prefix_cache", prefix_cache_section),
        ("distill", distill_section),
        ("distill_recipe", distill_recipe_section),
        ("distill_families", distill_families_section),
        ("dpo", dpo_section),
        ("grpo", grpo_section),
        ("fsdp", fsdp_section),
        ("memory", memory_section),
        ("memory_cuda", memory_section),
    )
    every = []
    for kind, render in sections:
        runs = load(kind)
        every += runs
        if runs:
            lines += render(*runs[-1]) + [""]
    if every:
        lines += ["## All runs", ""]
        for path, r in sorted(every, key=lambda x: x[0].name):
            lines.append(f"- `{rel(path)}` ({r.get('date', '?')})")
        lines.append("")
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    # It takes no arguments: the parser answers --help and refuses anything else, before the file is rewritten.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
