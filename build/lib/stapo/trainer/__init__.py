"""The training loop (``loop.train``) and the phases it wires."""
