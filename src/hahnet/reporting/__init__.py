"""Layer 5, reporting: results turned into Markdown, JSON and PNG, written atomically.

* :mod:`hahnet.reporting.evaluation`: an evaluation's ``results.json``, ``report.md``
  (the paper's table side by side with ours) and plots;
* :mod:`hahnet.reporting.corruptions`: the CIFAR-10-C section and its plots;
* :mod:`hahnet.reporting.sweep`: a sweep summary's tables, report and plots;
* :mod:`hahnet.reporting.bench`: the benchmark table and verdicts, its JSON file;
* :mod:`hahnet.reporting.plots`: figures without pyplot's global state.

Reports read result data (``EvalResult``, a sweep summary, a benchmark result) and never
start work: the flows that produce the results and then call a writer live in
:mod:`hahnet.experiments` or :mod:`hahnet.cli`. May import: the bottom modules,
:mod:`hahnet.nn`, :mod:`hahnet.data`, :mod:`hahnet.training` and :mod:`hahnet.eval`.
"""
