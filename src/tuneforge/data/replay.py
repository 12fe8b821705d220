"""General replay data for `data.general_mix`: what is mixed into training against forgetting.

`data.general_replay` chooses the conversations and `train.replay_loss` how they are learned. On
the quickstart (SmolLM2, LoRA, `general_mix: 0.2`, see the issue notes), learned as text
(`replay_loss: ce`, 100 steps, measured 2026-11-28):

- `chitchat` (the default): the bundled human chit-chat conversations (MIT). Nothing to generate.
  General-text cross-entropy fell 3.0%, but the model also took on their style ("Hmm, that's a
  good question.") and kept 71% of its general-question accuracy.
- `self`: the base model's own greedy replies to the bundled replay prompts
  (`tasks/general/replay_prompts.jsonl`, disjoint from every forgetting measure), a
  self-distillation that teaches nothing new. It kept 83-89% of the general-question accuracy,
  but general-text cross-entropy rose 9-10% (greedy replies are sharper than human text), and
  generating the replies took about 3 minutes of the first run on 2 CPU cores.

Learned as the base model's distribution (`replay_loss: kl_to_base`, 2026-11-29) the replay's text
is only context, so neither its style nor its sharpness is taught: chitchat kept 93.9% of the
questions and self 91.3% (both at 140 steps), general-text cross-entropy moved by -0.16% and -0.10%.
Under KL a reply cut at the length limit teaches no early stop, so cut replies are kept, and the
limit (`data.general_replay_tokens`) can be short: self replies of 32 tokens take about 40 s to
generate, and are far shorter than chit-chat: the quickstart's 2,498 examples fill 292 rows instead
of 431, so a step sees more tickets. At 140 steps it scored 64% exact with 93.0% of the questions
kept (chit-chat, 120 steps: 53% and 93.9%). The quickstart uses self replies of 32 tokens with KL.

Self replies are generated once per base model (batched greedy decoding, a progress bar) and
cached under `tuneforge_home()/replay-cache/` (written atomically), keyed by the weights, the
tokenizer, the prompts and the generation length: a second run, and every rank after the first,
reads the file. When the replay trains as text, a reply cut at the length limit is left out:
trained with its end-of-turn token it would teach the model to stop mid-sentence.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from ..config import Config
from ..fsio import atomic_file, tuneforge_home
from ..tasks.general import general_conversations, replay_prompts
from .cache import tokenizer_fingerprint

REPLAY_FORMAT = 2


def cache_path(source, tokenizer, max_new_tokens: int) -> Path:
    """Where the self replies (up to `max_new_tokens`) of the model at `source` (a `models.ModelSource`) are cached."""
    h = hashlib.sha256(json.dumps({"format": REPLAY_FORMAT, "max_new_tokens": max_new_tokens,
                                   "prompts": replay_prompts()}).encode())
    for folder in (source.path, source.adapter):
        if folder is None:
            continue
        for weights in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")):
            stat = weights.stat()
            h.update(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return tuneforge_home() / "replay-cache" / f"{h.hexdigest()[:32]}.jsonl"


def generate_self_replies(base_model: str, tokenizer, path: Path, max_new_tokens: int, *, progress: bool = True) -> None:
    """The base model's greedy reply to every replay prompt, one row each, written atomically to `path`."""
    import torch

    from ..generate import generate
    from ..methods.distill import load_teacher
    from ..progress import progress_bar

    prompts = replay_prompts()
    model = load_teacher(base_model, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    with progress_bar("general replay replies", len(prompts), progress) as advance:
        replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                           max_new_tokens=max_new_tokens, on_progress=advance)
    with atomic_file(path) as f:
        for prompt, reply in zip(prompts, replies):
            f.write(json.dumps({"prompt": prompt, "reply": reply.text, "finished": reply.finish_reason == "stop"},
                               ensure_ascii=False) + "\n")


def replay_conversations(cfg: Config, tokenizer, *, generate: bool = True,
                         log: Callable[[str], object] = print) -> list[list[dict]] | None:
    """The conversations `prepare` mixes into a run of `cfg`; None when there is no mix, or (with
    `generate=False`) when the self replies are not generated yet. Self replies cut at the length
    limit are kept when the replay is learned as the base's distribution, where no end of turn is taught."""
    data = cfg.data
    if not data.general_mix:
        return None
    if data.general_replay == "chitchat":
        return general_conversations()
    from ..models import resolve

    limit = data.general_replay_tokens
    path = cache_path(resolve(cfg.base_model), tokenizer, limit)
    if not path.is_file():
        if not generate:
            return None
        log(f"data: general replay: the base model answers {len(replay_prompts())} general prompts "
            f"(once per model; cached in {path})")
        generate_self_replies(cfg.base_model, tokenizer, path, limit)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    keep_cut = cfg.train.replay_loss == "kl_to_base"
    kept = [row for row in rows if (row["finished"] or keep_cut) and row["reply"].strip()]
    left_out = "empty" if keep_cut else f"cut at {limit} tokens or empty"
    log(f"data: general replay: {len(kept)} of the base model's {len(rows)} replies"
        + (f" (the others were {left_out})" if len(kept) < len(rows) else ""))
    return [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["reply"]}] for row in kept]
