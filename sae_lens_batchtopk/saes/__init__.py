"""SAE architectures this plugin adds to SAELens, one module per architecture."""

from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.saes.feature_choice_sae import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
)

__all__ = [
    "CalibratedBatchTopKSAE",
    "CalibratedBatchTopKSAEConfig",
    "CalibratedBatchTopKTrainingSAE",
    "CalibratedBatchTopKTrainingSAEConfig",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
]
