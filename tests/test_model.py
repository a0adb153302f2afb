"""BertVectorModel: pooling, projection, normalisation, save/load, encode, limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedforge.model import BertVectorModel, ModelError, detect_pooling, pad_batch, pool
from embedforge.testing import build_tiny_model
from embedforge.tokenization import load_tokenizer

TEXTS = ["how to boil an egg", "boil the eggs in hot water for seven minutes", "coffee", "bread and butter"]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize(("pooling", "projection_dim"), [("cls", None), ("mean", None), ("mean", 8)])
def test_save_load_round_trip_gives_the_same_normalised_vectors(tmp_path, model_type, pooling, projection_dim):
    model = build_tiny_model(tmp_path / "m", pooling=pooling, projection_dim=projection_dim, model_type=model_type)
    before = model.encode(TEXTS)
    loaded = BertVectorModel.from_pretrained(tmp_path / "m")
    after = loaded.encode(TEXTS)
    assert after.shape == (len(TEXTS), projection_dim or 32)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(before, after, atol=1e-6)
    settings = json.loads((tmp_path / "m" / "embedforge.json").read_text())
    assert settings["pooling"] == pooling and settings["projection_dim"] == projection_dim
    assert settings["dim"] == loaded.dim and settings["base_model"] == f"tiny-random-{model_type}"


@pytest.mark.parametrize("saved_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(tmp_path, saved_dtype):
    """transformers 5 keeps a checkpoint's saved dtype unless told; training and export need float32 weights."""
    model = build_tiny_model(tmp_path / "m")
    model.encoder.to(saved_dtype)
    model.save_pretrained(tmp_path / "half")
    expected = {name: tensor.float() for name, tensor in model.encoder.state_dict().items()}
    half = tmp_path / "half"
    for loaded in (BertVectorModel.from_pretrained(half), BertVectorModel.from_base(str(half))):
        state = loaded.encoder.state_dict()
        assert {tensor.dtype for tensor in state.values() if tensor.is_floating_point()} == {torch.float32}
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)


def test_encode_matches_unbatched_forward_whatever_the_batch(tmp_path):
    model = build_tiny_model(tmp_path / "m", pooling="mean")
    model.eval()
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([model.tokenize([text])[0]])
            expected.append(model(ids, torch.ones_like(ids))[0].numpy())
    for batch_size in (1, 3, 16):
        np.testing.assert_allclose(model.encode(TEXTS, batch_size=batch_size), np.stack(expected), atol=1e-5)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_tiny_tokenizer_knows_its_words_before_and_after_saving(tmp_path, model_type):
    """transformers 5 ignores BertTokenizerFast(vocab_file=...): every token would be [UNK] and tests see noise."""
    model = build_tiny_model(tmp_path / "m", model_type=model_type)
    unknown = model.tokenizer.unk_token_id
    for tokenizer in (model.tokenizer, BertVectorModel.from_pretrained(tmp_path / "m").tokenizer):
        ids = tokenizer(["how to boil an egg", "b"])["input_ids"]
        assert unknown not in ids[0] + ids[1] and len(set(ids[0])) == len(ids[0]) == 7  # [CLS] 5 words [SEP]
        assert ids[0][3] != ids[1][1]  # "boil" and "b" are different tokens


def test_pad_batch_pads_to_the_longest():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pooling_auto_reads_a_sentence_transformers_config(tmp_path):
    assert detect_pooling(tmp_path) == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert detect_pooling(tmp_path) == "mean"


def test_pooling_auto_keeps_an_embedforge_models_own_pooling(tmp_path):
    """Fine-tuning again from a trained model (a checkpoint or the save path's root) keeps its mean pooling."""
    build_tiny_model(tmp_path / "trained", pooling="mean")
    assert detect_pooling(tmp_path / "trained") == "mean"
    assert BertVectorModel.from_base(str(tmp_path / "trained")).pooling == "mean"


