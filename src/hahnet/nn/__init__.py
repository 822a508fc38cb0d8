"""Layer 1, nn: the networks and their training objective, as plain ``nn.Module`` objects.

* :mod:`hahnet.nn.layers`: the layers and blocks (weight-normalized conv, divisive
  normalization, top-fraction threshold, HaH and VGG blocks);
* :mod:`hahnet.nn.fused`: their hand-written forward/backward passes;
* :mod:`hahnet.nn.hah`: the HaH cost and the one-pass :class:`HaHObjective`;
* :mod:`hahnet.nn.models`: VGG11/13/16/19 with leading HaH blocks, ``create_model``.

May import: the bottom modules only (:mod:`hahnet.config`, :mod:`hahnet.io`,
:mod:`hahnet.errors`). The layer order: docs/architecture.md.
"""

from hahnet.nn.layers import (DivisiveNorm2d, HaHBlock, InputNormalize, TopFractionThreshold,
                              VGGBlock, WNConv2d, conv_override, threshold_rank)

__all__ = ["DivisiveNorm2d", "HaHBlock", "InputNormalize", "TopFractionThreshold", "VGGBlock",
           "WNConv2d", "conv_override", "threshold_rank"]
