"""Pruning: unstructured for size, structured (whole channels removed) for speed, with an optional fine-tune.

* Unstructured: ``torch.nn.utils.prune``'s L1 magnitude criterion zeroes the smallest ``amount`` of
  each Conv/Linear weight (of a torch module, or of an ONNX model's Conv/Gemm/MatMul weights through
  the same criterion). The tensors keep their shapes: the file shrinks only compressed (the report's
  zstd size), which is what a model costs on the wire.
* Structured (torch modules): ``torch.nn.utils.prune.ln_structured`` ranks each layer's output
  channels by L1 norm, then the pruned channels are really removed: the layer is rebuilt smaller, and
  so are the BatchNorms and the layer that consumes it (its input channels; after a flatten, every
  feature of a removed channel). The dependencies are read from the module's torch.fx graph: a layer is
  pruned only when its output reaches exactly one Conv/Linear through channel-wise ops (activations,
  pooling, BatchNorm, dropout, a flatten from dimension 1), never the model's outputs. Fewer channels:
  fewer FLOPs, smaller weights, faster on every runtime.

A short fine-tune on given data (labels: cross-entropy; else the original model's outputs: mean
squared error) recovers most of what pruning costs. The result is exported to ONNX.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.errors import MissingDependencyError, OptimizeError
from edgespeed.optimize.data import (
    Progress,
    Samples,
    copy_atomic,
    default_output,
    feed_for,
    load_model,
    mark_precision,
    onnx_module,
    read_samples,
    strip_provenance,
    write_model,
)
from edgespeed.optimize.report import OptimizeReport, compare, relocated, session

__all__ = ["prune", "prune_channels"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch") from exc
    return torch


def _tprune() -> Any:
    """``torch.nn.utils.prune`` (untyped), the pruning criteria and masks this module builds on."""
    _torch()
    from torch.nn.utils import prune as tprune

    return tprune


def prune(
    model: Any,
    *,
    amount: float = 0.5,
    structured: bool = False,
    output: Path | str | None = None,
    example: Any = None,
    finetune: Any = None,
    epochs: int = 5,
    lr: float = 3e-3,
    batch: int = 64,
    evaluation: Any = None,
    latency: bool = True,
    progress: Progress | None = None,
) -> OptimizeReport:
    """Prune a torch module (structured or not) or an ONNX model (unstructured); write the ONNX result.

    Args:
        model: a ``torch.nn.Module``, or an ONNX model (path, bytes, ModelProto; unstructured only).
        amount: the fraction of weights (unstructured) or output channels (structured) to remove.
        structured: remove whole channels (torch modules only).
        output: where to write the pruned model (default: ``NAME.pruned.onnx`` beside an ONNX source).
        example: one input of the torch module (a tensor or an array); default: a row of the data.
        finetune: data to fine-tune on (torch modules): inputs, and ``labels`` or ``reference``.
        epochs, lr, batch: the fine-tune (Adam).
        evaluation: data to compare both models on (see `edgespeed.optimize.quantize`).

    Raises:
        OptimizeError: a bad amount, structured pruning of an ONNX model, a torch module without any
            example input, data that does not fit, a module whose graph torch.fx cannot trace.
    """
    if not 0.0 < amount < 1.0:
        raise OptimizeError(f"amount is a fraction between 0 and 1, not {amount}", reason="unsupported")
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        if structured or finetune is not None:
            raise OptimizeError(
                "structured pruning and fine-tuning need the torch module (give .safetensors and its architecture)",
                reason="unsupported",
            )
        return _prune_onnx(model, amount, output, evaluation, latency, progress)
    if output is None:
        raise OptimizeError("give an output path for the pruned torch module", reason="unsupported")
    target = Path(output)
    with tempfile.TemporaryDirectory(prefix="edgespeed-prune-") as tmp:
        example_array = _example(example, finetune, evaluation)
        original = export_onnx(model, example_array, Path(tmp) / "original.onnx")
        proto = load_model(original)
        tune = read_samples(finetune, proto, what="fine-tune data") if finetune is not None else None
        checked = read_samples(evaluation, proto, what="evaluation data") if evaluation is not None else None
        if structured:
            pruned = prune_channels(model, torch.from_numpy(example_array), amount)
            settings: dict[str, Any] = {"amount": amount, "structured": True, "criterion": "L1 per output channel"}
        else:
            pruned = _mask_unstructured(model, amount)
            settings = {"amount": amount, "structured": False, "criterion": "L1 per weight"}
        if tune is not None:
            _finetune(pruned, model, tune, epochs, lr, batch, progress)
            settings.update(finetune_rows=len(tune), epochs=epochs, lr=lr)
        if not structured:
            _remove_masks(pruned)
        staged = export_onnx(pruned, example_array, Path(tmp) / "new.onnx")
        write_model(mark_precision(strip_provenance(load_model(staged)), "fp32"), staged)
        report = compare(
            "prune",
            original,
            staged,
            evaluation=checked,
            feed=feed_for(proto, tune if tune is not None else checked),
            latency=latency,
            progress=progress,
            settings=settings,
        )
        copy_atomic(staged, target)
    return relocated(report, f"(torch {type(model).__name__})", target)


def _example(example: Any, *data: Any) -> np.ndarray[Any, Any]:
    """One input row: ``example``, or the first row of the first data given."""
    torch = _torch()
    if isinstance(example, torch.Tensor):
        return np.ascontiguousarray(example.detach().cpu().numpy())
    if example is not None:
        return np.ascontiguousarray(np.asarray(example))
    for source in data:
        if source is None:
            continue
        arrays: dict[str, Any]
        if isinstance(source, Samples):
            arrays = dict(source.inputs)
        elif isinstance(source, np.ndarray):
            arrays = {"": source}
        elif isinstance(source, dict):
            arrays = source
        else:
            path = Path(source)
            if not path.is_file() or path.stat().st_size == 0:
                continue  # read_samples names the problem
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        for key, value in arrays.items():
            if key not in ("labels", "y", "reference") and np.ndim(value) > 0 and len(value):
                return np.ascontiguousarray(np.asarray(value)[:1])
    raise OptimizeError(
        "a torch module needs an example input (example=, or fine-tune/evaluation data)", reason="bad_data"
    )


def export_onnx(module: Any, example: np.ndarray[Any, Any], path: Path) -> Path:
    """Export a one-input torch module to ONNX (``x`` in, ``y`` out, the batch dynamic)."""
    torch = _torch()
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export: Any = torch.onnx.export
        try:
            export(
                module,
                (torch.from_numpy(example),),
                str(path),
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                dynamo=False,
            )
        except Exception as exc:  # the exporter's failures: an op it cannot export, a bad example
            raise OptimizeError(f"cannot export the torch module to ONNX: {exc}", reason="bad_model") from exc
    return path


def _mask_unstructured(module: Any, amount: float) -> Any:
    tprune = _tprune()
    pruned = copy.deepcopy(module)
    for layer in pruned.modules():
        if isinstance(layer, _prunable_types()):
            tprune.l1_unstructured(layer, "weight", amount=amount)
    return pruned


def _remove_masks(module: Any) -> None:
    tprune = _tprune()
    for layer in module.modules():
        if tprune.is_pruned(layer) and hasattr(layer, "weight_mask"):
            tprune.remove(layer, "weight")


def _prunable_types() -> tuple[type, ...]:
    nn = _torch().nn
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _prune_onnx(
    model: Any, amount: float, output: Path | str | None, evaluation: Any, latency: bool, progress: Progress | None
) -> OptimizeReport:
    """Unstructured L1 pruning of an ONNX model's Conv/Gemm/MatMul weights (torch's criterion, per tensor)."""
    torch = _torch()
    tprune = _tprune()
    onnx = onnx_module()
    target = default_output(model, "pruned", output)
    proto = load_model(model)
    session(proto)
    checked = read_samples(evaluation, proto, what="evaluation data") if evaluation is not None else None
    new = onnx.ModelProto()
    new.CopyFrom(proto)
    weights = {n.input[1] for n in new.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    done = 0
    for i, tensor in enumerate(new.graph.initializer):
        if tensor.name not in weights or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        values = torch.from_numpy(onnx.numpy_helper.to_array(tensor).copy())
        mask = tprune.L1Unstructured(amount).compute_mask(values, torch.ones_like(values))
        new.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array((values * mask).numpy(), tensor.name))
        done += 1
    if not done:
        raise OptimizeError("no float Conv, Gemm or MatMul weights to prune in this model", reason="bad_model")
    with tempfile.TemporaryDirectory(prefix="edgespeed-prune-") as tmp:
        original = write_model(proto, Path(tmp) / "original.onnx")
        staged = write_model(strip_provenance(new), Path(tmp) / "new.onnx")
        report = compare(
            "prune",
            original,
            staged,
            evaluation=checked,
            feed=feed_for(proto, checked),
            latency=latency,
            progress=progress,
            settings={"amount": amount, "structured": False, "criterion": "L1 per weight", "tensors": done},
        )
        copy_atomic(staged, target)
    return relocated(report, model, target)


def _finetune(
    module: Any, teacher: Any, data: Samples, epochs: int, lr: float, batch: int, progress: Progress | None
) -> None:
    """A short fine-tune (Adam): cross-entropy on labels, else mean squared error against the reference
    outputs or the original module's."""
    torch = _torch()
    if len(data.inputs) != 1:
        raise OptimizeError("fine-tuning takes one input array", reason="bad_data")
    x = torch.from_numpy(next(iter(data.inputs.values())))
    if data.labels is not None:
        target = torch.from_numpy(data.labels.astype(np.int64).reshape(-1))
        loss_fn: Any = torch.nn.functional.cross_entropy
    else:
        if data.reference is not None:
            target = torch.from_numpy(np.asarray(data.reference, dtype=np.float32))
        else:
            with torch.inference_mode():
                target = teacher.eval()(x).detach().clone()
        loss_fn = torch.nn.functional.mse_loss
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            rows = order[start : start + batch]
            optimiser.zero_grad()
            loss_fn(module(x[rows]), target[rows]).backward()
            optimiser.step()
        if progress is not None:
            progress("fine-tuning", epoch, epochs)
    module.eval()


