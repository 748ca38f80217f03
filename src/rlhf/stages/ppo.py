"""Stage 3: online RL against the reward model with a KL penalty to the frozen initial policy: PPO (the
default), GRPO, RLOO or REINFORCE++ (``ppo.algorithm``).

One iteration is a rollout (steps 1-5) and an update (step 6), numbered as in OpenAI's
lm-human-preferences and its reproduction by Huang et al. 2023 ("The N Implementation Details of
RLHF with PPO"):

  1. generate a response per prompt (K per prompt for GRPO and RLOO), cut after the first stop token;
  2. score (prompt, response) with the reward model at the last token; normalise; fixed score for
     responses without a stop token (or past the reward model's context); extra reward components; clip;
  3. log-probs of the policy and of the reference at the sampling temperature, in fp32, and the
     critic's values (PPO);
  4. per-token rewards: -kl_coef * KL_t on every token (GRPO: in the loss instead), the score on the last;
  5. advantages: GAE with the critic (PPO), group baselines (GRPO, RLOO), the batch's (REINFORCE++);
  6. ppo_epochs passes over shuffled minibatches: clipped policy loss (+ GRPO's k3 KL term, + PPO's clipped
     value loss), optional entropy bonus and PPO-ptx loss, gradient clipping; stop early on approximate KL.

The parts are in :mod:`rlhf.rl` (experience maker: 1-3; algorithms: 4-5; learner: 6; checkpointer), the maths
in :mod:`rlhf.algos`; this file joins them and drives the loop with logs and checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from rlhf import distributed
from rlhf.algos.ppo import explained_variance, kl_controller, kl_penalty, sequence_kl
from rlhf.config import PPOConfig, require
from rlhf.configlib import ConfigError, to_dict
from rlhf.models.loading import check_length
from rlhf.models.policy import unwrap
from rlhf.report.metrics import MetricsLogger
from rlhf.report.progress import progress_bar
from rlhf.rl.algorithms import ALGORITHMS
from rlhf.rl.checkpoint import Checkpointer, check_ppo_out, checkpoint_step, checkpoints, prepare_out, save_final
from rlhf.rl.experience import ExperienceMaker
from rlhf.rl.learner import Learner
from rlhf.rl.models import load_models
from rlhf.rl.monitor import Monitor
from rlhf.rl.prompts import load_prompt_stream, load_ptx, steering
from rlhf.rl.types import RewardComponent, Rollout
from rlhf.rollout import make_engine
from rlhf.training import fsdp_launch, rank_share
from rlhf.world import derive_seed, judge_prompt

log = logging.getLogger("rlhf.ppo")


class RLRun:
    """An online RL run: its parts, the KL controller and the iteration counter.

    ``step()`` runs one iteration and returns its metrics; ``run_ppo`` drives it with logging and
    checkpoints. Benchmarks and tests call ``rollout``/``update`` directly.
    """

    def __init__(self, cfg: PPOConfig, components: Sequence[RewardComponent] = ()):
        check_processes(cfg, distributed.processes())
        if fsdp_launch() or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
            log.warning("%s: the online RL loop does not shard its models: under this FSDP / DeepSpeed launch each "
                        "process holds whole policy, reference, critic and reward model (data parallel)", cfg.algorithm)
        self.cfg = cfg
        self.algorithm = ALGORITHMS[cfg.algorithm]
        # The device from accelerate (CUDA when visible); the loop runs in fp32: log-prob ratios need the precision.
        self.device = PartialState().device
        self.m = load_models(cfg, self.device, with_critic=self.algorithm.critic)
        self.prompts, self.world = load_prompt_stream(cfg, self.m.tok)
        engine = make_engine(unwrap(self.m.policy), self.m.tok, cfg.generation.backend,
                             hidden=self.m.value_head is not None)  # the value head's input, read while sampling
        self.experience = ExperienceMaker(cfg, self.m, self.prompts, engine, steering(cfg, self.m.tok), components,
                                          self.device)
        self.learner = Learner(cfg, self.m, self.algorithm, self.device,
                               load_ptx(cfg, self.m.tok) if cfg.ptx_coef > 0 else [], self._rank_seed)
        self.kl_ctl = kl_controller(cfg.kl.coef, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
        self.checkpointer = Checkpointer(cfg, self.m, self.learner.optimisers(), self.kl_ctl, self.device)
        self.iteration = 0
        # Several processes: each holds whole models; newly initialised weights (LoRA, a value head) are rank 0's.
        distributed.broadcast_parameters([*self.learner.policy_params, *self.m.critic_parameters()])

    def _seed(self, purpose: str) -> int:
        """Randomness of iteration i derives from a hash of (seed, i, purpose): a resumed run draws what the
        original drew, and no two (seed, iteration, purpose) share a stream (a linear mix of them can)."""
        return derive_seed(self.cfg.seed, f"ppo/{self.iteration}/{purpose}")

    def _rank_seed(self, purpose: str) -> int:
        """This process's own stream for a purpose (rank 0's is the one-process stream)."""
        rank = distributed.rank()
        return self._seed(f"{purpose}/rank{rank}" if rank else purpose)

    def rollout(self) -> tuple[Rollout, dict[str, float]]:
        """Steps 1-5: a scored rollout with its rewards and advantages, and its statistics."""
        cfg, k = self.cfg, self.cfg.num_generations
        # This process's share of the iteration's prompts, K samples of each, adjacent (the group baselines read
        # them so, and a group never spans two processes).
        prompts = rank_share(self.prompts.batch(self.iteration, cfg.batch_size // k), distributed.rank(),
                             distributed.processes())
        idx = [i for i in prompts for _ in range(k)]
        ro, stats = self.experience.make(idx, self._rank_seed("rollout"))  # 1-3
        self.algorithm.advantages(ro, cfg, self.kl_ctl.value)  # 4-5 (whitening over the global batch)
        seq_kl = sequence_kl(kl_penalty(ro.logprobs, ro.ref_logprobs, "k1"), ro.response_mask)  # (B,) the KL the controller tracks
        stats.update({"objective/rlhf_reward": (ro.scores - self.kl_ctl.value * seq_kl).mean().item(),
                      "objective/kl": seq_kl.mean().item(), "objective/kl_coef": self.kl_ctl.value})
        if ro.returns is not None:
            stats["val/explained_variance"] = explained_variance(ro.values, ro.returns, ro.response_mask).item()
        if self.world:  # measured, never trained on: the truth to hold the proxy against
            stats["objective/gold"] = sum(judge_prompt(p, r).total for p, r in zip(ro.prompts, ro.responses)) / len(ro.prompts)
        # Every process has as many samples: the means of the processes' means are the global batch's.
        return ro, distributed.mean_over_processes(stats)

    def update(self, ro: Rollout) -> dict[str, float]:
        """Step 6."""
        return self.learner.update(ro, self.kl_ctl.value)

    def step(self) -> tuple[dict[str, float], Rollout]:
        """One iteration: rollout, update, KL controller; returns the iteration's metrics."""
        lr = self.learner.set_lr(self.iteration)
        t0 = time.perf_counter()
        ro, stats = self.rollout()
        t1 = time.perf_counter()
        stats.update(self.update(ro))
        t2 = time.perf_counter()
        self.kl_ctl.update(stats["objective/kl"], self.cfg.batch_size)
        self.iteration += 1
        stats.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "lr": lr})
        return stats, ro


