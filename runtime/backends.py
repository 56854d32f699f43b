"""Inference backends for the bundle's graphs, chosen by name.

- ``ort-cpu``: onnxruntime CPUExecutionProvider (fp32; the parity reference path). With
  more than one thread, batches are split over single-threaded runs (``SplitCpuModel``).
- ``ort-cuda``: onnxruntime CUDAExecutionProvider, with IO binding (outputs are
  allocated on the GPU by ORT and copied back once per call).
- ``ort-trt``: onnxruntime TensorrtExecutionProvider (fp16, engine cache outside the
  bundle, see ``ort_trt_cache``), falling back to CUDA for unsupported nodes.
- ``tensorrt``: native TensorRT engines built at export (``tensorrt/<version>_<gpu>/``);
  ``tensorrt`` and the CUDA runtime (through ctypes, no extra bindings) are imported
  lazily, only by this backend.

Every model exposes ``run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]`` (float32
host arrays in, float32 host arrays out, outputs in the graph's order).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import ctypes.util
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from brainldm.runtime.bundle_format import MANIFEST

FLOAT16 = np.float16
TRT_CACHE_ENV = "BRAINLDM_TRT_CACHE"
BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class BackendError(ValueError):
    """Unknown backend name, or a backend this machine cannot run."""


class Model(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], static: frozenset[str] = frozenset()) -> list[np.ndarray]:
        """float32 feeds -> float32 outputs. An input named in ``static`` that is the very same array
        object as in the previous call is not copied to the GPU again (the caller promises not to
        mutate it): the UNet's text states stay on the device for a whole denoising loop."""
        ...


class OrtModel:
    """One onnxruntime session. With ``binding_device`` ("cuda" for the GPU providers) inputs and
    outputs go through IO binding on that device; None runs plain ``session.run``."""

    def __init__(self, path: Path, providers: list, options: ort.SessionOptions, binding_device: str | None):
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's load errors derive from Exception only
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"{path}: ONNX Runtime cannot load this graph ({first}); "
                               "re-export the bundle or load it with verify=True to find a damaged file") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # fp16 graphs take float16 inputs: cast here so callers always pass float32
        self.input_dtypes = {i.name: FLOAT16 if i.type == "tensor(float16)" else np.float32
                             for i in self.session.get_inputs()}
        self.binding_device = binding_device
        self.device_inputs: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}

    def run(self, feeds: dict[str, np.ndarray], static: frozenset[str] = frozenset()) -> list[np.ndarray]:
        if self.binding_device is None:
            host = {k: np.ascontiguousarray(feeds[k], dtype=self.input_dtypes[k]) for k in self.input_names}
            outputs = self.session.run(self.output_names, host)
        else:
            binding = self.session.io_binding()
            for name in self.input_names:
                binding.bind_ortvalue_input(name, self._device_input(name, feeds[name], name in static))
            for name in self.output_names:
                binding.bind_output(name, self.binding_device)
            self.session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        return [o.astype(np.float32, copy=False) for o in outputs]

    def _device_input(self, name: str, array: np.ndarray, static: bool) -> ort.OrtValue:
        cached = self.device_inputs.get(name)
        if static and cached is not None and cached[0] is array:
            return cached[1]
        host = np.ascontiguousarray(array, dtype=self.input_dtypes[name])
        value = ort.OrtValue.ortvalue_from_numpy(host, self.binding_device)
        self.device_inputs[name] = (array, value)
        return value