def prune_channels(module: Any, example: Any, amount: float) -> Any:
    """A copy of ``module`` with ``amount`` of the output channels of each prunable Conv/Linear removed.

    Channels are ranked with ``torch.nn.utils.prune.ln_structured`` (L1 norm); see the module's notes
    for which layers qualify. Returns a ``torch.fx.GraphModule``.

    Raises:
        OptimizeError: torch.fx cannot trace the module, or no layer qualifies.
    """
    torch = _torch()
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    tprune = _tprune()
    try:
        traced = symbolic_trace(copy.deepcopy(module).eval())
        ShapeProp(traced).propagate(example)
    except Exception as exc:  # fx's tracing failures: data-dependent control flow and the like
        raise OptimizeError(f"torch.fx cannot trace this module: {exc}", reason="bad_model") from exc
    modules = dict(traced.named_modules())
    plans = [p for node in traced.graph.nodes if (p := _plan(node, modules)) is not None]
    if not plans:
        raise OptimizeError("no layer of this module can lose channels safely", reason="bad_model")
    keep_out: dict[str, Any] = {}
    keep_in: dict[str, Any] = {}
    for layer, norms, consumer, factor in plans:
        probe = copy.deepcopy(modules[layer])
        tprune.ln_structured(probe, "weight", amount=amount, n=1, dim=0)
        kept = probe.weight_mask.flatten(1).any(dim=1).nonzero().flatten()
        if len(kept) == 0:
            kept = probe.weight_orig.flatten(1).abs().sum(1).argmax().reshape(1)
        keep_out[layer] = kept
        for norm in norms:
            keep_out[norm] = kept
        keep_in[consumer] = (kept[:, None] * factor + torch.arange(factor)[None, :]).flatten()
    for name in {*keep_out, *keep_in}:
        _replace(traced, name, _rebuild(modules[name], keep_out.get(name), keep_in.get(name)))
    traced.recompile()
    return traced


