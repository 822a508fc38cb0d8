"""Layer 6, experiments: whole studies, each from settings to a written report.

* :mod:`hahnet.experiments.presets`: the ``paper``, ``cpu`` and ``demo`` settings;
* :mod:`hahnet.experiments.reproduce`: train both networks of a preset, evaluate them
  (reusing finished work) and write the paper's table;
* :mod:`hahnet.experiments.sweep`: grids of runs over seeds, in worker processes;
  :mod:`hahnet.experiments.sweep_summary` reads them back as mean +- sd and paired gains;
* :mod:`hahnet.experiments.bench`: the speed benchmark.

May import every layer below: the bottom modules, :mod:`hahnet.nn`,
:mod:`hahnet.data`, :mod:`hahnet.training`, :mod:`hahnet.eval` and
:mod:`hahnet.reporting`. Nothing here prints; progress goes through callbacks.
"""