def session_options(threads: int) -> ort.SessionOptions:
    """onnxruntime options: ``threads`` intra-op threads (0 = ORT's default, all cores), errors-only log."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class SplitCpuModel:
    """ort-cpu on ``threads`` cores by data parallelism: the batch is cut into ``threads``
    chunks run side by side, each by a single-threaded session (onnxruntime releases the GIL).

    Why: the small LDM's convolutions and attention are too small for intra-op threads to
    scale (its UNet on a CFG batch of 8: 19.7 ms on 1 thread, 12.3 ms on 2); two 1-thread runs
    on halves take 10.8 ms, and gave the same bits as the whole batch (max |diff| 0).
    A batch smaller than ``threads`` runs on an intra-op-threaded session made on first need.
    """

    def __init__(self, path: Path, threads: int):
        self.single = OrtModel(path, ORT_PROVIDERS["ort-cpu"], session_options(1), binding_device=None)
        self.input_names, self.output_names = self.single.input_names, self.single.output_names
        self.path, self.threads = path, threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ort-cpu")
        self._threaded: OrtModel | None = None

    def run(self, feeds: dict[str, np.ndarray], static: frozenset[str] = frozenset()) -> list[np.ndarray]:
        batch = len(feeds[self.input_names[0]])
        if batch < self.threads:
            return self._threaded_model().run(feeds)
        chunks = np.array_split(np.arange(batch), self.threads)
        parts = list(self.pool.map(
            lambda idx: self.single.run({k: feeds[k][idx[0]:idx[-1] + 1] for k in self.input_names}), chunks))
        return [np.concatenate([part[i] for part in parts]) for i in range(len(self.output_names))]

    def _threaded_model(self) -> OrtModel:
        if self._threaded is None:
            self._threaded = OrtModel(self.path, ORT_PROVIDERS["ort-cpu"], session_options(self.threads), None)
        return self._threaded


class OrtBackend:
    """onnxruntime with the providers of ``name`` (see ORT_PROVIDERS)."""

    def __init__(self, name: str, threads: int = 0):
        available = ort.get_available_providers()
        wanted = ORT_PROVIDERS[name][0]
        if wanted not in available:
            raise BackendError(f"backend {name!r} needs onnxruntime's {wanted}, which this install lacks "
                               f"(available: {available}); install onnxruntime-gpu on a CUDA machine or use 'ort-cpu'")
        self.name = name
        self.threads = threads

    def load(self, bundle, model: str, fp16: bool = False) -> Model:
        threads = self.threads or os.cpu_count() or 1
        if self.name == "ort-cpu" and threads > 1:
            return SplitCpuModel(bundle.model_path(model, fp16), threads)
        options = session_options(self.threads)
        providers = list(ORT_PROVIDERS[self.name])
        if self.name == "ort-trt":
            cache = ort_trt_cache(bundle)
            providers[0] = ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                          "trt_engine_cache_path": str(cache)})
        device = None if self.name == "ort-cpu" else "cuda"
        return OrtModel(bundle.model_path(model, fp16), providers, options, binding_device=device)


def ort_trt_cache(bundle) -> Path:
    """Engine cache of the ORT TensorRT provider: outside the bundle (which stays read-only), keyed by its manifest.

    ``$BRAINLDM_TRT_CACHE`` or ``~/.cache/brainldm/ort-trt``, then ``<bundle name>-<manifest sha256[:12]>``.
    """
    root = Path(os.environ.get(TRT_CACHE_ENV, Path.home() / ".cache" / "brainldm" / "ort-trt"))
    digest = hashlib.sha256((bundle.root / MANIFEST).read_bytes()).hexdigest()[:12]
    return root / f"{bundle.root.name}-{digest}"


def create_backend(name: str, threads: int = 0):
    """The backend called ``name`` (one of BACKENDS).

    ``threads``: CPU threads (0 = all cores); ort-cpu splits batches over them.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendError("backend 'tensorrt' needs the tensorrt Python package (gpu extra) and a CUDA GPU; "
                               "use 'ort-cuda' or 'ort-cpu' instead")
        return TensorRTBackend()
    return OrtBackend(name, threads)


# CUDA runtime API through ctypes, so the TensorRT backend needs no extra CUDA bindings.
CUDA_MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyKind values
CUDA_MEMCPY_DEVICE_TO_HOST = 2
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
DEVICE_PROP_BYTES = 16384  # more than sizeof(cudaDeviceProp) of any CUDA version; name is its first field
DEVICE_NAME_BYTES = 256


def _load_cudart() -> ctypes.CDLL:
    """libcudart from the system, or from the pip ``nvidia-cuda-runtime`` wheels TensorRT depends on."""
    candidates = [ctypes.util.find_library("cudart"), *CUDART_NAMES]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(str(p) for p in Path(root).glob("**/lib/libcudart.so*"))
    for name in filter(None, candidates):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendError("backend 'tensorrt' needs the CUDA runtime library (libcudart.so), which was not found; "
                       "install the gpu extra on a CUDA machine or use 'ort-cuda'")


