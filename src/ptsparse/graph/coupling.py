"""Coupled output channels, found with torch-pruning's dependency graph.

Two layers' output channels are *coupled* when removing channel ``c`` of one forces removing a channel of
the other: layers whose outputs are added (residual streams), a depthwise convolution and its input, the
parts of a concatenation. torch-pruning traces the model once and groups every such dependency
(``DependencyGraph.get_all_groups``); a :class:`ChannelGroup` keeps, of each group, the prunable layers
that *produce* its channels and which of their output channels each group channel is. A grouped convolution
(not depthwise) further ties each channel it reads or writes to the channels at the same offset in its other
groups (:attr:`ChannelGroup.ties`): torch-pruning prunes it by offsets common to all groups.
:func:`head_groups` turns the groups of attention projections into groups whose channels are whole heads
(:mod:`ptsparse.attention`).
"""

from __future__ import annotations

import math

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from .._extras import require
from ..attention import AttentionHeads
from ..errors import ExportError, first_line
from ..norms import BATCH_NORMS

PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels of several layers that can only be pruned together.

    Attributes:
        size: channels in the group.
        members: layer name -> its output channel for each of the group's channels (so
            ``members[name][c]`` is the channel of ``name`` that group channel ``c`` is); with ``width`` > 1,
            its ``width`` output channels (rows) for each group channel, one after the other.
        width: output rows of each member per group channel: 1, a head's rows when the group's channels
            are attention heads (:func:`head_groups`), or the channels tied together by a grouped convolution
            (:meth:`tied_units`).
        ties: for a group of single rows read or written by a grouped (not depthwise) convolution: the sets of
            group channels that can only go together, one channel per convolution group at the same offset
            within it (torch-pruning removes a grouped convolution's channels at the same offsets in every
            group); empty when every channel can go alone.
        removable: every module that outputs the group's channels is :func:`channelwise`, so the channel export
            can remove a channel zeroed in the members (not a residual stream through a LayerNorm).
    """

    size: int
    members: dict[str, tuple[int, ...]]
    width: int = 1
    ties: tuple[tuple[int, ...], ...] = ()
    removable: bool = True

    def rows(self, name: str) -> torch.Tensor:
        """Output rows of member ``name`` per group channel, a ``(size, width)`` index tensor."""
        return torch.tensor(self.members[name]).view(self.size, self.width)

    def channel_weights(self, shape: Sequence[int]) -> int:
        """Weights in one group channel of a member whose weight has ``shape``: its ``width`` rows."""
        return self.width * math.prod(shape[1:])

    def tie(self, chosen: torch.Tensor) -> torch.Tensor:
        """``chosen`` (per group channel) narrowed to whole :attr:`ties`: a channel stays chosen only with its set."""
        chosen = chosen.clone()
        for tied in self.ties:
            chosen[list(tied)] = bool(chosen[list(tied)].all())
        return chosen

    def tied_units(self) -> ChannelGroup:
        """The group whose channels are its :attr:`ties` (``width`` rows of each member each); itself without ties."""
        if not self.ties:
            return self
        return ChannelGroup(len(self.ties), {name: tuple(rows[c] for tied in self.ties for c in tied)
                                             for name, rows in self.members.items()}, len(self.ties[0]),
                            removable=self.removable)


def head_group(attention: AttentionHeads, layers: Sequence[str], removable: bool = True) -> ChannelGroup:
    """The heads of ``attention`` as a group of channels of its projections ``layers``."""
    return ChannelGroup(attention.num_heads,
                        {name: tuple(row for head in attention.projections[name] for row in head) for name in layers},
                        attention.rows_per_head(layers[0]), removable=removable)


def head_groups(groups: Sequence[ChannelGroup], heads: Mapping[str, AttentionHeads]) -> list[ChannelGroup]:
    """``groups`` with the channels of attention projections taken as whole heads.

    A group whose members are all projections of one attention module (torch-pruning couples the rows of
    separate q, k and v layers) becomes the group of its heads. A projection in a group with other layers,
    which the recognised layouts do not give, leaves that group and forms a head group of its own.

    Args:
        groups: coupled channel groups (:func:`channel_groups`).
        heads: projection layer name -> its attention heads (:func:`ptsparse.attention.heads_by_layer`).
    """
    result = []
    for group in groups:
        projections = [name for name in group.members if name in heads]
        owners = {heads[name].name for name in projections}
        if not projections:
            result.append(group)
        elif len(projections) == len(group.members) and len(owners) == 1:
            result.append(head_group(heads[projections[0]], projections, group.removable))
        else:
            others = {n: m for n, m in group.members.items() if n not in heads}
            if others:
                result.append(ChannelGroup(group.size, others, removable=group.removable))
            result += [head_group(heads[name], [name], group.removable) for name in projections]
    return result


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode (BatchNorm statistics stay untouched) and restores the modes after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _owner(node, names: Mapping[object, str]) -> str:
    """The nearest module or parameter of the model at or upstream of torch-pruning's graph ``node``."""
    queue, seen = [node], set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in names:
            return names[current.module]
        queue += current.inputs
    return "the model's input"


