"""OpenAI's Evals API on the jobs service: evals whose testing criteria are graders, and runs that answer
each item of a data source with a model and grade the answers.

An eval holds a custom data source config (the item schema) and its testing criteria, graders as OpenAI
writes them, each built and checked by `tuneforge.graders` when the eval is created. A run's data source
is a `completions` one: items (a JSONL file uploaded with purpose `evals`, or given inline), an input
template whose `{{ item.x }}` references are the graders' templates, the model (one the caller may use
for inference) and sampling params. The tools an item's prompt offers, its own `tools` or else the sampling
params' `tools` (OpenAI's chat completion tools), are rendered into the prompt as `tuneforge serve` renders a
request's; an answer that calls them has its calls in the graders' `sample.output_tools`. A sample's assistant
message and finish_reason are a chat completion's (`reasoning.assistant_reply`, as serve's): a reasoning model's
reasoning apart in `reasoning_content`, the calls in `tool_calls`. Runs are queued and run by the workers of the server
(`EvalRunner`): the model answers every item through `tuneforge.generate`, each testing criterion grades the
answers, and the run's counts and output items are stored in one transaction when it completes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from ..data.formats import tool_definitions
from ..data.readers import MAX_ROW_BYTES, bounded_lines
from ..database import may_clear
from ..errors import ConfigError, ModelSourceError, TuneforgeError, unreadable_json
from ..fsio import refused_write
from ..generate import MAX_SEED
from ..graders import LOCAL_MODEL_GRADER, Grader, GraderError, build_grader, grader_types, rollout_samples, runs_python
from ..graders.templates import Template
from ..serve.bodies import refuse_not_served
from ..tool_calls import ParsedReply, tool_call_parser
from ..web import MAX_NESTING, APIError, Metadata, RequestBody, StoredText, failure_id, nesting
from ..web.shapes import not_unicode
from .files import FileStorage
from .runner import no_room
from .store import Eval, EvalOutputItem, EvalRun, Store, new_id, now

if TYPE_CHECKING:
    from ..models import ModelSource

log = logging.getLogger("tuneforge.jobs")

# OpenAI's defaults for a completions run's sampling params.
DEFAULT_SAMPLING = {"max_completion_tokens": 128, "temperature": 1.0, "top_p": 1.0, "seed": 42}
MAX_RUN_ITEMS = 10_000
END_RETRY_S = 5.0  # how often a run's end that the store refused (its disk full) is written again
PASS_SCORE = 1.0  # the score a criterion without a pass_threshold must reach for an answer to pass


def _only(allowed: str, what: str):
    """A `type` field that takes one value; any other is refused saying what is supported here."""

    def check(value: Any):
        if value != allowed:
            raise ValueError(f"{value!r:.60} {what} are not supported here; give '{allowed}'")
        return value

    return Annotated[Literal[allowed], BeforeValidator(check)]  # type: ignore[valid-type]


class CustomDataSourceConfig(RequestBody):
    type: _only("custom", "data source configs")
    item_schema: dict[str, Any]
    include_sample_schema: bool = False


class CreateEvalBody(RequestBody):
    data_source_config: CustomDataSourceConfig
    testing_criteria: list[dict[str, Any]] = Field(min_length=1, max_length=32)
    name: StoredText | None = Field(None, max_length=256)
    metadata: Metadata | None = None


class UpdateEvalBody(RequestBody):
    name: StoredText | None = Field(None, max_length=256)
    metadata: Metadata | None = None


class ContentRow(RequestBody):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None


class FileIdSource(RequestBody):
    type: Literal["file_id"]
    id: StoredText


class FileContentSource(RequestBody):
    type: Literal["file_content"]
    content: list[ContentRow] = Field(min_length=1, max_length=MAX_RUN_ITEMS)


class TemplateMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None


class InputTemplate(RequestBody):
    type: _only("template", "input_messages types")
    template: list[TemplateMessage] = Field(min_length=1)


# OpenAI's sampling params of a completions run that tuneforge does not build, and chat's name for the answer's
# limit: each refused by name, saying why (`SamplingParams.check_supported`).
SAMPLING_NOT_SERVED = {
    "reasoning_effort": (
        "a reasoning model reasons as its chat template makes it, with no effort set; remove it",
        (),
    ),
    "response_format": (
        "a run's answers are not constrained to JSON here (tuneforge serve's /v1/chat/completions constrains "
        "a reply with response_format); remove it, and ask for JSON in the input template where a grader reads "
        "sample.output_json",
        ({"type": "text"},),
    ),
    # Chat's name for the answer's limit, which a client moved from /v1/chat/completions sends.
    "max_tokens": ("a run limits its answers with max_completion_tokens: send max_completion_tokens instead", ()),
}


class SamplingParams(RequestBody):
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # as serve's requests take it
    tools: list[dict[str, Any]] | None = None
    # SAMPLING_NOT_SERVED's: any value passes validation, and one that asks for something is refused by name.
    reasoning_effort: Any = None
    response_format: Any = None
    max_tokens: Any = None

    def check_supported(self) -> None:
        refuse_not_served(
            SAMPLING_NOT_SERVED,
            {name: getattr(self, name) for name in SAMPLING_NOT_SERVED},
            prefix="data_source.sampling_params.",
        )


class CompletionsDataSource(RequestBody):
    type: _only("completions", "data sources of this type")
    source: Annotated[FileIdSource | FileContentSource, Field(discriminator="type")]
    model: StoredText
    input_messages: InputTemplate
    sampling_params: SamplingParams | None = None


class CreateRunBody(RequestBody):
    data_source: CompletionsDataSource
    name: StoredText | None = Field(None, max_length=256)
    metadata: Metadata | None = None


# ---- checks when an eval or a run is created ------------------------------------------------------


def testing_criteria(specs: list[dict], *, allow_python: bool) -> list[Grader]:
    """The graders of an eval, each built by `tuneforge.graders`; a bad one is a 400 naming it."""
    graders: list[Grader] = []
    for index, spec in enumerate(specs):
        param = f"testing_criteria[{index}]"
        if nesting(spec) > MAX_NESTING:  # stored with the eval, and serialized with its runs' results
            raise APIError(
                400,
                f"{param}: the grader nests arrays or objects more than {MAX_NESTING} deep (a multi grader nests two "
                f"a level); send graders nested at most {MAX_NESTING} deep (the grader's own object counted).",
                param=param,
                code="invalid_grader",
            )
        if runs_python(spec) and not allow_python:
            raise APIError(
                400,
                f"{param}: this server does not run python graders (they run your code on its machine); grade "
                "with string_check, text_similarity, json_fields or multi, or ask its operator to start it with "
                "--allow-python-graders.",
                param=param,
                code="python_grader_not_allowed",
            )
        if "reward_model" in grader_types(spec):
            raise APIError(400, f"{param}: {LOCAL_MODEL_GRADER}.", param=param, code="invalid_grader")
        try:
            grader = build_grader(spec)
        except GraderError as err:
            raise APIError(400, f"{param}: {err.message}", param=param, code="invalid_grader") from None
        if grader.type == "text_similarity" and grader.pass_threshold is None:
            # As OpenAI's: a similarity is a fraction, so without a threshold almost no answer would pass.
            raise APIError(
                400,
                f"{param}: a text_similarity testing criterion needs a pass_threshold, the similarity at which "
                "an answer passes (as 0.8).",
                param=f"{param}.pass_threshold",
                code="invalid_grader",
            )
        if any(g.name == grader.name for g in graders):
            raise APIError(
                400,
                f"{param}: two testing criteria are named {grader.name!r}; give each its own name, as the run's "
                "results are counted by name.",
                param=f"{param}.name",
                code="invalid_value",
            )
        graders.append(grader)
    return graders


def input_templates(messages: list[TemplateMessage]) -> list[Template]:
    """The input template's messages, their `{{ item.x }}` references parsed by the graders' templates."""
    templates = []
    for index, message in enumerate(messages):
        param = f"data_source.input_messages.template[{index}].content"
        try:
            template = Template(message.content, label=param, field="content")
        except GraderError as err:
            raise APIError(400, err.message.removeprefix("grader "), param=param, code="invalid_value") from None
        if any(steps[0] == "sample" for steps in template.paths):
            raise APIError(
                400,
                f"{param}: the input is written before the model answers, so it can read only item fields "
                "({{ item.x }}), not the sample.",
                param=param,
                code="invalid_value",
            )
        templates.append(template)
    return templates


def file_items(path: Path, file_id: str) -> list[dict]:
    """The items of an uploaded JSONL file: each line `{"item": {...}}` (or the item itself); a bad line is a
    400 naming the file and the line (one over the data readers' MAX_ROW_BYTES is not read), and so is a file of
    more items than a run takes, read only that far."""
    items = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(bounded_lines(lines), start=1):
            if raw is None:  # left unread: parsed, it would take several times its size in memory
                raise _bad_line(
                    file_id, number, f"it is over {MAX_ROW_BYTES // (1 << 20)} MiB, more than any item holds"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _bad_line(file_id, number, f"it is not UTF-8 text (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise _bad_line(file_id, number, f"it is not JSON ({err.msg})") from None
            except (ValueError, RecursionError) as err:
                raise _bad_line(file_id, number, f"it {unreadable_json(err) or f'is not JSON ({err})'}") from None
            if not isinstance(row, dict):
                raise _bad_line(file_id, number, "it is not a JSON object")
            item = row["item"] if set(row) <= {"item", "sample"} and "item" in row else row
            if not isinstance(item, dict):
                raise _bad_line(file_id, number, "its `item` is not a JSON object")
            found = not_unicode(item)
            if found is not None:  # no tokenizer encodes it
                where, position, character = found
                what = f"item.{where} is not Unicode text: character {position} ({character}) is one half of a UTF-16 "
                raise _bad_line(file_id, number, what + "surrogate pair alone")
            items.append(item)
            if len(items) > MAX_RUN_ITEMS:
                raise APIError(
                    400,
                    f"{file_id} holds more than {MAX_RUN_ITEMS:,} items; a run takes at most {MAX_RUN_ITEMS:,}.",
                    param="data_source.source.id",
                    code="invalid_file_format",
                )
    if not items:
        raise APIError(400, f"{file_id} holds no items.", param="data_source.source.id", code="invalid_file_format")
    return items


def _bad_line(file_id: str, line: int, what: str) -> APIError:
    return APIError(
        400,
        f'{file_id} line {line}: {what}; each line must be {{"item": {{...}}}}.',
        param="data_source.source.id",
        code="invalid_file_format",
    )


def check_item_schema(schema: dict) -> None:
    """The eval's `data_source_config.item_schema`, checked as a JSON Schema: a 400 naming what is wrong in it."""
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as err:
        where = "".join(f"[{json.dumps(step)}]" for step in err.absolute_path)
        param = f"data_source_config.item_schema{where}"
        raise APIError(
            400, f"{param} is not a valid JSON Schema: {err.message:.300}", param=param, code="invalid_value"
        ) from None
    except RecursionError:  # jsonschema checks a subschema by recursing into it
        raise APIError(
            400,
            "data_source_config.item_schema nests its subschemas too deeply for this server to check; give a "
            "flatter schema.",
            param="data_source_config.item_schema",
            code="invalid_value",
        ) from None


def check_nesting(items: list[dict], item_param: str, sampling_tools: list[dict] | None) -> None:
    """Every item, and each of the sampling params' tools, nested at most `MAX_NESTING` deep (both are stored with
    the run): a 400 naming the first that is not."""
    named = [(f"{item_param}[{index}]", "item", item) for index, item in enumerate(items)]
    named += [
        (f"data_source.sampling_params.tools[{index}]", "tool", tool) for index, tool in enumerate(sampling_tools or [])
    ]
    for param, what, value in named:
        if nesting(value) > MAX_NESTING:
            raise APIError(
                400,
                f"{param}: the {what} nests arrays or objects more than {MAX_NESTING} deep; a run takes items and "
                f"tools nested at most {MAX_NESTING} deep (the {what}'s own object counted).",
                param=param,
                code="invalid_value",
            )


def check_items_match(schema: dict, items: list[dict], item_param: str) -> None:
    """Every item validated against the eval's item schema (`data_source_config.item_schema`), as OpenAI
    validates them: a 400 naming the first item that does not match, the field and what is wrong with it."""
    from jsonschema import validators
    from jsonschema.exceptions import best_match
    from referencing.exceptions import Unresolvable

    check_item_schema(schema)  # an eval created before its item_schema was checked may hold one that is not
    validator = validators.validator_for(schema)(schema)
    for index, item in enumerate(items):
        param = f"{item_param}[{index}]"
        try:
            error = best_match(validator.iter_errors(item))
        except RecursionError:  # jsonschema follows the item and the schema's references by recursion
            raise APIError(
                400,
                f"{param}: the item cannot be checked against the eval's data_source_config.item_schema, as the "
                "check recurses too deeply: the item nests arrays or objects too deeply, or the schema refers to "
                'itself without end (as {"$ref": "#"}). Nest the item less, or create the eval again with a '
                "schema whose references end.",
                param=param,
                code="invalid_value",
            ) from None
        except Unresolvable as err:  # a $ref is looked up only when an item reaches it
            raise APIError(
                400,
                f"the eval's data_source_config.item_schema has a $ref that cannot be resolved ({err}); this server "
                "resolves references within the schema alone (as #/$defs/name). Create the eval again with the "
                "schema it refers to inside its item_schema.",
                param="data_source_config.item_schema",
                code="invalid_value",
            ) from None
        if error is not None:
            field = "".join(f"[{json.dumps(step)}]" if isinstance(step, int) else f".{step}" for step in error.path)
            raise APIError(
                400,
                f"{param}: item{field} does not match the eval's data_source_config.item_schema: {error.message:.300}",
                param=param,
                code="invalid_value",
            )


def check_items(graders: list[Grader], templates: list[Template], items: list[dict], item_param: str) -> None:
    """Every item field the input template and the graders read, looked up on each item: a 400 naming the
    first item that lacks one (`item_param` says where the items were given)."""
    for template in templates:
        try:
            template.check_items(items)
        except GraderError as err:
            raise _bad_item(err, item_param) from None
    for index, grader in enumerate(graders):
        try:
            grader.check_items(items)
        except GraderError as err:
            raise _bad_item(err, item_param, f"testing_criteria[{index}]: ") from None


def _bad_item(err: GraderError, item_param: str, prefix: str = "") -> APIError:
    param = f"{item_param}[{err.sample}]" if err.sample is not None else item_param
    message = err.message.split("\non sample", 1)[0].removeprefix("grader ")
    return APIError(400, f"{param}: {prefix}{message}", param=param, code="invalid_value")


def check_tools(sampling_tools: list[dict] | None, items: list[dict], item_param: str) -> None:
    """The sampling params' tools and each item's own `tools`, checked as a data row's are: a 400 naming the
    first bad definition and its field."""
    if sampling_tools is not None:
        problem = next(iter(tool_definitions(sampling_tools)[1]), None)
        if problem is not None:
            param = f"data_source.sampling_params.{problem.field}"
            raise APIError(400, f"{param}: {problem.message}", param=param, code="invalid_value")
    for index, item in enumerate(items):
        problem = next(iter(tool_definitions(item.get("tools"))[1]), None)
        if problem is not None:
            param = f"{item_param}[{index}]"
            raise APIError(400, f"{param}: item.{problem.field}: {problem.message}", param=param, code="invalid_value")


def item_tools(sampling_tools: list[dict] | None, items: list[dict]) -> list[list[dict] | None]:
    """The tools each item's prompt offers (`check_tools` has checked them): its own, else the sampling params'."""
    fallback = tool_definitions(sampling_tools)[0]
    return [tool_definitions(item["tools"])[0] if item.get("tools") else fallback for item in items]


def check_tools_read(
    tokenizer: Callable[[], Any], model: str, sampling_tools: list[dict] | None, items: list[dict], item_param: str
) -> list[list[dict] | None]:
    """The tools each item's prompt offers (`item_tools`), once the chat template of `model` (whose tokenizer
    `tokenizer()` gives, asked only where a prompt offers tools) writes them and its calls are parsed, as serve
    requires of a request's tools: else a 400 naming where the first item's tools were given."""
    tools = item_tools(sampling_tools, items)
    first = next((index for index, offered in enumerate(tools) if offered), None)
    if first is None:
        return tools
    own = bool(items[first].get("tools"))
    param = f"{item_param}[{first}]" if own else "data_source.sampling_params.tools"
    try:
        tool_call_parser(tokenizer(), f"`{model}`", "item.tools" if own else param)
    except ConfigError as err:
        raise APIError(400, f"{param}: {err.message}" if own else err.message, param=param, code=err.code) from None
    return tools


class TemplateTokenizers:
    """The tokenizers whose chat templates `runs.create` checks a run's tools with (`check_tools_read`) and
    `jobs.create` renders a job's first rows with (its tuneforge_chat_template in place of the model's): each
    model's, with each template, loaded once and loaded again when a file in its folders changes (an allowed model
    replaced in place), the `size` most recently used kept."""

    def __init__(self, size: int = 4):
        self._size, self._lock = size, threading.Lock()
        self._held: OrderedDict[tuple, tuple[list, Any]] = OrderedDict()

    def get(self, source: ModelSource, template: str | None = None, key: str = "model.chat_template"):
        """`template` (Jinja), which `key` names in a refusal, replaces the model's own chat template."""
        from ..data.prepare import file_state
        from ..data.render import renderer_for
        from ..models import load_tokenizer

        folders = [folder for folder in (source.path, source.adapter) if folder is not None]
        state = [(path, file_state(str(path))) for folder in folders for path in sorted(folder.iterdir())]
        held_as = (source.path, source.adapter, template)
        # Under the lock, so requests for one model load it once and share a tokenizer none of them changes.
        with self._lock:
            held = self._held.get(held_as)
            if held is None or held[0] != state:
                tokenizer = load_tokenizer(source, template=template, key=key)
                renderer_for(tokenizer)  # the template's checks, made once for the requests that read it
                held = self._held[held_as] = (state, tokenizer)
            self._held.move_to_end(held_as)
            while len(self._held) > self._size:
                self._held.popitem(last=False)
            return held[1]


def _graded_calls(sample: dict) -> Callable[[str], ParsedReply | None]:
    """The calls of an answer as its graders read them (`sample`'s `output_tools`, with the text before them), for
    its stored message: parsed once, so the message's call ids are those the graders saw."""
    calls = sample["output_tools"]
    return lambda _: ParsedReply(sample["output_text"] or None, calls) if calls else None


def items_param(source: dict) -> str:
    """How the refusals name a run's items: by its file's id, or as its inline content."""
    return f"{source['id']} item" if source["type"] == "file_id" else "data_source.source.content"


def run_items(store: Store, storage: FileStorage, run: EvalRun) -> list[dict]:
    """The items a run answers: its inline content, or its file's lines."""
    source = run.data_source["source"]
    if source["type"] == "file_content":
        return [row["item"] for row in source["content"]]
    row = store.get_file(run.owner, source["id"])
    try:
        if row is not None:
            return file_items(storage.path(row), row.id)
    except FileNotFoundError:  # deleted after its row was read
        pass
    raise RunFailure("file_not_found", f"The file {source['id']} of this run has been deleted.")


# ---- bodies ----------------------------------------------------------------------------------------


def eval_body(row: Eval) -> dict:
    return {
        "object": "eval",
        "id": row.id,
        "name": row.name,
        "created_at": row.created_at,
        "metadata": row.metadata_,
        "data_source_config": row.data_source_config,
        "testing_criteria": row.testing_criteria,
    }


def data_source_config(config: CustomDataSourceConfig) -> dict:
    """The config as OpenAI shows it: the JSON schema of the namespaces the templates read."""
    properties: dict[str, Any] = {"item": config.item_schema}
    if config.include_sample_schema:
        properties["sample"] = {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "choices": {"type": "array"},
                "output_text": {"type": "string"},
                "output_json": {"type": "object"},
            },
            "required": ["model", "choices"],
        }
    return {"type": "custom", "schema": {"type": "object", "properties": properties, "required": list(properties)}}


