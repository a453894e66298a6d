"""The reward server's clients, kept importable as ``coati.client``; they live in :mod:`coati.serving.client`."""

from coati.serving.client import AsyncRewardClient, Prompt, RemoteRewardFunction, RewardClient, RewardServerError

__all__ = ["AsyncRewardClient", "Prompt", "RemoteRewardFunction", "RewardClient", "RewardServerError"]
