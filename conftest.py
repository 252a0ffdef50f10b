"""Doctest collection skips modules whose optional extra is not installed (their tests skip on their own)."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("openenv") is None:  # the `serve` extra
    collect_ignore_glob.append("medeyes_env/serving/*.py")
if importlib.util.find_spec("verifiers") is None:  # the `verifiers` extra
    collect_ignore_glob.append("medeyes_env/integrations/verifiers_env.py")
if importlib.util.find_spec("verl") is None:  # its own venv (scripts/install_verl.sh)
    collect_ignore_glob += ["medeyes_env/integrations/verl_agent_loop.py", "tests/verl_token_server.py"]
