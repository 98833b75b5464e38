"""Bridges from stapo's objectives into other training frameworks.

- ``stapo.integrations.trl``: ``STAPOConfig`` / ``STAPOTrainer``, the S2T mask inside TRL's
  ``GRPOTrainer`` (install with ``pip install 'stapo[trl]'``).

Nothing is imported here, so ``import stapo.integrations`` never needs the optional frameworks.
"""
