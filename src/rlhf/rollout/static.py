"""The ``static`` engine: our own decode loop over the causal LM's forward.

Where ``generate`` spends a tiny model's decode step (a DynamicCache grown by concatenation, the mask and
positions rebuilt, the processor and stopping-criteria lists, finished rows still computed), this loop
spends it on the forward:

- one preallocated KV cache for prompt + ``max_new_tokens`` (``PreallocatedLayer``: written in place, read as
  views of the filled positions), one prefill, then one-token steps; the attention mask (B, P + N) and the
  positions are built once and filled in; for Llama-structured models the steps run fused
  (``rlhf.rollout.fused``), for others through the model's own forward;
- sampling inline, in fp32 (``rlhf.rollout.sampling``), in generate's order: steering processors on the raw
  logits, temperature, top-p, the draw; greedy is the argmax;
- rows that have stopped leave the batch once ``compact`` of it has stopped (cache, mask and positions are
  indexed down), so a long response does not keep 63 finished ones computing;
- each token's log-prob and entropy under softmax(logits / T) are read off the same logits, and with
  ``hidden`` the backbone's final hidden state that made them (PPO need not run the policy again over the
  rollout, nor for a value head on it).

Shapes: b rows still decoding, P prompt width (left-padded), N = max_new_tokens, L = P + N, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer

from rlhf.config import GenerationConfig
from rlhf.models.policy import backbone
from rlhf.rollout.fused import FusedDecoder, supports_fused
from rlhf.rollout.common import Sampled, generation_batches, join_batches
from rlhf.rollout.sampling import inverse_cdf_draw, logprobs_and_entropy, top_p_filter


def static_supported(model: PreTrainedModel) -> str | None:
    """None when the static loop can drive ``model``, else the reason it cannot (the ``hf`` engine is used)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    try:
        layers = StaticCache(config=model.config, max_cache_len=2).layers
    except Exception as e:  # a config StaticCache cannot read
        return f"no static cache for {type(model).__name__}: {e}"
    if not all(isinstance(layer, StaticLayer) for layer in layers):
        return f"{type(model).__name__} has cache layers that are not plain key/value layers"
    return None


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values, (b, heads, L, head_dim) allocated at the first update; each update writes
    its positions in place and returns views of the filled part. Unlike transformers' StaticLayer, attention
    then runs over the positions filled so far, not all L (at P = 32, N = 64 that is half the work on
    average); unlike its DynamicLayer, nothing is concatenated. A sliding-window layer (Gemma-2) keeps every
    position too, and the model's sliding-window mask (absolute positions, offset 0) leaves out the old ones
    (the tests' Gemma-2 windows are longer than their sequences)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len, self.length = max_cache_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        self.keys = key_states.new_zeros((b, h, self.max_cache_len, key_states.shape[-1]))
        self.values = value_states.new_zeros((b, h, self.max_cache_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows that ``keep`` (b,) leaves out (only the filled positions are copied)."""
        if self.is_initialized:
            self.keys, self.values = self.keys[keep], self.values[keep]


def preallocated_cache(model: PreTrainedModel, max_cache_len: int) -> Cache:
    return Cache(layers=[PreallocatedLayer(max_cache_len) for _ in range(model.config.get_text_config().num_hidden_layers)])


class StaticEngine:
    """Sampling with a preallocated KV cache, inline fp32 sampling and batch compaction."""

    name = "static"

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, stop: set[int], hidden: bool = False):
        self.model, self.tok, self.stop, self.hidden = model, tok, stop, hidden
        self._stop = torch.tensor(sorted(stop), dtype=torch.long)
        self.fused = supports_fused(model)  # decode steps in fused ops (Llama, Qwen2); else the model's forward

    def _draw(self, logits: torch.Tensor, seq: torch.Tensor, cfg: GenerationConfig, procs, uniforms: torch.Tensor,
              gen: torch.Generator) -> torch.Tensor:
        """The next token of each row (b,) from the step's logits (b, V), in generate's order."""
        scores = logits.float()
        for proc in procs:
            scores = proc(seq, scores)
        if not cfg.do_sample:
            return scores.argmax(dim=-1)
        scores = top_p_filter(scores / cfg.temperature, cfg.top_p)
        if cfg.sampler == "inverse_cdf":
            return inverse_cdf_draw(scores, uniforms)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen).squeeze(1)

    def _forward(self, ids, mask, positions, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's own forward: the last position's logits (b, V) and, with ``hidden``, its final hidden state
        (b, H), the backbone's output (read by a hook: the causal LM's output keeps no hidden states)."""
        captured: list[torch.Tensor] = []
        hook = backbone(self.model).register_forward_hook(
            lambda _m, _a, out: captured.append(out.last_hidden_state[:, -1])) if self.hidden else None
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]  # (b, V)
        finally:
            if hook is not None:
                hook.remove()
        return logits, (captured[0] if captured else None)

    def _decode(self, ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: GenerationConfig, procs, gen: torch.Generator
                ) -> tuple[torch.Tensor, ...]:
        """Tokens, log-probs and entropies (B, N) for left-padded prompts (B, P), and with ``hidden`` the final
        hidden states (B, N, H) that predicted each token; pad / 0 after a row's stop."""
        B, P = ids.shape
        N, device = cfg.max_new_tokens, ids.device
        cache = preallocated_cache(self.model, P + N)
        mask = torch.nn.functional.pad(prompt_mask, (0, N))  # (B, L): response columns are filled in as they are fed
        seq = torch.nn.functional.pad(ids, (0, N), value=self.tok.pad_token_id)  # (B, L) what processors read
        start = prompt_mask.sum(dim=1)  # (B,) position of each row's first response token
        tokens = torch.full((B, N), self.tok.pad_token_id, dtype=torch.long, device=device)
        logprobs, entropy = torch.zeros(B, N, device=device), torch.zeros(B, N, device=device)
        hiddens = torch.zeros(B, N, self.model.config.get_text_config().hidden_size, device=device) if self.hidden else None
        rows = torch.arange(B, device=device)  # original index of each row still in the batch
        live = torch.ones(B, dtype=torch.bool, device=device)  # (b,) has not stopped
        stop = self._stop.to(device)
        logits, hidden = self._forward(ids, mask, (prompt_mask.cumsum(dim=1) - 1).clamp(min=0), cache)
        fast = FusedDecoder(self.model, P + N) if self.fused else None
        for t in range(N):
            uniforms = torch.rand(B, generator=gen, device=device)[rows]  # one per original row: compaction draws the same
            token = self._draw(logits, seq[:, : P + t], cfg, procs, uniforms, gen)  # (b,)
            lp, ent = logprobs_and_entropy(logits, token, cfg.temperature)
            kept = rows[live]
            tokens[kept, t], logprobs[kept, t], entropy[kept, t] = token[live], lp[live], ent[live]
            if hiddens is not None:
                hiddens[kept, t] = hidden[live].float()
            live = live & ~torch.isin(token, stop)
            n_live = int(live.sum())
            if n_live == 0 or t == N - 1:
                break
            if n_live <= (1 - cfg.compact) * len(live):  # enough rows stopped: stop computing them
                for layer in cache.layers:
                    layer.keep_rows(live)
                rows, mask, seq, start, token, live = rows[live], mask[live], seq[live], start[live], token[live], live[live]
            seq[:, P + t], mask[:, P + t] = token, 1
            if fast is not None:
                bias = torch.zeros(mask.shape[0], 1, 1, P + t + 1, device=device).masked_fill_(
                    mask[:, None, None, : P + t + 1] == 0, -float("inf"))  # (b, 1, 1, T) additive padding mask
                logits, hidden = fast.step(token, start + t, cache, bias)
            else:
                logits, hidden = self._forward(token.unsqueeze(1), mask, (start + t).unsqueeze(1), cache)
        return (tokens, logprobs, entropy) + ((hiddens,) if hiddens is not None else ())

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, seed: int | None = None,
                 logits_processor=None) -> Sampled:
        """One response per encoded prompt, in generation batches of cfg.batch_size (each as wide as its longest
        prompt); the seed fixes every draw (None: one drawn from torch's global generator)."""
        device = next(self.model.parameters()).device
        if seed is None:
            seed = int(torch.randint(2**62, (1,)))
        gen = torch.Generator(device=device).manual_seed(seed)
        batch, parts = generation_batches(prompts, cfg.batch_size, self.tok.pad_token_id, device)
        with torch.inference_mode():
            chunks = [self._decode(part["input_ids"], part["attention_mask"], cfg, list(logits_processor or []), gen)
                      for part in parts]
        # Tensors made under inference_mode cannot enter autograd (PPO's update reads these): normal copies.
        tokens, *extras = ([c[i].clone() for c in chunks] for i in range(len(chunks[0])))
        return join_batches(batch["input_ids"], batch["attention_mask"], tokens, self.tok.pad_token_id, self.stop,
                            extras=extras)
