"""The network modules: :mod:`hahnet.nn.layers` (the layers and blocks) and
:mod:`hahnet.nn.fused` (their hand-written forward/backward passes)."""

from hahnet.nn.layers import (DivisiveNorm2d, HaHBlock, InputNormalize, TopFractionThreshold,
                              VGGBlock, WNConv2d, conv_override, threshold_rank)

__all__ = ["DivisiveNorm2d", "HaHBlock", "InputNormalize", "TopFractionThreshold", "VGGBlock",
           "WNConv2d", "conv_override", "threshold_rank"]
