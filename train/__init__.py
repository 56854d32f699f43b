"""brainldm.train: everything upstream of the bundle (imports torch), one subpackage per step
of the data flow:

    simulation/      the simulated subject in NSD's and THINGS-fMRI's formats    (simulate)
    data/            native files -> one normalised HDF5 per dataset             (prepare)
    ldm/             the image model: small LDM or SD v1.x; its training         (train_ldm)
    decoding/        fMRI -> z, c: targets, decoders, fitting, test predictions  (targets, fit, decode)
    reconstruction/  z, c -> images with diffusers' img2img, the reference       (reconstruct)
    evaluation/      metrics, floors, attribute classifier, scores, REPORT.md    (attribute_classifier,
                                                                                  evaluate, report)

Shared by several stages: ``config`` (one frozen dataclass per params.yaml section),
``compute_options`` (device and dtype) and ``distributed`` (torchrun or one process).
"""
