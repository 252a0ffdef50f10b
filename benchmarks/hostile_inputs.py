"""Time and memory bounds of opening inputs from others: big files, and hostile cases of tests/adversarial.

Each case runs in its own subprocess after its imports, so its time and its growth of peak resident memory
(``VmHWM``; ``ru_maxrss`` where there is no /proc) are its own. Prints a table with the bound each case must
stay under (docs/security.md says why) and exits 1 when one is exceeded.
Run: python benchmarks/hostile_inputs.py [--lines 1000000] [--records 20000] [--only parquet]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# name -> (input folder, imports, timed body); N = --lines, R = --records
PARQUET = "import pyarrow.parquet\nfrom medeyes_env.sources import open_source"  # pyarrow's import is not the case's
CASES: dict[str, tuple[str, str, str]] = {
    "jsonl dataset, N lines": (
        "dataset",
        "from medeyes_env.sources import open_source",
        """
        source = open_source(f"jsonl:{root / 'cases.jsonl'}")
        assert source.size("test") == N, source.size("test")
        """,
    ),
    "jsonl dataset, N lines, 1% hostile, skip_bad=1": (
        "hostile_dataset",
        "from medeyes_env.sources import open_source",
        """
        source = open_source(f"jsonl:{root / 'cases.jsonl'}?skip_bad=1")
        assert source.n_skipped == N // 100, source.n_skipped
        """,
    ),
    "trajectory store, R records (open + read all)": (
        "store",
        "from medeyes.trajectories import TrajectoryStore",
        """
        store = TrajectoryStore(root / "run")
        assert sum(1 for _ in store.records()) == R
        """,
    ),
    "YAML alias bomb (9^9 strings) refused": (
        "bomb",
        "from medeyes.training.config import TrainConfig\nfrom medeyes_env.errors import ConfigError",
        """
        try:
            TrainConfig.from_yaml(root / "bomb.yaml")
            raise SystemExit("accepted")
        except ConfigError:
            pass
        """,
    ),
    "HTML report, 20 records with 1e308 boxes": (
        "report",
        "from medeyes.report.html import render_report\nfrom medeyes.trajectories import TrajectoryStore, read_records",
        """
        render_report(read_records(root / "huge"), TrajectoryStore(root / "huge", read_only=True))
        """,
    ),
    "parquet 2 kB: 200 image cells of 5 MB in 1 row group, image 0": (
        "parquet/dict_images",
        PARQUET,
        """
        assert open_source(f"vqa_rad_hf:{root}").case("test", 0).load_image().size == (64, 48)
        """,
    ),
    "parquet 80 kB: the same, 1 GB uncompressed, refused": (
        "parquet/plain_images",
        PARQUET + "\nfrom medeyes_env.errors import ImageLoadError",
        """
        try:
            open_source(f"vqa_rad_hf:{root}").case("test", 0).load_image()
            raise SystemExit("accepted")
        except ImageLoadError:
            pass
        """,
    ),
    "parquet 11 kB: one question of 300 MB, refused": (
        "parquet/question",
        PARQUET + "\nfrom medeyes_env.errors import SourceError",
        """
        try:
            open_source(f"vqa_rad_hf:{root}")
            raise SystemExit("accepted")
        except SourceError:
            pass
        """,
    ),
    "parquet 280 kB: 3,000,000 dictionary rows, refused": (
        "parquet/rows",
        PARQUET + "\nfrom medeyes_env.errors import SourceError",
        """
        try:
            open_source(f"vqa_rad_hf:{root}")
            raise SystemExit("accepted")
        except SourceError:
            pass
        """,
    ),
    "parquet 95 kB: 1,000,000 rows (the row limit), open": (
        "parquet/limit_rows",
        PARQUET,
        """
        assert open_source(f"vqa_rad_hf:{root}").size("test") == 1_000_000
        """,
    ),
    "PNG 131 kB: 16-bit, 64 Mpx (the pixel limit)": (
        "images",
        "from medeyes_env.cases import load_image_file",
        """
        assert load_image_file(root / "gray16.png").size == (8000, 8000)
        """,
    ),
    "TIFF 386 kB: float, 64 Mpx (256 MB decoded), refused": (
        "images",
        "from medeyes_env.cases import load_image_file\nfrom medeyes_env.errors import ImageLoadError",
        """
        try:
            load_image_file(root / "float64mpx.tif")
            raise SystemExit("accepted")
        except ImageLoadError:
            pass
        """,
    ),
    "TIFF 289 kB: float, 48 Mpx (the decoded-byte limit)": (
        "images",
        "from medeyes_env.cases import load_image_file",
        """
        assert load_image_file(root / "float48mpx.tif").size == (8000, 6000)
        """,
    ),
}
BOUNDS = {  # (seconds, MB of peak-memory growth) at the default sizes: 10^6 lines, 20,000 records
    # linear: at most 60 us and 500 bytes a line on the project's shared 2-core machine
    "jsonl dataset, N lines": (60.0, 500.0),
    "jsonl dataset, N lines, 1% hostile, skip_bad=1": (60.0, 500.0),
    "trajectory store, R records (open + read all)": (30.0, 100.0),
    "YAML alias bomb (9^9 strings) refused": (1.0, 50.0),
    "HTML report, 20 records with 1e308 boxes": (10.0, 200.0),
    # parquet (issue 21; before: MemoryError or 1 GB, 3 GB, 0.9 GB, 1.8 GB and 64 s), images (before: 3.1 GB, 3.5 GB)
    "parquet 2 kB: 200 image cells of 5 MB in 1 row group, image 0": (5.0, 150.0),
    "parquet 80 kB: the same, 1 GB uncompressed, refused": (5.0, 100.0),
    "parquet 11 kB: one question of 300 MB, refused": (5.0, 100.0),
    "parquet 280 kB: 3,000,000 dictionary rows, refused": (5.0, 100.0),
    "parquet 95 kB: 1,000,000 rows (the row limit), open": (60.0, 600.0),
    "PNG 131 kB: 16-bit, 64 Mpx (the pixel limit)": (10.0, 400.0),
    "TIFF 386 kB: float, 64 Mpx (256 MB decoded), refused": (1.0, 50.0),
    "TIFF 289 kB: float, 48 Mpx (the decoded-byte limit)": (10.0, 400.0),
}

RUNNER = """
import json, re, resource, sys, time
from pathlib import Path
root, N, R = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def peak_kb():  # VmHWM starts afresh at exec; ru_maxrss keeps the parent's peak (the writer of the inputs)
    try:
        return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{setup}
