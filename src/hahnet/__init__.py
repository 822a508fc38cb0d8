"""hahnet: neuro-inspired deep networks with sparse, strong activations.

Layers (:mod:`hahnet.layers`), the layer-local HaH cost (:mod:`hahnet.hah`) and VGG
models (:mod:`hahnet.models`) as plain ``nn.Module``s, plus training, evaluation and
reporting behind the ``hahnet`` command.
"""

from hahnet.hah import PAPER_ALPHAS, HaHObjective, hah_score
from hahnet.layers import DivisiveNorm2d, HaHBlock, TopFractionThreshold, VGGBlock, WNConv2d
from hahnet.models import ModelConfig, build_model, vgg11, vgg13, vgg16, vgg19

__version__ = "0.1.0"

__all__ = [
    "PAPER_ALPHAS", "HaHObjective", "hah_score", "DivisiveNorm2d", "HaHBlock",
    "TopFractionThreshold", "VGGBlock", "WNConv2d", "ModelConfig", "build_model",
    "vgg11", "vgg13", "vgg16", "vgg19",
]
