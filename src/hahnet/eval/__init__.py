"""Layer 4, eval: trained models measured, as the paper does it and a little more.

* :mod:`hahnet.eval.metrics`: clean and noisy accuracy, sparsity, per-layer SNR;
* :mod:`hahnet.eval.attacks`: APGD-CE + APGD-T (the paper's), PGD and Square;
* :mod:`hahnet.eval.corruptions`: the 19 CIFAR-10-C corruptions, batched;
  :mod:`hahnet.eval.corruptions.evaluate`: accuracy under them, their cache, mCE;
* :mod:`hahnet.eval.runner`: one whole evaluation (``evaluate_model``), data checks, ETA;
* :mod:`hahnet.eval.journal`: attack rows saved as they finish, so a stopped evaluation resumes;
* :mod:`hahnet.eval.results`: the result dataclasses and results.json (write and read).

Settings: :class:`hahnet.config.EvalSettings`. May import: the bottom modules,
:mod:`hahnet.nn`, :mod:`hahnet.data` and :mod:`hahnet.training` (sharded sums). Nothing
here prints; progress goes through callbacks.
"""

from hahnet.config import EvalSettings
from hahnet.eval.base import EvalError
from hahnet.eval.results import EvalResult, read_results
from hahnet.eval.runner import (check_compatible, checkpoint_name, estimate_seconds,
                                evaluate_model, evaluation_split)

__all__ = ["EvalSettings", "EvalError", "EvalResult", "read_results", "check_compatible",
           "checkpoint_name", "estimate_seconds", "evaluate_model", "evaluation_split"]
