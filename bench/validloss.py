"""The shared validation loss: every candidate's saved adapter, judged by one function.

    python bench/validloss.py MODEL_DIR VALID.jsonl OUT.json ADAPTER_DIR [ADAPTER_DIR ...]

Loads the base model in fp32, attaches each adapter in turn (PEFT), and computes the
token-weighted mean cross-entropy over the assistant tokens of the validation set with
`common.assistant_ce`. "base" (no adapter) is evaluated too, as the starting point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import assistant_ce, read_jsonl, tokenize_chat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="the base model's HF folder")
    parser.add_argument("valid", help="the validation set, OpenAI chat JSONL")
    parser.add_argument("out", help="where the JSON of losses is written")
    parser.add_argument("adapters", nargs="*", help="adapter folders, each judged on the base")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.environ.get("TF_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["TF_BENCH_THREADS"]))
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    examples = tokenize_chat(read_jsonl(args.valid), tok)
    results = {}
    for adapter in ["base", *args.adapters]:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        if adapter != "base":
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        results[adapter] = {**assistant_ce(model, examples, tok.pad_token_id), "seconds": time.perf_counter() - t}
        print(adapter, results[adapter], flush=True)
        del model
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
