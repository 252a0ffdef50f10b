"""MedEyes: expert trajectories (GRN + CVS), VLM policies and dual-stream GRPO on top of ``medeyes_env``.

Importing this package does not import torch; the modules that need it do so themselves.
"""

__version__ = "0.1.0"
