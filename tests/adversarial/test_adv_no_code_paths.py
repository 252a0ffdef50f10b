"""The guarantee that run directories, stores and datasets are data: no code path of the package can unpickle,
and YAML is parsed by the strict loader only. A static check, so a new call site fails here, not in a review."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    r"\btorch\.load\(": "torch.load unpickles (use safetensors / JSON, see medeyes/training/checkpoints.py)",
    r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|\bjoblib\.load\(": "unpickling runs code",
    r"weights_only\s*=\s*False": "torch.load(weights_only=False) runs code",
    r"\byaml\.(safe_)?load\(|\byaml\.unsafe_load\(|yaml\.Loader\b": "YAML goes through medeyes.safe_yaml",
    r"trust_remote_code\s*=\s*True": "a model directory's code is never run by default",
    r"\bnp\.load\([^)]*allow_pickle\s*=\s*True": "numpy pickles run code",
}
ALLOWED = {("medeyes/safe_yaml.py", r"\byaml\.(safe_)?load\(|\byaml\.unsafe_load\(|yaml\.Loader\b")}


def test_no_package_module_can_run_code_from_a_file():
    found = []
    for folder in ("medeyes", "medeyes_env"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                for pattern, why in FORBIDDEN.items():
                    if (relative, pattern) not in ALLOWED and re.search(pattern, code):
                        found.append(f"{relative}:{number}: {why}: {line.strip()}")
    assert found == []


def test_the_check_sees_a_forbidden_call(tmp_path):
    line = "state = torch.load(path, weights_only=False)"
    assert [p for p in FORBIDDEN if re.search(p, line)] == [r"\btorch\.load\(", r"weights_only\s*=\s*False"]
