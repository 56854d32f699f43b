import numpy as np
import pytest

from brainldm.runtime import generation
from brainldm.runtime import reconstructor as rr
from brainldm.runtime.backends import BackendError
from brainldm.train.reconstruction import reconstruct as reference
from tests.export.tiny_bundle import TEST_IMAGES, build_tiny_bundle, raw_test


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return rr.Reconstructor(build_tiny_bundle(tmp_path_factory.mktemp("rec")), threads=1)


@pytest.fixture(scope="module")
def raw():
    return raw_test()


def test_noise_is_the_references():
    # one definition: the reference stage draws with the runtime's function and stream ids
    assert reference.numpy_noise is generation.numpy_noise and rr.numpy_noise is generation.numpy_noise
    assert (reference.NOISE_STREAM_POSTERIOR, reference.NOISE_STREAM_DIFFUSION) == (0, 1)
    a = generation.numpy_noise(42, 3, 1, generation.NOISE_STREAM_POSTERIOR, (4, 4, 4))
    assert a.dtype == np.float32 and a.shape == (4, 4, 4)
    np.testing.assert_array_equal(a, generation.numpy_noise(42, 3, 1, generation.NOISE_STREAM_POSTERIOR, (4, 4, 4)))
    for other in [(42, 3, 1, generation.NOISE_STREAM_DIFFUSION), (42, 3, 0, 0), (42, 2, 1, 0), (41, 3, 1, 0)]:
        assert not np.array_equal(a, generation.numpy_noise(*other, (4, 4, 4))), other


def test_to_uint8_rounds_half_to_even_and_clips():
    x = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.2, 254.5 / 255, 1.0, 1.5], np.float32)
    assert generation.to_uint8(x).tolist() == [0, 0, 0, 2, 51, 254, 255, 255]
    assert rr.to_uint8 is generation.to_uint8 and reference.to_uint8 is generation.to_uint8


def test_shapes_ranges_and_determinism(rec, raw):
    images = rec.reconstruct(raw["betas"], raw["session"], raw["image_index"], samples=2, seed=1, batch_size=3)
    floats = rec.reconstruct_float(raw["betas"], raw["session"], raw["image_index"], samples=2, seed=1, batch_size=3)
    assert images.shape == (len(TEST_IMAGES), 2, 16, 16, 3) and images.dtype == np.uint8
    assert floats.dtype == np.float32 and 0 <= floats.min() and floats.max() <= 1
    np.testing.assert_array_equal(images, rr.to_uint8(floats))
    assert not np.array_equal(images[:, 0], images[:, 1])  # samples differ
    other_seed = rec.reconstruct(raw["betas"], raw["session"], raw["image_index"], samples=2, seed=2, batch_size=3)
    assert not np.array_equal(images, other_seed)


def test_batch_composition_and_trial_order_do_not_matter(rec, raw):
    base = rec.reconstruct_float(raw["betas"], raw["session"], raw["image_index"], samples=2, batch_size=8)
    one = rec.reconstruct_float(raw["betas"], raw["session"], raw["image_index"], samples=2, batch_size=1)
    perm = np.random.default_rng(0).permutation(len(raw["betas"]))
    shuffled = rec.reconstruct_float(raw["betas"][perm], raw["session"][perm], raw["image_index"][perm], samples=2,
                                     batch_size=5)
    assert np.abs(one - base).max() <= 1e-5 and np.abs(shuffled - base).max() <= 1e-5


def test_given_noise_replaces_the_seeded_draws(rec, raw):
    predicted = rec.predict_targets(raw["betas"], raw["session"], raw["image_index"])
    items, samples = np.array([0, 3]), np.array([1, 0])
    seeded = rec.generate(predicted.z[items], predicted.c[items], items, samples, seed=5)
    shape = (len(TEST_IMAGES), 2) + rec.latent_shape
    noise = {"posterior": np.zeros(shape, np.float32), "diffusion": np.zeros(shape, np.float32)}
    for stream, key in ((0, "posterior"), (1, "diffusion")):
        for i, s in zip(items, samples):
            noise[key][i, s] = rr.numpy_noise(5, int(i), int(s), stream, rec.latent_shape)
    np.testing.assert_array_equal(rec.generate(predicted.z[items], predicted.c[items], items, samples, 0, noise), seeded)
    noise["diffusion"][:] = 0
    assert not np.allclose(rec.generate(predicted.z[items], predicted.c[items], items, samples, 0, noise), seeded)


