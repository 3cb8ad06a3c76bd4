"""fusedaccum: fused gradient-accumulation ops (Triton on CUDA, pure PyTorch elsewhere)."""

from .accumulator import GradAccumulator, StepResult
from .buckets import Bucket, GradBuckets
from .parallel import broadcast_parameters
from .ops import accumulate_, clip_grad_norm_, unscale_clip_
from .scaler import LossScaler
from .signals import AdaptiveSteps, NoiseScale, NoiseScaleSettings, StepsChange

__all__ = ["Bucket", "GradAccumulator", "GradBuckets", "LossScaler", "StepResult", "accumulate_",
           "broadcast_parameters", "clip_grad_norm_", "unscale_clip_"]
__all__ += ["AdaptiveSteps", "NoiseScale", "NoiseScaleSettings", "StepsChange"]  # signals
__version__ = "0.1.0"
