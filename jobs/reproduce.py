"""Toy reproduction of the paper's comparison (real-only, base, class-wise, image-wise and
ChimeraLoRA over seeds, plus ablations) on the embedded long-tail dataset and base model.

    python jobs/reproduce.py [--seeds 0 1 2] [--no-ablations | --ablations NAME ...] [key=value ...]
    ray job submit --working-dir . -- python jobs/reproduce.py --seeds 0 --no-ablations

The same as `chimera-ray reproduce` (chimera_ray/cli.py parses it, chimera_ray/pipelines/runner.py runs
chimera_ray/pipelines/job_reproduce.py's `compare`), as a script for `ray job submit`.
Exit codes: 0 done; 1 a run failed; 2 bad config or input.
"""

import sys

from chimera_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
