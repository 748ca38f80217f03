"""Typed configs for every stage, grouped by concern.

Each field's docstring is its ``--help`` text. Derived values (effective batch size, number of
steps) are properties or are computed by the stage, never configured. Paths that a pipeline run
fills in (``model``, ``data``, ``out``) default to null and are required only when a stage is run
on its own (see :func:`require`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.configlib import ConfigError


def require(cfg: object, *names: str, stage: str, group: str = "") -> None:
    """Fail before any work starts when a path the stage needs was not given; ``group`` is the dotted
    section the fields sit in ("data."), so the hint names the real flag (--data.path)."""
    missing = [f"{group}{n}" for n in names if getattr(cfg, n) in (None, "")]
    if missing:
        flags = ", ".join(f"--{n}" for n in missing)
        raise ConfigError(f"{stage}: missing required setting(s) {', '.join(missing)} (pass {flags} or set them in the YAML)")


def check_numbers(cfg: object, section: str, *, positive: tuple[str, ...] = (), at_least_one: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = (), fraction: tuple[str, ...] = ()) -> None:
    """Range checks with the field's dotted name in the message; a field that is None (optional) passes.

    positive: > 0; at_least_one: integers >= 1; non_negative: >= 0; fraction: in [0, 1]."""
    rules = [(positive, lambda v: v > 0, "> 0"), (at_least_one, lambda v: v >= 1, ">= 1"),
             (non_negative, lambda v: v >= 0, ">= 0"), (fraction, lambda v: 0 <= v <= 1, "in [0, 1]")]
    for names, ok, text in rules:
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not ok(value):
                raise ConfigError(f"{section}{name}: must be {text}, got {value}")


@dataclass
class TrainConfig:
    """Optimisation settings shared by pretraining, SFT and the reward model."""

    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps; overrides epochs."""
    batch_size: int = 16
    """Global batch: sequences (pairs for a reward model) per optimiser step, over all processes. Each process
    takes batch_size / processes of them, in micro-batches of micro_batch_size accumulated into one step."""
    micro_batch_size: int | None = None
    """Sequences per forward pass on each device (null: batch_size / processes, no accumulation). Gradient
    accumulation steps = batch_size / (micro_batch_size * processes), derived and printed at the start."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a share of the peak learning rate (cosine and linear)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    eval_every: int = 0
    """Run validation every N optimiser steps (0: at the end of each epoch)."""
    early_stopping_patience: int = 0
    """Stop after this many validations without improvement, keeping the best weights (0: off)."""
    log_every: int = 10
    """Write metrics every N optimiser steps."""
    seed: int = 0
    """Seed for the data order, initialisation of new weights and dropout."""
    mixed_precision: Literal["no", "bf16", "auto"] = "no"
    """bf16 autocast through accelerate (weights and optimiser stay fp32). 'auto': bf16 where the hardware
    runs it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    group_by_length: bool = False
    """Batch samples of similar length together (transformers' LengthGroupedSampler: the shuffled samples are cut
    into groups of 50 batches, each sorted by length; the batches are then shuffled): far less padding for
    variable-length samples, the same data each epoch. No effect on packed pretraining blocks."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1 or null, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.eval_every < 0 or self.early_stopping_patience < 0 or self.max_grad_norm < 0:
            raise ConfigError("train.eval_every, train.early_stopping_patience and train.max_grad_norm must be >= 0")
        check_numbers(self, "train.", non_negative=("weight_decay",))


@dataclass
class LoraConfig:
    """Low-rank adapters through peft."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 8
    """Rank of the adapters."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt (Llama/Qwen: q_proj, k_proj, v_proj, o_proj; GPT-2: c_attn)."""
    save: Literal["merged", "adapter"] = "merged"
    """Save merged full weights (loads anywhere) or only the adapter (small; needs the base model)."""

    def validate(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ConfigError(f"lora.r and lora.alpha must be >= 1, got r={self.r}, alpha={self.alpha}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: must name at least one module")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class DataConfig:
    """Where the examples come from and how they are cut to length."""

    path: str | None = None
    """Training data: a .jsonl/.json/.parquet/.csv file or a `datasets` folder saved with save_to_disk."""
    val_path: str | None = None
    """Validation data in the same formats; when null, val_fraction of the training data is held out."""
    val_fraction: float = 0.05
    """Share of the training data held out for validation when val_path is null."""
    max_length: int = 256
    """Longest sample in tokens (prompt + response, after the chat template)."""
    truncation: Literal["left", "right", "error"] = "left"
    """Overlong samples: 'left' drops the oldest prompt tokens and keeps the response whole, 'right' cuts
    the end (the response may lose its EOS), 'error' treats them as bad rows (see on_error). A sample
    with no response token left is dropped and counted."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad rows (malformed, missing or empty fields, too long with truncation='error'): fail on the first,
    or skip them and print how many and the first reasons."""
    assistant_turns: Literal["all", "last"] = "all"
    """SFT on multi-turn `messages` rows: train on every assistant turn (as TRL's assistant_only_loss does) or
    on the last one only. User and system turns are never trained on."""

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: must be >= 8, got {self.max_length}")


@dataclass
class ModelLoadConfig:
    """How a model folder is loaded."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype at load time (training keeps fp32 master weights unless you choose otherwise)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model folder. Off unless you trust the source."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel: 'auto' lets transformers choose for the model (sdpa where the model supports it, eager
    for Gemma-2's softcapped attention); flash_attention_2 needs the flash-attn package and a GPU."""
    special_tokens_in_text: Literal["text", "control"] = "text"
    """The tokenizer's control tokens (<|im_end|>, <|im_start|>, the pad token...) written inside a prompt or a
    response: 'text' encodes them as plain text, so user text cannot forge a turn or train a pad or EOS inside
    a reply (rows that hold them are counted in the log); 'control' reads them as the control tokens."""


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on demonstrations; the loss covers response tokens only."""

    model: str | None = None
    """The causal LM folder to fine-tune (ours, or a Llama/GPT-2/Qwen folder on disk)."""
    out: str | None = None
    """Output folder: an ordinary Hugging Face model folder plus metrics.jsonl."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    data: DataConfig = field(default_factory=DataConfig)
    padding_free: bool = True
    """Pack each batch's samples side by side in as few rows as hold them, attention kept within each sample
    (TRL's padding_free): the padded batch's loss and gradients with less computed. Used where the
    architecture masks packed samples (Llama, Mistral, Qwen2, Gemma-2, GPT-2); padded batches elsewhere."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=2e-5))
    lora: LoraConfig = field(default_factory=LoraConfig)
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        if self.load.dtype != "float32" and not self.lora.enabled:
            raise ConfigError(
                f"load.dtype={self.load.dtype!r} trains all weights in low precision; use float32 with "
                "train.mixed_precision bf16 or enable lora"
            )


@dataclass
class TokenizerConfig:
    """The byte-level BPE tokenizer trained on the corpus."""

    vocab_size: int = 2048
    """Vocabulary size including the special tokens."""
    min_frequency: int = 2
    """Least count for a merge to be learned."""

    def validate(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"tokenizer.vocab_size: must be >= 260 (256 bytes and the special tokens), got {self.vocab_size}")
        check_numbers(self, "tokenizer.", at_least_one=("min_frequency",))


@dataclass
class ArchConfig:
    """Shape of the tiny LlamaForCausalLM that plays the base model."""

    hidden_size: int = 192
    """Width of the residual stream."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size must divide evenly)."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 512
    """Longest sequence the model supports."""

    def validate(self) -> None:
        check_numbers(self, "arch.", at_least_one=("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                   "max_position_embeddings"))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"arch.hidden_size ({self.hidden_size}) must be divisible by arch.num_heads ({self.num_heads})")


@dataclass
class PretrainConfig:
    """Base model: train a tokenizer and pretrain a tiny Llama on the world's web-like corpus."""

    corpus: str | None = None
    """JSONL corpus: rows of {"text"} (prose) or {"messages"} (chat transcripts, rendered with the chat template)."""
    out: str | None = None
    """Output folder: model (safetensors), tokenizer with chat template, metrics.jsonl."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    seq_len: int = 128
    """Tokens per packed training block."""
    val_fraction: float = 0.02
    """Share of the blocks held out for validation loss."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=2, batch_size=32, lr=2e-3, weight_decay=0.1, warmup_ratio=0.03)
    )

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be >= 2, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.seq_len > self.arch.max_position_embeddings:
            raise ConfigError(
                f"seq_len ({self.seq_len}) exceeds arch.max_position_embeddings ({self.arch.max_position_embeddings})"
            )


@dataclass
class WorldConfig:
    """The embedded assistant world: how much of each artefact to generate."""

    seed: int = 0
    """Seed for every generator of the world."""
    n_pretrain: int = 20000
    """Documents in the web-like pretraining corpus."""
    n_sft: int = 2000
    """SFT demonstrations (train split)."""
    n_sft_val: int = 200
    """SFT validation demonstrations."""
    n_prompts_train: int = 1000
    """Training prompts for preference collection and RL."""
    n_prompts_heldout: int = 300
    """Held-out evaluation prompts (held-out phrasings and entities included)."""
    n_prompts_deploy: int = 0
    """Deployment prompts (phrasings and entities of neither split; the rounds after the first collect their pairs
    on them), and the deployment facts in the pretraining prose; 0: no deployment split (the world as without it)."""

    def validate(self) -> None:
        for name in ("n_pretrain", "n_sft", "n_sft_val", "n_prompts_train", "n_prompts_heldout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"world.{name}: must be >= 1")
        if self.n_prompts_deploy < 0:
            raise ConfigError(f"world.n_prompts_deploy: must be >= 0, got {self.n_prompts_deploy}")


@dataclass
class GenerationConfig:
    """Sampling settings for evaluation and rollouts."""

    max_new_tokens: int = 48
    """Longest response in tokens."""
    do_sample: bool = False
    """Sample (with temperature/top_p and the seed) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (do_sample only)."""
    top_p: float = 1.0
    """Nucleus sampling mass (do_sample only)."""
    sampler: Literal["multinomial", "inverse_cdf"] = "inverse_cdf"
    """How a token is drawn (do_sample only): inverse_cdf (one uniform per row, the CDF inverted in fp32: cheap
    on CPU, and a row draws the same whichever rows share its batch) or multinomial (torch.multinomial, as
    generate draws). The same distribution; different random streams."""
    batch_size: int = 64
    """Prompts per generation batch (left-padded)."""
    backend: Literal["auto", "static", "hf"] = "auto"
    """Rollout engine: static (our decode loop: preallocated KV cache, inline sampling, finished rows leave the
    batch; returns each token's log-prob), hf (transformers' generate, the reference), auto (static where the
    model's cache can be static, else hf)."""
    compact: float = 0.25
    """static engine: once this share of the decoding batch has stopped, the stopped rows leave it (0: at every
    stop; 1: never)."""

    def validate(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("generation: need temperature > 0, 0 < top_p <= 1, max_new_tokens >= 1, batch_size >= 1")
        if not 0 <= self.compact <= 1:
            raise ConfigError(f"generation.compact: must be in [0, 1], got {self.compact}")


@dataclass
class EvalConfig:
    """Policy evaluation on the world's held-out prompts, judged by the gold judge."""

    model: str | None = None
    """Model folder to evaluate."""
    against: str | None = None
    """A second model folder; adds win_rate of `model` over it on the same prompts (ties count half)."""
    out: str | None = None
    """Output JSON file."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    prompts: str | None = None
    """Prompt file (JSONL with 'prompt'); null: the world's held-out prompts generated with eval.seed."""
    n_prompts: int = 300
    """Prompts to evaluate (balanced over families when generated)."""
    seed: int = 0
    """Seed for prompt generation and sampling."""
    constitution: str | None = None
    """Constitution YAML (or a packaged name: world, hhh): adds the violation rate per principle."""
    steer: bool = False
    """Generate with the constitution's logits processor (banned phrases cannot be written)."""
    reward_model: str | None = None
    """Reward model folder: adds the mean RM reward of the responses (the proxy beside the gold score)."""
    redteam: bool = False
    """Also attack the model with the world's red-team cases under every strategy (the summary goes in the JSON)."""
    perplexity_text: str | None = None
    """Held-out text (JSONL with "text", or SFT records) for perplexity, the capability side of the alignment tax;
    null in the world: its held-out pretraining text."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        check_numbers(self, "eval.", at_least_one=("n_prompts",))


@dataclass
class RedteamConfig:
    """Red teaming (`rlhf redteam`): harmful requests times attack strategies, judged for compliance."""

    model: str | None = None
    """Model folder to attack."""
    against: str | None = None
    """A second model folder attacked with the same conversations (key `against` in the output)."""
    out: str | None = None
    """Output folder: redteam.json (and redteam.samples.jsonl)."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    cases: str | None = None
    """Test cases (JSONL with `category` and `request`); null: the assistant world's harmful intents."""
    strategies: list[str] = field(default_factory=list)
    """Attack strategies by name (empty: all of direct, roleplay, hypothetical, prefix_injection, obfuscation,
    instruction_override, multi_turn)."""
    constitution: str | None = "world"
    """Constitution (file or packaged name) that judges requests outside the world, and steers when `steer`."""
    steer: bool = False
    """Generate with the constitution's logits processor (the deployment-time guard)."""
    repeats: int = 1
    """Draws per case and strategy (wordings and typos are drawn at random)."""
    seed: int = 0
    """Seed for wordings, typos and sampling."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        check_numbers(self, "redteam.", at_least_one=("repeats",))


@dataclass
class SafetyConfig:
    """PPO's safety and anti-hacking reward terms, added through its extra-reward hook."""

    constitution: str | None = None
    """Constitution YAML (or packaged name: world, hhh) whose violations are penalised (null: none)."""
    safety_weight: float = 0.0
    """Weight of the safety reward: minus the summed severity of violated principles."""
    length_target: int = 30
    """Words a response may use before the length penalty starts."""
    length_weight: float = 0.0
    """Weight of the length penalty (0 up to length_target words, then -excess/target, at most -1)."""
    repetition_weight: float = 0.0
    """Weight of the repetition penalty (minus the share of repeated word trigrams)."""
    diversity_weight: float = 0.0
    """Weight of the diversity bonus (1 minus a response's largest bigram overlap with the rest of its batch)."""
    steer: bool = False
    """Sample rollouts through the constitution's logits processor (banned phrases cannot be written)."""
    redteam_share: float = 0.0
    """Share of PPO prompts that are red-team attacks on the world's training harmful intents, or (a
    `redteam_contrast` share of them) the same framings around its benign scary-word requests (training
    wordings only: evaluation wordings and held-out requests stay unseen)."""
    redteam_contrast: float = 0.5
    """Share of those red-team prompts that frame a benign scary-word request; a larger share teaches that the
    request, not the framing, calls for a refusal (less over-refusal, at some cost in attack resistance)."""

    def validate(self) -> None:
        if not 0 <= self.redteam_share < 1:
            raise ConfigError(f"ppo.safety.redteam_share: must be in [0, 1), got {self.redteam_share}")
        if not 0 <= self.redteam_contrast <= 1:
            raise ConfigError(f"ppo.safety.redteam_contrast: must be in [0, 1], got {self.redteam_contrast}")
        check_numbers(self, "ppo.safety.", non_negative=("safety_weight", "length_weight", "repetition_weight",
                                                         "diversity_weight"), at_least_one=("length_target",))
        if (self.safety_weight or self.steer) and not self.constitution:
            raise ConfigError("ppo.safety.safety_weight > 0 and ppo.safety.steer need ppo.safety.constitution")


@dataclass
class CollectConfig:
    """Preference data from a policy: K sampled responses per prompt, paired, labelled by simulated annotators."""

    policy: str | None = None
    """Policy folder that writes the responses (by default the SFT model)."""
    prompts: str | None = None
    """Prompt file (JSONL with 'prompt'); the simulated annotators know assistant-world prompts only."""
    out: str | None = None
    """Output preference JSONL: prompt, chosen, rejected, margin, annotator, plus gold fields for evaluation."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    n_prompts: int | None = None
    """Use the first N prompts of the file (null: all)."""
    k: int = 4
    """Responses sampled per prompt; every distinct pair of them is labelled (K(K-1)/2 pairs)."""
    annotators: list[str] = field(default_factory=lambda: ["careful", "average", "length_lover", "random_clicker"])
    """Simulated annotators (careful, average, length_lover, random_clicker); each pair goes to one at random."""
    overlap: float = 0.2
    """Share of pairs labelled by every annotator, so that agreement (kappa, alpha) can be measured."""
    mismatch_pairs: int = 0
    """Extra pairs per prompt that pit one of its responses against one written for another prompt, so the
    reward model learns that a fluent answer to a different question is worse (0: on-policy pairs only)."""
    against: str | None = None
    """A second policy folder (rounds set it: the policy the previous round started from): `against_pairs` more
    pairs per prompt pit one of the policy's responses against one of this policy's, so the reward model sees what
    the last update changed."""
    against_pairs: int = 0
    """Pairs per prompt against `against`'s responses (0: none)."""
    seed: int = 0
    """Seed for sampling, annotator assignment and label noise."""
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=48, batch_size=128)
    )
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        if self.k < 2:
            raise ConfigError(f"collect.k: need at least 2 responses per prompt to form a pair, got {self.k}")
        if not 0 <= self.overlap <= 1:
            raise ConfigError(f"collect.overlap: must be in [0, 1], got {self.overlap}")
        check_numbers(self, "collect.", at_least_one=("n_prompts",))
        if self.mismatch_pairs < 0 or self.against_pairs < 0:
            raise ConfigError(f"collect.mismatch_pairs, collect.against_pairs: must be >= 0, got {self.mismatch_pairs}, "
                              f"{self.against_pairs}")
        if not self.annotators:
            raise ConfigError("collect.annotators: name at least one annotator")


@dataclass
class RewardLossConfig:
    """The pairwise loss: Bradley-Terry plus optional margin and centering terms."""

    margin_weight: float = 0.0
    """Weight of the hinge term relu(margin - (r_chosen - r_rejected)) added to -logsigmoid(r_chosen - r_rejected) (0: off)."""
    margin: float = 1.0
    """Margin of the hinge term when the data carries none (or use_data_margin is off)."""
    use_data_margin: bool = False
    """Use each pair's 'margin' field (how strongly chosen was preferred) in the hinge term where present."""
    center_coef: float = 0.0
    """Reward centering (Eisenstein et al. 2023): coef * (r_chosen + r_rejected)^2 keeps rewards near 0."""

    def validate(self) -> None:
        if self.margin_weight < 0 or self.center_coef < 0:
            raise ConfigError("loss.margin_weight and loss.center_coef must be >= 0")
        if self.use_data_margin and not self.margin_weight:
            raise ConfigError("loss.use_data_margin: the data's margins enter the hinge term only, which is off "
                              "(loss.margin_weight is 0); set loss.margin_weight > 0 too")


@dataclass
class RewardNormConfig:
    """Reward normalisation: the mean and std of the reward on policy samples, stored in the model config."""

    policy: str | None = None
    """Sample fresh responses from this policy folder; null: use the responses in the training data
    (which are policy samples when the data came from `rlhf collect`)."""
    prompts: str | None = None
    """Prompt file for the fresh samples (needed with policy)."""
    n: int = 512
    """Responses scored for the statistics."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(do_sample=True, batch_size=128))

    def validate(self) -> None:
        if self.n < 2:
            raise ConfigError(f"normalize.n: must be >= 2 (a standard deviation needs two samples), got {self.n}")


@dataclass
class RewardConfig:
    """Stage 2: a reward model (or an ensemble of them) trained on preference pairs."""

    model: str | None = None
    """Backbone folder: any causal LM (by default the SFT model) or an encoder such as BERT."""
    out: str | None = None
    """Output folder: an AutoModelForSequenceClassification folder (num_labels=1), or member_*/ folders
    and ensemble.json for an ensemble."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(val_fraction=0.05))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-5, batch_size=16))
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    exclude_annotators: list[str] = field(default_factory=list)
    """Drop the labels of these annotators (the 'annotator' field) before training."""
    drop_flagged_annotators: bool = False
    """Drop the labels of annotators whose mean Cohen's kappa with the others on shared pairs is below 0.2
    ("slight" agreement: what random clicking gets): as `rlhf collect` measured it (its FILE.stats.json beside
    the training file, ties counted), else measured on the training file's pairs."""
    ensemble: int = 1
    """Members to train; each gets its own seed (train.seed + i) and, with bootstrap, its own resample."""
    bootstrap: bool = True
    """Train each ensemble member on a bootstrap resample of the training pairs (ensemble > 1 only)."""
    share_prompt: bool = True
    """Run the prompt a pair's two sides share once and continue it with chosen and rejected from its KV
    cache: the same rewards up to float rounding, less compute the longer the prompt. Decoders without
    gradient checkpointing; other models run both full sequences."""
    normalize: RewardNormConfig = field(default_factory=RewardNormConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        if self.ensemble < 1:
            raise ConfigError(f"ensemble: must be >= 1, got {self.ensemble}")
        if self.data.truncation == "right":
            raise ConfigError("data.truncation: the reward is read at the last token, so the end must be kept; "
                              "use 'left' or 'error'")
        if self.load.dtype != "float32" and not self.lora.enabled:
            raise ConfigError(f"load.dtype={self.load.dtype!r} trains all weights in low precision; use float32 "
                              "with train.mixed_precision bf16 or enable lora")
        if self.normalize.policy and not self.normalize.prompts:
            raise ConfigError("normalize.policy needs normalize.prompts (the prompts to sample responses for)")


@dataclass
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023): the policy trained on preference pairs against a frozen
    reference, with no reward model and no sampling."""

    policy: str | None = None
    """The causal LM folder to train (by default the SFT model); as it is before training, it is the reference."""
    out: str | None = None
    """Output folder: the trained policy as an ordinary model folder, metrics.jsonl, stage.json."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(val_fraction=0.05))
    """The preference file, read as `rlhf rm` reads it (prompt/chosen/rejected or messages; the same validation)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=5e-6, batch_size=16))
    beta: float = 0.1
    """KL strength: the implicit reward is beta * (log pi - log pi_ref) of a response."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * margin). ipo: (margin - 1 / (2 beta))^2 on per-token mean log-ratios
    (Azar et al. 2023), which does not push the margin to infinity on deterministic preferences."""
    label_smoothing: float = 0.0
    """cDPO (Mitchell 2023): the share of labels assumed flipped; the sigmoid loss becomes a mix of both
    directions (sigmoid loss only)."""
    share_prompt: bool = True
    """Run a pair's prompt once and continue it with chosen and rejected from its KV cache (as `rlhf rm`):
    the same log-probs up to float rounding. Off under gradient checkpointing."""
    drop_flagged_annotators: bool = False
    """Drop the labels of annotators flagged by the agreement statistics (as rm.drop_flagged_annotators)."""
    exclude_annotators: list[str] = field(default_factory=list)
    """Drop the labels of these annotators (the 'annotator' field) before training."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing applies to loss_type sigmoid only (cDPO)")
        if self.data.truncation == "right":
            raise ConfigError("data.truncation: the responses are scored whole; use 'left' or 'error'")
        if self.load.dtype != "float32" and not self.lora.enabled:
            raise ConfigError(f"load.dtype={self.load.dtype!r} trains all weights in low precision; use float32 or enable lora")
        if self.lora.enabled and self.lora.dropout > 0:
            raise ConfigError(f"lora.dropout: must be 0 in DPO (got {self.lora.dropout}): the reference is the same "
                              "weights with adapters off, and dropout would make the policy's log-probs noise")


@dataclass
class BoNConfig:
    """Best-of-n: n samples per prompt, the one the reward model ranks first; the gold score for each n against the
    analytic KL log n - (n - 1) / n of best-of-n to the policy (Stiennon et al. 2020; Gao et al. 2022)."""

    policy: str | None = None
    """The causal LM folder to sample from (by default the SFT model)."""
    reward_model: str | None = None
    """Reward model (or ensemble) folder that ranks the samples."""
    out: str | None = None
    """Output JSON file (a samples file for the largest n is written beside it)."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out`."""
    prompts: str | None = None
    """Prompt file (JSONL with 'prompt'); null: the world's held-out prompts generated with seed."""
    n_prompts: int = 300
    """Prompts to evaluate (balanced over families when generated)."""
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """The n to measure; the samples are drawn once for the largest, and best-of-n reads the first n of them."""
    ensemble_penalty: float = 0.0
    """With an ensemble: rank by mean - ensemble_penalty * std (a conservative score)."""
    seed: int = 0
    """Seed for prompt generation (the held-out set `rlhf eval` draws with the same seed)."""
    sampling_seed: int | None = None
    """Seed for sampling (null: seed): the first sample of each prompt is plain sampling with it."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(do_sample=True))
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        check_numbers(self, "bon.", at_least_one=("n_prompts",), non_negative=("ensemble_penalty",))
        if not self.ns or min(self.ns) < 1:
            raise ConfigError(f"bon.ns: need one or more n >= 1, got {self.ns}")
        if not self.generation.do_sample:
            raise ConfigError("bon.generation.do_sample: best-of-n needs sampled responses (greedy gives n copies)")


@dataclass
class EvalRMConfig:
    """Reward-model evaluation on a preference file: accuracy, gold accuracy, calibration, length bias, agreement."""

    model: str | None = None
    """Reward model folder (one model or an ensemble folder)."""
    data: str | None = None
    """Preference file to evaluate on (held-out pairs)."""
    out: str | None = None
    """Output JSON file."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    batch_size: int = 64
    """Sequences per forward pass."""
    max_length: int = 256
    """Longest sequence in tokens (prompts are cut from the left)."""
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def validate(self) -> None:
        check_numbers(self, "", at_least_one=("batch_size",))
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")


@dataclass
class KLConfig:
    """The KL penalty to the reference policy: fixed, or adapted towards a target (Ziegler et al. 2019)."""

    coef: float = 0.05
    """KL coefficient beta in the per-token reward -beta * KL_t; the starting value when adaptive."""
    adaptive: bool = True
    """Adapt beta so that the KL per sequence tracks `target` (proportional controller, error clipped to +-0.2)."""
    target: float = 6.0
    """Target KL per sequence (nats, summed over response tokens) for the adaptive controller."""
    horizon: int = 10000
    """Controller horizon in samples: how fast beta moves (beta *= 1 + error * batch / horizon per iteration)."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator: k1 = log p - log p_ref (unbiased, the standard), k2 = (k1)^2 / 2, k3 = (ratio - 1)
    - log ratio with ratio = p_ref / p (Schulman 2020). PPO puts KL in the reward, where only k1 is right; k2
    and k3 belong in a loss term."""

    def validate(self) -> None:
        if self.coef < 0 or self.target <= 0 or self.horizon < 1:
            raise ConfigError("kl: need coef >= 0, target > 0, horizon >= 1")


@dataclass
class PPOConfig:
    """Stage 3: online RL (PPO by default; GRPO, RLOO, REINFORCE++) against the reward model with a KL penalty to the
    frozen initial policy."""

    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    """ppo: a critic and GAE (the default). grpo: K samples per prompt, group-normalised scores, k3 KL as a loss term
    (Shao et al. 2024). rloo: K samples per prompt, leave-one-out baseline, KL in the reward (Ahmadian et al. 2024).
    reinforce_pp: per-token KL in the reward, advantages normalised over the batch (Hu 2025). The last three train
    no critic."""
    num_generations: int = 1
    """K: samples per prompt in a rollout (adjacent rows), so a rollout is batch_size / K prompts; grpo and rloo
    need K >= 2 (their baselines are the prompt's other samples)."""
    scale_rewards: bool = True
    """grpo: divide by the group's score std (false: Dr. GRPO, Liu et al. 2025, only the group mean is taken off)."""

    policy: str | None = None
    """The causal LM folder to optimise (by default the SFT model); a frozen copy of it is the reference unless
    `reference` names another."""
    reference: str | None = None
    """The frozen reference of the KL penalty, when it is not the policy as it starts: continuing from an earlier RL
    policy with the SFT model as reference keeps the KL measured to SFT. It must share the policy's tokenizer."""
    reward_model: str | None = None
    """Reward model folder, or an ensemble folder (scored as mean - ensemble_penalty * std)."""
    prompts: str | None = None
    """Prompt file (JSONL with 'prompt'); world prompts also get the gold score of each rollout logged."""
    out: str | None = None
    """Output folder: the final policy as an ordinary model folder, metrics.jsonl, checkpoint-N/ folders."""
    overwrite: bool = False
    """Replace an earlier output of this stage at `out` (nothing else is ever replaced: a folder or file that
    is not this stage's output, or that holds one of the run's inputs, is refused)."""
    n_prompts: int | None = None
    """Use the first N prompts of the file (null: all)."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens (after the chat template); longer ones are left out and counted (null: what the
    policy's positions leave after generation.max_new_tokens)."""
    micro_batch_size: int | None = None
    """Sequences per forward pass in the rollout's scoring (policy, reference, critic, reward model) and in the
    update, whose gradients accumulate over a minibatch's micro-batches: memory scales with it, not with
    batch_size (null: whole minibatches, and the whole rollout at once). The same results up to float rounding."""
    padding_free: bool = True
    """Pack each micro-batch of the rollout's scoring (policy, reference, critic) and of the update without its
    padding (each sample's prompt and response tokens side by side in as few rows as hold them, attention within
    each sample): the padded micro-batch's log-probs, values and gradients with less computed. Used where the
    policy's, reference's and critic's architectures mask packed samples (Llama, Mistral, Qwen2, Gemma-2, GPT-2);
    padded micro-batches elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute the policy's (and critic's) activations in the backward pass of the update: less memory, slower."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 autocast for the policy, reference and critic forward passes of the rollout's scoring and of the update
    (both, so that the ratios compare like with like; weights, log-probs and the optimiser stay fp32)."""
    critic: Literal["reward_model", "policy"] = "reward_model"
    """Value model: a copy of the reward model with its head read at every token (the standard), or a
    zero-initialised value head on the policy's own hidden states (one model less, shared features)."""
    iterations: int = 100
    """Iterations: each is one rollout of batch_size samples and ppo_epochs passes over it."""
    batch_size: int = 64
    """Samples per rollout: batch_size / num_generations prompts, num_generations responses each."""
    mini_batch_size: int = 16
    """Samples per optimiser step in the update; batch_size must be a multiple of it."""
    ppo_epochs: int = 4
    """Passes over each rollout, reshuffled into minibatches every pass."""
    lr: float = 1e-5
    """Policy learning rate (AdamW, constant after warmup)."""
    critic_lr: float | None = None
    """Critic learning rate (null: the same as lr)."""
    warmup_iterations: int = 0
    """Iterations of linear learning-rate warmup from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon: the policy loss is pessimistic outside [1 - eps, 1 + eps]."""
    cliprange_value: float = 0.2
    """Value clip: new values further than this from the rollout's values get the pessimistic loss."""
    vf_coef: float = 0.1
    """Weight of the value loss (the critic has its own optimiser; this scales its gradient)."""
    ent_coef: float = 0.0
    """Entropy bonus weight (0: off)."""
    gamma: float = 1.0
    """Discount (1 for language: the episode is one response)."""
    lam: float = 0.95
    """GAE lambda: bias/variance trade-off of the advantages."""
    whiten_advantages: bool = True
    """ppo: normalise advantages to mean 0, std 1 over the rollout's response tokens (reinforce_pp always does;
    grpo and rloo never: their group baselines are the normalisation)."""
    approxkl_stop: float = 0.0
    """Stop the update epochs early when a minibatch's approximate KL to the rollout policy exceeds this (0: off)."""
    max_grad_norm: float = 1.0
    """Clip each model's gradient norm to this value (0: no clipping)."""
    normalize_reward: bool = True
    """Normalise scores with the reward model's stored reward_mean/reward_std (measured on SFT samples)."""
    missing_eos_score: float | None = -1.0
    """Score given instead of the reward model's to a response that did not end within max_new_tokens
    (null: keep the model's score)."""
    reward_clip: float = 5.0
    """Clip the (normalised) score to [-reward_clip, reward_clip] (0: off)."""
    ensemble_penalty: float = 0.0
    """With an ensemble reward model: score = mean - ensemble_penalty * std (a conservative reward)."""
    kl: KLConfig = field(default_factory=KLConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    ptx_coef: float = 0.0
    """PPO-ptx (Ouyang et al. 2022): weight of a language-modelling loss on ptx_data mixed into each policy step."""
    ptx_data: str | None = None
    """SFT data (prompt/completion or messages) or a corpus of {"text"} rows for the PPO-ptx loss."""
    ptx_batch_size: int = 8
    """Sequences of ptx_data per policy step."""
    ptx_max_length: int = 128
    """Longest ptx sequence in tokens."""
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=48, batch_size=64)
    )
    save_every: int = 0
    """Write a checkpoint every N iterations (0: only at the end); the last two are kept."""
    resume: bool = False
    """Continue from the newest checkpoint in `out`; refused when the policy, reward model, prompts or
    settings differ from those the checkpoint was made with (see resume_changed)."""
    resume_changed: bool = False
    """With resume: continue even though inputs or settings changed since the checkpoint (they are listed)."""
    log_every: int = 1
    """Write metrics every N iterations."""
    seed: int = 0
    """Seed for prompt order, sampling and minibatch shuffling (each iteration's randomness derives from it)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)

    def _refuse_off_policy_settings(self) -> None:
        """Settings that make PPO's ratios or rewards wrong, refused at parse time rather than trained with."""
        if self.generation.top_p < 1:
            raise ConfigError(f"ppo.generation.top_p: must be 1 in PPO (got {self.generation.top_p}): log-probs and KL "
                              "come from the full softmax(logits / T), not from the nucleus the tokens would be drawn from")
        if self.kl.estimator != "k1":
            raise ConfigError(f"ppo.kl.estimator: only k1 (log p - log p_ref) is an unbiased per-token KL in the reward "
                              f"(got {self.kl.estimator!r}); k3 belongs in a loss term, which the critic-free algorithms use")
        if self.lora.enabled and self.lora.dropout > 0:
            raise ConfigError(f"ppo.lora.dropout: must be 0 in PPO (got {self.lora.dropout}): dropout makes every forward "
                              "pass of the same tokens differ, so the ratio to the rollout's log-probs is noise")

    def validate(self) -> None:
        check_numbers(self, "ppo.", at_least_one=("iterations", "batch_size", "mini_batch_size", "ppo_epochs", "log_every",
                                                  "num_generations", "ptx_batch_size", "n_prompts", "max_prompt_length",
                                                  "micro_batch_size"),
                      positive=("lr", "critic_lr"),
                      non_negative=("warmup_iterations", "weight_decay", "vf_coef", "ent_coef", "approxkl_stop",
                                    "max_grad_norm", "reward_clip", "ensemble_penalty", "ptx_coef", "save_every"))
        if self.ptx_max_length < 2:
            raise ConfigError(f"ppo.ptx_max_length: must be >= 2, got {self.ptx_max_length}")
        self._refuse_off_policy_settings()
        if self.algorithm in ("grpo", "rloo") and self.num_generations < 2:
            raise ConfigError(f"ppo.num_generations: {self.algorithm} needs K >= 2 samples per prompt (its baseline is the "
                              f"prompt's other samples), got {self.num_generations}")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.num_generations "
                              f"({self.num_generations}): a rollout holds whole groups")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.mini_batch_size "
                              f"({self.mini_batch_size})")
        if not self.generation.do_sample:
            raise ConfigError("ppo.generation.do_sample: PPO needs sampled rollouts (greedy decoding has no exploration "
                              "and its log-probs are not those of the sampling distribution)")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ConfigError(f"ppo: need 0 <= lam <= 1 and 0 < gamma <= 1, got lam={self.lam}, gamma={self.gamma}")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ConfigError("ppo.cliprange and ppo.cliprange_value must be > 0")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_data (the SFT or pretraining data to mix in)")
        if self.load.dtype != "float32" and not self.lora.enabled:
            raise ConfigError(f"load.dtype={self.load.dtype!r} trains all weights in low precision; use float32 or enable lora")


@dataclass
class RunConfig:
    """The whole pipeline (`rlhf run`): world -> pretrain -> SFT -> collect preferences -> reward model -> PPO -> eval -> report."""

    out: str = "runs/demo"
    """Run folder; each stage writes a subfolder and is skipped when its finished output exists."""
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO on the reward model's preference file (not a stage of `rlhf run`; `rlhf dpo` and `rlhf experiment
    algorithms` read it)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    redteam: RedteamConfig = field(default_factory=RedteamConfig)
    rounds: int = 1
    """Rounds of iterated online RLHF: after the first (the stages above), each round samples pairs from the last
    policy, trains the reward model again on every round's pairs and continues PPO from that policy (under
    round_K/); the red team and the headline figures are the last round's. `rlhf iterate RUN` adds one."""
    ref_refresh: bool = False
    """Rounds after the first: the previous round's policy is PPO's reference (default: the SFT model)."""
    against_pairs: int = 0
    """Rounds after the first: pairs per training prompt of the policy's responses against those of the policy the
    previous round started from (collect.against_pairs); 0: pairs within the policy's own samples only."""

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if self.against_pairs < 0:
            raise ConfigError(f"against_pairs: must be >= 0, got {self.against_pairs}")
