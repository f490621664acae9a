"""fastinv.nn."""
from fastinv.nn.conditional_batch_norm import ConditionalBatchNorm2d, convert_sync_cbn  # noqa: F401  (issue 3)
