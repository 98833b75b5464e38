"""Bridges from stapo's objectives into other training frameworks.

- ``stapo.integrations.trl``: ``STAPOConfig`` / ``STAPOTrainer``, the S2T mask inside TRL's
  ``GRPOTrainer`` (install with ``pip install 'stapo[trl]'``).
- ``stapo.integrations.verl``: ``loss_mode=stapo`` / ``entropy20`` as verl policy losses, with the
  entropy pass-through and mini-batch-wide τ_h (``pip install 'stapo[verl]'``; docs/verl.md).

Nothing is imported here, so ``import stapo.integrations`` never needs the optional frameworks.
"""
