"""Pipeline parallelism: the layer split (split.py), the stage modules (stage.py) and a training
step through torch.distributed.pipelining's schedules (schedule.py)."""
