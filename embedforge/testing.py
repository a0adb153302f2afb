"""Test support: a tiny random BERT-family model with a real tokenizer, built in milliseconds, no download."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModel

from embedforge.model import BertVectorModel, ModelError


def build_tiny_model(path: str | Path, pooling: str = "mean", projection_dim: int | None = None,
                     model_type: str = "bert", max_length: int = 512, seed: int = 0) -> BertVectorModel:
    """A small random encoder (bert, roberta or deberta-v2) with a real WordPiece tokenizer, saved to `path`.

    No download: the vocabulary is built from a fixed word list. The tokenizer is a BertTokenizerFast with
    its vocab.txt, so transformers' slow `BertTokenizer` loads the saved directory too.
    """
    from transformers import BertConfig, BertTokenizerFast, DebertaV2Config, RobertaConfig

    torch.manual_seed(seed)
    words = ("the a an is are of to and in on for with how what why do does egg eggs boil boiling water "
             "pasta salt minutes bread bake oven coffee tea cup hot cold cook cooking rice pan fry "
             "soup recipe kitchen knife cut onion garlic sauce sugar flour butter milk cheese").split()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = dict.fromkeys(specials + words + list("abcdefghijklmnopqrstuvwxyz"))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("".join(f"{token}\n" for token in tokens))
    # transformers 5 renamed vocab_file to vocab, and takes the old name silently (every token becomes [UNK]).
    vocab_argument = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizerFast(**{vocab_argument: str(vocab_file)}, do_lower_case=True, model_max_length=max_length)
    size = {"vocab_size": len(tokens), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "pad_token_id": 0}
    if model_type == "bert":
        config = BertConfig(max_position_embeddings=max_length, **size)
    elif model_type == "roberta":
        config = RobertaConfig(max_position_embeddings=max_length + 2, **size)
    elif model_type == "deberta-v2":  # the DeBERTa-v3 layout: relative positions only, no token types
        config = DebertaV2Config(max_position_embeddings=max_length, relative_attention=True,
                                 pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                                 position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True, **size)
    else:
        raise ModelError(f"unknown tiny model type {model_type!r}")
    encoder = AutoModel.from_config(config)
    model = BertVectorModel(encoder, pooling, projection_dim, max_length, base_model=f"tiny-random-{model_type}",
                            tokenizer=tokenizer)
    model.save_pretrained(path)
    return model
