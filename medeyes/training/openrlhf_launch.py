"""Old import path of the OpenRLHF export and launch, kept for earlier commands and scripts.

The code lives in :mod:`medeyes.training.openrlhf.export` and :mod:`medeyes.training.openrlhf.launch`;
``python -m medeyes.training.openrlhf_launch`` still runs :func:`medeyes.training.openrlhf.launch.main`.
"""

from medeyes.training.openrlhf.export import (
    AGENT_FILE,
    BACKEND_FILE,
    EVAL_FILE,
    EXPERT_FILE,
    IMAGES_DIR,
    PROMPTS_FILE,
    ExportSummary,
    OpenRLHFConfig,
    check_export,
    export_openrlhf_data,
)
from medeyes.training.openrlhf.launch import (
    LAUNCH_MODULE,
    OPENRLHF_MODULE,
    RAY_DEFAULT_ENV,
    build_command,
    format_command,
    main,
    openrlhf_args,
    preflight,
    run_command,
)

__all__ = [
    "AGENT_FILE",
    "BACKEND_FILE",
    "EVAL_FILE",
    "EXPERT_FILE",
    "IMAGES_DIR",
    "LAUNCH_MODULE",
    "OPENRLHF_MODULE",
    "PROMPTS_FILE",
    "RAY_DEFAULT_ENV",
    "ExportSummary",
    "OpenRLHFConfig",
    "build_command",
    "check_export",
    "export_openrlhf_data",
    "format_command",
    "main",
    "openrlhf_args",
    "preflight",
    "run_command",
]

if __name__ == "__main__":
    main()
