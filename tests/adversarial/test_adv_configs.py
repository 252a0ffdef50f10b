"""Hostile training configs: every one is a ConfigError naming FILE:LINE(:COLUMN), and none expands."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from medeyes.safe_yaml import MAX_DEPTH, parse_yaml
from medeyes.training.config import TrainConfig, build_config
from medeyes_env.errors import ConfigError

ALIAS_BOMB = "\n".join(
    ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]"
        for i in range(8)
    ]
)


def _write(tmp_path, content: bytes | str, name: str = "train.yaml"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "data_options:\n" + "\n".join("  " + line for line in ALIAS_BOMB.splitlines()),
            r"train.yaml:3:10: alias \*a is refused in configs \(aliases can expand exponentially\)",
        ),
        ("seed: 1\ngrpo: {steps: 3\n", r"train.yaml:3:1: expected ',' or '}', but got '<stream end>'"),
        ("seed: 1\n  bad: indent\n", r"train.yaml:2:6: mapping values are not allowed here"),
        (b"seed: 1\ndata: \xff\xfe\n", r"train.yaml: not UTF-8 \(byte 14: b'\\xff'\)"),
        ("x: " + "[" * 20_000 + "]" * 20_000, rf"train.yaml:1:{MAX_DEPTH + 3}: nested deeper than {MAX_DEPTH} levels"),
        ("preset: 3\n", r"train.yaml: preset must be a name \(cpu-default, tiny, paper\), got int 3"),
        ("preset: [tiny]\n", r"train.yaml: preset must be a name .*got list \['tiny'\]"),
        ("preset: tinyy\n", r"train.yaml: unknown preset 'tinyy'; choose one of cpu-default, tiny, paper"),
        ("seed: 1\nseed: 2\n", r"train.yaml:2:1: duplicate key 'seed' \(first given on line 1\)"),
        ("grpo:\n  steps: 1\n  steps: 2\n", r"train.yaml:3:3: duplicate key 'steps' \(first given on line 2\)"),
        ("- seed\n", r"train.yaml must hold a mapping of config fields, got list"),
        (
            "data_options: {families: {nested: [1]}}\n",
            r"(?s)train.yaml: invalid training config: 1 validation error.*data_options\.families\n  Input should be "
            r"a valid tuple",
        ),
        (
            "seed: 1\nbogus: 2\n",
            r"(?s)train.yaml: invalid training config: 1 validation error.*bogus\n  Extra inputs are not permitted",
        ),
    ],
    ids=[
        "alias-bomb",
        "unclosed-flow",
        "bad-indent",
        "non-utf8",
        "deep-nesting",
        "preset-int",
        "preset-list",
        "preset-unknown",
        "duplicate-top",
        "duplicate-nested",
        "not-a-mapping",
        "nested-data-options",
        "extra-field",
    ],
)
def test_hostile_config_files_are_named_errors(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(_write(tmp_path, content))


def test_alias_bomb_is_refused_before_any_expansion():
    assert len(ALIAS_BOMB) < 600  # 9^9 = 387 million strings once expanded
    with pytest.raises(ConfigError, match=r"bomb:2:\d+: alias \*a is refused"):
        parse_yaml(ALIAS_BOMB, "bomb")
    assert parse_yaml("a: &x [1, 2]\nb: 3", "ok") == {"a": [1, 2], "b": 3}  # an anchor alone is harmless


def test_oversized_and_missing_config_files(tmp_path):
    path = _write(tmp_path, "# " + "x" * (1024 * 1024) + "\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"train.yaml: 1,048,587 bytes, above the 1,048,576-byte limit"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_flat_data_options_still_load(tmp_path):
    path = _write(tmp_path, "preset: tiny\ndata_options: {families: [presence], image_size: 512, noise: 0.01}\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.data_options.model_dump() == {"families": ("presence",), "image_size": 512, "noise": 0.01}
    assert build_config({"data_options": {"lesion_radius": [20.0, 36.0]}}).data_options.lesion_radius == (20, 36)


def test_cli_set_values_are_parsed_strictly(tmp_path):
    from medeyes.cli.app import app

    result = CliRunner().invoke(app, ["train", "--set", "data_options=[&a [1], *a]", "--print-config"])
    assert result.exit_code == 2
    assert "--set data_options:1:10: alias *a is refused in configs" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("9" * 5000, r"9999999999\.\.\. \(5000 characters\)"),
        ("-" + "9" * 5000, r"-999999999\.\.\. \(5001 characters\)"),
        ("0x" + "f" * 5000, r"0xffffffff\.\.\. \(5002 characters\)"),
        ("1" + ":00" * 3000, r"1:00:00:00\.\.\. \(9001 characters\)"),
        ("18446744073709551616", "18446744073709551616"),
    ],
    ids=["5000-digits", "negative", "hex", "sexagesimal", "2^64"],
)
def test_huge_integers_in_a_config_file_name_their_place(tmp_path, value, shown):
    message = rf"train.yaml:2:7: integer {shown} is too large for a config value \(the limit is 2\^64\)"
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(_write(tmp_path, f"preset: tiny\nseed: {value}\n"))
    assert parse_yaml("seed: 18446744073709551615", "ok") == {"seed": 2**64 - 1}


def test_huge_integer_in_cli_set_names_the_field():
    from medeyes.cli.app import app

    result = CliRunner().invoke(app, ["train", "--set", "seed=" + "9" * 5000, "--print-config"])
    assert result.exit_code == 2, result.output
    assert "--set seed:1:1: integer 9999999999... (5000 characters) is too large" in " ".join(result.output.split())
