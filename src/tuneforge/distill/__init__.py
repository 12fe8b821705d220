"""Distillation tools beside the `distill` method (`methods/distill.py`, the token-level objective):

    from tuneforge.distill import init_student, generate_teacher_data
    init_student("runs/teacher", "students/half", every=2)        # keep every 2nd teacher layer
    init_student("runs/teacher", "students/11", most_influential_of=(11, "train.jsonl"))  # by block influence
    generate_teacher_data("runs/teacher", "prompts.jsonl", "teacher.jsonl", max_new_tokens=128)
    generate_teacher_data("runs/sft", "prompts.jsonl", "pairs.jsonl", samples=8, grader="rw.py:score", keep="pairs")

`init_student` builds a smaller student from a subset of the teacher's layers; `generate_teacher_data`
writes the teacher's answers as chat data, for sequence-level distillation (any tokenizers), or with
`samples` and a `grader` the best of N sampled answers as chat rows, or best-vs-worst as DPO pairs.
"""

from .student import StudentInit, init_student, layers_to_keep
from .teacher_data import TeacherData, generate_teacher_data, read_prompts

__all__ = ["StudentInit", "TeacherData", "generate_teacher_data", "init_student", "layers_to_keep", "read_prompts"]
