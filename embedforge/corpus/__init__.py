"""`embedforge embed-corpus`: a corpus of texts -> Parquet shards of vectors (torch-free; Ray optional)."""
