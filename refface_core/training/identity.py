"""The identity losses: a frozen, differentiable ArcFace read from insightface's ONNX file, and the HID loss.

``ArcFace`` evaluates the ONNX graph node by node with torch ops (the op subset face recognition models use), so
one loader serves insightface's iresnet50/100 and MobileFaceNet packs without onnx2torch. The weights are frozen,
non-persistent buffers: they always come from the ONNX file, never from a training checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RefFaceError, listing

FACE_SIZE = 112


def identity_preprocess(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,3,112,112]: ReF-LDM's centre crop (1/16 off each side) and 'area' resize."""
    h, w = images.shape[-2:]
    crop = images[:, :, int(h * 0.0625) : int(h * 0.9375), int(w * 0.0625) : int(w * 0.9375)]
    return F.interpolate(crop, (FACE_SIZE, FACE_SIZE), mode="area")


# ---------------------------------------------------------------------------------------------------------------------
# ONNX operators, evaluated with torch. Each takes the node's inputs (None for an omitted optional input) and its
# attributes, and returns its outputs.

Op = Callable[[list[Any], dict[str, Any]], "torch.Tensor | list[torch.Tensor]"]


def _pads(attrs: dict[str, Any], rank: int) -> list[int]:
    """ONNX pads [begin..., end...] as one symmetric padding per spatial dim (asymmetric pads are refused)."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise RefFaceError(f"ArcFace ONNX: auto_pad={attrs['auto_pad'].decode()} is not supported")
    pads = list(attrs.get("pads", [0] * 2 * rank))
    if pads[:rank] != pads[rank:]:
        raise RefFaceError(f"ArcFace ONNX: asymmetric padding {pads} is not supported")
    return pads[:rank]


def _conv(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, w, b = i[0], i[1], i[2] if len(i) > 2 else None
    if x.dim() != 4:
        raise RefFaceError(f"ArcFace ONNX: only 2-D Conv is supported (input of rank {x.dim()})")
    return F.conv2d(
        x,
        w,
        b,
        stride=a.get("strides", 1),
        padding=_pads(a, 2),
        dilation=a.get("dilations", 1),
        groups=a.get("group", 1),
    )


def _batch_norm(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, scale, bias, mean, var = i[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _gemm(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, w = i[0], i[1]
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * i[2] if len(i) > 2 and i[2] is not None else y


def _reshape(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, shape = i[0], [int(s) for s in i[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [x.shape[d] if s == 0 else s for d, s in enumerate(shape)]
    return x.reshape(shape)


def _pool(i: list[Any], a: dict[str, Any], average: bool) -> torch.Tensor:
    kernel, strides = a["kernel_shape"], a.get("strides", 1)
    args = dict(
        kernel_size=kernel, stride=strides, padding=_pads(a, len(kernel)), ceil_mode=bool(a.get("ceil_mode", 0))
    )
    if average:
        return F.avg_pool2d(i[0], count_include_pad=bool(a.get("count_include_pad", 0)), **args)
    return F.max_pool2d(i[0], dilation=a.get("dilations", 1), **args)


def _gather(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    data, index, axis = i[0], i[1].long(), a.get("axis", 0) % i[0].dim()
    index = index % data.shape[axis]
    picked = data.index_select(axis, index.flatten())
    return picked.reshape(data.shape[:axis] + index.shape + data.shape[axis + 1 :])


def _axes(i: list[Any], a: dict[str, Any]) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    return [int(v) for v in i[1].tolist()] if len(i) > 1 and i[1] is not None else None


def _unsqueeze(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, axes = i[0], _axes(i, a) or []
    rank = x.dim() + len(axes)
    for axis in sorted(d % rank for d in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, axes = i[0], _axes(i, a)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(d % x.dim() for d in axes))


def _flatten(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, axis = i[0], a.get("axis", 1) % max(i[0].dim(), 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


OPS: dict[str, Op] = {
    "Add": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: i[0] / i[1],
    "Relu": lambda i, a: F.relu(i[0]),
    "PRelu": lambda i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": lambda i, a: i[0] @ i[1],
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda i, a: i[0].permute(a["perm"]) if "perm" in a else i[0].permute(*reversed(range(i[0].dim()))),
    "Identity": lambda i, a: i[0],
    "Dropout": lambda i, a: i[0],  # inference: the identity (a mask output is not supported)
    "AveragePool": lambda i, a: _pool(i, a, average=True),
    "MaxPool": lambda i, a: _pool(i, a, average=False),
    "GlobalAveragePool": lambda i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "Concat": lambda i, a: torch.cat([t for t in i if t is not None], dim=a["axis"]),
    "Shape": lambda i, a: torch.tensor(i[0].shape, dtype=torch.int64, device=i[0].device),
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
}


# ---------------------------------------------------------------------------------------------------------------------


def _sorted_nodes(nodes: list[Any], available: set[str], path: Path) -> list[Any]:
    """The nodes in an order where every input is computed before use (ONNX files normally already are)."""
    done, order, pending = set(available) | {""}, [], list(nodes)
    while pending:
        ready = [n for n in pending if all(name in done for name in n.input)]
        if not ready:
            missing = sorted({name for n in pending for name in n.input if name not in done})
            raise RefFaceError(f"{path}: the ONNX graph has a cycle or inputs nothing produces: {missing[:5]}")
        order += ready
        done.update(name for n in ready for name in n.output)
        pending = [n for n in pending if n not in ready]
    return order


def _takes_raw_pixels(nodes: list[Any]) -> bool:
    """insightface's rule (model_zoo/arcface_onnx.py): a Sub and a Mul among the first 8 nodes mean the model
    normalises its own input, so it takes 0..255 pixels; otherwise it takes (x - 127.5) / 127.5.
    insightface matches node names (mxnet's _minusscalar/_mulscalar); the op type is accepted as well."""

    def seen(op: str, prefixes: tuple[str, ...]) -> bool:
        return any(n.op_type == op or n.name.startswith(prefixes) for n in nodes[:8])

    return seen("Sub", ("Sub", "_minus")) and seen("Mul", ("Mul", "_mul"))


class ArcFace(nn.Module):
    """A face recogniser read from an insightface ONNX file, frozen and differentiable w.r.t. its input.

    forward: RGB faces [B,3,112,112] in [-1,1] (the norm_crop alignment) -> embeddings [B,D] (not normalised).
    """

    def __init__(
        self,
        nodes: list[tuple[str, list[str], list[str], dict[str, Any]]],
        constants: dict[str, torch.Tensor],
        input_name: str,
        output_name: str,
        raw_pixels: bool,
    ) -> None:
        super().__init__()
        self.nodes, self.input_name, self.output_name, self.raw_pixels = nodes, input_name, output_name, raw_pixels
        self.constant_names: dict[str, str] = {}
        for k, (name, value) in enumerate(constants.items()):
            self.constant_names[name] = f"c{k}"
            self.register_buffer(f"c{k}", value, persistent=False)
        last_use = {name: k for k, (_, names, _, _) in enumerate(nodes) for name in names}
        self.release: list[list[str]] = [[] for _ in nodes]  # intermediates to drop after each node
        for name, k in last_use.items():
            if name not in self.constant_names and name not in ("", input_name, output_name):
                self.release[k].append(name)
        self.eval()

    def train(self, mode: bool = True) -> ArcFace:
        """Always in inference mode (BatchNormalization uses its running statistics, Dropout is off)."""
        return super().train(False)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> ArcFace:
        """Load a recognition model (e.g. buffalo_l/w600k_r50.onnx, antelopev2/glintr100.onnx)."""
        import onnx
        from onnx import numpy_helper

        path = Path(path)
        if not path.is_file():
            raise RefFaceError(
                f"ArcFace model not found: {path} (give the recognition ONNX file of an insightface pack, "
                "e.g. models/insightface/models/buffalo_l/w600k_r50.onnx)"
            )
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise RefFaceError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from e
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in inits]
        dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
        shape_ok = len(dims) == 4 and dims[1] == 3 and all(d == FACE_SIZE or isinstance(d, str) for d in dims[2:])
        if len(inputs) != 1 or len(graph.output) != 1 or not shape_ok:
            raise RefFaceError(
                f"{path} is not an ONNX face recognition model: expected one input [N,3,{FACE_SIZE},{FACE_SIZE}] "
                f"and one output; found inputs {[v.name for v in inputs]} (shape {dims}), {len(graph.output)} outputs"
            )
        consumed = {name for n in graph.node for name in n.input} | {graph.output[0].name}
        unsupported: dict[str, str] = {}
        for n in graph.node:
            if n.op_type not in OPS and n.op_type != "Constant":
                unsupported.setdefault(n.op_type, f"{n.op_type} (node '{n.name}')")
            elif any(name in consumed for name in n.output[1:]):
                unsupported.setdefault(n.op_type + "+", f"{n.op_type} with a second output in use (node '{n.name}')")
        if unsupported:
            raise RefFaceError(
                listing(
                    f"{path} uses ONNX operators that RefFace's ArcFace does not support", list(unsupported.values())
                )
                + f"\nSupported: {', '.join(sorted(OPS))}, Constant"
            )

        constants = {name: torch.from_numpy(numpy_helper.to_array(t).copy()) for name, t in inits.items()}
        nodes = []
        for n in _sorted_nodes(list(graph.node), {inputs[0].name} | set(inits), path):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                if "value" not in attrs:
                    raise RefFaceError(f"{path}: Constant node '{n.name}' without a tensor value is not supported")
                constants[n.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
            else:
                nodes.append((n.op_type, list(n.input), list(n.output), attrs))
        return cls(nodes, constants, inputs[0].name, graph.output[0].name, _takes_raw_pixels(list(graph.node)))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """RGB faces [B,3,112,112] in [-1,1] -> embeddings [B,D]."""
        if faces.dim() != 4 or tuple(faces.shape[1:]) != (3, FACE_SIZE, FACE_SIZE):
            raise RefFaceError(f"ArcFace takes faces [B,3,{FACE_SIZE},{FACE_SIZE}], got {list(faces.shape)}")
        dtype = next((b.dtype for b in self.buffers() if b.is_floating_point()), faces.dtype)
        x = faces.to(dtype)
        values: dict[str, Any] = {name: self._buffers[b] for name, b in self.constant_names.items()}
        values[""] = None
        values[self.input_name] = (x + 1) * 127.5 if self.raw_pixels else x
        for (op, inputs, outputs, attrs), release in zip(self.nodes, self.release, strict=True):
            values[outputs[0]] = OPS[op]([values[name] for name in inputs], attrs)
            for name in release:
                del values[name]
        return values[self.output_name].flatten(1)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(a, b, dim=1)


def identity_loss(arcface: ArcFace, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_ID per sample [B] = 1 - cos(ArcFace(pre(a)), ArcFace(pre(b))); images [B,3,H,W] in [-1,1], any size."""
    return _cosine_distance(arcface(identity_preprocess(a)), arcface(identity_preprocess(b)))


def hid_loss(
    arcface: ArcFace, restored: torch.Tensor, hq: torch.Tensor, reference: torch.Tensor, lam: float = 0.5
) -> torch.Tensor:
    """Hard Example Identity loss per sample [B]: (1 - lam)·L_ID(hq, restored) + lam·L_ID(reference, restored)."""
    if not 0.0 <= lam <= 1.0:
        raise RefFaceError(f"the HID weight lambda must lie in [0, 1], got {lam}")
    restored_emb = arcface(identity_preprocess(restored))
    terms = [(1 - lam, hq), (lam, reference)]
    losses = [w * _cosine_distance(arcface(identity_preprocess(x)), restored_emb) for w, x in terms if w > 0]
    return losses[0] + losses[1] if len(losses) == 2 else losses[0]
