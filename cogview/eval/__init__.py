"""Evaluation metrics: shapes-zh oracle, caption score, FID/IS, SR PSNR/SSIM."""
