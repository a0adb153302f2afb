"""`embedforge embed-corpus`: a corpus of texts -> Parquet shards of vectors (torch-free; Ray optional)."""

from embedforge.server.config import MAX_BATCH_TOKENS_CPU
from embedforge.st_layout import PROMPT_NAMES

MAX_BATCH_TOKENS = MAX_BATCH_TOKENS_CPU
"""Default padded tokens per batch: the serving default on CPU, for the same reason (server/config.py)."""
MAX_BATCH_SIZE = 128
"""Default texts per batch (short texts: 128 x 32 tokens fill the token budget)."""

INPUT_TYPES = PROMPT_NAMES
"""What the texts of a corpus are (--input-type): each takes the export's prompt of that name (manifest.json
`prompts`)."""
