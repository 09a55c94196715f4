"""`ray job submit --working-dir . -- python rayjobs/pipeline.py --config configs/demo.yaml [key=value ...]`

Runs every stage (curate -> train -> quantize -> serve smoke test) on the cluster in RAY_ADDRESS,
or on a local Ray started here when there is none."""

import sys

from _entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("run"))
