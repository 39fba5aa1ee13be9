"""Downstream check of a run: a classifier (Ray Train) on the real training split plus the run's
synthetic shards, judged on the real test split; then per-class fidelity/diversity metrics.

    python jobs/downstream.py --config jobs/configs/demo.yaml [key=value ...] [--tag TAG] [--smoke-test]
    ray job submit --working-dir . -- python jobs/downstream.py --config jobs/configs/demo.yaml

The same as `chimera-ray evaluate` (chimera_ray/cli.py parses it, chimera_ray/pipelines/runner.py runs
chimera_ray/pipelines/job_evaluate.py's `evaluate`), as a script for `ray job submit`.
Exit codes: 0 done; 1 the evaluation failed; 2 bad config or input.
"""

import sys

from chimera_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