def _failing_node(error: BaseException):
    """The node of torch-pruning's graph that was being handled when ``error`` was raised, if any."""
    tp = require("torch_pruning", "coupled channel pruning")
    found, trace = None, error.__traceback__
    while trace is not None:
        found = next((v for v in trace.tb_frame.f_locals.values() if isinstance(v, tp.dependency.Node)), found)
        trace = trace.tb_next
    return found


def lookup_tables(model: nn.Module, example: torch.Tensor) -> list[nn.Parameter]:
    """The parameters that ``model`` reads by indexing (gathers), e.g. a Swin attention's relative position bias table.

    Such a table holds no channels of the layers around it, but torch-pruning maps channels through the reshapes
    that follow the gather, round a cycle that multiplies its index lists at each pass (swin_t grew past 22 GB).
    """
    parameters = {id(p): p for p in model.parameters() if p.requires_grad}
    found: dict[int, nn.Parameter] = {}
    with eval_mode(model), torch.enable_grad():
        output = model(example)
    stack, seen = [output.grad_fn] if isinstance(output, torch.Tensor) else [], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        gather = type(node).__name__.startswith("IndexBackward")
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if gather and variable is not None and id(variable) in parameters:
                found[id(variable)] = parameters[id(variable)]
            stack.append(child)
    return list(found.values())


# Autograd nodes of products that mix channels (matrix products, convolutions): where :func:`score_terms` stops.
PRODUCTS = ("Mm", "Bmm", "Addmm", "Baddbmm", "Addbmm", "Matmul", "Convolution", "Linear", "Einsum")


def score_terms(model: nn.Module, example: torch.Tensor) -> list[nn.Parameter]:
    """The parameters that enter attention scores, e.g. Swin v2's logit scale and continuous position bias MLP.

    From each softmax, going upstream through the operations between it and the product of two activations that
    gives the scores (queries times keys), every operand computed from parameters alone (not from the input) is a
    score term: it holds the scores' heads, no channels of the layers around it, and like a
    :func:`lookup_tables` table it lets torch-pruning map channels round a cycle that multiplies its index lists at
    each pass (swin_v2_t exhausted 8 GB). A softmax reached through anything else (a layer's output, two
    activations added) gives none. Inputs that cannot carry gradients (token ids) give none: what depends on
    the input is then not known.
    """
    if not example.is_floating_point():
        return []
    parameters = {id(p): p for p in model.parameters() if p.requires_grad}
    inputs = example.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        output = model(inputs)
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        return []
    depends: dict[int, bool] = {}  # node -> whether it is computed from the input
    nodes: dict[int, object] = {}
    stack = [(output.grad_fn, False)]
    while stack:  # iterative post-order: graphs are deeper than Python's recursion limit
        node, expanded = stack.pop()
        if id(node) in depends:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack += [(node, True)] + [(child, False) for child in children if id(child) not in depends]
            continue
        depends[id(node)] = (getattr(node, "variable", None) is inputs
                             or any(depends.get(id(child), False) for child in children))
        nodes[id(node)] = node

    def leaves(node) -> list[nn.Parameter]:
        found, todo, seen = [], [node], set()
        while todo:
            current = todo.pop()
            if current is None or id(current) in seen:
                continue
            seen.add(id(current))
            variable = getattr(current, "variable", None)
            if variable is not None and id(variable) in parameters:
                found.append(parameters[id(variable)])
            todo += [child for child, _ in current.next_functions]
        return found

    found: dict[int, nn.Parameter] = {}
    for softmax in (n for n in nodes.values() if type(n).__name__.startswith("SoftmaxBackward")):
        terms, node = [], softmax
        while True:
            children = [child for child, _ in node.next_functions if child is not None]
            active = [child for child in children if depends.get(id(child))]
            if type(node).__name__.rstrip("0123456789").removesuffix("Backward") in PRODUCTS:
                if len(active) >= 2:  # queries times keys: the scores
                    found.update((id(p), p) for term in terms for p in leaves(term))
                break
            if len(active) != 1:
                break
            terms += [child for child in children if not depends.get(id(child))]
            node = active[0]
    return list(found.values())


