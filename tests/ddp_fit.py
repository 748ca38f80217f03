"""Run by tests/test_distributed.py, alone or under `torchrun --nproc_per_node N`: the supervised loop (`fit`) on an
SFT file with a global batch (and a micro-batch per process); the main process writes each step's loss and the final weights to OUT."""

from __future__ import annotations

import json
import sys

from safetensors.torch import save_file

from rlhf import distributed
from rlhf.config import DataConfig, TrainConfig
from rlhf.data.chat import pad_right
from rlhf.data.io import load_sft
from rlhf.models.loading import load_causal_lm
from rlhf.stages.sft import encode_examples
from rlhf.training import fit, lm_loss, make_accelerator


class Losses:
    def __init__(self):
        self.rows = []

    def log(self, step, **metrics):
        self.rows.append(metrics["train/loss"])


def main(model_dir: str, data: str, batch_size: int, micro: int, out: str) -> None:
    distributed.init()  # as `rlhf` starts it
    model, tok = load_causal_lm(model_dir)
    items, _ = encode_examples(tok, list(load_sft(data)), DataConfig(path=data, max_length=64))
    cfg = TrainConfig(max_steps=4, batch_size=batch_size, micro_batch_size=micro or None, lr=1e-3, warmup_ratio=0.0, schedule="constant",
                      log_every=1, seed=0, max_grad_norm=1.0)
    acc = make_accelerator(cfg)
    losses = Losses()
    fit(model, items, lambda rows: pad_right(rows, tok.pad_token_id), cfg, loss_fn=lm_loss, logger=losses,
        accelerator=acc, desc="ddp")
    if acc.is_main_process:
        weights = {k: v.detach().contiguous() for k, v in acc.unwrap_model(model).state_dict().items()}
        save_file(weights, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"losses": losses.rows, "processes": acc.num_processes}, f)
    distributed.finish()  # as `rlhf` ends it


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
