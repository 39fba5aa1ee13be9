"""The one job runner: what ``chimera-ray run``, ``evaluate`` and ``reproduce`` (and ``jobs/*.py``,
which call them) share around their job. The entry point parses the command line once into a
``Config`` and hands it here (torchtune's ``recipe_main(cfg)``); the job never sees argparse.

The runner owns the output's lease, the job's console (Ray's and the libraries' output in
``<output>/logs/<name>.log``), the run report and what a failure leaves behind:

* a user error (``USER_ERRORS``: config, data, base model, cache, lease) ends with one line and exit 2;
* any other exception: its traceback goes to the log, one line (and where to look) to the terminal,
  exit 1; a job with a report also gets ``failures/run.json`` and ``report.json`` saying why.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable

from chimera_ray.config import Config
from chimera_ray.io import write_json
from chimera_ray.lease import LeaseHeld, OutputLease
from chimera_ray.pipelines.common import USER_ERRORS, quiet_console
from chimera_ray.progress import Display

__all__ = ["Job", "run_job"]

# job(cfg, report, display, lease): runs on a validated config, filling ``report`` stage by stage
# (``report["stage"]`` names where a failure happened), showing its plan, progress and results on
# ``display``; ``lease`` is the driver's hold on the output (None for a job run without one).
Job = Callable[[Config, dict, Display, "OutputLease | None"], None]


def run_job(
    job: Job,
    cfg: Config,
    *,
    config_path: str | None,
    verbose: bool,
    name: str = "run",
    what: str = "run",
    out: str | None = None,
    lease: bool = False,
    report: bool = False,
    summary: Callable[[dict], str] | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Runs ``job`` on ``cfg``; returns the exit code (0 done, 1 failed, 2 bad config or input).

    Args:
        job: the job; see ``Job``.
        cfg: the validated config (file + overrides).
        config_path: the config file given (recorded in the report).
        verbose: Ray's and the libraries' output, and a failure's traceback, on the terminal
            instead of in the log file.
        name: the log file's name, ``<out>/logs/<name>.log``.
        what: the job in the failure line ("error: the {what} failed...").
        out: the folder of the log (and report); default ``cfg.output``.
        lease: take the output's lease before anything is written there (one driver per output).
        report: write ``<out>/report.json`` at the end (status "ok" or "failed") and, on failure,
            ``<out>/failures/run.json`` with the traceback.
        summary: the closing text from the finished report, shown after the progress view closes.
        user_errors: more exceptions that are this job's user errors (exit 2, one line).
    """
    out = (out or cfg.output).rstrip("/")
    held = None
    if lease:
        try:
            # One driver per output, taken before anything is written there (the log included).
            held = OutputLease(out).acquire()
        except LeaseHeld as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    run_report: dict = {"config": config_path, "output": out, "status": "running"}
    error, code = "", 0
    with held or contextlib.nullcontext(), quiet_console(out, verbose, name=name) as (display, log_path):
        try:
            job(cfg, run_report, display, held)
            if report:
                run_report["status"] = "ok"
                write_json(f"{out}/report.json", run_report)
            display.close()
            if summary is not None:
                display.print(summary(run_report))
        except (*USER_ERRORS, *user_errors) as e:
            error, code = f"error: {e}", 2
        except Exception as e:  # noqa: BLE001 - one line for the user, the traceback in the log
            code = 1
            if report:
                error = _failure_report(e, run_report, out, display, log_path, what)
            else:
                print(traceback.format_exc(), file=sys.stderr)  # the log file (the terminal with --verbose)
                error = (f"error: the {what} failed: {type(e).__name__}: {str(e)[:300]}"
                         + (f"\n       traceback: {log_path}" if log_path else ""))
    if error:
        print(error, file=sys.stderr)
    return code


def _failure_report(e: Exception, report: dict, out: str, display: Display, log_path: str | None, what: str) -> str:
    """Writes ``failures/run.json`` (the traceback) and ``report.json`` (status "failed"), prints the
    traceback to the log; returns the lines for the terminal."""
    display.close()
    cause = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    tb = traceback.format_exc()
    failure = f"{out}/failures/run.json"
    report.update(status="failed", error=cause, failure_file=failure)
    error = ""
    try:
        write_json(failure, {"stage": report.get("stage"), "error": cause, "traceback": tb})
        write_json(f"{out}/report.json", report)
    except Exception as write_error:  # noqa: BLE001 - the output itself may be what failed
        error = f"error: could not write the failure report to {out}: {write_error}\n"
    print(tb, file=sys.stderr)  # the log file (the terminal with --verbose)
    return error + (f"error: the {what} failed while {report.get('stage')}: {cause}\n"
                    f"       details: {failure} (traceback), {out}/report.json"
                    + (f", {log_path} (Ray's output)" if log_path else ""))
