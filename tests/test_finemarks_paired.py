"""experiments/finemarks_paired.py as a user runs it: run folders and a committed records file
merge, --save writes records that read back to the same tables, sub-form shares are averaged."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "finemarks_paired.py"


def _result(tail: float, subform_cov: float | None = None, shares: dict | None = None) -> dict:
    oracle = None
    if subform_cov is not None:
        oracle = {"mean": {"fidelity": 0.3, "subform_coverage": subform_cov},
                  "per_class": {c: {"subform_shares": s, "fidelity": 0.3} for c, s in (shares or {}).items()}}
    return {"mode": "x", "images": 8, "downstream": {"tail_acc": tail, "predicted": {"a": {"a": 3}}},
            "metrics": {"mean": {"fd": 1.5}}, "oracle": oracle}


def _write(root: Path, seed: int, run: str, result: dict) -> None:
    path = root / f"seed{seed}" / run / "eval" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))


def _run(*args) -> str:
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_records_merge_with_run_folders_and_round_trip(tmp_path):
    # seeds 0-1 only as a records file, seed 2 only as run folders: chimera - one_head on tail
    # accuracy is 1, 2, 3 points -> mean 2, sd 1, 95 % t half-width t(0.975, 2) / sqrt(3) = 2.484
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"what": "kept across saves", "runs": {
        "0": {"chimera": _result(0.51, 0.5), "chimera_one_head": _result(0.50, 0.75)},
        "1": {"chimera": _result(0.52, 0.5), "chimera_one_head": _result(0.50, 0.5)}}}))
    runs = tmp_path / "out"
    _write(runs, 2, "chimera", _result(0.53, 1.0, {"a": [0.2, 0.2, 0.6], "b": [0.0, 0.4, 0.6], "c": [None] * 3}))
    _write(runs, 2, "chimera_one_head", _result(0.50, 2 / 3, {"a": [0.1, 0.1, 0.8]}))

    saved = tmp_path / "saved.json"
    text = _run(records, runs, "--save", saved)
    assert "| chimera - chimera_one_head | 3 | +2.0 [-0.5, +4.5] (3/3)" in text
    # shares: mean over the classes with faithful images (c has none), seed 2 only (records hold none)
    assert "| chimera | 2 | 10.0 / 30.0 / 60.0 |" in text
    assert "| chimera_one_head | 2 | 10.0 / 10.0 / 80.0 |" in text

    data = json.loads(saved.read_text())
    assert data["what"] == "kept across saves" and sorted(data["runs"]) == ["0", "1", "2"]
    assert "predicted" not in data["runs"]["2"]["chimera"]["downstream"]  # per-image predictions are dropped
    assert _run(saved) == text  # the saved records alone give the same tables
    assert "| chimera - chimera_one_head | 2 |" in _run(saved, "--seeds", "0", "2")


def test_missing_source_says_what_to_give(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode != 0 and "does not exist" in out.stderr
