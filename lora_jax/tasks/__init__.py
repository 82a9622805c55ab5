"""Few-shot tasks: registry, templates and label words, k-shot sampling, encoding.

Example:
  >>> from lora_jax import tasks
  >>> task = tasks.get_task('mr')
  >>> splits = tasks.few_shot_splits(task, k=16, seed=13, test_cap=1000)
  >>> batch = tasks.encode(splits.train, tokenizer, task, max_length=128)  # doctest: +SKIP
  >>> words = tasks.label_word_ids(tokenizer, task, 'leading_space')  # doctest: +SKIP
"""

from lora_jax.tasks.encoding import encode, label_word_ids, pad_length, truncated_lengths
from lora_jax.tasks.local import csv_task, jsonl_task
from lora_jax.tasks.registry import (
    OFFLINE_TASKS,
    TASKS,
    HubUnavailableError,
    UnknownTaskError,
    get_task,
    list_tasks,
)
from lora_jax.tasks.sampling import SEEDS, FewShotSplits, few_shot_splits, sample_k_shot
from lora_jax.tasks.task import (
    WORD_STYLES,
    Examples,
    Task,
    TaskData,
    WordStyle,
    word_style_for,
    word_style_for_tokenizer,
)
from lora_jax.tasks.task_file import (
    TaskFileError,
    load_task_file,
    resolve_tasks,
    task_file_digest,
)

__all__ = [
    "OFFLINE_TASKS",
    "SEEDS",
    "TASKS",
    "WORD_STYLES",
    "Examples",
    "FewShotSplits",
    "HubUnavailableError",
    "Task",
    "TaskData",
    "TaskFileError",
    "UnknownTaskError",
    "WordStyle",
    "csv_task",
    "encode",
    "few_shot_splits",
    "get_task",
    "jsonl_task",
    "label_word_ids",
    "list_tasks",
    "load_task_file",
    "pad_length",
    "resolve_tasks",
    "sample_k_shot",
    "task_file_digest",
    "truncated_lengths",
    "word_style_for",
    "word_style_for_tokenizer",
]
