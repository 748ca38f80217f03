"""The ``hf`` engine: transformers' ``generate``, kept as the reference the other engines are tested against."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase, TemperatureLogitsWarper, TopPLogitsWarper

from rlhf.config import GenerationConfig
from rlhf.rollout.common import Sampled, generation_batches, join_batches
from rlhf.rollout.sampling import InverseCDFSampler


def sampling_processors(cfg: GenerationConfig, logits_processor=None) -> LogitsProcessorList:
    """The processors of one greedy-mode generate call with the inverse-CDF sampler: the caller's
    (steering), then temperature, top-p (top-k off) and the sampler, whose token generate then takes."""
    procs = LogitsProcessorList(logits_processor or [])
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    procs.append(InverseCDFSampler())
    return procs


def generate_kwargs(cfg: GenerationConfig, logits_processor=None) -> dict:
    """``model.generate`` arguments for the config's decoding: greedy, generate's own multinomial sampling
    (temperature/top-p, top-k off) or greedy behind the inverse-CDF sampler."""
    if not cfg.do_sample:
        return dict(do_sample=False, logits_processor=logits_processor)
    if cfg.sampler == "inverse_cdf":
        return dict(do_sample=False, logits_processor=sampling_processors(cfg, logits_processor))
    return dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, logits_processor=logits_processor)


@contextlib.contextmanager
def only_our_settings(model: PreTrainedModel, tok: PreTrainedTokenizerBase, stop: set[int]):
    """Generate with exactly the settings our config names. transformers fills every setting a call leaves
    unset from ``model.generation_config``: a folder's repetition_penalty, top_k, min_p, no_repeat_ngram_size,
    bad words or forced tokens would reshape what is drawn, while log-probs and KL are computed from plain
    ``softmax(logits / T)``. For the call, the model's generation config holds the stop and pad ids only;
    the folder's own is put back after (and saved with the model, for other tools)."""
    saved = model.generation_config
    model.generation_config = HFGenerationConfig(eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id,
                                                 bos_token_id=saved.bos_token_id if saved is not None else None)
    try:
        yield
    finally:
        model.generation_config = saved


class HFEngine:
    """Sampling through ``model.generate`` (DynamicCache, generate's processors and sampler)."""

    name = "hf"

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, stop: set[int]):
        self.model, self.tok, self.stop = model, tok, stop

    @torch.no_grad()
    def _batch(self, batch: dict[str, torch.Tensor], cfg: GenerationConfig, logits_processor) -> torch.Tensor:
        """Responses (b, A) to left-padded prompts (b, P); generate pads rows that stopped."""
        with only_our_settings(self.model, self.tok, self.stop):
            out = self.model.generate(
                **batch, max_new_tokens=cfg.max_new_tokens, pad_token_id=self.tok.pad_token_id, eos_token_id=sorted(self.stop),
                use_cache=True, **generate_kwargs(cfg, logits_processor),
            )  # (b, P + A)
        return out[:, batch["input_ids"].shape[1]:]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, seed: int | None = None,
                 logits_processor=None) -> Sampled:
        if seed is not None:
            torch.manual_seed(seed)
        batch, parts = generation_batches(prompts, cfg.batch_size, self.tok.pad_token_id, next(self.model.parameters()).device)
        chunks = [self._batch(part, cfg, logits_processor) for part in parts]
        return join_batches(batch["input_ids"], batch["attention_mask"], chunks, self.tok.pad_token_id, self.stop)
