"""Tokenizer loading shared by training, export and serving (tokenizers only, no torch).

Some model directories ship a `tokenizer.json` that pins padding and truncation (the bundled
all-MiniLM-L6-v2 pads and truncates every text to 128 tokens). That setting would pad short texts
to 128 and silently cut long ones, so it is always replaced here: no padding (callers pad each batch
to its longest text) and truncation at the model's `max_length`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path, max_length: int | None, direction: str = "right") -> Tokenizer:
    """Load `model_dir/tokenizer.json` with padding off and truncation at `max_length` tokens, cutting the
    `direction` end ("right": keep the start; "left": keep the end); max_length None: no truncation."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer file is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length=max_length, direction=direction)
    return tokenizer


PREFIX_CHARS_PER_TOKEN = 8
"""First guess of how many characters max_length tokens need (English: about 4-5 per WordPiece token)."""
PREFIX_SAFE_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
PREFIX_SAFE_NORMALIZERS = {"NoneType", "BertNormalizer", "Lowercase"}


def cuts_at_spaces(tokenizer: Tokenizer) -> bool:
    """Whether a text cut just before a space tokenizes into a prefix of the whole text's tokens.

    True for tokenizers that normalize each character on its own and split words at whitespace (BERT's
    WordPiece): the words before the cut are tokenized exactly as in the whole text.
    """
    return (type(tokenizer.pre_tokenizer).__name__ in PREFIX_SAFE_PRE_TOKENIZERS
            and type(tokenizer.normalizer).__name__ in PREFIX_SAFE_NORMALIZERS)


def encode_truncated(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list:
    """`tokenizer.encode_batch_fast(texts)` (truncating at max_length), without tokenizing what is cut off.

    A long text is first tokenized from a prefix cut just before a space: if that prefix already overflows
    max_length, its truncated tokens are those of the whole text (see cuts_at_spaces); else the prefix doubles,
    up to the whole text. So a 20,000-character text costs about as much as its first max_length tokens.
    An encoding's `overflowing` is non-empty iff the text was truncated.
    """
    encodings = [None] * len(texts)
    limit = max_length * PREFIX_CHARS_PER_TOKEN
    todo = list(range(len(texts)))
    while todo:
        pieces, whole = [], []
        for i in todo:
            cut = texts[i].rfind(" ", 0, limit) if len(texts[i]) > limit and cuts_at_spaces(tokenizer) else -1
            pieces.append(texts[i][:cut] if cut > 0 else texts[i])
            whole.append(cut <= 0)
        retry = []
        for i, is_whole, encoding in zip(todo, whole, tokenizer.encode_batch_fast(pieces), strict=True):
            if is_whole or encoding.overflowing:
                encodings[i] = encoding
            else:
                retry.append(i)
        todo, limit = retry, limit * 2
    return encodings
