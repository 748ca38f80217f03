"""Datasets: loading and validating user files (clear errors with file:line), chat formatting, collation."""

from .io import (
    DataError,
    LoadResult,
    Message,
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preferences,
    load_prompts,
    load_records,
    load_sft,
    read_jsonl,
    to_record,
    write_jsonl_atomic,
)

__all__ = [
    "DataError",
    "LoadResult",
    "Message",
    "PreferenceExample",
    "PromptExample",
    "SFTExample",
    "load_preferences",
    "load_prompts",
    "load_records",
    "load_sft",
    "read_jsonl",
    "to_record",
    "write_jsonl_atomic",
]
