"""What a person watching a run sees: a progress bar with loss, tokens/s and ETA; a final table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.progress import Progress
from rich.table import Table

from ..console import new_console, plain
from ..methods.dpo import DPOObjective
from ..progress import LogLines, bar_columns

# rewards/chosen, ..., a reward model's accuracy and margin, shown in the run's summary table (kto's kl among
# them, after grpo's)
REWARDS = DPOObjective.logged_sums + DPOObjective.orpo_sums + ("logps/chosen", "logps/rejected", "accuracy", "margin")


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, *, enabled: bool):
        self.enabled = enabled
        self.console = new_console(stderr=True)
        live = enabled and self.console.is_terminal
        self.lines = LogLines(self.console, "train step", total_steps, start_step) if enabled and not live else None
        self.progress = Progress(*bar_columns("{task.fields[shown]}"), console=self.console, disable=not live)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, shown="loss - · - tok/s")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    @contextlib.contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A bar of its own (or log lines) for long work between steps, such as a validation pass: under
        the training bar while it runs, gone after; yields `advance(n)`."""
        if not self.enabled:
            yield lambda n: None
        elif self.lines:
            yield LogLines(self.console, description, total).advance
        else:
            task = self.progress.add_task(description, total=total, shown="")
            try:
                yield lambda n: self.progress.advance(task, n)
            finally:
                self.progress.remove_task(task)

    def update(self, record: dict) -> None:
        loss = f"{record['train_loss']:.4f}"
        if "valid_loss" in record:
            loss += f" (valid {record['valid_loss']:.4f})"
        if "valid_reward" in record:
            loss += f" (valid reward {record['valid_reward']:.3f})"
        if "divergence" in record:
            loss += f" div {record['divergence']:.4f} agree {record['teacher_agreement']:.1%}"
        if "rewards/margins" in record:
            loss += f" margin {record['rewards/margins']:.3f} acc {record['rewards/accuracies']:.0%}"
        if "accuracy" in record:  # a reward model's pairs
            loss += f" margin {record['margin']:.3f} acc {record['accuracy']:.0%}"
        if "logps/chosen" in record or "logps/rejected" in record:  # kto: the rewards of each kind of reply
            for name in ("chosen", "rejected"):
                if f"rewards/{name}" in record:
                    loss += f" {name} {record[f'rewards/{name}']:.3f}"
            loss += f" kl {record['kl']:.4f}"
        if "nll_loss" in record:
            loss += f" nll {record['nll_loss']:.4f}"
        if "reward" in record:
            loss += (
                f" reward {record['reward']:.3f} (std {record['reward_std']:.3f}) kl {record['kl']:.4f} "
                f"len {record['completion_length']:.0f} (cut {record['clipped_share']:.0%}) "
                f"alike {record['zero_std_share']:.0%} trained {record['trained_share']:.0%}"
            )
        speed = f"{record['tokens_per_s']:.0f}"
        self.progress.update(self.task, completed=record["step"], shown=f"loss {loss} · {speed} tok/s")
        if self.lines:
            self.lines.update(record["step"], f" · loss {loss} · {speed} tok/s")

    def stopped_early(self, step: int) -> None:
        """The bar of a run that stops before its last step says so, instead of looking cut short."""
        self.progress.update(self.task, description=f"train: stopped early at step {step}")


def print_summary(metrics: dict, output_dir: Path) -> None:
    """The run's final metrics as a table on stderr."""
    if not metrics:
        return
    table = Table(title=f"run {plain(output_dir)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "step",
        "epoch",
        "train_loss",
        "train_mean_token_accuracy",
        "divergence",
        "teacher_agreement",
        *REWARDS,
        "reward",
        "reward_std",
        *sorted(key for key in metrics if key.startswith("reward/")),
        *sorted(key for key in metrics if key.startswith("reward_std/")),
        "zero_std_share",
        "kl",
        "completion_length",
        "clipped_share",
        "trained_share",
        "valid_loss",
        "full_valid_loss",
        "best_step",
        "best_valid_loss",
        "full_valid_reward",
        *sorted(key for key in metrics if key.startswith("full_valid_reward/")),
        "full_valid_completion_length",
        "full_valid_clipped_share",
        "full_valid_mean_token_accuracy",
        *(f"full_valid_{name}" for name in REWARDS),
        "tokens",
        "elapsed",
    ):
        if key in metrics:
            v = metrics[key]
            table.add_row(plain(key), f"{v:.4f}" if isinstance(v, float) else plain(v))
    new_console(stderr=True).print(table)
