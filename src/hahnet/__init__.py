"""hahnet: neuro-inspired deep networks with sparse, strong activations.

The public API: :func:`create_model` (a fresh network by name, :func:`list_models`),
:func:`load` (a trained one from a checkpoint, in eval mode), :func:`hahify` (a HaH
front-end for any CNN), :class:`HaHObjective` (the training objective), layer costs
(:class:`LayerCostObjective` with :class:`HaHCost`, :class:`L1Cost` or your own) and the
layers.
The method, in equations and the paper's settings: docs/method.md; the package layout:
docs/architecture.md.
"""

from hahnet.training.checkpoint import load
from hahnet.config import PAPER_ALPHAS, ModelConfig, TrainConfig
from hahnet.nn.hah import HaHCost, HaHObjective, hah_score
from hahnet.nn.models import build_model, create_model, list_models, vgg11, vgg13, vgg16, vgg19
from hahnet.nn.costs import L1Cost, LayerCost
from hahnet.nn.hahify import hahify
from hahnet.nn.objective import LayerCostObjective
from hahnet.nn.layers import DivisiveNorm2d, HaHBlock, TopFractionThreshold, VGGBlock, WNConv2d
from hahnet.data import jpeg_pack  # also importable from here: data-packing instructions do so

from hahnet.config import VERSION as __version__  # its one copy is in config

__all__ = [
    "create_model", "list_models", "load", "hahify", "HaHObjective", "hah_score", "PAPER_ALPHAS",
    "LayerCost", "LayerCostObjective", "HaHCost", "L1Cost",
    "DivisiveNorm2d", "HaHBlock", "TopFractionThreshold", "VGGBlock", "WNConv2d",
    "ModelConfig", "TrainConfig", "build_model", "vgg11", "vgg13", "vgg16", "vgg19",
]