# Attention modules whose q/k/v reshapes torch-pruning cannot follow (it maps their rows onto channels the layers
# do not have), by the names of the Linears that read their input and write their output: torchvision MaxVit's
# relative-position attention. :func:`stand_ins` traces each as ``writes(zeros)``.
OPAQUE_ATTENTION = (("to_qkv", "merge"),)

# Hugging Face grouped-query attention (Llama, Qwen2, Mistral, ... with fewer key/value heads than query heads), by
# the names of its projections: q, k, v read the input, o writes the output. Its rows cannot be coupled one to one
# (several query heads share each key/value head), and torch-pruning does not end trying: round the rotary
# embedding's cycle on the keys (halves sliced, concatenated again, multiplied and added back) it shifts the
# keys' indices further at each pass, so they never repeat and ``get_all_groups`` runs for ever.
GROUPED_QUERY = (("q_proj", "k_proj", "v_proj"), "o_proj")


class Opaque(NamedTuple):
    """An attention module traced through its :func:`stand_ins`.

    Attributes:
        reads: the Linears that read its input.
        writes: the Linear that writes its output.
        pair: it returns ``(output, attention weights)`` (Hugging Face attention), not the output alone.
    """

    reads: tuple[nn.Linear, ...]
    writes: nn.Linear
    pair: bool = False


def _grouped_query(module: nn.Module) -> Opaque | None:
    """``module`` as :data:`GROUPED_QUERY` attention (k and v narrower than q), or ``None``."""
    reads, writes = GROUPED_QUERY
    layers = tuple(getattr(module, name, None) for name in reads)
    output = getattr(module, writes, None)
    if not all(isinstance(layer, nn.Linear) for layer in (*layers, output)):
        return None
    query, key, value = layers
    return Opaque(layers, output, pair=True) if key.out_features == value.out_features < query.out_features else None


def opaque_readers(model: nn.Module) -> dict[nn.Module, Opaque]:
    """The :data:`OPAQUE_ATTENTION` and :data:`GROUPED_QUERY` modules of ``model``, with their reading and writing
    Linears."""
    found = {}
    for module in model.modules():
        for reads, writes in OPAQUE_ATTENTION:
            layers = getattr(module, reads, None), getattr(module, writes, None)
            if all(isinstance(layer, nn.Linear) for layer in layers):
                found[module] = Opaque((layers[0],), layers[1])
        grouped = _grouped_query(module)
        if grouped is not None:
            found[module] = grouped
    return found