def test_from_base_with_auto_pooling_and_a_projection(tmp_path):
    build_tiny_model(tmp_path / "base", pooling="cls")
    model = BertVectorModel.from_base(str(tmp_path / "base"), pooling="auto", projection_dim=4, max_length=128)
    assert (model.pooling, model.dim, model.max_length) == ("cls", 4, 128)


def test_max_length_beyond_the_position_limit_is_a_clear_error(tmp_path):
    build_tiny_model(tmp_path / "base", max_length=64)
    with pytest.raises(ModelError, match=r"max_length 512 is outside 1..64"):
        BertVectorModel.from_base(str(tmp_path / "base"), max_length=512)


def test_texts_are_truncated_at_max_length_and_never_padded(tmp_path):
    model = build_tiny_model(tmp_path / "m", max_length=16)
    ids = model.tokenize(["egg " * 100, "egg"])
    assert [len(x) for x in ids] == [16, 3]
    serving = load_tokenizer(tmp_path / "m", 16)
    assert [len(e.ids) for e in serving.encode_batch(["egg " * 100, "egg"])] == [16, 3]


def test_pinned_padding_in_tokenizer_json_is_switched_off(tmp_path):
    model = build_tiny_model(tmp_path / "m", max_length=64)
    config = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    config["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                         "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    config["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(config))
    loaded = BertVectorModel.from_pretrained(tmp_path / "m")
    assert [len(x) for x in loaded.tokenize(["egg " * 30, "egg"])] == [32, 3]
    assert [len(e.ids) for e in load_tokenizer(tmp_path / "m", 64).encode_batch(["egg " * 30, "egg"])] == [32, 3]
    np.testing.assert_allclose(loaded.encode(["egg"]), model.encode(["egg"]), atol=1e-6)


def test_loading_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="embedforge.json is missing"):
        BertVectorModel.from_pretrained(tmp_path)


def pickled_model_dir(path, weights_file: str = "pytorch_model.bin") -> tuple:
    """The tiny model with its weights in a pickle (what safe_serialization=False writes), no safetensors."""
    model = build_tiny_model(path, pooling="mean")
    torch.save(model.encoder.state_dict(), path / weights_file)
    (path / "model.safetensors").unlink()
    return path, model


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.pt"])
def test_a_model_directory_with_only_pickle_weights_is_refused_with_how_to_convert(tmp_path, weights_file):
    """Pickle weights can run code when loaded: only safetensors load, and the error says how to convert."""
    model_dir, _ = pickled_model_dir(tmp_path / "pickled", weights_file)
    for load in (BertVectorModel.from_pretrained, BertVectorModel.from_base):
        with pytest.raises(ModelError) as info:
            load(str(model_dir))
        message = str(info.value)
        assert str(model_dir) in message and weights_file in message
        assert "trusted environment" in message and "safe_serialization=True" in message


def test_a_pickled_model_converted_as_the_error_says_loads_with_the_same_weights(tmp_path):
    from transformers import AutoModel

    model_dir, model = pickled_model_dir(tmp_path / "pickled")
    AutoModel.from_pretrained(model_dir).save_pretrained(model_dir, safe_serialization=True)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "pytorch_model.bin").is_file()
    np.testing.assert_allclose(BertVectorModel.from_pretrained(model_dir).encode(TEXTS), model.encode(TEXTS),
                               atol=1e-6)


def test_encoders_load_with_use_safetensors(tmp_path, monkeypatch):
    """Every encoder load asks transformers for safetensors only (a hub id has no directory to check)."""
    import embedforge.model as model_module

    build_tiny_model(tmp_path / "m")
    calls = []
    real = model_module.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_safetensors"))
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module.AutoModel, "from_pretrained", spy)
    BertVectorModel.from_pretrained(tmp_path / "m")
    BertVectorModel.from_base(str(tmp_path / "m"))
    assert calls == [True, True]


