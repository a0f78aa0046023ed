"""BatchTopK sparse autoencoders as first-class SAELens architectures.

Importing this package registers ``calibrated_batchtopk`` in SAELens's training and inference
registries, so runner configs, ``SAE.load_from_disk`` and ``SAE.from_pretrained`` know it.
"""

from sae_lens_batchtopk.aux_losses import (
    AuxLossInputs,
    auxk_loss,
    register_aux_loss,
    registered_aux_losses,
)
from sae_lens_batchtopk.registry import register_architecture
from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    ARCHITECTURE as CALIBRATED_BATCHTOPK,
)
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.selection import batch_topk, threshold_activation

__version__ = "0.1.0"

register_architecture(
    CALIBRATED_BATCHTOPK,
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)

__all__ = [
    "CALIBRATED_BATCHTOPK",
    "AuxLossInputs",
    "CalibratedBatchTopKSAE",
    "CalibratedBatchTopKSAEConfig",
    "CalibratedBatchTopKTrainingSAE",
    "CalibratedBatchTopKTrainingSAEConfig",
    "auxk_loss",
    "batch_topk",
    "make_runner_config",
    "register_aux_loss",
    "registered_aux_losses",
    "threshold_activation",
]
