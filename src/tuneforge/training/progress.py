"""What a person watching a run sees: a progress bar with loss, tokens/s and ETA; a final table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, *, enabled: bool):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", speed="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, record: dict) -> None:
        loss = f"{record['train_loss']:.4f}"
        if "valid_loss" in record:
            loss += f" (valid {record['valid_loss']:.4f})"
        self.progress.update(self.task, completed=record["step"], loss=loss, speed=f"{record['tokens_per_s']:.0f}")

    def summary(self, metrics: dict, output_dir: Path) -> None:
        if not self.enabled or not metrics:
            return
        table = Table(title=f"run {output_dir}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("step", "epoch", "train_loss", "train_mean_token_accuracy", "valid_loss",
                    "full_valid_loss", "full_valid_mean_token_accuracy", "tokens", "elapsed"):
            if key in metrics:
                v = metrics[key]
                table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
        self.console.print(table)
