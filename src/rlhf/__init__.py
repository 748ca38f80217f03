"""rlhf: SFT -> reward model -> PPO with a KL penalty, with the evaluations that prove it helped."""

__version__ = "0.1.0"
