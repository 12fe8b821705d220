"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases and MLflow get each
metrics.jsonl record at its step, and the run's config as its hyperparameters; the sample answers of
each validation (`samples.py`) go to TensorBoard as text, to W&B as a table, to MLflow as a text artifact.

Rank 0 reports alone (`MetricsLog` is enabled there only). A tracker's run is named after the run
folder and its id is kept in the folder (`trackers.json`), so a resumed run continues the same
tracker run, from its checkpoint's step on: TensorBoard drops its events past the checkpoint, and W&B and
MLflow, which keep every value they are sent, are not sent again what they got before (the values an exact
resume repeats), so no step shows twice: `trackers.json` keeps, per tracker run, the last step it was sent
and that step's keys, as they are sent, whichever attempts (resumed from whichever checkpoint, with or
without that tracker) wrote them. A tracker that is not installed
is refused before any data or model loads (`check_installed`); one that fails mid-run (a network down)
warns once and training goes on: metrics.jsonl holds every record either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
import warnings
from pathlib import Path

from ..config import Config, dotted
from ..errors import TuneforgeError
from ..fsio import write_json

IDS_FILE = "trackers.json"
# What to check when a tracker cannot start its run.
HINTS = {
    "tensorboard": "check that the run folder is writable",
    "wandb": "log in (`wandb login`, or WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in the run "
    "folder's wandb/ and `wandb sync` it later",
    "mlflow": "set train.mlflow.tracking_uri or MLFLOW_TRACKING_URI to your tracking server (http://HOST:5000; "
    "a file: folder needs MLFLOW_ALLOW_FILE_STORE=true with MLflow 3)",
}
# The module each tracker imports, and the tuneforge extra (pyproject.toml) that installs it.
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def chosen(cfg: Config) -> list[str]:
    """The trackers a run reports to: train.report_to, or where it is unset TensorBoard if it is installed."""
    if cfg.train.report_to is not None:
        return list(dict.fromkeys(cfg.train.report_to))
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def check_installed(cfg: Config) -> None:
    """Refuse a train.report_to tracker that is not installed, naming the install, and an MLflow tracking
    URI its client cannot use (it opens no connection: a server's address is taken as given)."""
    names = chosen(cfg)
    missing = [name for name in names if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        extras = ",".join(missing)
        raise TuneforgeError(
            f"{cfg.key_at('train.report_to')}: {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install with `pip install 'tuneforge[{extras}]'` "
            f"(from a clone: `pip install -e '.[{extras}]'`), or leave {' and '.join(missing)} out of train.report_to."
        )
    if "mlflow" in names:
        try:
            mlflow_client(cfg)
        except Exception as e:
            said = e
            if isinstance(e, ModuleNotFoundError) and mlflow_uri(cfg) is None:
                # MLflow 3's default store is a SQLite file, whose modules mlflow-skinny (tuneforge[mlflow]) leaves
                # out.
                from mlflow import get_tracking_uri

                said = RuntimeError(
                    f"no tracking URI is set, and MLflow's default, {get_tracking_uri()}, needs {e.name or e}, which "
                    "mlflow-skinny (tuneforge[mlflow]) leaves out: `pip install mlflow` to keep runs in that file"
                )
            raise cannot_start(cfg, "mlflow", said) from e


def cannot_start(cfg: Config, name: str, error: Exception) -> TuneforgeError:
    return TuneforgeError(
        f"{cfg.key_at('train.report_to')}: {name} could not start its run: {str(error).rstrip('. ')}; "
        f"{HINTS[name]}, or leave {name} out of train.report_to."
    )


def mlflow_uri(cfg: Config) -> str | None:
    """The tracking URI given (train.mlflow.tracking_uri, else MLFLOW_TRACKING_URI); None: MLflow's default."""
    return cfg.train.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def mlflow_client(cfg: Config):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri(cfg))


