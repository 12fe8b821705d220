"""Tasks: the demonstration task (support-ticket triage), generation metrics and the general sets
that measure forgetting.

- `tuneforge.tasks.support_triage`: the Nimbus Cloud triage task: system prompt, labels, data
  generator and scorer.
- `tuneforge.tasks.metrics`: generic metrics over generated text and the `METRICS` registry that
  `eval.task` names.
- `tuneforge.tasks.general`: general questions, prose and prompts, untouched by any training set.
"""
