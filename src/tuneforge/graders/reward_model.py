"""reward_model (ours): the score a reward model gives the sample's answer to the item's prompt.

    {"type": "reward_model", "name": "rm", "model": "runs/rm"}

`model` is a `method: reward` run (its final/ adapter, or a run that trained every weight), its merged
export, or any sequence classifier with one output that `models.resolve` finds. The item's `prompt`
(a text prompt, or its messages, as GRPO and `tuneforge eval --grader` give it) and the sample's
output_text as the assistant's reply are rendered with the reward model's chat template, and the score
is its output at the last token that is not the pad token, as `method: reward` trained it. The spec is
checked without loading the weights; they load on the first grade, on the GPU where there is one.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import TuneforgeError
from .base import Grader, GraderError, checked_score, grading_failed, spec_text


class RewardModelGrader(Grader):
    type = "reward_model"
    keys = ("model",)

    def __init__(self, spec: dict, name: str, label: str):
        from ..models import resolve
        from ..models.loading import is_sequence_classifier

        super().__init__(name, label)
        model = spec_text(spec, "model", label)
        try:
            self.source = resolve(model, pull_missing=False)
        except TuneforgeError as error:
            raise GraderError(f"grader {label}: `model` {model}: {error.message}") from None
        if not is_sequence_classifier(self.source):
            raise GraderError(
                f"grader {label}: `model` {model} is not a reward model (a sequence classifier with one output); "
                "give a method: reward run, its merged export, or another sequence classifier"
            )
        self._loaded = None

    def model_files(self) -> list[tuple[str, int, int]]:
        from ..methods.distill import source_files

        return source_files(self.source)

    def _model(self):
        import torch  # here: the graders load without torch (the jobs API, a python grader's child process)

        from ..models import load_model, load_tokenizer

        if self._loaded is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            model = load_model(self.source, dtype=dtype).to(device).eval()
            self._loaded = model, load_tokenizer(self.source)
        return self._loaded

    def _grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[float]:
        import torch

        model, tokenizer = self._model()
        scores = []
        for index, (sample, item) in enumerate(zip(samples, items)):
            prompt = item.get("prompt")
            if isinstance(prompt, str) and prompt:
                prompt = [{"role": "user", "content": prompt}]
            if not isinstance(prompt, list) or not prompt:
                raise grading_failed(
                    self.label, "the item has no prompt (item.prompt) to score the answer to", samples, index
                )
            conversation = [*prompt, {"role": "assistant", "content": sample["output_text"]}]
            ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
            # One conversation a forward: the score is at its last token that is not the pad token (the
            # config's, which `load_model` sets as training had it), as `method: reward` trained it.
            with torch.no_grad():
                score = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, 0].float().item()
            scores.append(checked_score(score, self.label, samples, index))
        return scores
