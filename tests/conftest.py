"""Shared fixtures: tiny model folders built from configs and saved with save_pretrained.

Nothing is downloaded: each model is built from a config, saved to a folder, and then loaded back
through the same `load_causal_lm` path a user's real model takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TEXTS = [
    "What is 3 + 4? 3 + 4 = 7.", "The capital of France is Paris.", "A spider has 8 legs.",
    "I can't help with that.", "Hello, Alice!", "List 3 fruits: apple, pear, plum.",
] * 40


def make_tokenizer(gpt2_like: bool = False):
    """Our byte-level BPE; gpt2_like drops the pad token and chat template like a GPT-2 base folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf.models.tokenizer import train_tokenizer

    if not gpt2_like:
        return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(gpt2_like=True)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Qwen2.5-Instruct's ChatML template (tool calls left out), with its default system turn.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_chatml_tokenizer():
    """A byte-level BPE with Qwen2's control tokens and ChatML template: EOS <|im_end|>, pad <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tiny_qwen2(path: Path) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = make_chatml_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    # Qwen2.5-Instruct's generation_config.json (plus a min_p), which must not reach our sampling.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, do_sample=True, repetition_penalty=1.5,
        temperature=0.7, top_p=0.8, top_k=20, min_p=0.1, eos_token_id=[tok.eos_token_id, tok.pad_token_id])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Llama-3-Instruct's template (tools and dates left out).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Gemma-2-it's template: the assistant is "model", every turn closed by <end_of_turn> and a newline.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _bpe(specials: list[str], **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials, **named)


def save_tiny_llama3(path: Path) -> Path:
    """A tiny Llama with Llama-3's control tokens and template: the base tokenizer's EOS <|end_of_text|>, turns
    closed by <|eot_id|>, which the generation config lists as a stop token; no pad token set (the vocabulary
    reserves <|finetune_right_pad_id|>)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"], bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>"))
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=ids("<|begin_of_text|>"), do_sample=True, temperature=0.6,
                                               top_p=0.9, eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_gemma2(path: Path) -> Path:
    """A tiny Gemma-2: final-logit and attention softcapping, sliding-window layers, its template; EOS <eos>, and
    <end_of_turn> a stop token in the generation config."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig

    tok = _bpe(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], pad_token="<pad>", eos_token="<eos>",
               bos_token="<bos>")
    tok.chat_template = GEMMA_TEMPLATE
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       final_logit_softcapping=3.0, attn_logit_softcapping=50.0, sliding_window=16,
                       pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"), bos_token_id=ids("<bos>"))
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # large logits, so that the softcap (3.0 here; 30 in Gemma-2) shapes them
        model.lm_head.weight.mul_(40.0)
    model.generation_config = GenerationConfig(bos_token_id=ids("<bos>"), pad_token_id=ids("<pad>"),
                                               eos_token_id=[ids("<eos>"), ids("<end_of_turn>")])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    return save_tiny_llama3(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory) -> Path:
    return save_tiny_gemma2(tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def write_sft_file(path: Path, n: int = 96) -> Path:
    """Arithmetic demonstrations: a pattern a 2-layer model can learn in a few dozen steps."""
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 7, (i * 3) % 5
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}) + "\n")
    return path


@pytest.fixture()
def sft_file(tmp_path) -> Path:
    return write_sft_file(tmp_path / "sft.jsonl")


PPO_PROMPTS = ["What is 3 + 4?", "Hello, Alice!", "List 3 fruits.", "The capital of France is", "A spider has"]


@pytest.fixture(scope="session")
def flat_rm(tiny_llama, tmp_path_factory) -> Path:
    """A reward model whose head is zero: every response scores 0, so only the extra components count."""
    path = tmp_path_factory.mktemp("flat_rm")
    from rlhf.models.reward import load_reward_backbone

    model, tok = load_reward_backbone(tiny_llama)
    torch.nn.init.zeros_(model.score.weight)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PPO_PROMPTS * 4))
    return path
