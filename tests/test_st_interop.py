"""sentence-transformers interop: a saved embedforge model loads in `SentenceTransformer` with the same vectors, and
a sentence-transformers directory is a base model whose modules embedforge takes over (or refuses by name)."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from embedforge import st_layout
from embedforge.model import BertVectorModel, ModelError
from embedforge.testing import build_tiny_model

sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = ["how to boil an egg", "boil the eggs in hot water for seven minutes", "coffee", "bread and butter " * 40]
PROMPTS = {"query": "query: ", "document": "passage: "}
MIN_COSINE = 0.99999


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def no_warnings():
    """Fail on any Python warning or WARNING log record (transformers' own logger at its default verbosity)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # embedforge.model lowers it to error; a plain user has warning
    handler = _Collect()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("sentence_transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    assert not caught, [str(warning.message) for warning in caught]
    assert not handler.messages, handler.messages


def load_st(path: Path):
    with no_warnings():
        return sentence_transformers.SentenceTransformer(str(path), device="cpu")


@pytest.mark.parametrize("prompts", [None, PROMPTS], ids=["no-prompts", "prompts"])
@pytest.mark.parametrize("projection_dim", [None, 8], ids=["no-projection", "projection"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_transformers_loads_the_saved_model_with_equal_vectors(tmp_path, pooling, projection_dim, prompts):
    model = build_tiny_model(tmp_path / "m", pooling=pooling, projection_dim=projection_dim, max_length=64)
    model.prompts = dict(prompts or {})
    model.save_pretrained(tmp_path / "m")
    st_model = load_st(tmp_path / "m")
    loaded = BertVectorModel.from_pretrained(tmp_path / "m")

    assert st_model.max_seq_length == 64 and st_model.similarity_fn_name == "cosine"
    dimension = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    assert dimension() == model.dim
    assert {name: text for name, text in st_model.prompts.items() if text} == (prompts or {})
    figures = {}
    for prompt_name in (None, "query", "document"):
        ours = loaded.encode(TEXTS, prompt_name=prompt_name)
        theirs = st_model.encode(TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
        figures[prompt_name] = (min_cosine(ours, theirs), float(np.abs(ours - theirs).max()))
        np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)  # the Normalize module
    print(f"{pooling} projection={projection_dim} prompts={bool(prompts)}: (min cosine, max abs diff) {figures}")
    assert min(cosine for cosine, _ in figures.values()) >= MIN_COSINE, figures
    # A random encoder gives similar vectors to every text: the components must agree too, not the angle alone.
    assert max(diff for _, diff in figures.values()) <= 1e-5, figures
    if prompts:  # the prompt is a prefix of the text: it changes the vector and counts towards max_length
        prompted = loaded.encode(TEXTS, prompt_name="query")
        np.testing.assert_allclose(prompted, loaded.encode(["query: " + text for text in TEXTS]), atol=1e-6)
        assert np.abs(prompted - loaded.encode(TEXTS)).max() > 1e-3
        assert len(loaded.tokenize(loaded.with_prompt(TEXTS[3:], "query"))[0]) == 64


def test_the_layout_files_are_listed_and_sized_in_a_checkpoint(tmp_path):
    from embedforge.checkpoints import FILE_LIST, read_checkpoint, save_checkpoint

    model = build_tiny_model(tmp_path / "base", projection_dim=8)
    info = save_checkpoint(tmp_path / "run", 1, model, {"step": 1, "val_loss": 0.5}, {})
    listed = json.loads((info.path / FILE_LIST).read_text())
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
                 "3_Normalize/config.json"):
        assert listed[name] == (info.path / name).stat().st_size, name
    (info.path / "2_Dense" / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(ValueError, match="2_Dense/model.safetensors"):
        read_checkpoint(info.path)


def st_modules():
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # sentence-transformers 5
        from sentence_transformers import models as modules
    return modules


def save_st_model(tmp_path: Path, pooling: str = "cls", dense: int | None = 8, normalize: bool = True,
                  prompts: dict | None = None, max_seq_length: int = 48) -> Path:
    """A sentence-transformers model saved by sentence-transformers itself, around a tiny random encoder."""
    import torch

    modules = st_modules()
    build_tiny_model(tmp_path / "encoder", pooling="mean", max_length=64)
    transformer = modules.Transformer(str(tmp_path / "encoder"), max_seq_length=max_seq_length)
    hidden = transformer.auto_model.config.hidden_size
    parts = [transformer, modules.Pooling(hidden, pooling)]
    if dense:
        torch.manual_seed(3)
        parts.append(modules.Dense(hidden, dense, activation_function=torch.nn.Identity()))
    if normalize:
        parts.append(modules.Normalize())
    model = sentence_transformers.SentenceTransformer(modules=parts, prompts=prompts, device="cpu")
    model.save(str(tmp_path / "st"))
    return tmp_path / "st"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_sentence_transformers_base_model_gives_its_modules_to_embedforge(tmp_path, pooling):
    path = save_st_model(tmp_path, pooling=pooling, prompts=PROMPTS)
    st_model = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    model = BertVectorModel.from_base(str(path))
    assert (model.pooling, model.dim, model.max_length, model.prompts) == (pooling, 8, 48, PROMPTS)
    for prompt_name in (None, "query", "document"):
        assert min_cosine(model.encode(TEXTS, prompt_name=prompt_name),
                          st_model.encode(TEXTS, prompt_name=prompt_name)) >= MIN_COSINE
    # Caller's settings win: another max length, no query prompt; a projection of another size is refused.
    model = BertVectorModel.from_base(str(path), max_length=32, prompts={"query": "", "document": None})
    assert (model.max_length, model.prompts) == (32, {"document": "passage: "})
    with pytest.raises(ModelError, match="already projects to 8 dimensions"):
        BertVectorModel.from_base(str(path), projection_dim=16)


def test_an_embedforge_model_is_a_base_model_with_its_projection_and_prompts(tmp_path):
    trained = build_tiny_model(tmp_path / "trained", pooling="cls", projection_dim=8, max_length=40)
    trained.prompts = dict(PROMPTS)
    trained.save_pretrained(tmp_path / "trained")
    again = BertVectorModel.from_base(str(tmp_path / "trained"))
    assert (again.pooling, again.dim, again.max_length, again.prompts) == ("cls", 8, 40, PROMPTS)
    assert min_cosine(again.encode(TEXTS, prompt_name="query"), trained.encode(TEXTS, prompt_name="query")) >= 0.99999


def _edit(path: Path, name: str, change) -> None:
    data = json.loads((path / name).read_text())
    data = change(data) or data
    (path / name).write_text(json.dumps(data))


@pytest.mark.parametrize(("name", "change", "message"), [
    ("modules.json", lambda m: m.insert(2, {"idx": 9, "name": "9", "path": "9_LayerNorm",
                                            "type": "sentence_transformers.models.LayerNorm"}),
     "module type 'sentence_transformers.models.LayerNorm' is not supported"),
    ("modules.json", lambda m: m.__setitem__(0, {**m[0], "type": "my_package.CustomTransformer"}),
     "module type 'my_package.CustomTransformer' is not supported"),
    ("1_Pooling/config.json", lambda c: {"word_embedding_dimension": 32, "pooling_mode_max_tokens": True},
     "pooling max_tokens is not supported"),
    ("1_Pooling/config.json", lambda c: {**c, "include_prompt": False}, "include_prompt false"),
    ("2_Dense/config.json", lambda c: {**c, "activation_function": "torch.nn.modules.activation.Tanh"},
     "activation_function 'torch.nn.modules.activation.Tanh' is not supported"),
    ("config_sentence_transformers.json", lambda c: {**c, "default_prompt_name": "query"},
     "default_prompt_name 'query' is not supported"),
    ("config_sentence_transformers.json", lambda c: {**c, "similarity_fn_name": "euclidean"},
     "similarity_fn_name 'euclidean' is not supported"),
])
def test_what_embedforge_cannot_represent_is_refused_by_name(tmp_path, name, change, message):
    model = build_tiny_model(tmp_path / "m", pooling="cls", projection_dim=8)
    model.prompts = dict(PROMPTS)
    model.save_pretrained(tmp_path / "m")
    _edit(tmp_path / "m", name, change)
    with pytest.raises(ModelError, match=message) as raised:
        BertVectorModel.from_base(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(raised.value)


def test_the_layout_names_its_modules_in_order():
    files = st_layout.layout_files(32, "mean", None, 128, {"query": "q: "}, {})
    assert [m["path"] for m in files["modules.json"]] == ["", "1_Pooling", "2_Normalize"]
    assert files["config_sentence_transformers.json"]["prompts"] == {"query": "q: ", "document": ""}
    assert files["1_Pooling/config.json"]["pooling_mode_mean_tokens"] is True