@contextmanager
def stand_ins(model: nn.Module) -> Iterator[None]:
    """Gives each :func:`opaque_readers` module of ``model`` a forward that torch-pruning can trace, for the trace.

    The stand-in returns ``writes(zeros)``, so the channels the module writes are coupled as usual. The layers
    that read its input are left out of the trace (torch-pruning does not see them): their rows (the heads) join
    no group, and stay (:func:`iter_groups`; a criterion prunes them row by row), and their input columns are not
    coupled to the channels they read. MaxVit's forward reshapes its heads back to its input width, so it could
    not run with fewer heads anyway; grouped-query attention shares each key/value head among several query
    heads, which a one-to-one coupling of rows cannot express. A Hugging Face attention module
    (:data:`GROUPED_QUERY`) takes its input as ``hidden_states`` and returns ``(output, attention weights)``; its
    stand-in does too (with no weights).
    """
    def forward(module: nn.Module, *args, **kwargs):
        opaque = found[module]
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        written = opaque.writes(x.new_zeros(*x.shape[:-1], opaque.writes.in_features))
        return (written, None) if opaque.pair else written

    found = opaque_readers(model)
    for module in found:
        module.forward = forward.__get__(module)
    try:
        yield
    finally:
        for module in found:
            del module.forward


def build_dependency_graph(model: nn.Module, example: torch.Tensor):
    """torch-pruning's dependency graph of ``model`` traced on ``example`` (eval mode, model unchanged).

    The model's :func:`lookup_tables` and :func:`score_terms` are left out of the trace, so the grouping stays
    bounded: Swin's coupling analysis (swin_t, ``get_all_groups``) then takes seconds and under 1 GB instead of
    growing past 22 GB, swin_v2_t's (its logit scale and position bias MLP) instead of exhausting 8 GB.
    Attention that torch-pruning cannot follow is traced through its :func:`stand_ins`.

    Raises:
        MissingExtraError: torch-pruning is not installed.
        ExportError: torch-pruning cannot trace the model (the message names the module or parameter nearest
            upstream of the operation it failed on, e.g. a channel shuffle).
    """
    tp = require("torch_pruning", "coupled channel pruning")
    tables = list({id(p): p for p in lookup_tables(model, example) + score_terms(model, example)}.values())
    with eval_mode(model), stand_ins(model), torch.enable_grad():
        try:
            for table in tables:
                table.requires_grad_(False)
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as error:  # torch-pruning raises plain exceptions of many kinds while tracing
            reason = first_line(error)
            names: dict[object, str] = {module: name for name, module in model.named_modules()}
            names.update({parameter: name for name, parameter in model.named_parameters()})
            node = _failing_node(error)
            where = f" at the operation after {_owner(node, names)!r}" if node is not None else ""
            raise ExportError(f"torch-pruning cannot trace the model{where}: {reason}") from None
        finally:
            for table in tables:
                table.requires_grad_(True)


def _grouped(module: object) -> bool:
    """A grouped convolution that is not depthwise (torch-pruning couples a depthwise one's input and output)."""
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels


def _ties(graph, group, names: Mapping[nn.Module, str]) -> tuple[tuple[int, ...], ...]:
    """The sets of ``group``'s channels that its grouped convolutions tie together (:attr:`ChannelGroup.ties`).

    The channel at offset ``o`` of one convolution group is tied to the channel at ``o`` of every other group, on
    the convolution's input and output alike; ties through several convolutions join.

    Raises:
        ExportError: some of a grouped convolution's channels lie outside the group (another torch-pruning group
            holds them), or the tied sets differ in size.
    """
    parent = list(range(len(group.items[0].idxs)))

    def find(channel: int) -> int:
        while parent[channel] != channel:
            parent[channel] = parent[parent[channel]]
            channel = parent[channel]
        return channel

    convolutions = [item for item in group.items if _grouped(item.dep.target.module)]
    for item in convolutions:
        module = item.dep.target.module
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        per_group = (module.out_channels if out else module.in_channels) // module.groups
        first: dict[int, int] = {}
        seen: dict[int, int] = {}
        for index, root in zip(item.idxs, item.root_idxs):
            offset = int(index) % per_group
            seen[offset] = seen.get(offset, 0) + 1
            parent[find(int(root))] = find(first.setdefault(offset, int(root)))
        if any(count != module.groups for count in seen.values()):
            raise ExportError(f"grouped convolution {names.get(module, type(module).__name__)!r} (groups="
                              f"{module.groups}) {'writes' if out else 'reads'} channels that torch-pruning couples "
                              "unevenly across its groups; channel pruning cannot keep its groups equal")
    if not convolutions:
        return ()
    sets: dict[int, list[int]] = {}
    for channel in range(len(parent)):
        sets.setdefault(find(channel), []).append(channel)
    ties = tuple(tuple(tied) for tied in sets.values())
    if len({len(tied) for tied in ties}) > 1:
        module = convolutions[0].dep.target.module
        raise ExportError(f"grouped convolution {names.get(module, type(module).__name__)!r} (groups="
                          f"{module.groups}) ties channels in sets of different sizes with other grouped "
                          "convolutions; channel pruning cannot keep their groups equal")
    return ties


