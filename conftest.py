"""Doctest collection skips modules whose optional extra is not installed (their tests skip on their own)."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("openenv") is None:  # the `serve` extra
    collect_ignore_glob += ["medeyes_env/serving/*.py", "medeyes_env/integrations/*.py"]
