"""fusedaccum: fused gradient-accumulation ops (Triton on CUDA, pure PyTorch elsewhere)."""

from .buckets import Bucket, GradBuckets
from .ops import accumulate_, clip_grad_norm_, unscale_clip_

__all__ = ["Bucket", "GradBuckets", "accumulate_", "clip_grad_norm_", "unscale_clip_"]
__version__ = "0.1.0"
