"""Pipeline parallelism: the stage modules (stage.py) of a layer split (parallel/pipeline_split.py) and a training
step through torch.distributed.pipelining's schedules (schedule.py)."""
