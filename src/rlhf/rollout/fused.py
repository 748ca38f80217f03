"""One decode step of a Llama-structured model (Llama, Qwen2, Mistral) in a few fused torch ops.

A tiny model's decode step in transformers is mostly per-op overhead: about forty small kernels per layer
(three projections, the RMSNorm's five ops, the rotary embedding's slices and concatenation, the mask
built again) around a few small matmuls. Here, for one new token per row:

- the q, k, v projections are one matmul against their concatenated weights, gate and up another;
- RMSNorm is ``F.rms_norm``; cos/sin are read off a table made once per ``generate`` by the model's own
  rotary module (so every rope scaling the model supports is the model's);
- attention is two batched matmuls with the additive padding mask (grouped-query heads without a copy).

The weights are read from the model at construction (one copy per ``generate`` call, so a policy updated
between rollouts is sampled as it now is). LoRA adapters count as merged: W + the adapters' delta, computed
into the copy, the trained weights untouched. The prefill still runs the model's own forward, which fills the
same cache. ``supports_fused`` names the architectures; anything else keeps the model's forward for every step.
Tested against the model's forward: greedy tokens and per-step log-probs (tests/test_rollout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def supports_fused(model: torch.nn.Module) -> bool:
    """A Llama-structured decoder with SiLU MLPs and full attention in every layer (no sliding window in use)."""
    cfg = model.config
    return (type(model).__name__ in ARCHITECTURES and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "pretraining_tp", 1) == 1 and not getattr(cfg, "mlp_bias", False)
            and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"]))
            and (getattr(cfg, "sliding_window", None) is None or not getattr(cfg, "use_sliding_window", True)))


def linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear, or of a peft LoRA Linear with its active, unmerged adapters added in."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, module.bias
    weight = base.weight
    if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name)
    return weight, base.bias


def _fuse(*modules: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    parts = [linear_weight(m) for m in modules]
    biases = [b for _, b in parts]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    return torch.cat([w for w, _ in parts]), bias


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    ln2: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class FusedDecoder:
    """Decode steps for one ``generate`` call: weights fused, cos/sin tabled for positions 0 .. max_len - 1."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        cfg, body = model.config, model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden, self.eps = cfg.hidden_size, cfg.rms_norm_eps
        self.embed = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.lm_head = linear_weight(model.lm_head)[0]
        self.layers = [
            _Layer(layer.input_layernorm.weight, _fuse(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                   linear_weight(layer.self_attn.o_proj), layer.post_attention_layernorm.weight,
                   _fuse(layer.mlp.gate_proj, layer.mlp.up_proj)[0], linear_weight(layer.mlp.down_proj)[0])
            for layer in body.layers
        ]
        positions = torch.arange(max_len, device=self.embed.device)[None]
        cos, sin = body.rotary_emb(self.embed[:1, None], positions)  # (1, L, D) each
        self.cos, self.sin = cos[0], sin[0]  # (L, D)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x (b, heads, D) at each row's position (cos, sin: (b, 1, D))."""
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def step(self, token: torch.Tensor, positions: torch.Tensor, cache, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (b, V) and the final hidden states (b, H) (after the last norm: the backbone's output, what a
        value head reads) after feeding token (b,) at positions (b,); ``bias`` (b, 1, 1, T) is 0 on the cache
        columns a row attends to (its prompt, its response so far, this token) and -inf on padding."""
        b, g = len(token), self.heads // self.kv_heads
        nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (b, 1, D)
        h = F.embedding(token, self.embed)  # (b, H)
        for layer, kv in zip(self.layers, cache.layers):
            x = F.rms_norm(h, (self.hidden,), layer.ln1, self.eps)
            qkv = F.linear(x, *layer.qkv)  # (b, (heads + 2 kv) * D)
            qk = self._rotate(qkv[:, : nq + nkv].view(b, self.heads + self.kv_heads, self.head_dim), cos, sin)  # one rotation
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            keys, values = kv.update(k.unsqueeze(2), qkv[:, nq + nkv :].view(b, self.kv_heads, 1, self.head_dim))  # (b, kv, T, D)
            scores = torch.matmul(q.view(b, self.kv_heads, g, self.head_dim), keys.transpose(-1, -2))  # (b, kv, g, T)
            weights = torch.softmax(scores * self.head_dim**-0.5 + bias, dim=-1)
            attn = torch.matmul(weights, values).reshape(b, nq)  # (b, heads * D)
            h = h + F.linear(attn, *layer.o)
            x = F.rms_norm(h, (self.hidden,), layer.ln2, self.eps)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down)
        h = F.rms_norm(h, (self.hidden,), self.norm, self.eps)
        return F.linear(h, self.lm_head), h  # (b, V), (b, H)
