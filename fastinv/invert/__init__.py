"""fastinv.invert: what a classifier's logits still know, measured with a trained inverter.

- ``analyses``: reconstruct, resample, misclassified, logit shift / scale / perturb
- ``metrics``: classifier agreement, logit consistency, PSNR / SSIM, noise std, LPIPS / FID
  (local weights only)
- ``factors``: factor regressor and R² per nuisance factor (synthetic data)
- ``baselines``: optimization-based inversion; ``deepsim_train``: the DeePSiM decoder baseline
- ``evaluate``: all analyses for one classifier, methods compared on the same images
- ``report``: report.md / report.html with verdicts computed from the numbers
- ``cli`` / ``report_cli``: ``fastinv invert`` and ``fastinv report``
"""
