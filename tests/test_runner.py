"""The one job runner (``chimera_ray.pipelines.runner.run_job``) around stand-in jobs: exit codes,
the one-line messages, report.json and failures/run.json, the output's lease. No Ray starts."""

import json
from functools import partial

import pytest

from chimera_ray.config import Config, ConfigError
from chimera_ray.lease import OutputLease
from chimera_ray.pipelines.runner import run_job


def _cfg(tmp_path) -> Config:
    return Config(output=str(tmp_path / "out"))


def _ok(cfg, report, display, lease):
    report["stage"] = "work"
    assert lease is None or lease.run_id
    display.print("working")
    report["done"] = True


def _boom(cfg, report, display, lease, error=RuntimeError("boom\nsecond line")):
    report["stage"] = "train + generate"
    raise error


def test_a_job_with_a_report_writes_it_and_shows_the_summary(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    code = run_job(_ok, cfg, config_path="c.yaml", verbose=True, lease=True, report=True,
                   summary=lambda r: f"summary of {r['status']}")
    out = capsys.readouterr()
    assert code == 0 and out.err == "" and "working" in out.out and "summary of ok" in out.out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == {"config": "c.yaml", "output": cfg.output, "status": "ok", "stage": "work", "done": True}
    assert not (tmp_path / "out" / "_lease.json").exists()  # released


def test_a_failed_run_leaves_a_report_and_one_error_line(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    code = run_job(_boom, cfg, config_path="c.yaml", verbose=True, lease=True, report=True, summary=lambda r: "no")
    err = capsys.readouterr().err
    out = cfg.output
    assert code == 1
    assert (f"error: the run failed while train + generate: RuntimeError: boom\n"
            f"       details: {out}/failures/run.json (traceback), {out}/report.json\n") in err
    assert "Traceback" in err  # --verbose: the traceback on the terminal
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == "RuntimeError: boom"
    assert report["failure_file"] == f"{out}/failures/run.json"
    failure = json.loads((tmp_path / "out" / "failures" / "run.json").read_text())
    assert failure["stage"] == "train + generate" and "second line" in failure["traceback"]


def test_without_verbose_the_failure_names_the_log(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    code = run_job(_boom, cfg, config_path=None, verbose=False, report=True)
    err = capsys.readouterr().err
    log = tmp_path / "out" / "logs" / "run.log"
    assert code == 1 and f", {log} (Ray's output)" in err


@pytest.mark.parametrize("verbose", [True, False])
def test_a_job_without_a_report_fails_in_one_line_and_writes_nothing(tmp_path, capsys, verbose):
    cfg = _cfg(tmp_path)
    code = run_job(_boom, cfg, config_path=None, verbose=verbose, name="evaluate", what="evaluation")
    err = capsys.readouterr().err
    assert code == 1 and "error: the evaluation failed: RuntimeError: boom\nsecond line" in err
    log = tmp_path / "out" / "logs" / "evaluate.log"
    assert (f"\n       traceback: {log}" in err) == (not verbose)
    assert not (tmp_path / "out" / "report.json").exists() and not (tmp_path / "out" / "failures").exists()


@pytest.mark.parametrize("error, user_errors", [
    (ConfigError(["lora.rank must be >= 1 (got 0)"]), ()),  # USER_ERRORS
    (FileNotFoundError("no finished runs"), (FileNotFoundError,)),  # this job's own
])
def test_user_errors_exit_2_with_their_message_and_no_report(tmp_path, capsys, error, user_errors):
    cfg = _cfg(tmp_path)
    code = run_job(partial(_boom, error=error), cfg, config_path=None, verbose=True, report=True,
                   user_errors=user_errors)
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {error}\n"
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_held_output_is_refused_before_anything_is_written(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    ran = []
    with OutputLease(cfg.output).acquire():
        code = run_job(lambda *a: ran.append(a), cfg, config_path=None, verbose=False, lease=True, report=True)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: output ") and err.count("\n") == 1 and not ran
    assert not (tmp_path / "out" / "logs").exists()
