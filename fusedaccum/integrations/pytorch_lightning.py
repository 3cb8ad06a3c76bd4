"""``FusedAccumPrecision`` for the standalone ``pytorch_lightning`` package (2.x): the same code
as ``fusedaccum.integrations.lightning``, built over ``pytorch_lightning``'s classes."""

import pytorch_lightning as _pl

from ._lightning_plugin import make_precision_class

FusedAccumPrecision = make_precision_class(_pl, __name__)

__all__ = ["FusedAccumPrecision"]
