"""Watches each rollout of an online RL run for reward hacking and mode collapse (measured, never trained on)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from rlhf.world import judge_prompt

log = logging.getLogger("rlhf.ppo")


class Monitor:
    """Watches each rollout for reward hacking and mode collapse (measured, never trained on).

    Alerts go to the log and to OUT/alerts.jsonl as they fire; the per-iteration figures join the
    metrics as ``hacking/alerts`` and ``diversity/*``. Diversity uses the bag-of-words similarity here
    (no embedding model inside the training loop); `rlhf eval` measures it with embeddings.
    """

    def __init__(self, world: bool, ensemble: bool):
        from rlhf.evaluation.diversity import Embedder
        from rlhf.evaluation.hacking import HackingMonitor

        self.world, self.ensemble = world, ensemble
        self.hacking, self.embedder = HackingMonitor(), Embedder(bag_of_words=True)
        self.collapse: dict = {"collapsed_iterations": [], "last": None}

    def update(self, iteration: int, prompts: list[str], responses: list[str], rm_scores: list[float], rm_std: float,
               kl: float, alerts_file: Path) -> dict[str, float]:
        """One rollout's samples (every process's), their reward-model scores and mean ensemble std, and its KL."""
        from rlhf.evaluation.diversity import diversity_report

        gold = [judge_prompt(p, r).total for p, r in zip(prompts, responses)] if self.world else None
        alerts = self.hacking.update(iteration, responses, rm_scores, kl, gold, rm_std if self.ensemble else None)
        if alerts:
            with alerts_file.open("a") as f:  # appended as they fire: a crash keeps what was seen
                f.writelines(json.dumps(asdict(a)) + "\n" for a in alerts)
        div = diversity_report(responses, self.embedder)
        if div["is_collapsed"]:
            self.collapse["collapsed_iterations"].append(iteration)
            if len(self.collapse["collapsed_iterations"]) == 1:
                log.warning("mode collapse? iteration %d: %s", iteration, "; ".join(div["collapse_reasons"]))
        self.collapse["last"] = {k: v for k, v in div.items() if k != "thresholds"}
        return {"hacking/alerts": float(len(self.hacking.records)), "diversity/distinct_2": div["distinct_2"],
                "diversity/self_bleu": div["self_bleu"], "diversity/similarity": div["mean_similarity"],
                "diversity/collapsed": float(div["is_collapsed"])}

    def state_dict(self) -> dict:
        return {"hacking": self.hacking.state_dict(), "collapse": self.collapse}

    def load_state_dict(self, state: dict) -> None:
        self.hacking.load_state_dict(state["hacking"])
        self.collapse = state["collapse"]
