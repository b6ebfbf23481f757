"""The entry points: flags in, the typed configuration built once, the checks, then a dry run
(planning/) or a training run (training/). The top layer: everything else sits below it."""
