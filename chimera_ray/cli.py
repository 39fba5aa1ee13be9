"""``chimera-ray``: one CLI whose subcommands mirror the jobs.

Every subcommand takes ``--config FILE.yaml`` plus dotted overrides (``train.steps=50``).
Subcommands import what they need inside their handler: ``chimera-ray --help`` must not pay
for importing torch, diffusers and transformers (several seconds). The config is given the same
way to every subcommand: ``--config FILE`` or ``FILE`` as the first positional argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

# The config module is light (dataclasses + yaml); everything heavy is imported by the handler
# that needs it, so that `chimera-ray --help` does not pay for torch and diffusers.
from chimera_ray.config import (
    SMOKE_EVALUATE,
    SMOKE_RUN,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
)
from chimera_ray.console import setup_logging
from chimera_ray.data.boxes import parse_box
from chimera_ray.data.ingest import IMAGE_EXTENSIONS, ImageRow
from chimera_ray.data.keys import safe_key
from chimera_ray.io import write_json
from chimera_ray.plan import (
    ClassPlan,
    class_counts,
    format_plan,
    plan_classes,
    subsample_shots,
    summarize,
)
from chimera_ray.sampling import mixture_weights
from chimera_ray.summary import run_summary  # light: formatting only

__all__ = ["main", "build_parser"]

_OVERRIDES_HELP = "config overrides as dotted key=value pairs, e.g. train.steps=50 lora.rank=4"


def _config_args(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--config", help="YAML config file (local path or fsspec URL); defaults apply without one. "
                                     "The file may also be given as the first positional argument.")
    if output:
        p.add_argument("--output", help="output folder or URL (overrides the config's `output`)")
    p.add_argument("overrides", nargs="*", help="[CONFIG.yaml] " + _OVERRIDES_HELP)


_EXIT_CODES = "Exit codes: 0 done, 1 failed, 2 bad config or input."


def _job_args(p: argparse.ArgumentParser) -> None:
    """The arguments every Ray job takes: its config, --verbose, dotted overrides."""
    p.add_argument("--config", help="YAML config, e.g. jobs/configs/demo.yaml (or give it as the first positional)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and the libraries' own output and a failure's traceback on the terminal "
                        "(default: in <output>/logs/<command>.log, whose path is printed)")
    p.add_argument("overrides", nargs="*", help="[CONFIG.yaml] " + _OVERRIDES_HELP)


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """``--config FILE`` or a first positional ``FILE`` (any argument without ``=``), then overrides."""
    overrides = list(args.overrides or [])
    config = args.config
    if overrides and "=" not in overrides[0]:
        if config is not None:
            raise ConfigError([f"two config files given: --config {config!r} and {overrides[0]!r}; pass one"])
        config, overrides = overrides[0], overrides[1:]
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera-ray",
        description="ChimeraLoRA synthetic datasets: multi-head LoRA per class, Dirichlet head mixtures per image.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_cluster_jobs(sub)
    _add_local_commands(sub)
    _add_inspection_commands(sub)
    _add_toy_command(sub)
    return parser


def _add_cluster_jobs(sub) -> None:
    """The cluster jobs: ``run`` (the main job), ``plan`` (its cost), ``evaluate``, ``reproduce``."""
    p = sub.add_parser("run", help="the main job: tail classes -> Ray Train fine-tunes -> Ray Data shards",
                       description="Validate, plan, fine-tune every tail class on Ray Train and generate WebDataset "
                                   "shards on Ray Data (what jobs/full.py runs under `ray job submit`). Shows one "
                                   "progress view per phase and a closing summary; Ray's own output goes to "
                                   "<output>/logs/run.log. " + _EXIT_CODES)
    _job_args(p)
    p.add_argument("--smoke-test", action="store_true", help="tiny run: 2 classes, 4 steps, 3 images each")
    p = sub.add_parser("plan", help="the plan and its cost: GPU-hours and storage, from a short measured calibration",
                       description="Validate and plan like `run`, then time a few training steps and one generation "
                                   "batch of the configured base model on this machine's device and extrapolate: "
                                   "device-hours for training and generation, images, bytes, shard count and sizes. "
                                   "Writes the estimate as JSON (default: <output>/estimate.json). Starts no Ray. "
                                   + _EXIT_CODES)
    p.add_argument("--json", dest="json_out", help="where to write the estimate (default: <output>/estimate.json)")
    p.add_argument("--train-steps", type=int, default=5, help="training steps timed (after one warm-up step; default 5)")
    p.add_argument("--no-calibration", action="store_true",
                   help="only the plan, counts and storage bound: load no model, time nothing")
    p.add_argument("--smoke-test", action="store_true", help="estimate the `run --smoke-test` run")
    _config_args(p)
    p = sub.add_parser("evaluate", help="downstream classifier + fidelity metrics of a finished run",
                       description="Train a classifier with Ray Train on the run's real training split plus its "
                                   "synthetic shards, score it on the real test split (<output>/eval/downstream.json), "
                                   "then per-class fidelity/diversity metrics (<output>/eval/metrics.json); what "
                                   "jobs/downstream.py runs. " + _EXIT_CODES)
    _job_args(p)
    p.add_argument("--smoke-test", action="store_true", help="tiny run: 20 classifier steps")
    p.add_argument("--tag", default="", help="suffix for the result files (downstream-TAG.json)")
    p = sub.add_parser("reproduce", help="the method comparison: real-only, base, class-wise, image-wise, ChimeraLoRA",
                       description="Every method over several seeds plus ablations on the embedded default, each run "
                                   "in <out>/seed<S>/<method>/ with its shards and eval/*.json; a rerun skips finished "
                                   "runs. Writes <out>/results.json and results.md (docs/results/results.md); what "
                                   "jobs/reproduce.py runs. Config default: jobs/configs/demo.yaml. " + _EXIT_CODES)
    _job_args(p)
    p.add_argument("--out", default="outputs/reproduce", help="root folder of all runs (default: outputs/reproduce)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of real_only base classwise imagewise chimera (default: all)")
    p.add_argument("--no-ablations", action="store_true",
                   help="skip the ablations (alpha, one head, no boosting, LoFT-matched rank)")
    p.add_argument("--ablations", nargs="+", default=None, metavar="NAME",
                   help="only these ablations, e.g. one_head alpha0.1 (names with or without chimera_; "
                        "default: all of alpha0.1 alpha10 one_head no_boost rank_loft)")
    p.add_argument("--reference", default="chimera",
                   help="method the paired differences are taken against (default: chimera)")
    p.add_argument("--classifier-seeds", type=int, default=1, metavar="N",
                   help="classifiers trained per synthetic set (seeds S, S+1000, ...); a run's accuracies are "
                        "their mean (default 1)")
    p.add_argument("--gate", action="store_true",
                   help="also run each fine-tuned method gated (<method>_gated: its adapters, generated again "
                        "through the quality gate of the config's gate section, docs/guides/quality_gate.md)")
    p.add_argument("--summarize-only", action="store_true",
                   help="only aggregate the runs already finished under --out into results.json/.md (no Ray)")


def _add_local_commands(sub) -> None:
    """One machine, no Ray: ``train`` one class, ``generate`` from adapters, ``export-lora``."""
    p = sub.add_parser("train", help="fine-tune one class's adapters on this machine",
                       description="Fine-tune one class (a folder of its images, optional boxes) into <output>/adapters/<key>.")
    p.add_argument("--images", required=True, help="folder (or URL) holding the class's real images")
    p.add_argument("--class-name", required=True, help="human-readable class name used in the prompt")
    p.add_argument("--boxes", help="JSON file mapping image file name -> [[x0, y0, x1, y1], ...] in pixels")
    p.add_argument("--label", type=int, default=0, help="integer label id recorded with the adapter (default 0)")
    _config_args(p)
    p = sub.add_parser("generate", help="generate images from trained adapters into a folder",
                       description="Generate generate.samples_per_class images per class into <output>/images/<key>/ "
                                   "with metadata.jsonl.")
    p.add_argument("--classes", help="comma-separated class keys (default: every adapter under <output>/adapters)")
    p.add_argument("--num", type=int, help="images per class (overrides generate.samples_per_class)")
    _config_args(p)
    p = sub.add_parser("export-lora", help="write one fixed mixture as a standard diffusers LoRA",
                       description="Export (A_c, B' = sum_i w_i B_i) as pytorch_lora_weights.safetensors that "
                                   "diffusers' pipe.load_lora_weights(folder) loads.")
    p.add_argument("--adapter", required=True, help="adapter folder written by `train` (<output>/adapters/<key>)")
    p.add_argument("--out", required=True, help="folder to write the LoRA into")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", help="comma-separated mixture weights, one per shot, summing to 1")
    g.add_argument("--sample-index", type=int, help="use the Dirichlet draw of this sample index (run seed from config)")
    _config_args(p, output=False)


def _add_inspection_commands(sub) -> None:
    """Look before and after a run: ``validate``, ``config``, ``report``, ``probe``."""
    p = sub.add_parser("validate", help="check config, dataset and storage; print every problem in one table",
                       description="Check the config, every URL it names (data, S3 prefixes, output), the dataset's rows "
                                   "and images, and print the plan. Exit 0 when nothing is fatal, 1 when something "
                                   "is, 2 for config errors. CONFIG may be given as the first positional argument.")
    p.add_argument("--images", choices=("tail", "all", "none"),
                   help="which images to open (default: data.check_images; 'all' reads every image)")
    p.add_argument("--max-per-code", type=int, default=20, help="table rows shown per problem code (default 20)")
    p.add_argument("--json", dest="json_out", help="also write every problem as JSON to this file")
    _config_args(p)
    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides) as YAML")
    _config_args(p)
    p = sub.add_parser("report", help="write one self-contained HTML page for a run directory",
                       description="Real shots, synthetic samples with their mixture weights, a Dirichlet "
                                   "concentration sweep, weight distributions and (when present) eval results of a "
                                   "run, in one HTML file with every image embedded.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder or URL (holds plan.json)")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--samples", type=int, default=8, help="synthetic images shown per class (default 8)")
    p.add_argument("--no-sweep", action="store_true",
                   help="skip the concentration sweep (it loads the base model and generates 6 images per class)")
    p.add_argument("--config", help="YAML config for the sweep's model settings (default: the run's, as the page says)")
    p.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP + " (of the sweep's config, e.g. model.device=cpu)")
    p = sub.add_parser("probe", help="do the heads carry their shots? one-hot images, identification, coverage",
                       description="Per trained class of a run: images at one-hot head weights with shared noise "
                                   "seeds; how far apart the heads' images are (against the noise), how often head i's "
                                   "image is nearest to shot i (against chance 1/K), a two-head interpolation row, "
                                   "and held-out coverage across a Dirichlet alpha sweep. Writes RUN_DIR/probe/.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (config.yaml, plan.json, adapters/)")
    p.add_argument("--classes", nargs="*", default=[], metavar="KEY", help="class keys to probe (default: all trained)")
    p.add_argument("--seeds", type=int, default=4, help="noise seeds shared by the heads (default 4)")
    p.add_argument("--alphas", type=float, nargs="*", default=[0.05, 0.3, 1.0, 5.0, 50.0],
                   help="Dirichlet concentrations of the coverage sweep")
    p.add_argument("--per-alpha", type=int, default=16, help="images per alpha (default 16)")
    p.add_argument("--out", help="folder for probe.json and the grids (default RUN_DIR/probe)")


def _add_toy_command(sub) -> None:
    """``toy build`` / ``toy evaluate``: the embedded toy base model."""
    p = sub.add_parser("toy", help="build or evaluate the embedded toy base model",
                       description="The embedded toy base model (builtin:toy): pretrain it from scratch into a folder, "
                                   "or measure how recognisable its generations are.")
    toy = p.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    b = toy.add_parser("build", help="pretrain the toy base model into OUT_DIR",
                       description="Pretrain the toy base model (ToyWorld captions, SD architecture at 32 px) into "
                                   "OUT_DIR. The config's model.device is used; ToyRecipe fields via --set.")
    b.add_argument("out_dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--minutes", type=float, default=None, help="nominal budget (scales step counts)")
    b.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ToyRecipe field (experiments), e.g. --set unet_steps=3000")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="ToyRecipe overrides, like --set")
    e = toy.add_parser("evaluate", help="classifier accuracy on generations of a built model",
                       description="Generate prompted samples of every class from MODEL_DIR and score them with a "
                                   "classifier trained on real ToyWorld renders. The config's model.device and "
                                   "model.precision are used.")
    e.add_argument("model_dir")
    e.add_argument("--n-per-class", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument("--grid", default=None, help="also save a sample grid PNG here")
    e.add_argument("--json", default=None, help="also write the report here")
    _config_args(e, output=False)


def _load(args, preset: tuple[str, ...] = ()) -> Config:
    """The config of a subcommand: file (flag or first positional), then ``preset``, then the overrides."""
    config, overrides = _config_and_overrides(args)
    overrides = list(preset) + overrides
    args.config = config
    if getattr(args, "output", None):
        overrides.append(f"output={args.output}")
    return load_config(config, overrides)


def _cmd_train(args) -> int:
    import fsspec

    from chimera_ray.local import train_one
    from chimera_ray.models import load_pipeline

    cfg = _load(args)
    fs, root = fsspec.core.url_to_fs(args.images)
    if not fs.isdir(root):
        raise SystemExit(f"error: --images {args.images!r} is not a folder")
    proto = args.images.split("://", 1)[0] + "://" if "://" in args.images else ""
    files = sorted(proto + f for f in fs.ls(root, detail=False) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.images!r}")
    boxes = {}
    if args.boxes:
        with fsspec.open(args.boxes, "r") as f:
            boxes = json.load(f)
    rows = [ImageRow(p, args.class_name, "train", tuple(parse_box(b) for b in boxes.get(p.rsplit("/", 1)[-1], [])))
            for p in files]
    key = safe_key(args.class_name)
    shots = tuple(subsample_shots(files, cfg.train.max_shots, cfg.train.seed, key))
    plan = ClassPlan(args.class_name, key, args.label, len(files), shots, 0)
    pipe = load_pipeline(cfg.model, cache_dir=cfg.cache_dir)
    report = train_one(pipe, plan, rows, cfg)
    write_json(cfg.output_path("reports", f"train-{key}.json"), report)
    print(json.dumps({k: report[k] for k in ("class", "key", "digest", "final_loss", "seconds")}, indent=2))
    print(f"adapter: {cfg.output_path('adapters', key)}")
    return 0


def _cmd_generate(args) -> int:
    import fsspec

    from chimera_ray.generate import Generator
    from chimera_ray.local import generate_local
    from chimera_ray.lora.adapter import load_adapter

    overrides = list(args.overrides or [])
    if args.num is not None:
        overrides.append(f"generate.samples_per_class={args.num}")
    args.overrides = overrides
    cfg = _load(args)
    out = cfg.output_path()
    if args.classes:
        keys = [k.strip() for k in args.classes.split(",") if k.strip()]
    else:
        fs, root = fsspec.core.url_to_fs(f"{out}/adapters")
        keys = sorted(p.rsplit("/", 2)[-2] for p in fs.glob(f"{root}/*/adapter.json"))
        if not keys:
            raise SystemExit(f"error: no adapters under {out}/adapters; run `chimera-ray train` first or pass --classes")
    plans = []
    for k in keys:
        _, meta = load_adapter(f"{out}/adapters/{k}")
        plans.append(ClassPlan(meta.class_name, k, meta.label, len(meta.shot_ids), tuple(meta.shot_ids),
                               cfg.generate.samples_per_class))
    gen = Generator(cfg.model, cfg.generate, mode=cfg.lora.mode, adapter_root=f"{out}/adapters",
                    cache_dir=cfg.cache_dir)
    written = generate_local(gen, plans, cfg)
    print(json.dumps({"images": f"{out}/images", "written": written}, indent=2))
    return 0


def _cmd_export(args) -> int:
    from chimera_ray.lora.adapter import export_lora, load_adapter

    state, meta = load_adapter(args.adapter)
    if args.weights is not None:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise SystemExit(f"error: --weights must be comma-separated numbers (got {args.weights!r})") from None
    else:
        cfg = _load(args)
        weights = mixture_weights(meta.mode, meta.num_heads, cfg.generate.dirichlet_concentration, cfg.generate.seed,
                                  meta.class_key, args.sample_index, cfg.generate.imagewise_mix,
                                  cfg.generate.imagewise_weight).tolist()
    export_lora(args.out, state, meta, weights)
    print(json.dumps({"lora": args.out, "class": meta.class_name, "weights": weights}, indent=2))
    return 0


def _cmd_validate(args) -> int:
    from chimera_ray.preflight import format_problems, validate

    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"config: {args.config or '(defaults)'}: {len(e.errors)} error(s)")
        for msg in e.errors:
            print(f"fatal     config  {msg}")
        return 2
    v = validate(cfg, images=args.images)
    print(format_problems(v.problems, max_per_code=args.max_per_code))
    if args.json_out:
        import fsspec

        with fsspec.open(args.json_out, "w") as f:
            json.dump([p.__dict__ for p in v.problems], f, indent=2)
    if v.ok:
        plans = plan_classes(v.dataset, cfg, candidates=v.candidates)
        counts = class_counts(v.dataset, cfg.data.split)
        print()
        print(format_plan(plans, summarize(counts, plans, cfg)))
    print("\nOK: no fatal problems" if v.ok else "\nFAILED: fix the fatal problems above")
    return 0 if v.ok else 1


def _cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(config_to_dict(_load(args)), sort_keys=False))
    return 0


def _cmd_report(args) -> int:
    from chimera_ray.eval.report import write_report

    out = write_report(args.run_dir, args.out, samples=args.samples, sweep=not args.no_sweep, config=args.config,
                       overrides=list(args.overrides or []), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(out)
    return 0


def _cmd_probe(args) -> int:
    from chimera_ray.eval.probes.heads import (
        probe_run,  # loads the base model: only for `probe`
    )

    res = probe_run(args.run_dir, classes=args.classes, seeds=args.seeds, alphas=args.alphas, per_alpha=args.per_alpha,
                    out=args.out)
    print(json.dumps({"summary": res["summary"], "skipped": res["skipped"],
                      "written": f"{(args.out or args.run_dir.rstrip('/') + '/probe')}/probe.json"}, indent=2))
    return 0


def _job_config(args, preset: tuple[str, ...], missing: str) -> Config | None:
    """A Ray job's config, parsed once here and handed to the job (``_load``); None after printing
    ``missing`` when no config file is given (a job does not run on the defaults alone)."""
    if _config_and_overrides(args)[0] is None:
        print(f"error: {missing}", file=sys.stderr)
        return None
    return _load(args, preset)


def _cmd_run(args) -> int:
    # Ray and the pipelines: imported only by the jobs' handlers.
    from chimera_ray.pipelines.job import run
    from chimera_ray.pipelines.runner import run_job

    cfg = _job_config(args, SMOKE_RUN if args.smoke_test else (),
                      missing="no config: pass --config FILE.yaml (see jobs/configs/)")
    if cfg is None:
        return 2
    return run_job(run, cfg, config_path=args.config, verbose=args.verbose, lease=True, report=True,
                   summary=lambda report: run_summary(report, config=args.config))


def _cmd_evaluate(args) -> int:
    from chimera_ray.pipelines.job_evaluate import evaluate
    from chimera_ray.pipelines.runner import run_job

    cfg = _job_config(args, SMOKE_EVALUATE if args.smoke_test else (),
                      missing="no config: pass the run's config as --config FILE.yaml (see jobs/configs/)")
    if cfg is None:
        return 2
    return run_job(partial(evaluate, tag=args.tag), cfg, config_path=args.config, verbose=args.verbose,
                   name="evaluate", what="evaluation")


def _cmd_reproduce(args) -> int:
    from chimera_ray.eval.comparison import ABLATIONS, METHODS
    from chimera_ray.pipelines.job_reproduce import DEFAULT_CONFIG, Comparison, compare
    from chimera_ray.pipelines.runner import run_job

    if args.classifier_seeds < 1:
        print(f"error: --classifier-seeds must be >= 1 (got {args.classifier_seeds})", file=sys.stderr)
        return 2
    unknown = [m for m in args.methods or () if m not in METHODS]
    if unknown:
        print(f"error: --methods {' '.join(unknown)}: unknown; choose among {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.ablations is not None and args.no_ablations:
        print("error: --ablations and --no-ablations: give one of them", file=sys.stderr)
        return 2
    chosen = [a if a.startswith("chimera_") else f"chimera_{a}" for a in args.ablations or ()]
    unknown = [a for a in chosen if a not in ABLATIONS]
    if unknown:
        print(f"error: --ablations {' '.join(unknown)}: unknown; choose among "
              f"{', '.join(a.removeprefix('chimera_') for a in ABLATIONS)}", file=sys.stderr)
        return 2
    names = () if args.no_ablations else tuple(a for a in ABLATIONS if a in chosen) if chosen else ABLATIONS
    config, overrides = _config_and_overrides(args)
    c = Comparison(config=config or DEFAULT_CONFIG, overrides=tuple(overrides), out=args.out,
                   seeds=tuple(args.seeds), methods=tuple(args.methods or METHODS),
                   ablation_names=names, reference=args.reference,
                   classifier_seeds=args.classifier_seeds, gated=args.gate)
    cfg = load_config(c.config, list(c.overrides))
    return run_job(partial(compare, comparison=c, summarize_only=args.summarize_only), cfg, config_path=c.config,
                   verbose=args.verbose, name="reproduce", what="comparison", out=c.out,
                   user_errors=(FileNotFoundError,) if args.summarize_only else ())


def _cmd_plan(args) -> int:
    from chimera_ray.estimate import estimate_run, format_estimate

    cfg = _load(args, SMOKE_RUN if args.smoke_test else ())
    est = estimate_run(cfg, calibrate=not args.no_calibration, train_steps=args.train_steps,
                       log=lambda m: print(m, flush=True))
    print(format_estimate(est))
    path = args.json_out or cfg.output_path("estimate.json")
    write_json(path, est)
    print(f"\nestimate written to {path}")
    return 0


def _cmd_toy(args) -> int:
    import dataclasses
    import time
    from pathlib import Path

    import torch

    from chimera_ray.eval.probes.base_model import evaluate_base, sample_grid
    from chimera_ray.models import load_pipeline
    from chimera_ray.toy.base import DEFAULT_RECIPE, build_toy_base

    if args.toy_command == "build":
        recipe = DEFAULT_RECIPE
        for item in args.set + list(args.overrides or []):
            key, _, value = item.partition("=")
            if not hasattr(recipe, key):
                raise ValueError(f"--set {item!r}: ToyRecipe has no field {key!r}")
            current = getattr(recipe, key)
            parsed = json.loads(value) if not isinstance(current, str) else value
            recipe = dataclasses.replace(recipe, **{key: tuple(parsed) if isinstance(current, tuple) else parsed})
        t0 = time.perf_counter()
        report = build_toy_base(args.out_dir, seed=args.seed, minutes_budget=args.minutes,
                                progress=not args.no_progress, recipe=recipe)
        print(json.dumps(report, indent=2))
        print(f"built {args.out_dir} in {time.perf_counter() - t0:.1f} s "
              f"({report['weights_bytes'] / 1e6:.1f} MB of safetensors)")
        return 0
    cfg = _load(args)
    torch.set_num_threads(2)
    pipe = load_pipeline(dataclasses.replace(cfg.model, base=str(Path(args.model_dir).resolve())),
                         cache_dir=cfg.cache_dir)
    report = evaluate_base(pipe, n_per_class=args.n_per_class, seed=args.seed, steps=args.steps, guidance=args.guidance)
    if args.grid:
        report["grid"] = str(sample_grid(pipe, args.grid, seed=args.seed, steps=args.steps, guidance=args.guidance))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`run CONFIG --smoke-test train.steps=5`): argparse stops a
    # positional list at the first option, so the rest arrives as "unrecognized".
    args, extra = parser.parse_known_args(argv)
    # After parsing: `--help` exits above without importing torch (models needs it).
    import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
    from chimera_ray.models import BaseModelError
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    setup_logging()
    handler = {"train": _cmd_train, "generate": _cmd_generate, "export-lora": _cmd_export, "config": _cmd_config,
               "validate": _cmd_validate, "report": _cmd_report, "toy": _cmd_toy, "run": _cmd_run,
               "evaluate": _cmd_evaluate, "reproduce": _cmd_reproduce, "plan": _cmd_plan,
               "probe": _cmd_probe}[args.command]
    try:
        return handler(args)
    except (ConfigError, BaseModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
