"""Doctest collection skips modules whose optional extra is not installed (their tests skip on their own)."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("openenv") is None:  # the `serve` extra
    collect_ignore_glob.append("medeyes_env/serving/*.py")
if importlib.util.find_spec("verifiers") is None:  # the `verifiers` extra
    collect_ignore_glob.append("medeyes_env/integrations/verifiers_env.py")
