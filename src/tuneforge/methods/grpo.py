"""Group relative policy optimisation (GRPO): the policy learns from graded answers of its own.

Each optimizer step takes `train.batch_size` prompts. For each, `grpo.group_size` answers are
sampled from the policy as it stands (`generate.py`; the random stream is seeded by the run's
seed, the step, the process and the micro-batch, so a resumed run samples the very same answers),
the grader scores them (`tuneforge.graders`), and each answer's advantage is its reward against
its group's:

    A_i = (r_i - mean r) / (std r + 1e-4)      loss: grpo, dapo
    A_i =  r_i - mean r                         loss: dr_grpo (no std scaling: no difficulty bias)

The loss of a token t of answer i is  -A_i * rho_t + beta * KL_t,  where rho_t = pi(t) / pi_old(t)
is 1 in value (one update per sampling: the answers come from the weights being trained) and gives
the policy gradient A_i * grad log pi(t), and KL_t = exp(q_t) - q_t - 1 with q_t = log ref(t) -
log pi(t) (the k3 estimator: unbiased, never negative), against the reference: the policy's
disabled adapter for a LoRA policy, a frozen copy of the start for full. Token losses are weighted
so that the step's loss is

    grpo     the mean over answers of each answer's mean token loss (DeepSeekMath)
    dr_grpo  each answer's summed token loss / max_new_tokens, averaged over answers (Dr. GRPO)
    dapo     the mean over every answer token of the step, all processes together (DAPO's token level)

A group whose answers all scored alike has zero advantages and trains only its KL penalty; with
`skip_uniform_groups` such groups stay out of the forward and backward passes (DAPO's dynamic
sampling, without refilling the batch), and the rewards are still logged over every sampled answer.

The objective returns sums over the trained answers (`count`), so the loop's division by the step's
answers gives those means under any gradient accumulation and number of processes. Sampling and grading
are part of the step: the loop asks the objective to `make_batches` from the step's prompt rows.
The first prompt's group of each step is written to `rollouts.jsonl` in the run folder (answers and
their scores), which the run's report shows beside the reward curves.

A `base_model` that is a LoRA run (an SFT run, say) is merged into its base when loaded, as for
dpo, so a LoRA policy's fresh adapter sits on the SFT model, and the reference is the SFT model.

Data: chat rows (`{"messages": [...]}`, OpenAI's reinforcement fine-tuning format). The prompt is
the messages up to the last user turn; a final assistant message is not sampled from but handed to
the grader as `item.reference`, and every other field of the row is the item as it stands
(`{{ item.answer }}`). Graders also see `item.prompt`, the prompt as TRL gives it, and each sample's
`completion`, the answer as sampled: what TRL-style reward functions (FILE.py:FUNCTION) are given.

On a model that reads images (Gemma 3, Qwen2-VL), a prompt's user messages may show images (`image_url`
parts): the prompt is expanded into the images' tokens as training expands a row's, its answers are sampled
with the images' pixels in the prefill (`generate`'s `images`), and each answer runs as a row of its own (no
packing) with the pixels through the policy and the reference. Graders read the answer's text as for a text
prompt; `item.prompt` holds the messages with an `{"type": "image"}` part for each image.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import data as tfdata
from ..data import IGNORE_INDEX, pii
from ..data.dedup import content_hash, held_out_keys
from ..data.formats import prompt_conversation
from ..data.prepare import PiiScreen, SystemPromptTally, problem_warnings, refuses
from ..data.readers import open_rows
from ..data.render import renderer_for
from ..data.schema import Conversation, Problem, shown_text
from ..errors import ConfigError, DataError
from ..fsio import write_json, writing
from ..generate import encode_each, generate
from ..graders import GraderError, rollout_samples
from ..graders import load_grader as load_grader_spec
from ..models import causal_lm, frozen_base
from ..models.loading import image_inputs
from ..wording import counted
from .dpo import prepare_policy
from .sft import reference_lm, token_cross_entropy, trained_hidden

ROLLOUTS_FILE = "rollouts.jsonl"
STD_FLOOR = 1e-4
"""Added to a group's reward std before dividing by it: a group whose answers all scored alike has
zero advantages, not a division by zero."""


@dataclass
class PromptRow:
    """One prompt to sample answers to: its tokens (ready for the reply), its messages, and the item
    the grader reads. `labels` train nothing: a prompt row is a place in the schedule, not a target."""

    input_ids: list[int]
    messages: list[dict]
    item: dict
    where: str  # file:line, for messages about this row
    key: int  # the row's content key, which decides its side of a data.validation fraction
    prompt: str | list[dict] = ""  # the prompt as TRL gives it: a text prompt's text, else its messages
    tools: list[dict] | None = None  # the row's tools, which `input_ids` render as the server renders a request's
    images: tuple[bytes, ...] = ()  # the image files the prompt's image tokens show, in order

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.input_ids)

    @property
    def graded_item(self) -> dict:
        """What graders read: the item, and the `prompt` that TRL-style reward functions are given."""
        return {**self.item, "prompt": self.prompt}


@dataclass
class SampledGroups:
    """A micro-batch's prompts, their sampled answers (`group_size` a prompt, in prompt order), and the
    answers' grades: rewards, per-grader parts, advantages, each group's reward std, each group's std of
    each part (0 where the part scored alike), and whether each group's answers all scored alike."""

    rows: list[PromptRow]
    completions: list
    rewards: torch.Tensor
    parts: torch.Tensor
    advantages: torch.Tensor
    group_std: torch.Tensor
    part_std: torch.Tensor  # (groups, parts)
    uniform: torch.Tensor  # (groups,) bool: max reward == min reward


