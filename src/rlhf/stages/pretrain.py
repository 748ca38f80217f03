"""Base model: train a tokenizer and pretrain a tiny Llama on the world's web-like corpus.

The result plays the part of the base model a user would otherwise bring: an ordinary Hugging Face
folder (safetensors, tokenizer with chat template) that ``AutoModelForCausalLM.from_pretrained``
loads. It has read the web, flaws included (wrong sums, made-up facts, compliance with harmful
requests), which is what the later stages have to fix.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from rlhf.config import PretrainConfig, require
from rlhf.configlib import to_dict
from rlhf.data.io import DataError, load_records
from rlhf.fsutil import check_out, main_process_dir, write_json_atomic
from rlhf.models.tokenizer import train_tokenizer
from rlhf.report.metrics import MetricsLogger
from rlhf.training import eval_batch_size, evaluate_loss, fit, lm_loss, make_accelerator

log = logging.getLogger("rlhf.pretrain")


def read_corpus(path: str | Path) -> list[dict]:
    """Corpus rows: {"text": str} or {"messages": [...]}; anything else is an error naming the line."""
    docs = []
    for where, row in load_records(path):
        if isinstance(row.get("text"), str) and row["text"].strip():
            docs.append({"text": row["text"]})
        elif isinstance(row.get("messages"), list) and row["messages"]:
            docs.append({"messages": row["messages"]})
        else:
            raise DataError("expected a non-empty 'text' string or a 'messages' list", path=path, location=where, field="text")
    return docs


def render_corpus(docs: list[dict], tok) -> list[str]:
    """Prose ends with EOS; chat transcripts go through the tokenizer's chat template (which ends turns with EOS)."""
    return [
        tok.apply_chat_template(d["messages"], tokenize=False) if "messages" in d else d["text"] + tok.eos_token
        for d in docs
    ]


def pack_blocks(texts: list[str], tok, seq_len: int) -> torch.Tensor:
    """Concatenate the tokenized documents and cut them into (N, seq_len) blocks (the tail is dropped)."""
    ids = [i for enc in tok(texts, add_special_tokens=False)["input_ids"] for i in enc]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)


def build_model(cfg: PretrainConfig, tok) -> LlamaForCausalLM:
    arch = cfg.arch
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(config)


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train the tokenizer and the base model; write the model folder atomically; return a summary."""
    require(cfg, "corpus", "out", stage="pretrain")
    check_out(cfg.out, stage="pretrain", kind="dir", inputs={"corpus": cfg.corpus}, overwrite=cfg.overwrite)
    docs = read_corpus(cfg.corpus)
    random.Random(cfg.train.seed).shuffle(docs)
    contents = [d.get("text") or " ".join(m["content"] for m in d["messages"]) for d in docs]
    tok = train_tokenizer(contents, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    blocks = pack_blocks(render_corpus(docs, tok), tok, cfg.seq_len)  # (N, T)
    if len(blocks) < 2:
        raise DataError(f"{cfg.corpus}: {len(docs)} documents make {len(blocks)} blocks of seq_len={cfg.seq_len} tokens; "
                        "pretraining needs at least 2 (one to train on, one to validate)", path=cfg.corpus)
    n_val = max(1, int(len(blocks) * cfg.val_fraction))
    train_blocks, val_blocks = blocks[n_val:], blocks[:n_val]
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining %.2fM parameters on %d blocks of %d tokens", n_params / 1e6, len(train_blocks), cfg.seq_len)

    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(rows)  # (B, T)
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    bs = eval_batch_size(cfg.train)
    val_batches = [collate(list(val_blocks[i : i + bs])) for i in range(0, n_val, bs)]
    acc = make_accelerator(cfg.train)
    with main_process_dir(cfg.out) as tmp:  # several processes: the main one writes
        with MetricsLogger(tmp, enabled=acc.is_main_process) as logger:
            initial_val = evaluate_loss(model, val_batches, lm_loss, acc.device)
            result = fit(model, list(train_blocks), collate, cfg.train, loss_fn=lm_loss,
                         val_batches=val_batches, logger=logger, accelerator=acc, desc="pretrain")
        model = acc.unwrap_model(model)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                   bos_token_id=tok.bos_token_id)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        summary = {
            "stage": "pretrain", "parameters": n_params, "train_tokens": int(train_blocks.numel()),
            "steps": result.steps, "processes": result.processes, "sharded": result.sharded, "initial_val_loss": initial_val, "val_loss": result.val_losses[-1] if result.val_losses else None,
            "tokens_per_sec": result.tokens_per_sec, "seconds": result.seconds, "config": to_dict(cfg),
        }
        write_json_atomic(tmp / "stage.json", summary)
    return summary
