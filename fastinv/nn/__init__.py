"""fastinv.nn."""
from fastinv.nn.attention import SelfAttention  # noqa: F401  (issue 6)
from fastinv.nn.conditional_batch_norm import ConditionalBatchNorm2d, convert_sync_cbn  # noqa: F401  (issue 3)
from fastinv.nn.spectral_norm import (  # noqa: F401  (issue 4)
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNormGroup,
    is_spectral_norm,
    spectral_norm,
)
from fastinv.nn.spectral_norm_state import state_dict_as_biggan, state_dict_as_torch  # noqa: F401  (issue 4)