def prepare_model(model, cfg):
    return prepare_policy(model, cfg, cfg.grpo.policy)


def load_grader(cfg):
    """The grader `grpo.grader` names (`graders.load_grader`), weighed by `grpo.grader_weights`, fully checked."""
    return load_grader_spec(
        cfg.grpo.grader, cfg.grpo.grader_weights, key="grpo.grader", placed=cfg.key_at("grpo.grader")
    )


# --- data ----------------------------------------------------------------------------------------


def read_prompts(
    path: str, tokenizer, max_length: int, system_prompts: SystemPromptTally, screen: PiiScreen | None = None
) -> tuple[list[PromptRow], list[Problem]]:
    """The prompts of a chat file, each problem located by file, line and field; each kept row's
    system prompt is counted into `system_prompts`. `screen` (data.pii) looks for secrets and personal data
    in each row: in its prompt, and as in replies in its reference answer and the fields its grader reads,
    which the rewards steer the answers toward; under redact the row goes on with placeholders. A row's
    `tools` are rendered into its prompt as `tuneforge serve` renders a request's; a chat template that
    does not write tools refuses such rows. A prompt's images (`image_url` parts of its user messages) are
    expanded into their tokens as training's are, for a model that reads images; a model that reads text
    only refuses such rows, and its image processor an image it does not take (`Renderer.image_problems`)."""
    # (line, messages, tools, item, key, whether the prompt is text) of the rows that hold a prompt
    found: list[tuple[int, list, list | None, dict, int, bool]] = []
    problems: list[Problem] = []
    renderer = renderer_for(tokenizer)
    rows = open_rows(path)
    for line, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        if not isinstance(row, dict) or not {"messages", "prompt"} & set(row):
            problems.append(_prompt_problem("no_messages", NO_MESSAGES, path, line))
            continue
        conversation, row_problems = prompt_conversation(row, file=path, line=line, csv=rows.kind == "csv", images=True)
        problems += row_problems
        if conversation is None:
            continue
        unread = [replace(p, file=path, line=line) for p in renderer.image_problems(conversation)]
        if unread:
            problems += unread
            continue
        messages, tools = conversation.messages, conversation.tools
        if tools and not renderer.writes_tools:
            problems.append(Problem("tools_not_rendered", TOOLS_NOT_RENDERED, file=path, line=line, field="tools"))
            continue
        item = grader_item(row, messages[-1].content if messages[-1].role == "assistant" else None)
        if screen is not None:
            fields = [(k, v, True) for k, v in row.items() if k not in ("messages", "prompt") and isinstance(v, str)]
            before = len(screen.problems)
            messages = screen.screen(conversation, path, line, fields).messages
            if screen.mode == "redact" and len(screen.problems) > before:
                item = pii.redact_value(item)
        key = content_hash(Conversation(messages, tools))
        if messages[-1].role == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1].role not in ("user", "tool"):
            problems.append(_prompt_problem("no_prompt", NO_PROMPT, path, line))
            continue
        # A text prompt row is one user turn of the prompt's text: TRL gives its reward functions that text.
        text = "messages" not in row and len(messages) == 1 and messages[0].content == row.get("prompt")
        found.append((line, messages, tools, item, key, text))
    prompts = [[m.to_template() for m in messages] for _, messages, _, _, _, _ in found]
    shown = [tuple(image.data for m in messages for image in m.images) for _, messages, _, _, _, _ in found]
    encoded = encode_each(tokenizer, prompts, [tools for _, _, tools, _, _, _ in found], shown)
    rows = []
    for (line, messages, tools, item, key, text), prompt, ids, images in zip(found, prompts, encoded, shown):
        if len(ids) >= max_length:
            too_long = (
                f"the prompt is {len(ids)} tokens, and GRPO prompts must be shorter than data.max_length "
                f"({max_length}); the sampled answers add up to grpo.max_new_tokens after it. Shorten the prompt "
                "or raise data.max_length."
            )
            problems.append(_prompt_problem("too_long", too_long, path, line))
            continue
        system_prompts.add(messages)
        rows.append(
            PromptRow(ids, prompt, item, f"{path}:{line}", key, messages[0].content if text else prompt, tools, images)
        )
    return rows, problems


