"""Load any causal LM folder the same way: ours, a tiny test model, or a user's Llama/GPT-2/Qwen.

Everything goes through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
on a local folder; there is no special path for our own models. Tokenizers without a pad token or a
chat template get them here (a new ``<|pad|>`` token, distinct from EOS, and our template), so the
saved fine-tuned folder carries them.

A folder is user input, and loading it is where untrusted files are met: custom code (``auto_map``)
runs only with ``load.trust_remote_code``; pickled weights are read with ``weights_only=True`` (plain
tensors only) and a pickle that needs more is refused; every loading failure is an rlhf error that names
the folder, not a traceback.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import LoraConfig, ModelLoadConfig
from rlhf.configlib import ConfigError
from rlhf.data.chat import SPECIALS_ATTR, STOPS_ATTR
from rlhf.rollout.common import eos_ids, stop_token_ids
from rlhf.models.tokenizer import CHAT_TEMPLATE, PAD

log = logging.getLogger("rlhf.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def check_model_dir(path: str | Path) -> Path:
    """A clear error for a folder that is not a model, instead of a hub lookup that cannot succeed offline."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json or adapter_config.json)")
    return p


def read_json_file(path: Path) -> dict:
    """A JSON object from a model folder, with an rlhf error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def adapter_base(path: Path) -> Path | str | None:
    """The base model of a LoRA adapter folder (one with adapter_config.json and no config.json).

    The recorded path is used as it is when it exists (absolute, or relative to the working directory),
    else relative to the adapter folder, so an adapter saved next to its base loads from anywhere; a name
    that is no folder here (a Hub id) is passed on to transformers as it is."""
    if (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return None
    base = read_json_file(path / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is missing")
    for candidate in (Path(base), path / base):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    return base


def model_config(path: str | Path) -> dict | None:
    """config.json of a model folder (of the base model for an adapter folder), read as plain JSON: no code
    runs. None when the base is not a folder here."""
    path = Path(path)
    base = adapter_base(path)
    folder = path if base is None else base
    return read_json_file(folder / "config.json") if isinstance(folder, Path) else None


def folder_stop_ids(path: str | Path, tok: PreTrainedTokenizerBase) -> list[int]:
    """The stop tokens of a model folder read without its causal LM (a reward model's backbone): the
    tokenizer's EOS and the EOS ids of the folder's generation_config.json."""
    gen = Path(path) / "generation_config.json"
    return sorted(stop_token_ids(tok, read_json_file(gen).get("eos_token_id") if gen.is_file() else None))


def positions_in(config: dict) -> int | None:
    """The longest sequence a model config (as a dict) was built for: max_position_embeddings, GPT-2's
    n_positions, ..., in the config or its text_config."""
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


def max_positions(path: str | Path) -> int | None:
    """The longest sequence a model folder was built for, read from its config.json (no code runs)."""
    return positions_in(model_config(path) or {})


def check_length(path: str | Path | None, length: int, setting: str) -> None:
    """Refuse a sequence length the model cannot take (GPT-2 would fail mid-run, RoPE models silently run past
    their trained positions) before any model is loaded."""
    if not path:
        return
    limit = max_positions(check_model_dir(path))
    if limit is not None and length > limit:
        raise ConfigError(f"{setting} {length} is longer than the {limit} positions the model in {path} was built for "
                          f"(its config.json); use {setting} {limit} or less")


def _check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Custom modelling code (``auto_map``) runs only when asked; a known architecture loads without it."""
    if trust_remote_code or not (path / "config.json").is_file():
        return
    cfg = read_json_file(path / "config.json")
    if not cfg.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if cfg.get("model_type") in CONFIG_MAPPING:
        log.warning("%s ships its own modelling code (auto_map); loading the built-in %s implementation instead "
                    "(pass --load.trust_remote_code to run the folder's code)", path, cfg["model_type"])
        return
    raise ConfigError(f"{path} needs the Python code it ships (config.json auto_map, model_type "
                      f"{cfg.get('model_type')!r}), which rlhf does not run unless asked: pass --load.trust_remote_code "
                      "if you trust its source")


def _note_pickles(path: Path) -> None:
    if not path.is_dir():
        return
    files = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if files and not any(path.glob("*.safetensors")):
        log.warning("%s holds pickled weights only (%s); safetensors is preferred. They are read with "
                    "torch.load(weights_only=True), which refuses anything but plain tensors", path, ", ".join(sorted(files)))


def from_pretrained(auto_cls, path: str | Path, load: ModelLoadConfig, **kwargs) -> PreTrainedModel:
    """``auto_cls.from_pretrained`` on a local folder (or an adapter's base by name), with rlhf errors for
    custom code, unsafe pickles and broken folders."""
    path = Path(path)
    _check_remote_code(path, load.trust_remote_code)
    _note_pickles(path)
    if load.attn_implementation != "auto":
        kwargs["attn_implementation"] = load.attn_implementation
    try:
        return auto_cls.from_pretrained(str(path), dtype=DTYPES[load.dtype], trust_remote_code=load.trust_remote_code,
                                        **kwargs)
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
        raise ConfigError(f"{path}: refused to load its pickled weights, which hold more than plain tensors "
                          f"({reason.strip()}). rlhf reads pickles only with weights_only=True, and "
                          "--load.trust_remote_code does not change that: convert the weights to safetensors "
                          "with a tool you trust") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the model in {path}: {first}") from e


def load_tokenizer(path: str | Path, load: ModelLoadConfig | None = None, *, template: bool = True
                   ) -> PreTrainedTokenizerBase:
    """Load a tokenizer and (``template``) make sure it has a chat template; the pad token is handled in
    load_causal_lm. How control tokens inside user text are encoded follows load.special_tokens_in_text."""
    load = load or ModelLoadConfig()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=load.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (pass --load.trust_remote_code if it needs its own code and you trust it)" if "trust_remote_code" in str(e) else ""
        raise ConfigError(f"cannot load the tokenizer in {path}: {first}{hint}") from e
    if template and not tok.chat_template:
        log.info("%s has no chat template; using the rlhf template", path)
        tok.chat_template = CHAT_TEMPLATE
    setattr(tok, SPECIALS_ATTR, load.special_tokens_in_text)
    return tok


# Tokens that families reserve for padding, or leave unused, in order of preference (Llama-3's
# <|finetune_right_pad_id|>, Qwen's <|endoftext|> where <|im_end|> is EOS, a reserved special token).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<|reserved_special_token_0|>")


def reserved_pad(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> str | None:
    """A pad-like token the vocabulary already has (not EOS, not a stop token, inside the embeddings)."""
    stop = eos_ids(model, tok)
    vocab, rows = tok.get_vocab(), model.get_input_embeddings().weight.shape[0]
    for name in PAD_CANDIDATES:
        i = vocab.get(name)
        if i is not None and i not in stop and i < rows:
            return name
    return None


def ensure_pad_token(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from EOS: one the vocabulary reserves for it if there is one
    (no new embedding row, so the folder stays loadable by its original code), else a new ``<|pad|>``."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        model.config.pad_token_id = tok.pad_token_id
        return
    found = reserved_pad(model, tok)
    if found is not None:
        tok.pad_token = found
    else:
        tok.add_special_tokens({"pad_token": PAD})
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # classifiers have none
        model.generation_config.pad_token_id = tok.pad_token_id


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: log-probs and rewards must be the same in every forward pass (an RLHF detail)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def load_causal_lm(
    path: str | Path, load: ModelLoadConfig | None = None, *, gradient_checkpointing: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model folder (full weights, or a LoRA adapter folder with its base) and its tokenizer."""
    load = load or ModelLoadConfig()
    path = check_model_dir(path)
    base = adapter_base(path)
    tok = load_tokenizer(path if (path / "tokenizer_config.json").is_file() or base is None else str(base), load)
    if base is not None:
        from peft import PeftModel

        model = from_pretrained(AutoModelForCausalLM, str(base), load)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:  # the adapter was trained with an added pad token
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    else:
        model = from_pretrained(AutoModelForCausalLM, path, load)
    ensure_pad_token(model, tok)
    setattr(tok, STOPS_ATTR, sorted(eos_ids(model, tok)))  # where a response ends, for encoding as for generation
    # The tiny models here do not need dropout; users who want it can set it in the model config.
    disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The names (last part) of the layers LoRA can adapt: nn.Linear, and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, (torch.nn.Linear, Conv1D))})


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """Wrap the model with LoRA adapters; only the adapters stay trainable.

    With task_type "SEQ_CLS" (reward models) peft also trains the new scalar head in full.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    linear = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in linear]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} are not linear layers of {type(model).__name__}; its "
                          f"linear layers are: {', '.join(linear) or 'none'}")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type=task_type)
    if getattr(model, "is_activation_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    return get_peft_model(model, peft_cfg)


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: str | Path, *, lora_save: str = "merged") -> None:
    """Write an ordinary HF folder (safetensors); a LoRA model is merged unless asked to keep the adapter.

    An adapter folder records its base model as an absolute path, so ``AutoPeftModelForCausalLM`` and
    ``rlhf eval`` load it from any working directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and lora_save == "merged":
        model = model.merge_and_unload()
    if hasattr(model, "peft_config"):
        for adapter in model.peft_config.values():
            base = adapter.base_model_name_or_path
            if base and Path(base).exists():
                adapter.base_model_name_or_path = str(Path(base).resolve())
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
