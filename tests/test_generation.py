"""Batched generation and atomic outputs."""

import pytest

from rlhf.config import GenerationConfig
from rlhf.fsutil import atomic_dir
from rlhf.models.generation import generate, truncate_at_eos
from rlhf.models.loading import load_causal_lm
from rlhf.report.metrics import MetricsLogger, read_metrics


def test_truncate_at_first_eos_and_drop_padding():
    assert truncate_at_eos([5, 6, 2, 7, 2], {2}, 0) == ([5, 6, 2], True)
    assert truncate_at_eos([5, 6, 0, 0], {2}, 0) == ([5, 6], False)


def test_batched_generation_keeps_prompt_order_and_matches_unbatched(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    prompts = [[{"role": "user", "content": t}] for t in ("Hi", "What is 3 + 4 and then some more words?", "A")]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = generate(model, tok, prompts, cfg)
    single = [generate(model, tok, [p], GenerationConfig(max_new_tokens=6, batch_size=1))[0] for p in prompts]
    # Left padding with an attention mask must not change greedy outputs.
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) <= 6 for g in batched)
    assert all(g.ended == (g.token_ids[-1] == tok.eos_token_id) for g in batched if g.token_ids)


def test_atomic_dir_keeps_the_old_output_when_writing_fails(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folders left behind


def test_metrics_logger_writes_jsonl(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, **{"train/loss": 2.5})
        log.log(2, **{"val/loss": 2.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["train/loss"] == 2.5
