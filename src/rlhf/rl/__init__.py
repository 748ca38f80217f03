"""The online RL loop, in the parts data flows through (one job each):

1. :mod:`rlhf.rl.experience`: prompts -> the rollout engine -> scorers (reward model or ensemble, extra
   reward components, reference log-probs, critic values) -> a :class:`~rlhf.rl.types.Rollout`;
2. :mod:`rlhf.rl.algorithms`: per algorithm, the rewards and advantages of a rollout (the maths is in
   :mod:`rlhf.algos`) and its loss terms;
3. :mod:`rlhf.rl.learner`: losses and optimiser steps over minibatches;
4. :mod:`rlhf.rl.checkpoint`: atomic save and resume of everything the loop needs.

:mod:`rlhf.stages.ppo` joins them into the stage. :mod:`rlhf.rl.types` is a leaf: the safety layer and
the evaluations import the types from it without importing the loop.
"""
