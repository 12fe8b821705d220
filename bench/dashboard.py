"""How fast the dashboard's pages answer with 100 runs: `tuneforge ui` over 100 run folders and
`tuneforge api` with 100 jobs of one key, each run 500 logged steps long with checkpoints and a data
report. Times are server-side (FastAPI's test client, no network), median of `--repeat` requests;
the first run page is timed apart, since it draws its charts (later ones come from the chart cache).

    python bench/dashboard.py [--runs 100] [--steps 500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from tuneforge.dashboard.app import create_ui_app
from tuneforge.jobs.api import create_api
from tuneforge.jobs.store import Job, Store, now
from tuneforge.web import KEY_COOKIE, owner_of

KEY = "bench-key"


def fill_run(folder: Path, steps: int, seed: int) -> None:
    """A finished LoRA run's folder: a loss that falls with noise, validation every 50 steps, 3 checkpoints."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"base_model": "smollm2-135m-instruct", "method": "lora", "train": {"learning_rate": 2e-4}})
    )
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "train_loss": 2.0 / (1 + step / 100) + (seed * step % 7) / 100, "lr": 2e-4}
        record.update(elapsed=step * 0.4, tokens=step * 4096)
        if step % 50 == 0:
            record["valid_loss"] = record["train_loss"] + 0.05
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = json.loads(lines[-1]) | {"full_valid_loss": 1.0}
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "steps": steps, "metrics": final}))
    (folder / "data_report.json").write_text(
        json.dumps({"files": [], "counts": {"read": 1000, "valid": 1000, "rejected": 0}, "errors": [], "warnings": []})
    )
    for step in (steps - 100, steps - 50, steps):
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True)


def timed(client: TestClient, url: str, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
        size = len(response.content)
    return statistics.median(times), size


def measure(client: TestClient, first_run: str, compared: list[str], repeat: int) -> dict[str, tuple[float, int]]:
    results = {"run page, first (draws the charts)": timed(client, f"/ui/runs/{first_run}", 1)}
    results["runs list"] = timed(client, "/ui/", repeat)
    results["run page"] = timed(client, f"/ui/runs/{first_run}", repeat)
    results["live part of a run page (polled)"] = timed(client, f"/ui/live/{first_run}", repeat)
    query = "&".join(f"run={run_id}" for run_id in compared)
    results[f"comparison of {len(compared)} runs"] = timed(client, f"/ui/compare?{query}", repeat)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: the pages are timed on at least one run")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        names = [f"run-{i:03d}" for i in range(args.runs)]
        for i, name in enumerate(names):
            fill_run(root / "runs" / name, args.steps, i)
        with TestClient(create_ui_app(root / "runs")) as client:
            folders = measure(client, names[0], names[:4], args.repeat)

        jobs_root = root / "jobs"
        store = Store(f"sqlite:///{root / 'jobs.db'}")
        job_ids = [f"ftjob-bench{i:05d}" for i in range(args.runs)]
        for i, job_id in enumerate(job_ids):
            fill_run(jobs_root / "runs" / job_id, args.steps, i)
            store.add(
                Job(
                    id=job_id,
                    owner=owner_of(KEY),
                    model="smollm2-135m-instruct",
                    training_file="file-bench",
                    seed=i,
                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
                    status="succeeded",
                    created_at=now() - 3600,
                    finished_at=now(),
                    result_files=[],
                    fine_tuned_model=f"ft:smollm2-135m-instruct:tuneforge::{i:08d}",
                    step=args.steps,
                    total_steps=args.steps,
                )
            )
        app = create_api(jobs_root, store, api_keys=[KEY], workers=0)
        with TestClient(app) as client:
            client.cookies.set(KEY_COOKIE, KEY)
            jobs = measure(client, job_ids[0], job_ids[:4], args.repeat)

    print(f"{args.runs} runs of {args.steps} logged steps; median of {args.repeat} requests, server side")
    print(f"{'page':42} {'tuneforge ui':>14} {'tuneforge api':>14} {'size':>10}")
    for page in folders:
        print(f"{page:42} {folders[page][0] * 1000:11.0f} ms {jobs[page][0] * 1000:11.0f} ms {jobs[page][1]:8,} B")


if __name__ == "__main__":
    main()
