"""brainldm.train: data loading, the simulated subject, targets, decoders, fitting,
reference reconstruction and evaluation (imports torch)."""
