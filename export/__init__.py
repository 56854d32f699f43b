"""brainldm.export: ONNX / TensorRT export of decoders, UNet and VAE into a runtime bundle."""
