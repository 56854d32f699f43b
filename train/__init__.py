"""brainldm.train: everything upstream of the bundle (imports torch), one subpackage per step
of the data flow:

    simulation/      the simulated subject in NSD's and THINGS-fMRI's formats    (simulate)
    data/            native files -> one normalised HDF5 per dataset             (prepare)
    ldm/             the image model: small LDM or SD v1.x; its training         (train_ldm)
    decoding/        fMRI -> z, c: targets, decoders, fitting, test predictions  (targets, fit, decode)
    reconstruction/  z, c -> images with diffusers' img2img, the reference       (reconstruct)
    evaluation/      metrics, floors, attribute classifier, scores, REPORT.md    (attribute_classifier,
                                                                                  evaluate, report)

Every stage module (also ``export.export`` and ``export.parity``) has the same two entry
points: ``run(cfg[, rc], [dataset[, decoder | pair]])``, its config(s) first and then the
``foreach`` item in dvc.yaml's order, returning the path it wrote or its metrics; and
``main(argv)``, which parses ``--params`` and the item and goes through ``config.run_stage``
(one line and exit 1 on a user error).

Shared by several stages: ``config`` (one frozen dataclass per params.yaml section),
``compute_options`` (device and dtype) and ``distributed`` (torchrun or one process).
"""