def grader_item(row: dict, reference: str | None) -> dict:
    """The item a grader reads for a data row: its fields other than the prompt's, and `reference`, the final
    assistant message, unless the row has a field of that name (evaluation grades a row as training does)."""
    item = {k: v for k, v in row.items() if k not in ("messages", "prompt")}
    if reference is not None:
        item.setdefault("reference", reference)
    return item


NO_MESSAGES = (
    'method: grpo reads chat rows, {"messages": [...], ...any fields the grader reads}, or prompt rows, '
    '{"prompt": "..." or [...], ...}; this row has neither.'
)
TOOLS_NOT_RENDERED = (
    "the row gives 'tools', and the model's chat template does not write tool definitions: the policy would "
    "answer without seeing the functions it is to call. Use a model whose chat template takes tools (Qwen 2.5 "
    "and 3, Llama 3.1, Mistral, ...), or remove 'tools' from the row."
)
NO_PROMPT = (
    "the messages must end with the user's turn (and may be followed by one reference assistant reply): the policy "
    "samples the next assistant turn."
)


def _prompt_problem(code: str, message: str, path: str, line: int) -> Problem:
    return Problem(code, message, file=path, line=line, field="messages")


def prepare(cfg, tokenizer, *, report_path: Path | None = None, log=print) -> tfdata.PreparedData:
    """The training and validation prompts, checked; the grader run once on the validation items (or
    the first training ones), and the item fields its templates read looked up on every row, so that a
    grader that cannot score this data fails before any training. A data.validation fraction splits
    the training prompts by content key, as for the other methods. data.pii looks for secrets and personal
    data in the rows as it does in every other format (`read_prompts`); its warnings go to `log`."""
    rows, problems, system_prompts = [], [], SystemPromptTally(tokenizer)
    # A prompt is never trained (the policy's own samples are); replies are the rows' answers and fields.
    screen = PiiScreen(cfg.data.pii, "assistant", problems) if cfg.data.pii != "off" else None
    for path in cfg.data.train_files:
        found_rows, found = read_prompts(path, tokenizer, cfg.data.max_length, system_prompts, screen)
        rows += found_rows
        problems += found
    valid: list[PromptRow] = []
    if isinstance(cfg.data.validation, str):
        tally = SystemPromptTally(tokenizer)
        valid, found = read_prompts(cfg.data.validation, tokenizer, cfg.data.max_length, tally, screen)
        problems += found
    elif isinstance(cfg.data.validation, float):
        held_out = held_out_keys([r.key for r in rows], cfg.data.validation)
        valid = [r for r in rows if r.key in held_out]
        rows = [r for r in rows if r.key not in held_out]
    errors = [p for p in problems if p.is_error]
    report = {
        "kind": "prompts",
        "files": [{"path": str(p), "role": "train", "format": "chat"} for p in cfg.data.train_files],
        "counts": {"train": len(rows), "validation": len(valid), "rejected": len(errors)},
        "rejected_by_code": dict(Counter(p.code for p in errors).most_common()),
        "system_prompt": system_prompts.report(),
        **({"pii": screen.report()} if screen else {}),
        "warnings": problem_warnings(problems),
        "errors": [p.to_dict() for p in errors[:1000]],
        "errors_total": len(errors),
    }
    for warning in report["warnings"]:
        log(f"data: warning: {warning['message']}")
    # Secrets and personal data that data.pii: refuse refuses stop the run under on_error: skip too.
    if errors and (refuses(cfg.data.on_error, {p.code for p in errors}) or not rows):
        if report_path is not None:
            write_json(report_path, report)
        listed = "\n".join(f"  {p}" for p in errors[:20])
        raise DataError(
            f"the prompts have {counted(len(errors), 'error')}:\n{listed}"
            + ("\nFix these rows, or set data.on_error: skip to leave bad rows out." if rows else ""),
            code=errors[0].code,
            problems=errors,
        )
    checked, grader = (valid or rows)[:16], load_grader(cfg)
    shows = next((r for r in rows + valid if r.images), None)
    if shows is not None and grader.model_files():
        raise ConfigError(
            f"{cfg.key_at('grpo.grader')}: it scores with a reward model, which reads text only, and the prompt at "
            f"{shows.where} shows images: the answers would be scored without them. Grade answers to image prompts "
            "with string_check, text_similarity, json_fields, python or TRL reward functions, or remove the image "
            "rows."
        )
    with naming_rows(checked):
        grader.check([r.graded_item for r in checked])
    with naming_rows(rows + valid):
        grader.check_items([r.graded_item for r in rows + valid])
    return tfdata.PreparedData(rows, valid, report)


