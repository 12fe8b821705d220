"""Adapters loaded and unloaded while the server runs (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter),
on a real uvicorn server driven by httpx and the official `openai` client."""

import threading

import httpx
import openai
import pytest
from test_serve import BASE, KEY, QUESTION, alone, random_adapter, running_server
from tiny import save_tiny_model

from tuneforge.models import causal_lm, load_model, load_tokenizer
from tuneforge.serve import AdapterPool, Engine, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("updates")
    return {"alpha": random_adapter(base_dir, root / "alpha", 1), "beta": random_adapter(base_dir, root / "beta", 2)}


@pytest.fixture(scope="module")
def server(base_dir):
    engine = Engine(AdapterPool(str(base_dir)))
    with running_server(create_app(engine, api_keys=[KEY], adapter_updates=True)) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def gamma(server, adapters):
    """The server's URL, with alpha's adapter loaded as gamma."""
    assert load(server[0], "gamma", adapters["alpha"]).status_code == 200
    return server[0]


def load(server, name, path, **extra) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path), **extra}
    return httpx.post(f"{server}/v1/load_lora_adapter", headers=AUTH, json=body, timeout=60)


def unload(server, name) -> httpx.Response:
    return httpx.post(f"{server}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": name}, timeout=60)


def served(client) -> list[str]:
    return [model.id for model in client.models.list()]


def answer(client, name, max_tokens=10) -> str:
    reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def tuned(path):
    return load_model(str(path)).eval(), load_tokenizer(str(path))


def test_a_loaded_adapter_answers_as_served_from_the_start_until_unloaded(server, client, base, adapters):
    server = server[0]
    # The adapters other tests left on this module's server (gamma, delta) stay as they are.
    before, in_memory = served(client), httpx.get(f"{server}/health").json()["loaded_adapters"]
    assert "alpha" not in before
    loaded = load(server, "alpha", adapters["alpha"])
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'alpha' added successfully."
    assert served(client) == [*before, "alpha"]
    assert answer(client, "alpha") == alone(*tuned(adapters["alpha"]), QUESTION, 10).text
    assert unload(server, "alpha").text == "Success: LoRA adapter 'alpha' removed successfully."
    assert served(client) == before
    assert httpx.get(f"{server}/health").json()["loaded_adapters"] == in_memory
    with pytest.raises(openai.NotFoundError):
        answer(client, "alpha")
    # The base answers as the base with its only adapter gone; the name can take another adapter.
    assert answer(client, BASE) == alone(*base, QUESTION, 10).text
    assert load(server, "alpha", adapters["beta"]).status_code == 200
    assert answer(client, "alpha") == alone(*tuned(adapters["beta"]), QUESTION, 10).text
    assert unload(server, "alpha").status_code == 200
    metrics = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert 'tuneforge_adapter_updates_total{action="load",adapter="alpha",base="base"} 2.0' in metrics
    assert 'tuneforge_adapter_updates_total{action="unload",adapter="alpha",base="base"} 2.0' in metrics


