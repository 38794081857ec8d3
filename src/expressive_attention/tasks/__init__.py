"""Sequence task generators: registry, train/eval streams, the task families and their ladders.

    task = make_task("pointer", T=8)
    x, y, mask = task.sample(32, train_generator(0))   # (32, 64) each; score only where mask
    x, y, mask = task.sample(1024, eval_generator(0))  # held out: never a training input row

Add a task: subclass Task, implement params/describe/_sample_raw, decorate with @register_task("name").
"""
from .base import (SPLITS, TASKS, SplitGenerator, Task, check_int, eval_generator, in_eval_split,
                   import_task_modules, make_task, register_task, train_generator)
from .lagged import LaggedDigitsTask, LaggedSumTask, draw_lags
from .multitask import MultiTask, MultiTaskNoToken
from .pointer import PointerTask
from .recall import RecallTask
from .ladders import LADDERS, ladder  # noqa: E402  (needs the registered tasks)

__all__ = [
    "SPLITS", "TASKS", "LADDERS", "SplitGenerator", "Task", "check_int", "eval_generator", "in_eval_split",
    "import_task_modules", "make_task", "register_task", "train_generator", "ladder", "draw_lags",
    "LaggedSumTask", "LaggedDigitsTask", "PointerTask", "RecallTask", "MultiTask", "MultiTaskNoToken",
]
