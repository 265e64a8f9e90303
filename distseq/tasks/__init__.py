"""Tasks: the task contract (``base``), heads (``heads``), the built-in feature tasks (``synthetic``) and
token tasks (``tokens``), and exact sampling without replacement (``sampling``).

    from distseq.tasks import IGNORE, Task, TaskSpec, register_task
"""

from distseq.tasks.base import Batch, Task, TaskSpec, as_task, register_task, spec_for
from distseq.tasks.heads import HEADS, IGNORE

__all__ = ["Batch", "HEADS", "IGNORE", "Task", "TaskSpec", "as_task", "register_task", "spec_for"]
