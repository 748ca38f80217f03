"""Load any causal LM folder the same way: ours, a tiny test model, or a user's Llama/GPT-2/Qwen.

Everything goes through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
on a local folder; there is no special path for our own models. Tokenizers without a pad token or a
chat template get them here (a new ``<|pad|>`` token, distinct from EOS, and our template), so the
saved fine-tuned folder carries them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import LoraConfig, ModelLoadConfig
from rlhf.models.tokenizer import CHAT_TEMPLATE, PAD

log = logging.getLogger("rlhf.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str | Path) -> Path:
    """A clear error for a folder that is not a model, instead of a hub lookup that cannot succeed offline."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json or adapter_config.json)")
    return p


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a chat template; the pad token is handled in load_causal_lm."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        log.info("%s has no chat template; using the rlhf template", path)
        tok.chat_template = CHAT_TEMPLATE
    return tok


def ensure_pad_token(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from EOS, growing the embeddings if it is new."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        model.config.pad_token_id = tok.pad_token_id
        return
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD})
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # classifiers have none
        model.generation_config.pad_token_id = tok.pad_token_id


def load_causal_lm(
    path: str | Path, load: ModelLoadConfig | None = None, *, gradient_checkpointing: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model folder (full weights, or a LoRA adapter folder with its base) and its tokenizer."""
    load = load or ModelLoadConfig()
    path = check_model_dir(path)
    tok = load_tokenizer(path, load.trust_remote_code)
    kwargs = dict(dtype=DTYPES[load.dtype], trust_remote_code=load.trust_remote_code,
                  attn_implementation=load.attn_implementation)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), **kwargs).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    ensure_pad_token(model, tok)
    # Dropout off: log-probs must be the same in every forward pass of a rollout (an RLHF detail) and
    # the tiny models here do not need it. Users who want it can set it in the model config.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """Wrap the model with LoRA adapters; only the adapters stay trainable.

    With task_type "SEQ_CLS" (reward models) peft also trains the new scalar head in full.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} not found in {type(model).__name__}; "
            f"linear layers here include: {sorted(n for n in names if 'proj' in n or 'attn' in n)[:12]}"
        )
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type=task_type)
    if getattr(model, "is_activation_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    return get_peft_model(model, peft_cfg)


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: str | Path, *, lora_save: str = "merged") -> None:
    """Write an ordinary HF folder (safetensors); a LoRA model is merged unless asked to keep the adapter."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and lora_save == "merged":
        model = model.merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
