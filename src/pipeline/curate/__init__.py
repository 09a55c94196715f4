"""Corpus curation on Ray Data: read -> normalize -> filter -> exact dedup -> fuzzy dedup -> write.

Every step only annotates rows: a row it drops gets a `reason` (and `duplicate_of` for
duplicates) and travels on, so the end of the run can write it to `rejected/` and check
that input = kept + rejected.
"""