def check_processes(cfg: PPOConfig, n: int) -> None:
    """Each of n processes takes an equal share of every rollout (whole groups) and of every minibatch."""
    prompts = cfg.batch_size // cfg.num_generations
    if prompts % n or cfg.mini_batch_size % n:
        raise ConfigError(f"ppo: under {n} processes the prompts per rollout (batch_size / num_generations = {prompts}) "
                          f"and ppo.mini_batch_size ({cfg.mini_batch_size}) must be multiples of {n}: each process "
                          "takes an equal share of both")


def gathered_samples(ro: Rollout) -> tuple[list[str], list[str], list[float], float]:
    """Every process's prompts, responses and reward-model scores (in rank order), and the mean ensemble std."""
    seen = distributed.gather_objects((ro.prompts, ro.responses, ro.rm_scores.tolist(), ro.rm_std.mean().item()))
    prompts, responses, scores = ([x for s in seen for x in s[i]] for i in range(3))
    return prompts, responses, scores, sum(s[3] for s in seen) / len(seen)


def run_ppo(cfg: PPOConfig, components: Sequence[RewardComponent] = ()) -> dict:
    """Optimise cfg.policy against cfg.reward_model on cfg.prompts; write cfg.out; return a summary."""
    from rlhf.safety.rewards import safety_components

    require(cfg, "policy", "reward_model", "prompts", "out", stage="ppo")
    action = check_ppo_out(cfg)
    check_length(cfg.policy, cfg.generation.max_new_tokens, "generation.max_new_tokens")
    if cfg.ptx_coef > 0:
        check_length(cfg.policy, cfg.ptx_max_length, "ptx_max_length")
    run = RLRun(cfg, [*components, *safety_components(cfg.safety)])
    out, run.iteration = prepare_out(cfg, run.checkpointer, action)
    start, first = time.perf_counter(), run.iteration
    last: dict[str, float] = {}
    log.info("%s: %d iterations of %d samples (%d per prompt; %d minibatches x %d epochs); critic: %s; reference: %s",
             cfg.algorithm, cfg.iterations, cfg.batch_size, cfg.num_generations, cfg.batch_size // cfg.mini_batch_size,
             cfg.ppo_epochs, cfg.critic if run.algorithm.critic else "none",
             "policy without adapters" if run.m.reference is None else "frozen copy")
    monitor = Monitor(run.world, len(run.m.reward.members) > 1)
    if first and (saved := max(checkpoints(out), key=checkpoint_step) / "monitor.json").is_file():
        monitor.load_state_dict(json.loads(saved.read_text()))
    main = distributed.is_main()  # several processes: the main one writes metrics, alerts, checkpoints, the model
    # purge_step: TensorBoard hides what an interrupted attempt logged past the checkpoint.
    with MetricsLogger(out, purge_step=first + 1 if first else None, enabled=main) as logger, \
            progress_bar(cfg.algorithm, cfg.iterations, enabled=main) as bar:
        bar.update(advance=first)
        while run.iteration < cfg.iterations:
            last, ro = run.step()
            samples = gathered_samples(ro)  # the monitors read every process's samples
            if main:
                last.update(monitor.update(run.iteration, *samples, last["objective/kl"], out / "alerts.jsonl"))
            bar.update(score=last["objective/scores"], kl=last["objective/kl"], **(
                {"gold": last["objective/gold"]} if "objective/gold" in last else {}))
            if run.iteration % cfg.log_every == 0 or run.iteration == cfg.iterations:
                logger.log(run.iteration, **last)
            if main and cfg.save_every and run.iteration % cfg.save_every == 0 and run.iteration < cfg.iterations:
                run.checkpointer.save(out, run.iteration, monitor.state_dict())
    if main and (first < cfg.iterations or not checkpoints(out)):
        run.checkpointer.save(out, run.iteration, monitor.state_dict())
    summary = {"stage": "ppo", "algorithm": cfg.algorithm, "iterations": run.iteration,
               "processes": distributed.processes(), "resumed_from": first or None, "seconds": time.perf_counter() - start, "final": last, "kl_coef": run.kl_ctl.value,
               "world": run.world, "dropped_prompts": run.prompts.dropped, "hacking": monitor.hacking.summary(),
               "collapse": monitor.collapse, "config": to_dict(cfg)}
    if main:
        save_final(run.m, cfg, out, summary)
    distributed.barrier()  # no process returns before the folder is finished
    return summary
