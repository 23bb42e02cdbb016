"""Channel removal: a channel-pruned model becomes a physically smaller dense model.

torch-pruning's dependency graph (:mod:`ptsparse.graph.coupling`) groups the channels that can only be
removed together. A group channel is removed when it is *dead* in the given model: every layer that
produces it outputs exactly zero there (a Conv/Linear row of zeros with a zero bias, a BatchNorm whose
output for a zero input is zero, e.g. zero weight and bias, as channel pruning leaves it:
:func:`~ptsparse.masking.attach_channel_masks`). Only dead channels go, so the smaller model computes what the
masked model computes; a channel zeroed in one layer but alive in a coupled one (a residual stream pruned
layer by layer) stays and is counted in the report. The result is checked: it must give the masked model's
outputs on the example inputs.

Attention (:mod:`ptsparse.attention`): a q/k/v projection loses whole heads only, those dead in q, k and v
alike (torch-pruning removes the output projection's input columns with them), and the module's head count
(timm ``num_heads``/``attn_dim``, Hugging Face ``num_attention_heads``/``all_head_size``) is set to the heads
left; the rows per head stay. A head pruned in part keeps all its rows. Attention that torch-pruning cannot
follow (MaxVit's) is traced through a stand-in and keeps its heads (:func:`ptsparse.graph.coupling.stand_ins`).

A grouped convolution (ResNeXt, RegNet) loses channels at the same offsets in all its groups, on its input and
its output (torch-pruning's way): a channel goes only with those tied to it (:attr:`ChannelGroup.ties`).

The output layer keeps its outputs. The model passed in is never modified. The file stores the smaller
model's weights and, in its metadata, the new sizes of the resized layers; ``ptsparse.load`` rebuilds the
architecture and resizes those layers before loading (this format's checkpoint reader).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..attention import find_attention, heads_by_layer, update_head_counts, whole_heads
from ..checkpoint import Reader, save_state
from ..errors import CheckpointError, ExportError
from ..graph.cost import count_macs, count_params
from ..graph.coupling import PRODUCER_TYPES, build_dependency_graph, channelwise, eval_mode, iter_groups
from ..graph.outputs import feeding_the_output, record_output_nodes, traceable_input
from .base import ExportFormat, check_outputs, float64_outputs, register_format

FORMAT = "channels"


def _channels_alive(module: nn.Module) -> torch.Tensor:
    """Per output channel, whether a :func:`~ptsparse.graph.coupling.channelwise` module with parameters (a
    Conv/Linear, a BatchNorm with running statistics) can output non-zero there."""
    with torch.no_grad():
        if isinstance(module, PRODUCER_TYPES):
            alive = module.weight.flatten(1).ne(0).any(1)
            if module.bias is not None:
                alive |= module.bias.ne(0)
            return alive
        # Eval-mode output for a zero input: the BatchNorm's shift.
        shift = -module.running_mean / torch.sqrt(module.running_var + module.eps)
        if module.weight is not None:
            shift = shift * module.weight + module.bias
        return shift.ne(0)


def _output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose output channels are the model's output channels (:mod:`ptsparse.graph.outputs`): they stay."""
    outputs: dict[nn.Module, torch.Tensor] = {}
    produced: dict[object, nn.Module] = {}
    producers = [m for m in model.modules() if isinstance(m, PRODUCER_TYPES)]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for m in producers]
    hooks += [m.register_forward_hook(record_output_nodes(produced, m)) for m in producers]
    try:
        with eval_mode(model), torch.enable_grad():
            result = model(traceable_input(example))
    finally:
        for hook in hooks:
            hook.remove()
    direct = {m for m, out in outputs.items() if out is result}
    return list(direct | feeding_the_output(result, produced))