def run_body(run: EvalRun) -> dict:
    counts = run.result_counts or {"total": 0, "passed": 0, "failed": 0, "errored": 0}
    usage = run.usage
    return {
        "object": "eval.run",
        "id": run.id,
        "eval_id": run.eval_id,
        "name": run.name,
        "model": run.model,
        "status": run.status,
        "created_at": run.created_at,
        "data_source": run.data_source,
        "error": run.error,
        "metadata": run.metadata_,
        "result_counts": counts,
        "per_testing_criteria_results": run.per_testing_criteria_results or [],
        "per_model_usage": [{"model_name": run.model, "cached_tokens": 0, **usage}] if usage else [],
        "report_url": "",
    }


# ---- running -----------------------------------------------------------------------------------------


class RunFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.error = {"code": code, "message": message}


class RunStopped(Exception):
    """The run was canceled, or its server is stopping, while the model answered."""


class EvalRunner:
    """Answers and grades one claimed run (the workers' eval thread calls `run`)."""

    def __init__(self, store: Store, storage: FileStorage):
        self.store, self.storage = store, storage

    def run(self, run: EvalRun, worker_id: str, stopping: threading.Event) -> None:
        try:
            items, graders, outcome = self._answer_and_grade(run, worker_id, stopping)
            rows, counts, per_criterion, usage = outcome
            # In the try: a store that refuses the results (locked past its timeout) fails the run, rather
            # than leaving it in progress with no worker to finish it.
            self.store.finish_run(
                run.id,
                worker_id,
                rows,
                status="completed",
                result_counts=counts,
                per_testing_criteria_results=per_criterion,
                usage=usage,
            )
        except RunStopped:
            # Canceled: it stays canceled. The server stopping: queued again for the next server.
            self._end(run.id, worker_id, stopping, status="queued", worker_id=None)
            return
        except RunFailure as failure:
            self._end(run.id, worker_id, stopping, status="failed", error=failure.error)
            return
        except Exception as err:  # noqa: BLE001 - one run's unforeseen failure fails that run alone
            if refused_write(err):  # the server's full disk, as a job's is told
                error = no_room(err, "run")
                log.error("eval run %s: %s", run.id, error.pop("log"))
            else:
                error_id = failure_id()
                log.error("eval run %s failed (error id %s)", run.id, error_id, exc_info=err)
                message = (
                    f"The server failed on this run (error id {error_id}); give the server's operator the error id."
                )
                error = {"code": "server_error", "message": message}
            self._end(run.id, worker_id, stopping, status="failed", error=error)
            return

    def _end(self, run_id: str, worker_id: str, stopping: threading.Event, **values) -> None:
        """Move the run out of progress with `values`. A store that cannot write it now, for a cause that clears
        (`database.may_clear`: its disk full, its connection lost), is asked again every `END_RETRY_S` until it
        does, told once in the log: the run's worker, alive, holds it, so no other server would end it. Any other
        refusal is raised at once, as is the last one when the server stops meanwhile: the next server takes the
        run up as one whose server died."""
        told = False
        while True:
            try:
                self.store.move_run(run_id, ["in_progress"], held_by=worker_id, **values)
                return
            except Exception as err:
                if stopping.is_set() or not may_clear(err):
                    raise
                if not told:
                    log.error(
                        "eval run %s: its end cannot be written yet (%s); trying again every %g s until it can",
                        run_id,
                        err,
                        END_RETRY_S,
                    )
                    told = True
                if stopping.wait(END_RETRY_S):
                    raise

    def _answer_and_grade(self, run: EvalRun, worker_id: str, stopping: threading.Event):
        from ..generate import encode_each, generate, load_for_inference
        from ..models import load_tokenizer, model_context_length, resolve
        from ..reasoning import assistant_reply, reasoning_opened

        evaluation = self.store.get_eval(run.owner, run.eval_id)
        if evaluation is None:
            raise RunStopped  # deleted with its eval
        graders = [build_grader(spec) for spec in evaluation.testing_criteria]
        source = run.data_source
        templates = [
            Template(m["content"], label="input", field="content") for m in source["input_messages"]["template"]
        ]
        items = run_items(self.store, self.storage, run)
        check = self.store.get_run
        try:
            model_source = resolve(run.model_source, pull_missing=False)
        except ModelSourceError:
            raise RunFailure("model_not_found", f"The model `{run.model}` is no longer on this server.") from None
        tokenizer = load_tokenizer(model_source)
        sampling = {
            **DEFAULT_SAMPLING,
            **{k: v for k, v in (source.get("sampling_params") or {}).items() if v is not None},
        }
        # Checked when the run was created; checked again, as the model's folder may have changed since.
        try:
            tools = check_tools_read(
                lambda: tokenizer, run.model, sampling.get("tools"), items, items_param(source["source"])
            )
        except APIError as err:
            raise RunFailure(err.code, err.message) from None
        model = load_for_inference(model_source, "eval")

        def on_progress(_: int) -> None:
            current = check(run.eval_id, run.id)
            if (
                stopping.is_set()
                or current is None
                or current.status != "in_progress"
                or current.worker_id != worker_id
            ):
                raise RunStopped

        roles = {"developer": "system"}
        prompts = [
            [
                {"role": roles.get(m["role"], m["role"]), "content": t.render([{}] * len(items), items, i)}
                for m, t in zip(source["input_messages"]["template"], templates)
            ]
            for i in range(len(items))
        ]
        # An input longer than the model's context window leaves no room for an answer: that item errors, saying
        # so, and the others are answered.
        window = model_context_length(model)
        prompt_ids = encode_each(tokenizer, prompts, tools)
        lengths = [len(ids) for ids in prompt_ids]
        fits = [i for i, length in enumerate(lengths) if window is None or length < window]
        answered = generate(
            model,
            tokenizer,
            [prompts[i] for i in fits],
            max_new_tokens=sampling["max_completion_tokens"],
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            seed=sampling["seed"],
            on_progress=on_progress,
            tools=[tools[i] for i in fits],
        )
        on_progress(0)
        answers: list = [None] * len(items)
        for i, answer in zip(fits, answered):
            answers[i] = answer
        samples = rollout_samples([a.text for a in answered], [tools[i] for i in fits], tokenizer)
        graded: list = [None] * len(items)  # the sample each answer's graders read
        for i, sample in zip(fits, samples):
            graded[i] = sample
        grades = {}
        for grader in graders:
            scores = iter(_grade(grader, samples, [items[i] for i in fits], fits))
            grades[grader.name] = [next(scores) if answer else None for answer in answers]
        rows, counts = [], {"total": len(items), "passed": 0, "failed": 0, "errored": 0}
        per_criterion = {g.name: {"testing_criteria": g.name, "passed": 0, "failed": 0} for g in graders}
        for i, (item, prompt, answer) in enumerate(zip(items, prompts, answers)):
            results = []
            for grader, spec in zip(graders, evaluation.testing_criteria if answer else []):
                grade = grades[grader.name][i]
                if isinstance(grade, GraderError):
                    results.append(
                        {
                            "name": grader.name,
                            "type": spec["type"],
                            "score": 0.0,
                            "passed": False,
                            "sample": None,
                            "error": grade.message,
                        }
                    )
                    continue
                threshold = PASS_SCORE if grader.pass_threshold is None else grader.pass_threshold
                passed = grade >= threshold
                per_criterion[grader.name]["passed" if passed else "failed"] += 1
                results.append(
                    {"name": grader.name, "type": spec["type"], "score": grade, "passed": passed, "sample": None}
                )
            status = (
                "error"
                if answer is None or any("error" in r for r in results)
                else "pass"
                if all(r["passed"] for r in results)
                else "fail"
            )
            counts[{"pass": "passed", "fail": "failed", "error": "errored"}[status]] += 1
            prompt_tokens, completion_tokens = (answer.prompt_tokens, answer.completion_tokens) if answer else (0, 0)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "cached_tokens": 0,
            }
            error = None
            if answer is None:
                error = {
                    "code": "context_length_exceeded",
                    "message": f"The input is {lengths[i]} tokens; the model's maximum context length is {window} "
                    "tokens, which leaves no room for an answer. Shorten this item's input.",
                }
            output, finish_reason = [], ""
            if answer is not None:  # the message and finish_reason a chat completion gives for the answer
                opened = reasoning_opened(tokenizer, prompt_ids[i])
                calls = _graded_calls(graded[i])
                message, finish_reason = assistant_reply(answer.text, answer.finish_reason, opened, calls)
                output = [message]
            sample = {
                "input": prompt,
                "output": output,
                "finish_reason": finish_reason,
                "model": run.model,
                "usage": usage,
                "error": error,
                "temperature": sampling["temperature"],
                "max_completion_tokens": sampling["max_completion_tokens"],
                "top_p": sampling["top_p"],
                "seed": sampling["seed"],
            }
            rows.append(
                EvalOutputItem(
                    id=new_id("outputitem_"),
                    run_id=run.id,
                    eval_id=run.eval_id,
                    index=i,
                    item=item,
                    sample=sample,
                    results=results,
                    status=status,
                    created_at=now(),
                )
            )
        prompt_tokens = sum(a.prompt_tokens for a in answered)
        completion_tokens = sum(a.completion_tokens for a in answered)
        usage = {
            "invocation_count": len(answered),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return items, graders, (rows, counts, list(per_criterion.values()), usage)


def _grade(grader: Grader, samples: list[dict], items: list[dict], places: list[int]) -> list[float | GraderError]:
    """The grader's score of each sample; where grading the batch fails, each sample alone, so one item's
    failure (a python grader raising on it) is that item's error and the others are scored. `places` are the
    items' indices in the run (items too long for the model are not graded, so the two can differ)."""
    try:
        return [result.score for result in grader.grade(samples, items)]
    except GraderError:
        pass
    scores: list[float | GraderError] = []
    for place, sample, item in zip(places, samples, items):
        try:
            scores.append(grader.grade([sample], [item])[0].score)
        except TuneforgeError as err:
            # Graded alone, the item is its batch's first: the message names its place in the run instead.
            message = err.message.replace(_FIRST_OF_BATCH, f"on item {place}", 1)
            scores.append(GraderError(message, code="grader_failed"))
    return scores


_FIRST_OF_BATCH = "on sample 0 of the batch (item 0)"  # as `graders.base.grading_failed` names it
