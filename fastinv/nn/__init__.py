"""fastinv.nn: the GAN layers built on fastinv's fused ops.

- ``ConditionalBatchNorm2d`` / ``convert_sync_cbn``: BigGAN's conditional BN (gain = 1 + Linear,
  bias = Linear of the condition) on the fused op, optionally synchronised across ranks;
  ``SyncBatchNorm2d`` / ``convert_sync_batchnorm``: a plain BatchNorm2d on the same op, and one
  call that makes every batch norm of a model cross-replica (gloo on CPU, NCCL on GPU).
- ``SNConv2d`` / ``SNLinear`` / ``SNEmbedding`` / ``spectral_norm``: spectral-normed layers;
  ``SpectralNormGroup`` refreshes every one of a model in one op call per forward.
- ``state_dict_as_torch`` / ``state_dict_as_biggan``: checkpoints in torch's parametrization
  or BigGAN-PyTorch's layout.
- ``SelfAttention``: BigGAN's self-attention block with SN convolutions.
"""

from fastinv.nn.attention import SelfAttention
from fastinv.nn.conditional_batch_norm import (
    ConditionalBatchNorm2d,
    SyncBatchNorm2d,
    convert_sync_batchnorm,
    convert_sync_cbn,
)
from fastinv.nn.spectral_norm import (
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNormGroup,
    is_spectral_norm,
    spectral_norm,
)
from fastinv.nn.spectral_norm_state import state_dict_as_biggan, state_dict_as_torch

__all__ = [
    "ConditionalBatchNorm2d",
    "SNConv2d",
    "SNEmbedding",
    "SNLinear",
    "SelfAttention",
    "SpectralNormGroup",
    "convert_sync_cbn",
    "convert_sync_batchnorm",
    "SyncBatchNorm2d",
    "is_spectral_norm",
    "spectral_norm",
    "state_dict_as_biggan",
    "state_dict_as_torch",
]