def _forward_naming_failures(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """Runs ``model(example)``; a failure raises :class:`ExportError` naming the module it happened in."""
    names = {module: name for name, module in model.named_modules()}
    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i: entered.append(names[m])) for m in model.modules()
             if not list(m.children())]
    try:
        with torch.no_grad():
            return model(example)
    except (RuntimeError, ValueError, IndexError) as error:
        where = entered[-1] if entered else "the model's first layer"
        reason = str(error).strip().splitlines()[0]
        raise ExportError(f"channel removal broke module {where!r} ({reason}): torch-pruning could not trace how "
                          f"its inputs connect to the pruned layers; the masked model is unchanged") from None
    finally:
        for hook in hooks:
            hook.remove()


def remove_channels(model: nn.Module, example: torch.Tensor,
                    tolerance: float = 1e-4) -> tuple[nn.Module, dict[str, Any]]:
    """Removes the dead output channels of a channel-pruned model.

    Args:
        model: a model with pruned channels (e.g. ``sparsify(..., method="taylor").model``); not modified.
        example: an input batch the model accepts (more than one sample checks the outputs better).
        tolerance: the largest output difference allowed, relative to the largest output magnitude (removing
            channels reorders float sums: about 1e-7 of it; where float32 rounding in a deep network exceeds it,
            float64 copies of both models decide: :func:`~ptsparse.export.base.check_outputs`).

    Returns:
        The smaller model (eval mode) and a report: parameters and MACs before and after, channels removed
        per group, zeroed channels kept because a coupled layer still uses them, and the largest output
        difference.

    Raises:
        MissingExtraError: torch-pruning is not installed.
        ExportError: the model cannot be traced, or the smaller model does not reproduce its outputs (the
            message names the module where it fails).
    """
    smaller = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    with torch.no_grad():
        reference = smaller(example)
    params, macs = count_params(smaller), count_macs(smaller, example[:1])["macs"]
    graph = build_dependency_graph(smaller, example)
    ignored = _output_layers(smaller, example)
    attentions = find_attention(smaller)
    heads = heads_by_layer(attentions)
    groups, kept_zeroed, grouped = [], 0, set()
    for group, channels in iter_groups(graph, smaller, ignored):
        grouped.update(channels.members)
        dead = torch.ones(channels.size, dtype=torch.bool)
        for item in group.items:
            if not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            module = item.dep.target.module
            if not channelwise(module):
                dead[:] = False
                break
            if not list(module.parameters(recurse=False)):
                continue  # parameter-free operations (activations, adds) pass zeros through
            dead[torch.tensor(item.root_idxs)] &= ~_channels_alive(module)[torch.tensor(item.idxs)]
        zeroed = torch.zeros(channels.size, dtype=torch.bool)
        for name, mapping in channels.members.items():
            weight = graph.model.get_submodule(name).weight
            zeroed |= weight.detach().flatten(1).eq(0).all(1)[torch.tensor(mapping)]
        dead = channels.tie(whole_heads(dead, channels.members, heads))
        if bool(dead.all()):  # a layer keeps at least one channel (an attention, one head: whole_heads)
            dead[list(channels.ties[0]) if channels.ties else 0] = False
        removable = dead.nonzero().flatten()
        kept_zeroed += int((zeroed & ~dead).sum())
        if len(removable) == 0:
            continue
        root = group.items[0]
        pruning_group = graph.get_pruning_group(root.dep.target.module, root.dep.handler, removable.tolist())
        if not graph.check_pruning_group(pruning_group):
            continue
        pruning_group.prune()
        groups.append({"layers": sorted(channels.members), "channels": channels.size, "removed": len(removable)})
    with torch.no_grad():  # layers in no group (MaxVit's to_qkv: its heads stay) keep their zeroed rows too
        kept_zeroed += sum(int(m.weight.flatten(1).eq(0).all(1).sum()) for n, m in smaller.named_modules()
                           if isinstance(m, PRODUCER_TYPES) and n not in grouped)
    update_head_counts(attentions)
    smaller.zero_grad(set_to_none=True)
    outputs = _forward_naming_failures(smaller, example)
    relative = check_outputs(
        outputs, reference, tolerance, "channel removal changed the outputs (a removed channel was not zero in every "
        "layer that reads it; the masked model is unchanged)",
        exact=lambda: (float64_outputs(smaller, example), float64_outputs(model, example)))
    macs_after = count_macs(smaller, example[:1])["macs"]
    report = {
        "format": FORMAT,
        "params": params, "params_after": count_params(smaller),
        "macs": macs, "macs_after": macs_after, "mac_reduction": 1 - macs_after / macs,
        "channels_removed": sum(g["removed"] for g in groups),
        "zeroed_channels_kept": kept_zeroed,
        "groups": groups,
        "max_relative_difference": relative,
    }
    return smaller, report


