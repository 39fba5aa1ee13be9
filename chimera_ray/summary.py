"""The closing words of a run: what was produced and where, what failed or was skipped (and the
file that lists it), time per phase, and the commands to run next. Plain text from the run
report (``report.json``); no Ray, no torch.
"""

from __future__ import annotations

import shlex

from chimera_ray.progress import format_bytes, format_seconds

__all__ = ["run_summary"]


def _q(s: str) -> str:
    return shlex.quote(str(s))


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def run_summary(report: dict, *, config: str | None = None, log_path: str | None = None) -> str:
    """The summary of a finished (or failed) main-job run, as lines of text.

    Args:
        report: the run report (``report.json``'s content).
        config: the config file the run was given (for the next commands).
        log_path: where Ray's and the libraries' own output went.
    """
    out = report["output"]
    ok = report.get("status") == "ok"
    sec = report.get("seconds", {})
    train = report.get("train", {})
    failed = report.get("failed_classes", [])
    trained = sum(1 for v in train.values() if v.get("status") == "trained")
    kept = sum(1 for v in train.values() if str(v.get("status", "")).startswith("skipped"))
    shards = report.get("shards", {})
    written = sum(report.get("written", {}).values())
    requested = sum(report.get("requested", {}).values())
    lines = []
    if ok:
        lines.append(f"Done in {format_seconds(sec.get('total'))}: {report.get('classes', 0)} classes, "
                     f"{written} of {requested} planned images in {_n(shards.get('count', 0), 'shard')} "
                     f"({format_bytes(shards.get('bytes', 0))}).")
    else:
        lines.append(f"FAILED while {report.get('stage')}: {report.get('error', '')}")
    lines.append(f"  shards     {out}/shards/  (index: {out}/shards/index.json)")
    if train:
        words = [f"{trained} trained"] + ([f"{kept} already committed"] if kept else []) + [f"{len(failed)} failed"]
        lines.append(f"  adapters   {out}/adapters/  ({', '.join(words)})")
    gen = report.get("generation")
    if gen and gen.get("units_skipped"):
        lines.append(f"  generation {_n(gen['units_generated'], 'unit')} generated, {gen['units_skipped']} kept from an "
                     "earlier attempt")
    if gen and gen.get("units_failed"):
        lines.append(f"  generation {_n(gen['units_failed'], 'unit')} failed after ray.unit_attempts attempts (errors in "
                     f"{out}/shards/index.json -> generation.failed_units; rerun the same command to retry them)")
    if gen and gen.get("units_held"):
        lines.append(f"  generation {_n(gen['units_held'], 'unit')} held back: they hold classes that failed training "
                     "(a rerun that trains them generates exactly these units)")
    gate = report.get("gate")
    if gate:
        draws = gate["kept"] + gate["rejected"]
        rate = f"{gate['kept'] / draws:.0%} of {draws} draws passed" if draws else "no draw scored"
        lines.append(f"  gate       {gate['kept']} images kept, {gate['rejected']} draws rejected, "
                     f"{gate['short']} slots left empty ({rate}; {out}/gate/summary.json)")
        if gate.get("below_floor"):
            lines.append(f"  gate       classes under gate.min_keep_rate: {', '.join(gate['below_floor'][:8])}"
                         + (" ..." if len(gate["below_floor"]) > 8 else ""))
    lines.append(f"  report     {out}/report.json  (plan: {out}/plan.json, config: {out}/config.yaml)")
    if log_path:
        lines.append(f"  log        {log_path}  (Ray's and the libraries' own output)")
    # Training and generation overlap: "train + generate" is their wall time together.
    phases = [(name, sec[key]) for name, key in (("ingest", "ingest"), ("train", "train"), ("generate", "generate"),
                                                 ("train + generate", "train_and_generate")) if key in sec]
    if phases:
        lines.append("  time       " + ", ".join(f"{n} {format_seconds(s)}" for n, s in phases))
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        lines.append(f"  failures   {_n(len(failed), 'class', 'classes')} failed training: {shown}; errors in {out}/failures/<class>.json "
                     "(the run goes on without them; rerun the same command to retry them)")
    if report.get("failure_file"):
        lines.append(f"  failure    {report['failure_file']} (the traceback)")
    skipped = report.get("skipped_inputs", [])
    if skipped:
        lines.append(f"  skipped    {_n(len(skipped), 'input row')} (bad images or boxes), each with its reason in "
                     f"{out}/report.json -> skipped_inputs")
    if not ok:
        return "\n".join(lines)
    cfg = f"{_q(config)} " if config else ""
    shards_dir = f"{out}/shards"
    lines += [
        "Next:",
        f"  chimera-ray report {_q(out)}                       # one HTML page: shots, samples, weights, metrics",
        f"  chimera-ray evaluate {cfg}output={_q(out)}   # downstream classifier + fidelity metrics -> {out}/eval/",
        "  read the shards (Python):",
        f"    from chimera_ray.shards import shard_urls; urls = shard_urls({shards_dir!r})",
        "    webdataset:  webdataset.WebDataset(urls, shardshuffle=len(urls)).decode('pil').to_tuple('png', 'cls', 'json')",
        "    Ray Data:    ray.data.read_webdataset(urls)",
        "    HF datasets: datasets.load_dataset('webdataset', data_files={'train': urls}, split='train')",
    ]
    return "\n".join(lines)
