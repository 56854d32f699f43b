"""brainldm.runtime: the lean reconstruction runtime (numpy, onnxruntime, Pillow; no torch)."""
