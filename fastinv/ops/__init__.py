"""fastinv's fused ops. Each op is one file here (schema, reference, fake, autograd, public
function) with its kernels under the same name in csrc/cpu and csrc/cuda.

``FASTINV_BACKEND=reference`` (read at import) keeps the compiled kernels out: every op then
runs its pure-PyTorch reference.
"""

from fastinv.ops import hinge_loss as _hinge_loss  # noqa: F401  (defines the schemas)
from fastinv.ops._library import backend_info, extension_status, load_extension
from fastinv.ops.conditional_batch_norm import (  # defines the conditional batch norm schemas
    conditional_batch_norm,
    conditional_batch_norm_reference,
)
from fastinv.ops.hinge_loss import (
    hinge_loss_d,
    hinge_loss_d_reference,
    hinge_loss_g,
    hinge_loss_g_reference,
)
from fastinv.ops.spectral_norm import (  # defines the spectral norm schemas
    spectral_norm_,
    spectral_norm_reference,
    spectral_norm_with_sigma,
)

# Kernels attach to schemas that exist, so load after every op module above.
load_extension()

__all__ = [
    "backend_info",
    "conditional_batch_norm",
    "conditional_batch_norm_reference",
    "extension_status",
    "hinge_loss_d",
    "hinge_loss_d_reference",
    "hinge_loss_g",
    "hinge_loss_g_reference",
    "spectral_norm_",
    "spectral_norm_reference",
    "spectral_norm_with_sigma",
]
