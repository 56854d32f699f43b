"""From native NSD / THINGS-fMRI files to one normalised HDF5 per dataset (stage ``prepare``):
the two loaders, the leak-free split and normalisation, the ROI graph, and the split readers
that later stages share."""
