"""Layout planning without processes: per-GPU memory (memory.py), communication bytes per step
(comm.py), a documented time model (throughput.py) and the search over layouts (search.py).
`--dry-run` (planning/dry_run.py) and `tools/plan_ted.py` use the same functions."""
