"""The PyTorch reference reconstruction: decoded z and c -> images with diffusers' img2img
(stage ``reconstruct``)."""
