"""`ray job submit --working-dir . -- python rayjobs/eval.py --config FILE [eval.models=[merged,awq]] [key=value ...]`

Scores the run's models with lm-evaluation-harness on the cluster in RAY_ADDRESS (set by
`ray job submit`), or on a local Ray; the report goes to runs/<name>/eval/."""

import sys

from _entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("eval"))
