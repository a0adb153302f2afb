"""Export a checkpoint to an optimized, verified ONNX directory (the stages are in :mod:`.pipeline`)."""

from embedforge.export.pipeline import (
    MANIFEST_FILE,
    MIN_COSINE,
    MODEL_FILES,
    PRECISIONS,
    TOKENIZER_FILES,
    UNPADDED_FILES,
    ExportError,
    cuda_available,
    default_output_dir,
    default_parity_path,
    default_precisions,
    export_checkpoint,
)

__all__ = ["MANIFEST_FILE", "MIN_COSINE", "MODEL_FILES", "PRECISIONS", "TOKENIZER_FILES", "UNPADDED_FILES",
           "ExportError", "cuda_available", "default_output_dir", "default_parity_path", "default_precisions",
           "export_checkpoint"]