def channelwise(module: object) -> bool:
    """Whether a channel that ``module`` outputs is zero, and can be removed, when its own parameters say so: a
    Conv/Linear (its row and bias), a BatchNorm with running statistics (its shift), an operation without
    parameters (zeros pass through). Not a normalisation over channels (LayerNorm, GroupNorm, RMSNorm), whose
    outputs a zero channel still changes, nor what torch-pruning tracks as a bare parameter."""
    if not isinstance(module, nn.Module):
        return False
    if not list(module.parameters(recurse=False)):
        return True
    if isinstance(module, BATCH_NORMS):
        return module.track_running_stats and module.running_mean is not None
    return isinstance(module, PRODUCER_TYPES)


def iter_groups(graph, model: nn.Module, ignored: Sequence[nn.Module] = ()):
    """Yields ``(torch-pruning group, ChannelGroup)`` for every group rooted at a Conv/Linear output.

    Each ChannelGroup's channels are the torch-pruning group's (width 1), with the ties of its grouped
    convolutions (:attr:`ChannelGroup.ties`). ``ignored`` layers root no group, nor do the layers that read the
    input of attention traced through :func:`stand_ins` (their rows stay).

    Raises:
        ExportError: a grouped convolution's channels cannot be pruned evenly across its groups, or torch-pruning
            maps a group onto channels a layer does not have (as MaxVit's attention would without its
            :func:`stand_ins`), so no group of that model can be trusted.
    """
    names = {module: name for name, module in model.named_modules()}
    ignored = list(ignored) + [layer for opaque in opaque_readers(model).values() for layer in opaque.reads]
    for group in graph.get_all_groups(root_module_types=PRODUCER_TYPES, ignored_layers=ignored):
        size = len(group.items[0][1])
        members: dict[str, tuple[int, ...]] = {}
        removable = True
        for item in group.items:
            module = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            removable &= channelwise(module)
            if not isinstance(module, PRODUCER_TYPES):
                continue
            rows = module.weight.shape[0]
            if any(int(index) >= rows for index in item.idxs):
                raise ExportError(f"torch-pruning cannot trace the model at layer {names.get(module, '?')!r}: it "
                                  f"couples {size} channels to its {rows} output channels (it loses track of them "
                                  "in the operations after it)")
            mapping = [-1] * size
            for index, root in zip(item.idxs, item.root_idxs):
                mapping[int(root)] = int(index)
            if -1 not in mapping and module in names:
                members[names[module]] = tuple(mapping)
        yield group, ChannelGroup(size, members, ties=_ties(graph, group, names), removable=removable)


def channel_groups(model: nn.Module, example: torch.Tensor, layers: Sequence[str] | None = None) -> list[ChannelGroup]:
    """Groups of coupled output channels of the model's Conv and Linear layers.

    Args:
        model: the model (not modified; traced in eval mode).
        example: an input batch the model accepts.
        layers: keep only these layers in the groups (the targets of a run); ``None`` keeps all.

    Returns:
        One group per set of coupled channels that holds at least one of ``layers``; where grouped convolutions
        tie channels, its channels are the tied sets (:meth:`ChannelGroup.tied_units`).

    Raises:
        MissingExtraError: torch-pruning is not installed.
        ExportError: torch-pruning cannot trace the model, or a grouped convolution cannot be pruned evenly.
    """
    graph = build_dependency_graph(model, example)
    wanted = None if layers is None else set(layers)
    groups = []
    for _, group in iter_groups(graph, model):
        members = {n: m for n, m in group.members.items() if wanted is None or n in wanted}
        if members:
            groups.append(replace(group, members=members).tied_units())
    return groups