base = peak_kb()
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
grown = peak_kb() - base
print(json.dumps({{"seconds": seconds, "growth_mb": grown / 1024}}))
"""
HOSTILE_LINES = (b"[" * 5000, b'{"id": "\xff"}', b'{"id": 1, "id": 2}', b'{"id": ' + b"9" * 5000 + b"}")


def _write_datasets(root: Path, lines: int) -> None:
    from PIL import Image

    row = {"image": "img/a.png", "question": "Is there a nodule?", "answer": "yes", "answer_type": "closed"}
    for name in ("dataset", "hostile_dataset"):
        (root / name / "img").mkdir(parents=True)
        Image.new("L", (64, 48), 128).save(root / name / "img" / "a.png")
        with (root / name / "cases.jsonl").open("wb") as handle:
            for i in range(lines):
                if name == "hostile_dataset" and i % 100 == 99:
                    handle.write(HOSTILE_LINES[i // 100 % 4] + b"\n")
                else:
                    handle.write((json.dumps({"id": f"c{i}", **row}) + "\n").encode())


def _write_stores(root: Path, records: int) -> None:
    from PIL import Image

    from medeyes.trajectories import Producer, StepRecord, TrajectoryRecord, TrajectoryStore
    from medeyes_env.protocol import Action

    producer = Producer(kind="other", name="bench")
    answer = StepRecord(index=0, text="<answer>yes</answer>", action=Action.final_answer("yes"), well_formed=True)
    common = dict(case_id="c", source="s", split="test", question="q?", answer_type="closed", gold_answer="yes")
    template = TrajectoryRecord(trajectory_id="@", image_size=(64, 64), producer=producer, steps=[answer], **common)
    text = template.model_dump_json()
    (root / "store" / "run").mkdir(parents=True)
    with (root / "store" / "run" / "trajectories.jsonl").open("w") as handle:  # what append() writes, minus fsyncs
        handle.writelines(text.replace('"@"', f'"t{i}"') + "\n" for i in range(records))

    huge = TrajectoryStore(root / "report" / "huge")
    digest = huge.put_image(Image.new("RGB", (256, 256)))
    scan = StepRecord(index=0, text="t", action=Action.scan(*[(0, 0, 1e308, 1e308)] * 5), well_formed=True)
    for i in range(20):
        huge.append(
            TrajectoryRecord(
                trajectory_id=f"h{i}",
                image_size=(256, 256),
                producer=producer,
                original_image=digest,
                gold_boxes=[(1.0, 1.0, 1e308, 1e308)],
                steps=[scan, answer.model_copy(update={"index": 1})],
                **common,
            )
        )

    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    (root / "bomb").mkdir()
    (root / "bomb" / "bomb.yaml").write_text("data_options:\n" + "\n".join("  " + level for level in levels))


def _write_parquets(root: Path) -> None:
    """Small files that expand to gigabytes (pyarrow: dictionary encoding and zstd store a repeat once)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def repeated(values: list, rows: int, kind: object = None) -> object:
        indices = pa.array(np.arange(rows, dtype=np.int32) % len(values))
        return pa.DictionaryArray.from_arrays(indices, pa.array(values, type=kind))

    def write(name: str, image: object, question: object, rows: int, **options: object) -> None:
        (root / "parquet" / name / "data").mkdir(parents=True)
        table = pa.table({"image": image, "question": question, "answer": repeated(["yes"], rows)})
        path = root / "parquet" / name / "data" / "test-00000-of-00001.parquet"
        pq.write_table(table, path, row_group_size=1 << 30, compression="zstd", **options)

    def images(cells: object, rows: int) -> object:
        return pa.StructArray.from_arrays([cells, pa.nulls(rows, pa.string())], names=["bytes", "path"])

    buffer = io.BytesIO()
    Image.new("L", (64, 48), 90).save(buffer, format="PNG")
    png = buffer.getvalue()
    cell = png + b"\0" * (5 << 20)  # a valid PNG, padded to 5 MB
    question = repeated(["Is there a nodule?"], 200)
    write("dict_images", images(repeated([cell], 200, pa.binary()), 200), question, 200)
    write("plain_images", images(pa.array([cell] * 200, pa.binary()), 200), question, 200, use_dictionary=False)
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image = pa.array([{"bytes": png, "path": None}], kind)
    write("question", image, pa.array(["x" * 300_000_000]), 1, use_dictionary=False)
    for name, rows in (("rows", 3_000_000), ("limit_rows", 1_000_000)):
        nulls = pa.nulls(rows, kind)
        write(name, nulls, repeated([f"Is there a nodule? ({i})" for i in range(1000)], rows), rows)


