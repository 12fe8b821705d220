"""Distillation tools beside the `distill` method (`methods/distill.py`, the token-level objective):

    from tuneforge.distill import init_student, generate_teacher_data
    init_student("runs/teacher", "students/half", every=2)        # keep every 2nd teacher layer
    init_student("runs/teacher", "students/11", most_influential_of=(11, "train.jsonl"))  # by block influence
    generate_teacher_data("runs/teacher", "prompts.jsonl", "teacher.jsonl", max_new_tokens=128)

`init_student` builds a smaller student from a subset of the teacher's layers; `generate_teacher_data`
writes the teacher's answers as chat data, for sequence-level distillation (any tokenizers).
"""

from .student import StudentInit, init_student, layers_to_keep
from .teacher_data import TeacherData, generate_teacher_data, read_prompts

__all__ = ["StudentInit", "TeacherData", "generate_teacher_data", "init_student", "layers_to_keep", "read_prompts"]
