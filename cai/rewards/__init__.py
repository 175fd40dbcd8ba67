"""Rewards for RL trainers (GRPO, PPO): the judge or a trained reward model as a reward function.

functions.py  JudgeReward, RewardModelReward: TRL ``reward_funcs`` callables (in-process)
remote.py     RemoteReward: the same call computed by a ``cai serve`` server
hooks.py      the same callables as verl's ``compute_score`` and OpenRLHF's ``reward_func``
model.py      RewardModel: a trained reward model at inference (no training stack)

from cai.judge import Judge
from cai.rewards import JudgeReward
reward = JudgeReward(Judge("smollm2-135m"), against="group", num_generations=4)
"""

from cai.rewards.functions import JudgeReward, RewardModelReward
from cai.rewards.hooks import openrlhf_reward_func, verl_compute_score
from cai.rewards.remote import RemoteReward, RemoteRewardError

__all__ = [
    "JudgeReward",
    "RemoteReward",
    "RemoteRewardError",
    "RewardModelReward",
    "openrlhf_reward_func",
    "verl_compute_score",
]