@contextmanager
def naming_rows(rows: list[PromptRow], answers_per_row: int = 1):
    """A GraderError raised inside names the data row (file:line) of the prompt its sample answers:
    the grader knows only the sample's place in the batch, `answers_per_row` samples a row."""
    try:
        yield
    except GraderError as error:
        if error.sample is None:
            raise
        where = rows[error.sample // answers_per_row].where
        raise GraderError(
            f"{error.message}\nThe sample answers the prompt at {where}.", code=error.code, sample=error.sample
        ) from None


# --- sampling and the loss -----------------------------------------------------------------------


class GRPOObjective(nn.Module):
    """Samples and grades answers (`make_batches`), then returns sums over them: `loss` and, for the
    logs, `reward` (its mean), `reward_std` (the mean of the groups' stds), `reward/NAME` and
    `reward_std/NAME` per grader, `zero_std_share` (the share of groups whose answers all scored alike),
    `trained_share` (the share of the sampled answers that trained), `kl` (mean per token, per trained
    answer), `completion_length` (tokens per sampled answer) and `clipped_share` (the share of sampled
    answers cut at max_new_tokens)."""

    train_only_sums = ()
    reported_sums = {"loss": "loss"}

    def __init__(self, model, tokenizer, grader, cfg, *, reference: nn.Module | None = None):
        super().__init__()
        self.model, self.tokenizer, self.grader = model, tokenizer, grader
        self.options, self.seed = cfg.grpo, cfg.train.seed
        self.samples_path = Path(cfg.output_dir) / ROLLOUTS_FILE
        self.step_logs = (self.samples_path,)  # emptied for a fresh run, cut at the checkpoint for a resumed one
        self.parts = grader.part_names
        self.logged_sums = (
            "reward",
            "reward_std",
            *(f"reward/{p}" for p in self.parts),
            *(f"reward_std/{p}" for p in self.parts),
            "zero_std_share",
            "trained_share",
            "kl",
            "completion_length",
            "clipped_share",
        )
        self.frozen = [reference.eval().requires_grad_(False)] if reference is not None else []

    @staticmethod
    def count(batch: dict) -> int:
        return batch["advantages"].numel()

    @torch.no_grad()
    def make_batches(self, micro_rows: list[list[PromptRow]], step: int, rank: int, all_sum) -> list[dict]:
        """Each micro-batch of prompts as a batch of its sampled answers, graded, with their advantages
        and token weights. `all_sum` adds a tensor over the processes (the step's answer and token counts)."""
        o = self.options
        lm = causal_lm(self.model)
        was_training = lm.training
        graded = []
        try:
            for index, rows in enumerate(micro_rows):
                prompts = [tuple(r.input_ids) for r in rows for _ in range(o.group_size)]  # rendered once, in prepare
                seed = zlib.crc32(json.dumps([self.seed, step, rank, index]).encode())
                completions = generate(
                    self.model,
                    self.tokenizer,
                    prompts,
                    max_new_tokens=o.max_new_tokens,
                    temperature=o.temperature,
                    top_p=o.top_p,
                    seed=seed,
                    images=[r.images for r in rows for _ in range(o.group_size)],
                )
                graded.append(self._grade(rows, completions))
        finally:
            lm.train(was_training)  # sampling runs in eval mode (no dropout)
        kept = [self._trained_groups(group) for group in graded]
        kept_tokens = sum(len(group.completions[i].token_ids) for group, ids in zip(graded, kept) for i in ids)
        kept_answers = sum(len(ids) for ids in kept)
        sampled_answers = sum(len(group.completions) for group in graded)
        step_tokens, step_kept, step_sampled = all_sum(
            torch.tensor([float(kept_tokens), float(kept_answers), float(sampled_answers)])
        ).tolist()
        if rank == 0:
            self._write_samples(step, graded[0])
        # The loop divides every sum by the step's trained answers; the reward sums are over every
        # sampled answer, so they are scaled to come out as means over the sampled ones.
        sampled_scale = step_kept / step_sampled
        per_token = step_kept / max(step_tokens, 1)
        return [self._batch(group, ids, per_token, sampled_scale) for group, ids in zip(graded, kept)]

    @torch.no_grad()
    def validation_sums(
        self, batches: list[list[PromptRow]], advance=lambda rows: None
    ) -> tuple[dict[str, float], float]:
        """The model's greedy answers to validation prompts, graded: ({"reward": total, "reward/NAME":
        total per grader, "completion_length": total tokens, "clipped_share": answers cut at
        max_new_tokens}, prompts). Greedy, so the figure moves only when the model does. `advance(rows)`
        is called after each batch."""
        lm = causal_lm(self.model)
        was_training = lm.training
        totals = torch.zeros(3 + len(self.parts), dtype=torch.float64)
        count = 0
        try:
            for rows in batches:
                answers = generate(
                    self.model,
                    self.tokenizer,
                    [tuple(r.input_ids) for r in rows],
                    max_new_tokens=self.options.max_new_tokens,
                    images=[r.images for r in rows],
                )
                with naming_rows(rows):
                    samples = rollout_samples([a.text for a in answers], [r.tools for r in rows], self.tokenizer)
                    grades = self.grader.grade(samples, [r.graded_item for r in rows])
                totals += torch.tensor(
                    [
                        [g.score, *(g.parts[p] for p in self.parts), a.completion_tokens, a.finish_reason == "length"]
                        for g, a in zip(grades, answers)
                    ],
                    dtype=torch.float64,
                ).sum(dim=0)
                count += len(rows)
                advance(rows)
        finally:
            lm.train(was_training)
        names = ("reward", *(f"reward/{p}" for p in self.parts), "completion_length", "clipped_share")
        return dict(zip(names, totals.tolist())), float(count)

    def _grade(self, rows: list[PromptRow], completions: list) -> SampledGroups:
        o = self.options
        items = [r.graded_item for r in rows for _ in range(o.group_size)]
        with naming_rows(rows, o.group_size):
            tools = [r.tools for r in rows for _ in range(o.group_size)]
            grades = self.grader.grade(rollout_samples([c.text for c in completions], tools, self.tokenizer), items)
        rewards = torch.tensor([g.score for g in grades], dtype=torch.float32)
        parts = torch.tensor([[g.parts[p] for p in self.parts] for g in grades], dtype=torch.float32)
        groups = rewards.view(len(rows), o.group_size)
        std = groups.std(dim=1, keepdim=True, unbiased=False)
        # Alike is equal: the float std (and the mean's distance) of equal rewards need not be 0 (eight of
        # 0.1 give a std of 7e-9), so a group that scored alike gets advantages of exactly 0.
        uniform = groups.amax(dim=1) == groups.amin(dim=1)
        advantages = (groups - groups.mean(dim=1, keepdim=True)).masked_fill(uniform[:, None], 0.0)
        if o.loss != "dr_grpo":
            advantages = advantages / (std + STD_FLOOR)
        part_groups = parts.view(len(rows), o.group_size, len(self.parts))
        part_alike = part_groups.amax(dim=1) == part_groups.amin(dim=1)
        part_std = part_groups.std(dim=1, unbiased=False).masked_fill(part_alike, 0.0)
        return SampledGroups(rows, completions, rewards, parts, advantages.flatten(), std.flatten(), part_std, uniform)

    def _trained_groups(self, group: SampledGroups) -> list[int]:
        """The answers that train: all of them, or with `skip_uniform_groups` those of the groups whose
        answers scored differently (at least the first group, so that every micro-batch runs)."""
        size = self.options.group_size
        groups = range(len(group.rows))
        if self.options.skip_uniform_groups:
            groups = [g for g in groups if not group.uniform[g]] or [0]
        return [g * size + i for g in groups for i in range(size)]

    def _write_samples(self, step: int, group: SampledGroups) -> None:
        """The first prompt's group of the step, with the answers' rewards and advantages."""
        row, size = group.rows[0], self.options.group_size
        record = {
            "step": step + 1,
            "prompt": shown_text(row.messages[-1]["content"]),
            "item": row.where,
            "answers": [
                {"text": c.text, "reward": float(r), "advantage": float(a)}
                for c, r, a in zip(group.completions[:size], group.rewards.tolist(), group.advantages.tolist())
            ],
        }
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.samples_path), self.samples_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _batch(self, group: SampledGroups, kept: list[int], answers_per_token: float, sampled_scale: float) -> dict:
        o = self.options
        completions = [group.completions[i] for i in kept]
        lengths = torch.tensor([max(len(c.token_ids), 1) for c in completions], dtype=torch.float32)
        weights = {
            "grpo": 1 / lengths,
            "dr_grpo": torch.full_like(lengths, 1 / o.max_new_tokens),
            "dapo": torch.full_like(lengths, answers_per_token),
        }[o.loss]
        examples = [
            _answer_example(group.rows[i // o.group_size], list(c.token_ids)) for i, c in zip(kept, completions)
        ]
        return {
            **tfdata.collate(examples, self.tokenizer.pad_token_id, images=image_inputs(self.tokenizer)),
            "advantages": group.advantages[kept],
            "token_weights": weights,
            "sampled_sums": torch.cat(
                [
                    group.rewards.sum().view(1),
                    group.group_std.sum().view(1) * o.group_size,
                    group.parts.sum(dim=0),
                    group.part_std.sum(dim=0) * o.group_size,
                    torch.tensor(
                        [
                            float(group.uniform.sum()) * o.group_size,
                            float(len(kept)),
                            float(sum(len(c.token_ids) for c in group.completions)),
                            float(sum(c.finish_reason == "length" for c in group.completions)),
                        ]
                    ),
                ]
            )
            * sampled_scale,
        }

    def forward(
        self,
        input_ids,
        labels,
        advantages,
        token_weights,
        sampled_sums,
        position_ids=None,
        attention_mask=None,
        **images,
    ):
        # `images`: the pixels (and image inputs) of answers whose prompts show images, which the policy and the
        # reference both read.
        batch = dict(
            input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask, **images
        )
        trained = labels != IGNORE_INDEX
        answer = trained.nonzero()[:, 0]  # the answer (row) of each trained token
        targets = labels[trained]
        lm = causal_lm(self.model)
        logp = -token_cross_entropy(lm, trained_hidden(lm, **batch), targets)[0]
        ratio = torch.exp(logp - logp.detach())
        token_loss = -advantages[answer] * ratio
        kl = torch.zeros_like(logp)
        if self.options.beta:
            with torch.no_grad(), reference_lm(self.model, self.frozen) as ref:
                ref_logp = -token_cross_entropy(ref, trained_hidden(ref, **batch), targets)[0]
            q = ref_logp - logp
            kl = torch.exp(q) - q - 1
            token_loss = token_loss + self.options.beta * kl
        lengths = trained.sum(dim=1).clamp(min=1)
        kl_per_answer = torch.zeros_like(advantages).index_add(0, answer, kl.detach()) / lengths
        n = len(self.parts)
        reward, reward_std = sampled_sums[:2]
        parts, part_stds = sampled_sums[2 : 2 + n], sampled_sums[2 + n : 2 + 2 * n]
        zero_std_share, trained_share, completion_length, clipped_share = sampled_sums[2 + 2 * n :]
        return {
            "loss": (token_loss * token_weights[answer]).sum(),
            "reward": reward,
            "reward_std": reward_std,
            **{f"reward/{p}": parts[k] for k, p in enumerate(self.parts)},
            **{f"reward_std/{p}": part_stds[k] for k, p in enumerate(self.parts)},
            "zero_std_share": zero_std_share,
            "trained_share": trained_share,
            "kl": kl_per_answer.sum(),
            "completion_length": completion_length,
            "clipped_share": clipped_share,
        }


def _answer_example(row: PromptRow, answer_ids: list[int]) -> tfdata.Example:
    """The prompt and its sampled answer as one example that trains the answer's tokens (labels shifted), with the
    prompt's images."""
    ids = row.input_ids + answer_ids
    labels = [IGNORE_INDEX] * (len(row.input_ids) - 1) + answer_ids + [IGNORE_INDEX]
    return tfdata.Example(ids, labels, images=row.images)


def build_objective(model, tokenizer, cfg, *, dtype: torch.dtype, device: torch.device) -> GRPOObjective:
    # A full policy changes every weight: its reference is a frozen copy of the start. A LoRA
    # policy's reference is its disabled adapter. Without a KL penalty there is no reference to run.
    needs_copy = cfg.grpo.policy == "full" and cfg.grpo.beta > 0
    reference = frozen_base(cfg, dtype=dtype, device=device) if needs_copy else None
    return GRPOObjective(model, tokenizer, load_grader(cfg), cfg, reference=reference)
