"""Training side: loss, loop and checkpoints. Import submodules directly (torch loads lazily)."""