def test_unloading_an_adapter_lets_its_running_stream_finish(server, client, adapters):
    url, engine = server
    assert load(url, "beta", adapters["beta"]).status_code == 200
    expected = alone(*tuned(adapters["beta"]), QUESTION, 40).text
    stream = client.chat.completions.create(
        model="beta", messages=QUESTION, max_tokens=40, temperature=0, stream=True, stream_options=None
    )
    pieces = [next(stream).choices[0].delta.content or ""]
    # The worker stops at its next forward pass until released: the stream is certainly running meanwhile.
    held, release = threading.Event(), threading.Event()

    def hold(*_):
        held.set()
        release.wait(60)

    hook = causal_lm(engine.pool.model).register_forward_pre_hook(hold)
    try:
        assert held.wait(60)
        unloaded = {}
        unloading = threading.Thread(target=lambda: unloaded.update(response=unload(url, "beta")))
        unloading.start()
        while "beta" in served(client):  # the name is refused from the moment the unload is asked
            pass
        with pytest.raises(openai.NotFoundError):
            answer(client, "beta")
        again = load(url, "beta", adapters["beta"])
        assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_unloading"
        assert load(url, "delta", adapters["alpha"]).status_code == 200  # other updates go on meanwhile
        assert unloading.is_alive()  # the unload answers once the stream is answered
    finally:
        hook.remove()
        release.set()
    pieces += [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    unloading.join(60)
    assert "".join(pieces) == expected
    assert unloaded["response"].status_code == 200
    assert "beta" not in served(client) and "beta" not in httpx.get(f"{url}/health").json()["loaded_adapters"]


@pytest.mark.parametrize(
    ("name", "path", "param", "code", "says"),
    [
        ("new", "missing", "lora_path", None, "missing"),
        ("new", "base_dir", "lora_path", "not_an_adapter", "holds a full model"),
        ("new", "other_base", "lora_path", "adapter_base_mismatch", "was trained on"),
        ("gamma", "alpha", "lora_name", "invalid_value", "already been loaded"),
        (BASE, "alpha", "lora_name", "invalid_value", "base model's name"),
        ("", "alpha", "lora_name", "invalid_value", "must not be empty"),
    ],
)
def test_a_bad_load_is_a_400_naming_the_field(
    client, gamma, adapters, base_dir, tmp_path, name, path, param, code, says
):
    server = gamma
    other_base = save_tiny_model(tmp_path / "other")
    paths = {"missing": tmp_path / "missing", "base_dir": base_dir, "alpha": adapters["alpha"]}
    if path == "other_base":
        paths[path] = random_adapter(other_base, tmp_path / "other-adapter", 3)
    refused = load(server, name, paths[path])
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == param and says in error["message"], error
    assert code is None or error["code"] == code
    # The client sent lora_path: a command-line option it never gave is no part of the answer.
    assert "--adapter" not in error["message"] and ": --model" not in error["message"], error
    assert "gamma" in served(client) and "new" not in served(client)


def test_a_load_downloads_nothing_and_lists_no_folder_of_the_server(gamma, adapters, tmp_path, monkeypatch):
    """lora_path is a folder on the server: a hub id, a registry model, or an adapter whose base is one (not here)
    is refused without a download, and a path that is not there without the listing of the folder above it."""
    import json
    import shutil

    import tuneforge.models.sources as sources

    def pull(name, *args, **kwargs):
        raise AssertionError(f"a client's load pulled {name}")

    monkeypatch.setattr(sources, "pull", pull)
    monkeypatch.setenv(
        "TUNEFORGE_HOME", str(tmp_path / "home")
    )  # no registry model pulled yet, whatever this machine has
    elsewhere = shutil.copytree(adapters["alpha"], tmp_path / "elsewhere")
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gemma3-270m"}))
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.pem").write_text("secret")
    monkeypatch.chdir(tmp_path)
    for path, says in [
        (elsewhere, "gemma3-270m has not been pulled yet"),
        ("gemma3-270m", "no such file or folder on this server"),
        ("private/missing", "no such file or folder on this server"),
    ]:
        refused = load(gamma, "new", path)
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["param"] == "lora_path" and says in error["message"], error
        assert "key.pem" not in error["message"]


def test_the_base_cannot_be_unloaded_and_an_unknown_name_is_not_found(server):
    server = server[0]
    refused = unload(server, BASE)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_name"
    assert "cannot be unloaded" in refused.json()["error"]["message"]
    missing = unload(server, "nobody")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_adapter_updates_are_refused_unless_the_server_allows_them(base_dir, adapters):
    engine = Engine(AdapterPool(str(base_dir)))
    try:
        with running_server(create_app(engine, api_keys=[KEY])) as url:
            refused = load(url, "alpha", adapters["alpha"])
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "adapter_updates_off"
            assert "--allow-adapter-updates" in refused.json()["error"]["message"]
            assert unload(url, "alpha").json()["error"]["code"] == "adapter_updates_off"
            keyless = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"})
            assert keyless.status_code == 401
            assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]] == [BASE]
    finally:
        engine.close()


def test_each_adapter_s_trained_rope_scaling_is_read_once_as_it_joins(base_dir, adapters, monkeypatch):
    # Reading it opens the adapter's run config (and an earlier run's, for a run that went on from one).
    from tuneforge.serve import adapters as pool_module

    read = []
    trained_rope_scaling = pool_module.trained_rope_scaling
    monkeypatch.setattr(
        pool_module, "trained_rope_scaling", lambda path: read.append(path) or trained_rope_scaling(path)
    )
    pool = AdapterPool(str(base_dir), {"alpha": str(adapters["alpha"])})
    pool.add_adapter("beta", str(adapters["beta"]))
    assert sorted(read) == sorted(pool._sources[name].adapter for name in ("alpha", "beta"))
