"""`ray job submit --working-dir . -- python rayjobs/curate.py --config configs/demo.yaml [key=value ...]`

Runs the curate stage on the cluster in RAY_ADDRESS (set by `ray job submit`), or on a local Ray."""

import sys

from _entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("curate"))
