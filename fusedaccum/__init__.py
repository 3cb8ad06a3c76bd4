"""fusedaccum: fused gradient-accumulation ops (Triton on CUDA, pure PyTorch elsewhere)."""

from .accumulator import GradAccumulator
from .buckets import Bucket, GradBuckets
from .ops import accumulate_, clip_grad_norm_, unscale_clip_
from .parallel import broadcast_parameters
from .scaler import LossScaler
from .signals import AdaptiveSteps, NoiseScale, NoiseScaleSettings, StepsChange
from .step_result import StepResult

__all__ = ["AdaptiveSteps", "Bucket", "GradAccumulator", "GradBuckets", "LossScaler", "NoiseScale",
           "NoiseScaleSettings", "StepResult", "StepsChange", "accumulate_", "broadcast_parameters",
           "clip_grad_norm_", "unscale_clip_"]
__version__ = "0.1.0"
