"""Each params.yaml stage section and the config dataclass its stage loads it into."""
from __future__ import annotations

from brainldm.export.export import ExportConfig
from brainldm.export.parity import ParityConfig
from brainldm.train.attribute_classifier import AttributeClassifierConfig
from brainldm.train.decode import DecodeConfig
from brainldm.train.evaluate import EvaluateConfig
from brainldm.train.fit import FitConfig
from brainldm.train.prepare import PrepareConfig
from brainldm.train.reconstruct import ReconstructConfig
from brainldm.train.report import ReportConfig
from brainldm.train.simulate import SimulateConfig
from brainldm.train.targets import TargetsConfig
from brainldm.train.train_ldm import TrainLdmConfig

STAGE_CONFIGS = {
    "simulate": SimulateConfig, "prepare": PrepareConfig, "train_ldm": TrainLdmConfig, "targets": TargetsConfig,
    "attribute_classifier": AttributeClassifierConfig, "fit": FitConfig, "decode": DecodeConfig,
    "reconstruct": ReconstructConfig, "evaluate": EvaluateConfig, "export": ExportConfig, "parity": ParityConfig,
    "report": ReportConfig,
}
