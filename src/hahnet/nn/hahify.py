"""A HaH front-end for any CNN: :func:`hahify` turns the first k convolution units of a
model (Conv2d, an optional BatchNorm, a ReLU) into HaH blocks of the same shapes.

Why torch.fx and not a walk over ``model.modules()``: the walk sees the order in which
modules were *registered*, not how data flows. It cannot tell whether a ReLU really
follows a convolution, whether the convolution's output also feeds a residual sum (then
a HaH block, which ends in its own ReLU, would change what the skip path receives), nor
whether one module object is called twice. ``torch.fx`` records the forward pass as a
graph of calls with each value's consumers, which answers all three exactly. The price:
the model's forward must be traceable (no Python branches on tensor values), which
torchvision's and timm's CNNs and hahnet's own models are. The graph is only read; the
returned model is a deep copy of the input with the units' modules replaced, so it keeps
its class, methods and the parameter names of everything not converted.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from hahnet.config import PAPER_KEEP, PAPER_SIGMA
from hahnet.nn.layers import DivisiveNorm2d, HaHBlock, InputNormalize, TopFractionThreshold

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
RELU_METHODS = ("relu", "relu_")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")


class HahifyError(ValueError):
    """A model or unit that :func:`hahify` cannot convert; the message is one line."""


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer that also keeps hahnet's own blocks whole (they are already HaH
    or have no convolution to convert, and their forward branches on tensor shapes)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        own = (HaHBlock, InputNormalize, DivisiveNorm2d, TopFractionThreshold)
        return isinstance(module, own) or super().is_leaf_module(module, qualified_name)


@dataclass(frozen=True)
class Unit:
    """One convertible unit: the convolution's and the absorbed BatchNorm's module names."""

    conv: str
    norm: str | None
    padding: tuple[int, int]


def trace(model: nn.Module) -> torch.fx.Graph:
    """The model's forward pass as a torch.fx graph; HahifyError if it cannot be traced."""
    try:
        return _Tracer().trace(model)
    except Exception as error:  # fx raises many kinds; all mean "not traceable"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise HahifyError(f"hahify: torch.fx cannot trace {type(model).__name__} ({first}); "
                          f"its forward must not branch on tensor values") from None


def _is_module(node: torch.fx.Node, modules: dict[str, nn.Module], kind: type) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), kind)


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (_is_module(node, modules, nn.ReLU)
            or (node.op == "call_function" and node.target in RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target in RELU_METHODS))


def _is_add(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                       str(node.target))
    return "the model's output" if node.op == "output" else f"{target}"


def _padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The convolution's zero padding as two integers, or why it has none such."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            return f"padding='same' with an even kernel {conv.kernel_size} pads unevenly"
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _conv_problem(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be a HaH block's convolution, or None."""
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}); a HaH block's convolution is dense"
    if tuple(conv.dilation) != (1, 1):
        return f"dilated convolution (dilation={tuple(conv.dilation)}); a HaH block's is not"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; a HaH block pads with zeros"
    padding = _padding(conv)
    return padding if isinstance(padding, str) else None


def _only_user(node: torch.fx.Node, what: str) -> torch.fx.Node | str:
    """The one node that consumes ``node``'s output, or why there is not exactly one."""
    users = list(node.users)
    if len(users) == 1:
        return users[0]
    if not users:
        return f"{what} is not used"
    names = ", ".join(_describe(u) for u in users)
    return (f"{what} is also used by {names} (a residual branch?): a HaH block replaces "
            f"convolution, BatchNorm and ReLU as one unit and cannot keep that value for them")