def _plan(node: Any, modules: dict[str, Any]) -> tuple[str, list[str], str, int] | None:
    """For a Conv/Linear node: (layer, its BatchNorms, the one consumer, features per channel), or None."""
    nn = _torch().nn
    if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d | nn.Linear):
        return None
    if isinstance(modules[node.target], nn.Conv2d) and modules[node.target].groups != 1:
        return None
    norms: list[str] = []
    factor = 1
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.args[:1] != (current,):
            return None
        kind = _kind(user, modules)
        if kind == "consumer":
            layer = modules[user.target]
            if isinstance(layer, nn.Conv2d) and (factor != 1 or layer.groups != 1):
                return None
            return str(node.target), norms, str(user.target), factor
        if kind == "norm":
            norms.append(str(user.target))
        elif kind == "flatten":
            shape = current.meta.get("tensor_meta")
            if shape is None or len(shape.shape) < 2:
                return None
            factor = int(np.prod(shape.shape[2:]))
        elif kind != "pass":
            return None
        current = user


_PASS_MODULES = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "GELU",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "Hardswish",
    "Dropout",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "Identity",
)
_PASS_CALLS = ("relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "dropout", "max_pool2d", "avg_pool2d")


def _kind(node: Any, modules: dict[str, Any]) -> str:
    """How a node treats channels: consumer (Conv/Linear), norm, flatten (from dim 1), pass, or other."""
    nn = _torch().nn
    if node.op == "call_module":
        layer = modules[node.target]
        if isinstance(layer, nn.Conv2d | nn.Linear):
            return "consumer"
        if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
            return "norm"
        if isinstance(layer, nn.Flatten):
            return "flatten" if layer.start_dim == 1 and layer.end_dim == -1 else "other"
        return "pass" if type(layer).__name__ in _PASS_MODULES else "other"
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return "flatten" if start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs else "other"
        if name in _PASS_CALLS or name.rstrip("_") in _PASS_CALLS:
            return "pass"
    return "other"


def _rebuild(layer: Any, out_keep: Any, in_keep: Any) -> Any:
    """A smaller copy of a Conv2d, Linear or BatchNorm keeping the given output and input channels."""
    nn = _torch().nn
    if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
        norm = type(layer)(len(out_keep), layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        state = {k: v[out_keep] if v.ndim else v for k, v in layer.state_dict().items()}
        norm.load_state_dict(state)
        return norm
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if out_keep is not None:
        weight = weight[out_keep]
        bias = None if bias is None else bias[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            1,
            bias is not None,
            layer.padding_mode,
        )
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _replace(root: Any, name: str, module: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def channel_counts(module: Any) -> Sequence[int]:
    """The output channels (features) of each Conv/Linear, in order: what structured pruning changed."""
    layers: list[Any] = [m for m in module.modules() if isinstance(m, _prunable_types())]
    return [int(m.weight.shape[0]) for m in layers]
