"""Gymnasium ids for MedEyes environments, so ``gymnasium.make`` and ``make_vec`` work."""

from __future__ import annotations

import gymnasium as gym

ENV_IDS: dict[str, dict] = {
    "MedEyes/Phantom-v0": {"source": "phantom"},
    "MedEyes/PhantomEasy-v0": {"source": "phantom:easy"},
    "MedEyes/PhantomHard-v0": {"source": "phantom:hard"},
    "MedEyes/Samples-v0": {"source": "samples", "split": "test"},
}


def register_envs() -> None:
    """Register every MedEyes id once (idempotent)."""
    for env_id, kwargs in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="medeyes_env.env:MedEyesEnv",
                kwargs=kwargs,
                vector_entry_point=None,
            )
