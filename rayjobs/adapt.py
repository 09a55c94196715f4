"""`ray job submit --working-dir . -- python rayjobs/adapt.py --config FILE [adapter=NAME] [key=value ...]`

Trains the config's LoRA adapters (one with adapter=NAME) on the cluster in RAY_ADDRESS (set by
`ray job submit`), or on a local Ray."""

import sys

from _entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("adapt"))