class Trackers:
    """The run's trackers, started with its run folder's ids (resumed) or new ones (saved there)."""

    def __init__(self, cfg: Config, resume_step: int | None):
        self.out = Path(cfg.output_dir)
        self.warned: set[str] = set()
        self.ids_path = ids_path = self.out / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        self.ids, self.changed = ids, False
        self.writers = {}
        for name in chosen(cfg):
            try:
                self.writers[name] = STARTS[name](cfg, self.out, resume_step, ids)
            except Exception as e:
                if cfg.train.report_to is None:  # TensorBoard by default, not asked for: the run goes on without it
                    warnings.warn(f"{cannot_start(cfg, name, e).message}; training goes on without it.", stacklevel=2)
                    continue
                self.close("failed")
                raise cannot_start(cfg, name, e) from e
            write_json(ids_path, ids)  # before any step, so a run killed at any point resumes the same tracker run

    def log(self, record: dict) -> None:
        self._send(record, self.writers)
        self._save_marks()

    def catch_up(self, records: list[dict], samples: list[dict] = ()) -> None:
        """Send each tracker run with a mark of what it got (W&B, MLflow) the records of a resumed run's steps up
        to its checkpoint (metrics.jsonl's, and samples.jsonl's sample answers) past that mark: those an attempt
        without it trained (left out of report_to, out of reach). TensorBoard keeps its events up to the
        checkpoint; a tracker run without a mark (new to this attempt, or marked by no earlier attempt) starts
        from the checkpoint."""
        marked = {name: writer for name, writer in self.writers.items() if "sent" in self.ids.get(name, {})}
        # In step order, as training sent them: a tracker marked past a step is sent nothing of it.
        sends = [(record["step"], 0, record) for record in records] + [(r["step"], 1, r) for r in samples]
        for _, is_samples, record in sorted(sends, key=lambda send: send[:2]):
            if is_samples:
                self._send_samples(record["step"], record["samples"], bool(record.get("full_valid")), marked)
            else:
                self._send(record, marked)
        self._save_marks()

    def _send(self, record: dict, writers: dict) -> None:
        step, scalars = record["step"], _scalars(record)
        for name, writer in writers.items():
            sent = {k: scalars[k] for k in self._unsent(name, step, list(scalars))}
            if sent and self._guarded(name, lambda w=writer, sent=sent: w.log(sent, step)):
                self._mark_sent(name, step, list(sent))

    def log_samples(self, step: int, samples: list[dict], final: bool = False) -> None:
        """`final`: the samples of the full validation after training."""
        self._send_samples(step, samples, final, self.writers)
        self._save_marks()

    def _send_samples(self, step: int, samples: list[dict], final: bool, writers: dict) -> None:
        key = "samples:full_valid" if final else "samples:valid"  # no metric's name: a key of the marks only
        for name, writer in writers.items():
            if self._unsent(name, step, [key]) and self._guarded(name, lambda w=writer: w.log_samples(samples, step)):
                self._mark_sent(name, step, [key])

    def _unsent(self, name: str, step: int, keys: list[str]) -> list[str]:
        """The keys at `step` that tracker `name`'s run has not got: all for one that keeps no mark (TensorBoard,
        which gets a resumed run's steps again; a new W&B or MLflow run), none before its last step sent."""
        mark = self.ids.get(name, {}).get("sent")
        if mark is None or step > mark["step"]:
            return keys
        return [] if step < mark["step"] else [k for k in keys if k not in mark["keys"]]

    def _mark_sent(self, name: str, step: int, keys: list[str]) -> None:
        if name in self.ids:  # a tracker run that keeps what it is sent (W&B, MLflow)
            mark = self.ids[name].get("sent")
            earlier = mark["keys"] if mark is not None and mark["step"] == step else []
            self.ids[name]["sent"] = {"step": step, "keys": earlier + keys}
            self.changed = True

    def _save_marks(self) -> None:
        # As the steps go, so that a run killed at any point resumes each tracker from what it got; not synced to
        # disk (two fsyncs a step), as metrics.jsonl's records, which the marks follow, are not.
        if self.changed:
            write_json(self.ids_path, self.ids, durable=False)
            self.changed = False

    def close(self, status: str) -> None:
        for name, writer in self.writers.items():
            self._guarded(name, lambda w=writer: w.close(status))
        self.writers = {}

    def _guarded(self, name: str, call) -> bool:
        """Whether `call` went through."""
        try:
            call()
            return True
        except Exception as e:  # a tracker's failure (its server unreachable) never stops training
            if name not in self.warned:
                self.warned.add(name)
                warnings.warn(
                    f"{name}: could not report the run's metrics ({type(e).__name__}: {e}); training goes on, and "
                    f"{self.out / 'metrics.jsonl'} has every record. Later failures of {name} are not reported.",
                    stacklevel=2,
                )
            return False


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoard:
    # A resumed run's events past its checkpoint are dropped: it gets those steps again (it keeps no mark in ids).

    def __init__(self, cfg: Config, out: Path, resume_step: int | None, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops the events past its checkpoint, as metrics.jsonl drops their lines; a fresh run
        # drops all earlier ones (those of a run killed before its first checkpoint, in this folder still).
        purge = 0 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + cfg.to_yaml() + "```")

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # live in TensorBoard, and nothing left for exit (cli.leave skips finalizing)

    def log_samples(self, samples: list[dict], step: int) -> None:
        self.writer.add_text("samples", samples_markdown(samples), step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, cfg: Config, out: Path, resume_step: int | None, ids: dict):
        import wandb

        w = cfg.train.wandb
        env_tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
        # A W&B run that goes on from the run's checkpoint keeps its mark of what it got (`Trackers.log`).
        saved = ids.setdefault("wandb", {"id": uuid.uuid4().hex[:16]})  # a W&B run id: letters and digits
        try:
            self.run = wandb.init(
                project=w.project or os.environ.get("WANDB_PROJECT") or "tuneforge",
                entity=w.entity or os.environ.get("WANDB_ENTITY") or None,
                name=w.name or os.environ.get("WANDB_NAME") or out.resolve().name,
                tags=w.tags if w.tags is not None else env_tags or None,
                config=cfg.model_dump(mode="json"),
                id=saved["id"],
                resume="allow",
                dir=str(out),
                reinit="create_new",
            )
        except wandb.errors.UsageError as e:
            # W&B's refusal of a run without a login ends in its own `wandb login` advice, which HINTS gives
            # with the other ways out: it is said once.
            if "wandb login" not in str(e):
                raise
            raise RuntimeError("W&B has no API key (not logged in)") from e
        # The run's step is metrics.jsonl's: W&B's own step only grows.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log({"step": step, **scalars})

    def log_samples(self, samples: list[dict], step: int) -> None:
        import wandb

        table = wandb.Table(
            columns=["step", *SAMPLE_COLUMNS], data=[[step, *(s[c] for c in SAMPLE_COLUMNS)] for s in samples]
        )
        self.run.log({"step": step, "samples": table})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class Mlflow:
    def __init__(self, cfg: Config, out: Path, resume_step: int | None, ids: dict):
        from mlflow.entities import Param

        m = cfg.train.mlflow
        self.client = mlflow_client(cfg)
        saved = ids.get("mlflow", {})
        # An MLflow run that goes on from the run's checkpoint keeps its mark of what it got (`Trackers.log`); a
        # new one (another tracking URI) starts without.
        if saved.get("tracking_uri") == self.client.tracking_uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tuneforge"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
            ids["mlflow"] = {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}
        # MLflow keeps a parameter's first value: a forced resume with a changed config adds only new keys.
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:6000]) for k, v in dotted(cfg.model_dump(mode="json")).items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow takes up to 100 parameters a call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, scalars: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_samples(self, samples: list[dict], step: int) -> None:
        self.client.log_text(self.run_id, json.dumps(samples, indent=1), f"samples/step-{step:06d}.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "KILLED")


SAMPLE_COLUMNS = ("example", "prompt", "answer", "reference", "stopped", "tokens")


def samples_markdown(samples: list[dict]) -> str:
    """The samples as Markdown (TensorBoard's text): each one's prompt, answer and reference."""
    parts = []
    for i, s in enumerate(samples, 1):
        stopped = "" if s["stopped"] else f" **did not stop** ({s['tokens']} tokens, no end of turn)"
        parts.append(
            f"**{i}.** validation example {s['example']}{stopped}\n\n"
            + "".join(
                f"{label}:\n\n```\n{s[key]}\n```\n\n"
                for label, key in (("prompt", "prompt"), ("answer", "answer"), ("reference", "reference"))
            )
        )
    return "\n".join(parts)


STARTS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
