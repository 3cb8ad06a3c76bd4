"""Framework integrations, each in its own module that imports its framework on import:

- ``fusedaccum.integrations.lightning``: ``FusedAccumPrecision``, a precision plugin for
  ``lightning.pytorch.Trainer(plugins=[...])`` (``fusedaccum.integrations.pytorch_lightning``:
  the same class for the standalone ``pytorch_lightning`` package).
- ``fusedaccum.integrations.accelerate``: ``FusedAccumulation``, a few lines in a Hugging Face
  Accelerate loop.
- ``fusedaccum.integrations.transformers``: ``FusedAccumTrainer``, a mixin over ``transformers.Trainer``.

Nothing is imported here, so ``import fusedaccum`` (and this package) never pulls in
Lightning or Accelerate. See docs/integrations.md.
"""