def test_a_sentence_transformers_pooling_path_outside_the_model_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = [{"idx": 1, "name": "1", "path": "../1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "model" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match=r"modules.json: field 'path' must be a plain file name.*'\.\./1_Pooling'"):
        detect_pooling(tmp_path / "model")


def test_the_bundled_default_model_loads_offline_with_mean_pooling():
    model = BertVectorModel.from_base(None)
    assert (model.pooling, model.dim) == ("mean", 384)
    vectors = model.encode(["A man is playing a flute.", "A man plays the flute.", "A cat sleeps."])
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_a_missing_model_directory_is_named():
    with pytest.raises(ModelError, match="/nonexistent/model: no such model directory"):
        BertVectorModel.from_base("/nonexistent/model")


def test_pad_token_ids_pads_to_the_longest_as_int64():
    from embedforge.onnxrt import pad_token_ids

    ids, mask = pad_token_ids([[5, 6], [8], [1, 2, 3, 4]], pad_id=9)
    assert ids.tolist() == [[5, 6, 9, 9], [8, 9, 9, 9], [1, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ids.dtype == mask.dtype == np.int64


# -- encode: one text or many ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> BertVectorModel:
    return build_tiny_model(tmp_path_factory.mktemp("encode") / "m", pooling="mean")


def test_encode_of_one_string_is_one_row_as_a_tensor_never_one_per_character(tiny):
    vector = tiny.encode("boil")
    assert isinstance(vector, torch.Tensor) and vector.shape == (1, tiny.dim) and vector.dtype == torch.float32
    np.testing.assert_allclose(vector.numpy(), tiny.encode(["boil"]), atol=1e-6)
    assert not np.allclose(vector.numpy(), tiny.encode(list("boil"))[:1], atol=1e-3)
    # An ordinary tensor, not an inference-mode one: users may change it in place or use it in autograd.
    assert not vector.is_inference() and not vector.requires_grad
    vector.mul_(2.0)


def test_encode_of_a_list_or_tuple_is_one_row_per_text_in_order(tiny):
    vectors = tiny.encode(TEXTS)
    assert isinstance(vectors, np.ndarray) and vectors.shape == (len(TEXTS), tiny.dim)
    singles = np.concatenate([tiny.encode(text).numpy() for text in TEXTS])
    np.testing.assert_allclose(vectors, singles, atol=1e-5)
    np.testing.assert_allclose(tiny.encode(tuple(reversed(TEXTS)), batch_size=3), vectors[::-1], atol=1e-5)


def test_encode_of_an_empty_list_is_an_empty_matrix(tiny):
    empty = tiny.encode([])
    assert isinstance(empty, np.ndarray) and empty.shape == (0, tiny.dim) and empty.dtype == np.float32
    empty_tensor = tiny.encode((), convert_to_tensor=True)
    assert isinstance(empty_tensor, torch.Tensor) and empty_tensor.shape == (0, tiny.dim)


@pytest.mark.parametrize(("texts", "message"), [
    (5, "takes a str or a list or tuple of str, got int"),
    (None, "got NoneType"),
    (b"boil", "got bytes"),
    (np.array(["boil", "egg"]), "got ndarray"),
    ((text for text in TEXTS), "got generator"),
    (["boil", 3], r"texts\[1\] is int, not str"),
    ([None], r"texts\[0\] is NoneType, not str"),
])
def test_encode_rejects_anything_but_text_with_a_clear_type_error(tiny, texts, message):
    with pytest.raises(TypeError, match=message):
        tiny.encode(texts)


def test_encode_result_type_options_follow_sentence_transformers(tiny):
    as_numpy = tiny.encode("boil", convert_to_numpy=True)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (1, tiny.dim)
    assert isinstance(tiny.encode("boil", convert_to_tensor=False), np.ndarray)
    as_tensor = tiny.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (len(TEXTS), tiny.dim)
    np.testing.assert_allclose(as_tensor.numpy(), tiny.encode(TEXTS, convert_to_numpy=True), atol=1e-6)
    assert isinstance(tiny.encode(TEXTS, convert_to_numpy=False), torch.Tensor)
    assert isinstance(tiny.encode(TEXTS, convert_to_numpy=True, convert_to_tensor=True), torch.Tensor)
    with pytest.raises(ValueError, match="leave no result type"):
        tiny.encode(TEXTS, convert_to_numpy=False, convert_to_tensor=False)
