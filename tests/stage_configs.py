"""Each params.yaml stage section and the config dataclass its stage loads it into."""
from __future__ import annotations

from brainldm.export.export import ExportConfig
from brainldm.export.parity import ParityConfig
from brainldm.train.evaluation.attribute_classifier import AttributeClassifierConfig
from brainldm.train.decoding.decode import DecodeConfig
from brainldm.train.evaluation.evaluate import EvaluateConfig
from brainldm.train.evaluation.known_truth import KnownTruthConfig
from brainldm.train.decoding.fit import FitConfig
from brainldm.train.data.prepare import PrepareConfig
from brainldm.train.reconstruction.reconstruct import ReconstructConfig
from brainldm.train.evaluation.report import ReportConfig
from brainldm.train.simulation.simulate import SimulateConfig
from brainldm.train.decoding.targets import TargetsConfig
from brainldm.train.ldm.train_ldm import TrainLdmConfig

STAGE_CONFIGS = {
    "simulate": SimulateConfig, "prepare": PrepareConfig, "train_ldm": TrainLdmConfig, "targets": TargetsConfig,
    "attribute_classifier": AttributeClassifierConfig, "fit": FitConfig, "decode": DecodeConfig,
    "reconstruct": ReconstructConfig, "evaluate": EvaluateConfig, "export": ExportConfig, "parity": ParityConfig,
    "known_truth": KnownTruthConfig, "report": ReportConfig,
}