def _write_images(root: Path) -> None:
    """Small files whose pixels take hundreds of MB: a 16-bit PNG and float TIFFs, mostly zeros."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir()
    gray = np.zeros((8000, 8000), np.uint16)
    gray[::97, ::89] = 4000
    Image.fromarray(gray).save(root / "images" / "gray16.png")
    for name, height in (("float64mpx.tif", 8000), ("float48mpx.tif", 6000)):
        values = np.zeros((height, 8000), np.float32)
        values[::97, ::89] = 1.5
        Image.fromarray(values).save(root / "images" / name, compression="tiff_adobe_deflate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000, help="Lines of the JSONL datasets.")
    parser.add_argument("--records", type=int, default=20_000, help="Records of the trajectory store.")
    parser.add_argument("--only", default="", help="Run only the cases whose name contains this text.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write_datasets(root, args.lines)
        _write_stores(root, args.records)
        _write_parquets(root)
        _write_images(root)
        print(f"{'case':60s} {'seconds':>8s} {'+MB':>6s} {'bound s':>8s} {'bound +MB':>10s}  ok")
        failed = False
        for name, (where, setup, body) in CASES.items():
            if args.only not in name:
                continue
            code = RUNNER.format(setup=setup, body=textwrap.dedent(body))
            command = [sys.executable, "-c", code, str(root / where), str(args.lines), str(args.records)]
            result = subprocess.run(command, capture_output=True, text=True)
            label = name.replace("N lines", f"{args.lines:,} lines").replace("R records", f"{args.records:,} records")
            if result.returncode != 0:
                print(f"{label:60s} failed: {result.stderr.strip().splitlines()[-1]}")
                failed = True
                continue
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            bound_s, bound_mb = BOUNDS[name]
            ok = measured["seconds"] <= bound_s and measured["growth_mb"] <= bound_mb
            failed |= not ok
            print(
                f"{label:60s} {measured['seconds']:8.2f} {measured['growth_mb']:6.0f} {bound_s:8.1f} {bound_mb:10.0f}"
                f"  {'yes' if ok else 'NO'}"
            )
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
