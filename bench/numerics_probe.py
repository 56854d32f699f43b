"""Fingerprints of the numerics the pipeline uses, one hash per library kernel family.

    python bench/numerics_probe.py            # prints {component: md5 prefix} as JSON

Run it under dvc.yaml's pins on two processors (bench/emulated_processors.sh runs it natively
and on QEMU-emulated Haswell and AMD EPYC-Rome processors): a component whose hash differs
is a kernel whose result depends on the processor despite the pins.
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

SIDE, CHANNELS = 32, 8  # small shapes: the probe must also finish under instruction-set emulation


def _h(array) -> str:
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()[:8]


def numpy_components(rng: np.random.Generator) -> dict[str, str]:
    """numpy's dispatched ufuncs and OpenBLAS / LAPACK."""
    x64 = rng.standard_normal((300, 200))
    x32 = x64.astype(np.float32)
    square = x64[:200] @ x64[:200].T + np.eye(200)
    return {"numpy.exp.f32": _h(np.exp(x32)), "numpy.sin.f64": _h(np.sin(x64)), "numpy.log.f32": _h(np.log1p(np.abs(x32))),
            "numpy.tanh.f32": _h(np.tanh(x32)), "numpy.power.f64": _h(np.abs(x64) ** 0.5), "numpy.sum.f32": _h(x32.sum(0)),
            "openblas.dgemm": _h(x64 @ x64.T), "openblas.sgemm": _h(x32 @ x32.T),
            "lapack.solve": _h(np.linalg.solve(square, x64[:200]))}


def torch_components() -> dict[str, str]:
    """ATen's vectorised kernels, MKL (GEMM, VML) and oneDNN (convolutions), forward and backward."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    a = torch.randn(64, 256)
    linear, conv, norm = torch.nn.Linear(256, 256), torch.nn.Conv2d(CHANNELS, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)
    image = torch.randn(4, CHANNELS, SIDE, SIDE, requires_grad=True)
    heads = a.view(4, 2, 8, 256)
    out = {}
    with torch.no_grad():
        out.update({"torch.linear": _h(linear(a)), "torch.softmax": _h(torch.softmax(a, -1)),
                    "torch.gelu": _h(torch.nn.functional.gelu(a)), "torch.silu": _h(torch.nn.functional.silu(a)),
                    "torch.exp": _h(torch.exp(a)), "torch.sum": _h(a.sum(0)),
                    "torch.bmm": _h(a.view(4, 16, 256) @ a.view(4, 256, 16)),
                    "torch.attention": _h(torch.nn.functional.scaled_dot_product_attention(heads, heads, heads)),
                    "torch.groupnorm": _h(norm(conv(image))),
                    # torch's float32 sqrt is within 1 ulp, not correctly rounded, and which of
                    # the two neighbours it returns depends on the processor: AdamW's denominator
                    # and the DDIM scheduler's sqrt(alpha_bar) go through it
                    "torch.sqrt": _h(torch.sqrt(a.abs())), "torch.adamw": _h(_adamw_steps(a))})
    features = conv(image)
    out["torch.conv"] = _h(features.detach())
    (features ** 2).mean().backward()
    (linear(a) ** 2).mean().backward()
    out.update({"torch.conv.grad_weight": _h(conv.weight.grad), "torch.conv.grad_input": _h(image.grad),
                "torch.linear.grad_weight": _h(linear.weight.grad)})
    return out


def _adamw_steps(a):
    """Two AdamW steps (the decoders' optimiser) on a copy of ``a`` with gradient ``a / 1000``."""
    import torch

    param = torch.nn.Parameter(a.clone())
    optimiser = torch.optim.AdamW([param], lr=2e-3, weight_decay=1e-4)
    for _ in range(2):
        param.grad = a / 1000
        optimiser.step()
    return param.detach()


def onnxruntime_component(rng: np.random.Generator) -> dict[str, str]:
    """ONNX Runtime's CPU kernels (MLAS) on a conv -> matmul -> softmax graph, one thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = {"w": rng.standard_normal((16, CHANNELS, 3, 3)).astype(np.float32),
               "m": rng.standard_normal((SIDE, SIDE)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("MatMul", ["c", "m"], ["p"]),
         helper.make_node("Softmax", ["p"], ["y"], axis=-1)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, CHANNELS, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, CHANNELS, SIDE, SIDE)).astype(np.float32)
    return {"onnxruntime.cpu": _h(session.run(None, {"x": x})[0])}


def main() -> int:
    rng = np.random.default_rng(0)
    print(json.dumps({**numpy_components(rng), **torch_components(), **onnxruntime_component(rng)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
