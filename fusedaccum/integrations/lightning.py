"""``FusedAccumPrecision`` for ``lightning.pytorch`` (Lightning 2.x); see ``_lightning_plugin``.

    trainer = lightning.pytorch.Trainer(accumulate_grad_batches=8, gradient_clip_val=1.0,
                                        plugins=[FusedAccumPrecision("bf16-mixed")])
"""

import lightning.pytorch as _pl

from ._lightning_plugin import make_precision_class

FusedAccumPrecision = make_precision_class(_pl, __name__)

__all__ = ["FusedAccumPrecision"]
