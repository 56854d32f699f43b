"""The simulated subject: procedural scenes and captions, the voxel-wise encoding model,
the experimental designs, and writers of NSD's and THINGS-fMRI's own file formats (stage ``simulate``)."""