# Size attributes of the layers channel removal resizes, and which of them a weight's shape determines.
_SIZE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                    "normalized_shape", "num_channels", "num_groups", "embedding_dim",
                    "num_heads", "attn_dim", "num_attention_heads", "all_head_size")  # heads: ptsparse.attention


def module_sizes(model: nn.Module) -> dict[str, dict[str, object]]:
    """The size attributes (``in_channels``, ``out_features``, ``num_features``, ...) of every module."""
    sizes = {}
    for name, module in model.named_modules():
        found = {a: getattr(module, a) for a in _SIZE_ATTRIBUTES if isinstance(getattr(module, a, None), (int, tuple))}
        if found:
            sizes[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in found.items()}
    return sizes


def changed_sizes(original: nn.Module, smaller: nn.Module) -> dict[str, dict[str, object]]:
    """Size attributes of the modules channel removal changed (what loading must re-apply)."""
    before = module_sizes(original)
    return {name: sizes for name, sizes in module_sizes(smaller).items() if before.get(name) != sizes}


def save_channels(original: nn.Module, smaller: nn.Module, path: str | os.PathLike,
                  metadata: dict | None = None) -> None:
    """Writes a channel-removed model: its weights plus the new layer sizes (``ptsparse.load`` reads both).

    Args:
        original: the model before removal (of the registered architecture named in ``metadata``).
        smaller: the model :func:`remove_channels` returned.
        path: destination ``.safetensors`` file (written atomically).
        metadata: header metadata, e.g. ``{"architecture": "reference_resnet20"}``.
    """
    header = dict(metadata or {}, format=FORMAT, modules=changed_sizes(original, smaller))
    save_state(smaller.state_dict(), path, header)


def resize_modules(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict,
                   source: str = "checkpoint") -> nn.Module:
    """Shapes a freshly built model to a channel-removed checkpoint, in place (this format's reader).

    Sets the size attributes of each module listed in ``metadata["modules"]`` and replaces its parameters
    and buffers by empty tensors of the checkpoint's shapes (``load_into`` then fills them).

    Raises:
        CheckpointError: a listed module does not exist in the model.
    """
    modules = dict(model.named_modules())
    for name, attributes in metadata.get("modules", {}).items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{source} resizes module {name!r}, which the model does not have")
        for attribute, value in attributes.items():
            setattr(module, attribute, tuple(value) if isinstance(value, list) else value)
        prefix = f"{name}." if name else ""
        for key, tensor in list(module.named_parameters(recurse=False)):
            new = state.get(prefix + key)
            if new is not None and new.shape != tensor.shape:
                setattr(module, key, nn.Parameter(torch.empty_like(new, dtype=tensor.dtype),
                                                  requires_grad=tensor.requires_grad))
        for key, tensor in list(module.named_buffers(recurse=False)):
            new = state.get(prefix + key)
            if tensor is not None and new is not None and new.shape != tensor.shape:
                setattr(module, key, torch.empty_like(new, dtype=tensor.dtype))
    return model


def _write(model: nn.Module, path: str | os.PathLike, metadata: dict, *, example: torch.Tensor,
           value_dtype: str | None) -> dict[str, Any]:
    """The format's writer: removes the dead channels and writes the smaller model."""
    smaller, report = remove_channels(model, example)
    save_channels(model, smaller, path, metadata)
    return report


register_format(FORMAT, ExportFormat(
    description="dead channels removed: a smaller, faster dense model (needs torch-pruning)",
    write=_write, reader=Reader(fit=resize_modules), traced=True,
    warnings=lambda model, metadata: []))  # the smaller model is dense: no zeros left to warn about
