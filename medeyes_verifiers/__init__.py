"""``--env.taskset.id medeyes-verifiers``: the name verifiers' loader imports for MedEyes.

verifiers resolves a taskset id to a top-level module (``medeyes-verifiers`` -> ``medeyes_verifiers``)
and takes the one ``Taskset`` and one ``Env`` it exports; the code lives in
:mod:`medeyes_env.integrations.verifiers_env`.
"""

from medeyes_env.integrations.verifiers_env import (
    MedEyesData,
    MedEyesTask,
    MedEyesTaskset,
    MedEyesTasksetConfig,
    MedEyesVerifiersEnv,
)

__all__ = ["MedEyesData", "MedEyesTask", "MedEyesTaskset", "MedEyesTasksetConfig", "MedEyesVerifiersEnv"]
