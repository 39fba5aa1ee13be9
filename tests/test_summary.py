"""The closing summary of a run, from its report: what, where, failures, time, next commands."""

from chimera_ray.summary import run_summary


def _report(**extra):
    return {"output": "runs/r1", "status": "ok", "classes": 3, "requested": {"a": 4, "b": 4, "c": 4},
            "written": {"a": 4, "b": 4, "c": 0}, "failed_classes": ["c"],
            "train": {"a": {"status": "trained"}, "b": {"status": "skipped (already committed)"},
                      "c": {"status": "failed", "error": "boom"}},
            "shards": {"count": 2, "bytes": 2_500_000}, "generation": {"units_generated": 1, "units_skipped": 1},
            "skipped_inputs": [{"code": "image_unreadable", "where": "x.png", "reason": "bad"}],
            "seconds": {"ingest": 1.0, "train": 70.0, "generate": 30.0, "total": 101.0}, **extra}


def test_a_finished_run_says_what_where_and_what_next():
    text = run_summary(_report(), config="jobs/configs/demo.yaml")
    assert text.startswith("Done in 1m41s: 3 classes, 8 of 12 planned images in 2 shards (2.5 MB).")
    assert "runs/r1/shards/" in text and "runs/r1/shards/index.json" in text
    assert "1 trained, 1 already committed, 1 failed" in text
    assert "1 class failed training: c; errors in runs/r1/failures/<class>.json" in text
    assert "1 input row " in text and "runs/r1/report.json -> skipped_inputs" in text
    assert "ingest 1s, train 1m10s, generate 30s" in text
    assert "1 unit generated, 1 kept from an earlier attempt" in text
    assert "chimera-ray report runs/r1" in text and "chimera-ray evaluate jobs/configs/demo.yaml output=runs/r1" in text
    assert "webdataset.WebDataset(urls" in text and "ray.data.read_webdataset(urls)" in text
    assert "datasets.load_dataset('webdataset'" in text


def test_a_failed_run_names_its_cause_and_files_and_suggests_nothing_else():
    text = run_summary(_report(status="failed", stage="train", error="RunFailed: no class is left",
                               failure_file="runs/r1/failures/run.json"))
    assert text.startswith("FAILED while train: RunFailed: no class is left")
    assert "runs/r1/failures/run.json" in text and "Next:" not in text


def test_a_gated_run_says_what_the_gate_kept_and_which_classes_fell_short():
    gate = {"kept": 6, "rejected": 14, "short": 2, "below_floor": ["c"]}
    text = run_summary(_report(gate=gate))
    assert "6 images kept, 14 draws rejected, 2 slots left empty (30% of 20 draws passed; runs/r1/gate/summary.json)" in text
    assert "classes under gate.min_keep_rate: c" in text
    assert "gate " not in run_summary(_report())
