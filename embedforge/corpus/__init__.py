"""`embedforge embed-corpus`: a corpus of texts -> Parquet shards of vectors (torch-free; Ray optional)."""

MAX_BATCH_TOKENS = 4096
"""Default padded tokens per batch: 8 x 512 tokens ran 16-18% faster per text than 16 or 32 x 512 (short texts
likewise) on 1 and 2 threads, in a third of the working memory (benchmarks/batch_memory.py)."""

INPUT_TYPES = ("query", "document")
"""What the texts of a corpus are (--input-type): each takes the export's prompt of that name (manifest.json
`prompts`)."""