class CudaRuntime:
    """Device buffers, copies and one stream via libcudart."""

    def __init__(self):
        self.lib = _load_cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                             ctypes.c_void_p]
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise BackendError(f"CUDA {what} failed: {self.lib.cudaGetErrorString(status).decode()}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), f"cudaMalloc({nbytes})")
        return int(ptr.value)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def device_name(self) -> str:
        props = ctypes.create_string_buffer(DEVICE_PROP_BYTES)
        get = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        self._check(get(props, 0), "cudaGetDeviceProperties")
        return props.raw[:DEVICE_NAME_BYTES].split(b"\0")[0].decode()


class TrtModel:
    """One TensorRT engine with device buffers pre-allocated for its profile's largest shapes."""

    def __init__(self, trt, engine, cuda: CudaRuntime):
        self.cuda = cuda
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        # the profile's max input shapes give every tensor's largest size (outputs via shape inference)
        largest = {n: tuple(engine.get_tensor_profile_shape(n, 0)[2]) for n in self.input_names}
        for n, shape in largest.items():
            self.context.set_input_shape(n, shape)
        largest.update({n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names})
        self.max_batch = int(largest[self.input_names[0]][0])
        self.buffers, self.last_inputs = {}, {}
        for n in names:
            self.buffers[n] = cuda.malloc(int(np.prod(largest[n])) * self.dtypes[n].itemsize)
            self.context.set_tensor_address(n, self.buffers[n])

    def run(self, feeds: dict[str, np.ndarray], static: frozenset[str] = frozenset()) -> list[np.ndarray]:
        hosts = []  # keep the host arrays alive until the stream is synchronised
        for n in self.input_names:
            if n in static and self.last_inputs.get(n) is feeds[n]:
                continue  # already on the device, shape unchanged
            self.last_inputs[n] = feeds[n]
            x = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
            if x.shape[0] > self.max_batch:
                raise BackendError(f"TensorRT engine input {n} has batch {x.shape[0]}; its profile allows at most "
                                   f"{self.max_batch} (lower --batch-size or rebuild with larger export.trt_batch_sizes)")
            self.context.set_input_shape(n, x.shape)
            self.cuda.copy(self.buffers[n], x.ctypes.data, x.nbytes, CUDA_MEMCPY_HOST_TO_DEVICE)
            hosts.append(x)
        if not self.context.execute_async_v3(self.cuda.stream.value or 0):
            raise BackendError("TensorRT execution failed")
        outputs = [np.empty(tuple(self.context.get_tensor_shape(n)), self.dtypes[n]) for n in self.output_names]
        for n, out in zip(self.output_names, outputs):
            self.cuda.copy(out.ctypes.data, self.buffers[n], out.nbytes, CUDA_MEMCPY_DEVICE_TO_HOST)
        self.cuda.synchronize()
        return [o.astype(np.float32, copy=False) for o in outputs]


class TensorRTBackend:
    """Native TensorRT engines of the bundle, checked against this machine's TensorRT version and GPU."""

    def __init__(self):
        import tensorrt as trt

        self.trt = trt
        self.cuda = CudaRuntime()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

    def load(self, bundle, model: str, fp16: bool = False) -> Model:
        entry = bundle.manifest.tensorrt
        if entry is None:
            raise BackendError(f"bundle {bundle.root} has no TensorRT engines (exported where tensorrt was missing); "
                               "re-export on this GPU machine or use 'ort-trt'")
        gpu = self.cuda.device_name()
        if entry.trt_version != self.trt.__version__ or entry.gpu != gpu:
            raise BackendError(f"bundle {bundle.root}: engines were built for TensorRT {entry.trt_version} on "
                               f"{entry.gpu}, this machine has TensorRT {self.trt.__version__} on {gpu}; "
                               "re-export here or use 'ort-trt'")
        engine = self.runtime.deserialize_cuda_engine((bundle.root / entry.engines[model]).read_bytes())
        if engine is None:
            raise BackendError(f"bundle {bundle.root}: TensorRT could not load the {model} engine")
        return TrtModel(self.trt, engine, self.cuda)
