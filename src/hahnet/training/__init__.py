"""Layer 3, training: one network trained from a dataset to a checkpoint on disk.

* :mod:`hahnet.training.run`: a training run's life cycle (fresh or resumed, checks,
  data, trainer), shared by ``hahnet train``, ``reproduce`` and the sweeps;
* :mod:`hahnet.training.trainer`: the epoch loop (``Trainer``), HaH or standard;
* :mod:`hahnet.training.rundir`: the run directory's files and their one reader/writer;
* :mod:`hahnet.training.checkpoint`: safetensors weights with checksums, ``load``;
* :mod:`hahnet.training.budget`: the epochs that fit a time budget;
* :mod:`hahnet.training.distributed`: torchrun / DDP, sharded sums;
* :mod:`hahnet.training.device`: device choice, autocast, backend tuning.

May import: the bottom modules, :mod:`hahnet.nn` and :mod:`hahnet.data`. Nothing here
prints; progress goes through callbacks.
"""
