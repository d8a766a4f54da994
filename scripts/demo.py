"""`make demo`: the main job on the embedded demo model, with no servers and no downloads.

1. `hwsi synth` renders one seeded 2x2-region synthetic slide whose ground truth is known;
2. `hwsi analyze` (default model) answers its test questions; each answer is printed beside
   the ground truth, and the report run's files (evidence GeoJSON, reports, overlay) are kept;
3. `hwsi analyze` writes a report for the real slide tests/data/CMU-1-Small-Region.svs.

Everything goes to --out (default demo-output/, features in its features/ folder). Research use only: the demo
model is tiny and trained on synthetic slides; on a real slide its text shows the pipeline
working, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"
SEED = 7
OPTION = re.compile(r"([A-D])\) (.+?)(?= [A-D]\) |$)")


def hwsi(out: Path, *args: str) -> str:
    """Run the hwsi CLI (as a user would, features kept in ``out``) and return its stdout."""
    env = {**os.environ, "HWSI_FEATURE_DIR": str(out / "features")}
    done = subprocess.run([sys.executable, "-m", "omero_hwsi.cli", *args], env=env, check=True,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output")
    out: Path = parser.parse_args().out.resolve()
    (slide,) = hwsi(out, "synth", "--out", str(out / "synthetic"), "--slides", "1", "--seed",
                    str(SEED), "--split", "test").splitlines()
    rows = [json.loads(line) for line in
            (out / "synthetic" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    print(f"\nsynthetic slide {Path(slide).name} (ground truth: {out / 'synthetic' / 'truth'})\n")
    for row in rows:
        # One folder per question: a template can be asked several times about one slide.
        number = row["question_id"].rsplit("-", 1)[1]
        folder = out / "synthetic-analysis" / f"{number}-{row.get('template', 'question')}"
        options = [f"{letter}) {text}" for letter, text in OPTION.findall(row["question"])]
        task = "report" if row["metadata"] == "Report" else "classify" if options else "vqa"
        # Multiple choice is scored by option likelihood, as in evaluation; never parsed text.
        extra = ["--labels", ",".join(options)] if options else []
        hwsi(out, "analyze", slide, "--out", str(folder), "--task", task, "-q", row["question"],
             *extra, "--evidence", "cell" if task == "report" else "region")
        answer = json.loads((folder / "result.json").read_text(encoding="utf-8"))["answer"]
        mark = "=" if answer.strip() == row["T-answer"].strip() else "~"
        print(f"[{row['metadata']}] {row['question']}\n  model {mark} {answer}\n  truth   {row['T-answer']}\n")
    print(hwsi(out, "analyze", str(CMU), "--out", str(out / "cmu"), "--task", "report"))
    result = json.loads((out / "cmu" / "result.json").read_text(encoding="utf-8"))
    print(f"{CMU.name}: {result['answer']}")
    print(f"\nfiles: {out}/synthetic-analysis/*/ and {out}/cmu/ (result.json, evidence.geojson: drag "
          "onto the slide in QuPath, report.html, report.md, overlay.png)")


if __name__ == "__main__":
    main()
