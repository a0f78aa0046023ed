"""BatchTopK sparse autoencoders as first-class SAELens architectures.

Importing this package registers ``calibrated_batchtopk`` in SAELens's training and inference
registries and ``feature_choice`` and ``calibrated_matryoshka_batchtopk`` in its training
registry (they export to the calibrated BatchTopK inference form), so runner configs,
``SAE.load_from_disk`` and ``SAE.from_pretrained`` know them.
"""

from sae_lens_batchtopk.aux_losses import (
    AuxLossInputs,
    auxk_loss,
    auxk_sae_lens_loss,
    register_aux_loss,
    registered_aux_losses,
    zipf_loss,
)
from sae_lens_batchtopk.calibration import (
    CalibrationError,
    CalibrationResult,
    calibrate_thresholds,
)
from sae_lens_batchtopk.finite import NonFiniteError
from sae_lens_batchtopk.registry import register_architecture
from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    ARCHITECTURE as CALIBRATED_BATCHTOPK,
)
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    BatchTopKView,
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.saes.feature_choice_sae import (
    FEATURE_CHOICE,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
)
from sae_lens_batchtopk.saes.matryoshka_batchtopk_sae import (
    CALIBRATED_MATRYOSHKA,
    CalibratedMatryoshkaBatchTopKTrainingSAE,
    CalibratedMatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.selection import batch_topk, feature_choice, threshold_activation

__version__ = "0.1.0"

register_architecture(
    CALIBRATED_BATCHTOPK,
    inference=(CalibratedBatchTopKSAE, CalibratedBatchTopKSAEConfig),
    training=(CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig),
)
register_architecture(
    FEATURE_CHOICE, training=(FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig)
)
register_architecture(
    CALIBRATED_MATRYOSHKA,
    training=(
        CalibratedMatryoshkaBatchTopKTrainingSAE,
        CalibratedMatryoshkaBatchTopKTrainingSAEConfig,
    ),
)

__all__ = [
    "CALIBRATED_BATCHTOPK",
    "CALIBRATED_MATRYOSHKA",
    "FEATURE_CHOICE",
    "AuxLossInputs",
    "BatchTopKView",
    "CalibratedBatchTopKSAE",
    "CalibratedBatchTopKSAEConfig",
    "CalibratedBatchTopKTrainingSAE",
    "CalibratedBatchTopKTrainingSAEConfig",
    "CalibratedMatryoshkaBatchTopKTrainingSAE",
    "CalibratedMatryoshkaBatchTopKTrainingSAEConfig",
    "CalibrationError",
    "CalibrationResult",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
    "NonFiniteError",
    "auxk_loss",
    "auxk_sae_lens_loss",
    "batch_topk",
    "calibrate_thresholds",
    "feature_choice",
    "make_runner_config",
    "register_aux_loss",
    "registered_aux_losses",
    "threshold_activation",
    "zipf_loss",
]
