"""The main job: dataset -> tail classes -> per-class multi-head LoRA (Ray Train) ->
synthetic images (Ray Data actor pool) -> WebDataset shards + index -> run report.

    python jobs/full.py --config jobs/configs/demo.yaml [key=value ...] [--smoke-test] [--verbose]
    ray job submit --working-dir . -- python jobs/full.py --config jobs/configs/demo.yaml

The same as `chimera-ray run` (chimera_ray/cli.py parses it, chimera_ray/pipelines/runner.py runs
chimera_ray/pipelines/job.py's `run`), as a script for `ray job submit`.
Exit codes: 0 done; 1 the run failed (report.json and failures/ say why); 2 bad config or input.
"""

import sys

from chimera_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
