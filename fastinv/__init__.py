"""fastinv: what do an image classifier's logits still know about the image?

Trains a feedforward inverter (a logit-conditioned BigGAN generator against a projection
discriminator, Teterwak et al., ICML 2021) and runs the analyses, on fused C++/CUDA kernels.
"""

__version__ = "0.1.0"

from fastinv import ops  # noqa: E402,F401  (registers the op library)
