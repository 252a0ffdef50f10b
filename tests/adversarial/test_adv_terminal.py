"""Terminal control sequences in data (clipboard writes, hidden links, the window title, screen clearing) never
reach the terminal: the CLI shows them as visible escapes (``\\x1b``), whatever field or command carries them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.cli.common import safe
from medeyes.trajectories import Producer, StepRecord, TrajectoryRecord, TrajectoryStore
from medeyes_env.protocol import Action

runner = CliRunner(env={"COLUMNS": "400"})  # one line per row: the asserted text is not wrapped
CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"  # OSC 52: write "rm -rf ~" to the clipboard
LINK = "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"  # OSC 8: a hidden hyperlink
TITLE = "\x1b]0;pwned\x07"  # the window title
CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home
C1 = "\x9b31m\x9d0;c1 title\x9c"  # the same in 8-bit C1 form: CSI, OSC, ST
SPOOF = "yes\rno\x08\x7f\u202eon"  # carriage return, backspace, DEL and a right-to-left override
HOSTILE = f"a{CLIPBOARD}b{LINK}c{TITLE}d{CLEAR}e{C1}f{SPOOF}"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # what must never be printed


def _assert_inert(output: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in RAW.findall(output)})
    assert not found, f"raw control characters reached the terminal: {found}"


def test_safe_shows_every_control_character_visibly():
    shown = safe(HOSTILE)
    _assert_inert(shown)
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in shown and "\\x9b31m" in shown and "\\u202e" in shown
    assert safe("line 1\nline\t2 [/]") == "line 1\nline\t2 \\[/]"  # newline and tab keep their meaning


def test_cases_neutralises_control_sequences_in_every_field(tmp_path: Path):
    data = tmp_path / f"set{TITLE}"
    data.mkdir()
    Image.new("L", (32, 32), 100).save(data / "a.png")
    row = {
        "id": f"id{TITLE}",
        "image": "a.png",
        "question": f"Q {HOSTILE}?",
        "answer": f"yes{CLIPBOARD}",
        "answer_type": "open",
        "modality": f"CT{CLEAR}",
    }
    (data / "cases.jsonl").write_text(json.dumps(row) + "\n")
    result = runner.invoke(app, ["cases", "--data", f"jsonl:{data / 'cases.jsonl'}", "--n", "1"])
    assert result.exit_code == 0, result.output
    _assert_inert(result.output)  # before: every sequence above was printed raw
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in result.output and "\\x1b]0;pwned\\x07" in result.output


def _record(tid: str) -> TrajectoryRecord:
    return TrajectoryRecord(
        trajectory_id=tid,
        case_id=f"c{TITLE}",
        source="test",
        split="test",
        family=f"fam{CLEAR}",
        question=f"Is there {HOSTILE}?",
        options=[f"opt{LINK}", "no"],
        answer_type="open",
        gold_answer=HOSTILE,
        final_answer=f"ans{CLIPBOARD}",
        image_size=(64, 64),
        producer=Producer(kind="other", name=f"me{TITLE}", oracle=f"or{C1}"),
        steps=[
            StepRecord(index=0, text="t", action=None, well_formed=False, error=HOSTILE, error_kind=f"k{CLEAR}"),
            StepRecord(
                index=1, text="t", action=Action.final_answer(HOSTILE), reasoning=HOSTILE, well_formed=True,
                feedback=f"fb{SPOOF}",
            ),
        ],
    )  # fmt: skip


def test_inspect_neutralises_control_sequences_in_stored_trajectories(tmp_path: Path):
    store = TrajectoryStore(tmp_path / "run", producer=Producer(kind="other", name="me"))
    store.append(_record(f"t{CLIPBOARD}"))
    result = runner.invoke(app, ["inspect", str(tmp_path / "run"), "--steps"])
    assert result.exit_code == 0, result.output
    _assert_inert(result.output)  # before: OSC 52, OSC 8, the title and the clear screen went out raw
    assert "\\x1b]8;;http://evil.example" in result.output and "\\u202eon" in result.output


def test_error_messages_neutralise_control_sequences(tmp_path: Path):
    bad = tmp_path / f"x{TITLE}{CLEAR}.jsonl"
    bad.write_text("{not json\n")
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2, result.output
    _assert_inert(result.output)  # the file name is in the one-line error
    assert "\\x1b]0;pwned\\x07" in result.output


def test_rollout_and_eval_tables_neutralise_control_sequences(tmp_path: Path):
    data = tmp_path / f"set{TITLE}"
    data.mkdir()
    Image.new("L", (32, 32), 100).save(data / "a.png")
    row = {"id": "c1", "image": "a.png", "question": "Q?", "answer": "yes", "answer_type": "closed"}
    (data / "cases.jsonl").write_text(json.dumps(row) + "\n")
    spec = f"jsonl:{data / 'cases.jsonl'}"
    rolled = runner.invoke(app, ["rollout", "--agent", "random", "--data", spec, "--n", "1", "--samples", "1"])
    assert rolled.exit_code == 0, rolled.output
    _assert_inert(rolled.output)  # the data spec is in the table's title
    scored = runner.invoke(app, ["eval", "--agent", "random", "--data", spec, "--limit", "1", "--quiet"])
    assert scored.exit_code == 0, scored.output
    _assert_inert(scored.output)
