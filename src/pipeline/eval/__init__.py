"""Evaluation with lm-evaluation-harness: tasks.py (what is asked), harness.py (which models, scored as
Ray tasks), report.py (the report and the gate), stage.py (`pipeline eval`)."""