def test_given_init_latents_replace_the_reencoding(rec, raw):
    predicted = rec.predict_targets(raw["betas"], raw["session"], raw["image_index"])
    items, samples = np.array([0, 1]), np.array([0, 1])
    z, c = predicted.z[items], predicted.c[items]
    init = rec.reencode(z, items, samples, 7, None)
    np.testing.assert_array_equal(rec.generate(z, c, items, samples, 7, init=init), rec.generate(z, c, items, samples, 7))
    assert not np.allclose(rec.generate(z, c, items, samples, 7, init=init + 0.5), rec.generate(z, c, items, samples, 7))


def test_matches_reference_reconstruct_batch(rec, raw, tmp_path):
    """Same z, c, items and noise seeds as the reference stage: images agree to 1e-2 (fp32 CPU)."""
    predicted = rec.predict_targets(raw["betas"], raw["session"], raw["image_index"])
    pipe = reference.load_reference_pipeline(rec.bundle.image_model.source)
    cfg = reference.ReconstructConfig(steps=10, strength=0.8, guidance=5.0, seed=42, encode_mode="sample")
    items, samples = np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1])
    expected = reference.reconstruct_batch(pipe, predicted.z[items], predicted.c[items], rec.bundle.uncond, items,
                                           samples, cfg)
    got = rec.generate(predicted.z[items], predicted.c[items], items, samples, seed=42)
    assert np.abs(got - expected).max() <= 1e-4


def test_unknown_or_unavailable_backend(rec):
    with pytest.raises(BackendError, match="unknown backend 'gpu'.*ort-cpu"):
        rr.Reconstructor(rec.bundle.root, backend="gpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="needs onnxruntime's CUDAExecutionProvider"):
            rr.Reconstructor(rec.bundle.root, backend="ort-cuda")


@pytest.mark.gpu
def test_cuda_runtime_roundtrip_through_ctypes():
    """The TensorRT backend's ctypes CUDA helper: device name, buffers and copies (no torch involved)."""
    import torch

    from brainldm.runtime import backends

    cuda = backends.CudaRuntime()
    assert cuda.device_name() == torch.cuda.get_device_name(0)
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    ptr, y = cuda.malloc(x.nbytes), np.empty_like(x)
    cuda.copy(ptr, x.ctypes.data, x.nbytes, backends.CUDA_MEMCPY_HOST_TO_DEVICE)
    cuda.copy(y.ctypes.data, ptr, y.nbytes, backends.CUDA_MEMCPY_DEVICE_TO_HOST)
    cuda.synchronize()
    np.testing.assert_array_equal(x, y)


def test_io_binding_path_and_static_inputs(rec):
    """The GPU providers' IO-binding path, exercised on the CPU device: same outputs, static inputs reused."""
    import onnxruntime as ort

    from brainldm.runtime.backends import OrtModel

    path = rec.bundle.model_path("unet")
    plain = OrtModel(path, ["CPUExecutionProvider"], ort.SessionOptions(), binding_device=None)
    bound = OrtModel(path, ["CPUExecutionProvider"], ort.SessionOptions(), binding_device="cpu")
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 5, 16)).astype(np.float32)
    feeds = {"sample": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
             "timestep": np.array([501, 501], np.float32), "encoder_hidden_states": hidden}
    static = frozenset({"encoder_hidden_states"})
    expected = plain.run(feeds)[0]
    np.testing.assert_array_equal(bound.run(feeds, static)[0], expected)
    cached = bound.device_inputs["encoder_hidden_states"][1]
    np.testing.assert_array_equal(bound.run(feeds, static)[0], expected)
    assert bound.device_inputs["encoder_hidden_states"][1] is cached  # not copied again
    feeds["encoder_hidden_states"] = hidden.copy()  # a new array object is always sent
    bound.run(feeds, static)
    assert bound.device_inputs["encoder_hidden_states"][1] is not cached


def test_split_batch_cpu_model_matches_one_thread(rec, raw):
    from brainldm.runtime.backends import SplitCpuModel

    split = rr.Reconstructor(rec.bundle.root, threads=2)
    assert isinstance(split.models["unet"], SplitCpuModel) and split.models["unet"]._threaded is None
    args = (raw["betas"], raw["session"], raw["image_index"])
    one = rec.reconstruct_float(*args, samples=2, seed=3, batch_size=3)
    two = split.reconstruct_float(*args, samples=2, seed=3, batch_size=3)
    assert np.abs(two - one).max() <= 1e-6
    z = rec.predict_targets(*args).z[:1]  # a batch of 1 < 2 threads runs on the intra-op-threaded session
    np.testing.assert_allclose(split._run("vae_decoder", latents=z)[0], rec._run("vae_decoder", latents=z)[0],
                               atol=1e-6)
    assert split.models["vae_decoder"]._threaded is not None
