"""The analytic models, without processes, on a RunConfig: model FLOPs (flops.py), parameter counts
(param_count.py), per-GPU memory (memory.py), communication bytes per step (comm.py), a documented
time model (throughput.py), one layout's plan and the ranking (search.py). `--dry-run` (dry_run.py)
and `tools/plan_ted.py` (candidates from launch/plan.py) use the same functions. Nothing here reads
the flags or imports training/."""
