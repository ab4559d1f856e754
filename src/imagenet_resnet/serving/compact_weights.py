"""Smaller ONNX files for a browser to download: the weights stored in fp16 or int8, the arithmetic kept in fp32.

A model converted to compute in fp16 would need fp16 kernels, which ONNX Runtime's WebAssembly build lacks for most
operators; here only the storage changes. Each large float32 weight becomes
- fp16: a float16 initializer and a Cast back to float32 (ONNX Runtime folds the casts when the session starts, so
  inference runs at fp32 speed; the file is half the size);
- int8: an int8 initializer with one scale per output channel (symmetric, so no zero point is needed beyond the
  zeros DequantizeLinear takes), dequantized in the graph (a quarter of the size; the weights carry rounding error,
  measured by the export against PyTorch before the file is used).
Biases, normalisation parameters and small tensors stay float32: they weigh little and are the most sensitive.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")
MIN_ELEMENTS = 4096  # smaller tensors (biases, batch-norm vectors) stay float32


def store_weights_as(model, precision: str):
    """`model` (an onnx.ModelProto, changed in place and returned) with its large float32 initializers stored in
    `precision`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision == "fp32":
        return model
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    graph = model.graph
    kept, decoders = [], []
    for tensor in graph.initializer:
        weight = numpy_helper.to_array(tensor)
        if tensor.data_type != TensorProto.FLOAT or weight.size < MIN_ELEMENTS or weight.ndim < 2:
            kept.append(tensor)
            continue
        name = tensor.name
        if precision == "fp16":
            kept.append(numpy_helper.from_array(weight.astype(np.float16), f"{name}.fp16"))
            decoders.append(helper.make_node("Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT))
        else:
            quantized, scale = _int8_per_channel(weight)
            kept += [numpy_helper.from_array(quantized, f"{name}.int8"),
                     numpy_helper.from_array(scale, f"{name}.scale"),
                     numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}.zero")]
            decoders.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale", f"{name}.zero"],
                                             [name], axis=0))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = decoders + list(graph.node)  # the decoders first: the graph's nodes stay in topological order
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def _int8_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output channel (axis 0): the rounding error of each channel is bounded
    by half its own step, so a channel of small weights is not flattened by another's large ones."""
    peak = np.abs(weight.reshape(len(weight), -1)).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    quantized = np.clip(np.rint(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return quantized, scale
