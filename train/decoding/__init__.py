"""Brain decoding, fMRI voxels -> the image model's z (VAE latents) and c (text states):
the targets (stage ``targets``), the ridge / CNN / VAE / GCN decoders, their training
(stage ``fit``) and their test-split predictions (stage ``decode``)."""
