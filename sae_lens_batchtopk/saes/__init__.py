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
from sae_lens_batchtopk.saes.matryoshka_batchtopk_sae import (
    CalibratedMatryoshkaBatchTopKTrainingSAE,
    CalibratedMatryoshkaBatchTopKTrainingSAEConfig,
)

__all__ = [
    "CalibratedBatchTopKSAE",
    "CalibratedBatchTopKSAEConfig",
    "CalibratedBatchTopKTrainingSAE",
    "CalibratedBatchTopKTrainingSAEConfig",
    "CalibratedMatryoshkaBatchTopKTrainingSAE",
    "CalibratedMatryoshkaBatchTopKTrainingSAEConfig",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
]
