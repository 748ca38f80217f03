"""The assistant world: a small deterministic world where what a careful rater prefers is known.

tasks      the six families, their phrasings, the train/held-out split, `make_tasks`, `parse_prompt`
judge      the gold judge (`judge`, `judge_prompt`, `summarise`): the only source of truth
annotators simulated raters with Bradley-Terry noise and quirks around the gold judge
corpora    demonstrations, web-like flawed replies, the pretraining corpus, prompt sets, `write_world`
"""

from rlhf.world.annotators import DEFAULT_ANNOTATORS, Annotator, annotator
from rlhf.world.corpora import (
    derive_seed,
    flawed_response,
    good_response,
    pretrain_corpus,
    prompt_set,
    sft_demos,
    web_response,
    write_world,
)
from rlhf.world.judge import ANSWERABLE, IDEAL_WORDS, RATES, WEIGHTS, Judgement, judge, judge_prompt, summarise
from rlhf.world.tasks import FAMILIES, SPLITS, Task, all_tasks, make_tasks, parse_prompt, sample_task

__all__ = [
    "FAMILIES", "SPLITS", "Task", "make_tasks", "all_tasks", "parse_prompt", "sample_task",
    "Judgement", "judge", "judge_prompt", "summarise", "WEIGHTS", "IDEAL_WORDS", "ANSWERABLE", "RATES",
    "Annotator", "DEFAULT_ANNOTATORS", "annotator",
    "good_response", "flawed_response", "web_response", "pretrain_corpus", "sft_demos",
    "prompt_set", "write_world", "derive_seed",
]
