"""embedforge: fine-tune, evaluate, export and serve text-embedding models."""
__version__ = "0.1.0"