def _unit_or_reason(node: torch.fx.Node, modules: dict[str, nn.Module],
                    calls: Counter) -> Unit | str:
    """The unit that starts at the convolution ``node``, or why it cannot be converted."""
    conv = modules[node.target]
    problem = _conv_problem(conv)
    if problem:
        return problem
    if calls[node.target] > 1:
        return f"it is called {calls[node.target]} times (shared weights)"
    after = _only_user(node, "its output")
    if isinstance(after, str):
        return after
    norm = None
    if _is_module(after, modules, nn.BatchNorm2d) and calls[after.target] == 1:
        norm = after.target
        after = _only_user(after, f"the output of its BatchNorm {norm}")
        if isinstance(after, str):
            return after
    if not _is_relu(after, modules):
        if _is_add(after):
            return (f"its output joins a residual sum ({_describe(after)}) before any ReLU; "
                    f"a HaH block ends in its own ReLU")
        return f"no ReLU after it (its output goes to {_describe(after)}); a HaH block ends in a ReLU"
    users = list(after.users)
    if norm is None and len(users) == 1 and _is_module(users[0], modules, nn.BatchNorm2d) \
            and calls[users[0].target] == 1:
        norm = users[0].target  # conv -> ReLU -> BatchNorm (the VGG order): absorbed too
    return Unit(node.target, norm, _padding(conv))


def find_units(model: nn.Module, blocks: int) -> list[Unit]:
    """The first ``blocks`` convolution units of ``model`` in forward order; HahifyError
    naming the first one that cannot be converted."""
    graph = trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    convs = [n for n in graph.nodes if _is_module(n, modules, nn.Conv2d)]
    if blocks > len(convs):
        raise HahifyError(f"hahify: blocks={blocks} but {type(model).__name__} runs only "
                          f"{len(convs)} convolutions outside HaH blocks; pass blocks <= {len(convs)}")
    units = []
    for index, node in enumerate(convs[:blocks]):
        unit = _unit_or_reason(node, modules, calls)
        if isinstance(unit, str):
            fix = (f"pass blocks={index} to convert only the units before it" if index else
                   "it is the first convolution, so no leading unit can be converted")
            raise HahifyError(f"hahify: cannot convert {node.target} "
                              f"({type(modules[node.target]).__name__}): {unit}; {fix}")
        units.append(unit)
    return units


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, new)


def _hah_block(conv: nn.Conv2d, padding: tuple[int, int], sigma: float, keep: float) -> HaHBlock:
    """A HaH block of ``conv``'s shape whose filters are ``conv``'s (its bias is dropped:
    a HaH block's convolution has none)."""
    block = HaHBlock(conv.in_channels, conv.out_channels, sigma=sigma, keep=keep,
                     kernel_size=conv.kernel_size, stride=conv.stride, padding=padding)
    block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        block.conv.weight.copy_(conv.weight)
    return block.train(conv.training)


def hahify(model: nn.Module, blocks: int = 1, sigma: float = PAPER_SIGMA,
           keep: float = PAPER_KEEP) -> nn.Module:
    """A copy of ``model`` whose first ``blocks`` convolution units (in forward order) are
    HaH blocks: each Conv2d becomes a :class:`HaHBlock` with the same shapes and filters,
    the BatchNorm right after its convolution or its ReLU is removed, and the ReLU stays
    (a no-op on the block's non-negative output). ``model`` is left untouched.

    Refuses (:class:`HahifyError`, one line naming the module) a grouped or dilated
    convolution, one without a ReLU after it (e.g. before a residual sum) and one whose
    output, or its BatchNorm's, is also used elsewhere (a residual branch). Train the
    result with :class:`hahnet.HaHObjective` to add the HaH cost."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise HahifyError(f"hahify: blocks must be an integer >= 1, got {blocks!r}")
    DivisiveNorm2d(sigma), TopFractionThreshold(keep)  # validate before any work
    converted = copy.deepcopy(model)
    for unit in find_units(converted, blocks):
        conv = converted.get_submodule(unit.conv)
        _replace(converted, unit.conv, _hah_block(conv, unit.padding, sigma, keep))
        if unit.norm is not None:
            _replace(converted, unit.norm, nn.Identity())
    return converted
