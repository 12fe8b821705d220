#!/usr/bin/env bash
# The checks that need a GPU, as one prepared script for a lent device machine (an H100 or H200 with
# the 'cuda' image: Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, no pydantic, no bitsandbytes).
#
#   bash bench/gpu_check.sh fetch   # here: the wheels that image lacks, and a tokenizer, into .whl/ (git-ignored)
#   bash bench/gpu_check.sh run     # there (device `run`, carry [".whl"], timeout_s 600): writes to $OUT
#   bash bench/gpu_check.sh profile # there: one step of each candidate profiled (1B shape, bf16), into $OUT
#
# `run` installs the wheels into /tmp/site, runs the tiny-model tests of training and memory on the GPU
# (tests/test_memory.py, tests/test_train.py; the two-process test needs two GPUs and is left out), then
# `bench/memory.py --device cuda` on the Llama 3.2 1B and 3.1 8B shapes, bf16 and nf4 bases, tuneforge
# against HF Trainer + PEFT. Its JSON lands in $OUT beside the logs; copy it into bench/results/ here.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  transformers==5.25.0 huggingface-hub==2.4.0 hf-xet==1.8.0 kernels==0.19.1 peft==0.21.2 bitsandbytes==0.50.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  gguf==0.19.0 datasketch==2.0.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 click==8.5.1 tomlkit==0.15.3
  typing-extensions==4.16.0
)

fetch() {
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  local platforms=()
  for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  # bitsandbytes carries a library per CUDA and ROCm version (43 MB); the image's torch is built for CUDA 13.
  .venv/bin/python - <<'EOF' || exit 1
import re, zipfile
from pathlib import Path
wheel = next(Path(".whl").glob("bitsandbytes-*.whl"))
unused = re.compile(r"libbitsandbytes_(cuda1[0-2]\d|rocm\d+)\.so")
trimmed = wheel.with_suffix(".trim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
    for item in src.infolist():
        if unused.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith("RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not unused.search(line.decode()))
        out.writestr(item, data)
trimmed.replace(wheel)
EOF
  .venv/bin/python -c "
from tuneforge.models import pull
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(pull('smollm2-135m-instruct')).save_pretrained('.whl/tokenizer')" || exit 1
  du -sh .whl
}

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
}

run() {
  local out="${OUT:-/tmp/gpu_check}"
  mkdir -p "$out"
  install
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft, bitsandbytes as b
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"
  } 2>&1 | tee "$out/env.txt"
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_memory.py tests/test_train.py \
    -k "not two_processes" 2>&1 | tee "$out/pytest.txt"
  timeout 360 python3 bench/memory.py --device cuda --shapes llama-3.2-1b,llama-3.1-8b --modes bf16,nf4 \
    --steps 20 --tokenizer .whl/tokenizer 2>&1 | tee "$out/memory.txt"
  cp bench/results/memory_cuda-*.json "$out/" 2>/dev/null
}

# Where a tuneforge step's time goes that HF Trainer's does not: the operators of step 4 of 6, by GPU time.
profile() {
  local out="${OUT:-/tmp/gpu_check}"
  mkdir -p "$out"
  install
  timeout 500 python3 bench/memory.py --device cuda --shapes llama-3.2-1b --modes bf16 --steps 6 --profile 4 \
    --tokenizer .whl/tokenizer 2>&1 | tee "$out/profile.txt"
  cp bench/results/memory_cuda-*.json bench/results/profile_*cuda*.txt "$out/" 2>/dev/null
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  profile) profile ;;
  *) echo "usage: bash bench/gpu_check.sh fetch|run|profile" >&2; exit 2 ;;
esac
