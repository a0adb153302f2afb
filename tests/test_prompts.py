"""Query and document prompts: applied in training batches, validation and evaluation, saved with the model,
recorded in the export manifest, applied by embed-corpus --input-type; the prompt counts towards max_length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import SAMPLE_PAIRS

from embedforge.corpus.command import embed_corpus_command
from embedforge.data import Pair
from embedforge.evaluate.runner import evaluate_model, evaluate_pairs
from embedforge.model import BertVectorModel
from embedforge.testing import build_tiny_model

PROMPTS = {"query": "query: ", "document": "passage: "}
PAIRS = [Pair(**record) for record in SAMPLE_PAIRS]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.fixture(scope="module")
def prompted(tmp_path_factory) -> BertVectorModel:
    """A tiny model with query and document prompts, saved (and loaded back) like a checkpoint."""
    path = tmp_path_factory.mktemp("prompted") / "model"
    model = build_tiny_model(path, pooling="mean", max_length=32)
    model.prompts = dict(PROMPTS)
    model.save_pretrained(path)
    return BertVectorModel.from_pretrained(path)


def test_encode_applies_the_named_prompt_and_refuses_other_names(prompted):
    texts = ["how to boil an egg", "rice"]
    np.testing.assert_allclose(prompted.encode(texts, prompt_name="document"),
                               prompted.encode(["passage: " + text for text in texts]), atol=1e-6)
    assert prompted.with_prompt(texts, None) == texts
    with pytest.raises(ValueError, match="prompt_name must be one of"):
        prompted.encode(texts, prompt_name="passage")
    # The prompt's tokens count: a long text keeps 32 tokens in all, the prompt's among them.
    ids = prompted.tokenize(prompted.with_prompt(["egg " * 100], "query"))[0]
    prefix = prompted.tokenize(["query:"])[0][:-1]  # [CLS] and the prompt's tokens, without [SEP]
    assert len(ids) == 32 and ids[:len(prefix)] == prefix


def test_training_batches_hold_prompted_texts_and_check_duplicates_on_the_written_text(prompted):
    from embedforge.train.trainer import TokenizedPairs

    pairs = [Pair("rice", "egg", 1.0), Pair("egg", "rice", 0.5)]  # each text is a query once and a document once
    data = TokenizedPairs(pairs, prompted, unique_texts=True)
    assert [data.token_ids[i] for i in data.query] == prompted.tokenize(["query: rice", "query: egg"])
    assert [data.token_ids[i] for i in data.document] == prompted.tokenize(["passage: egg", "passage: rice"])
    assert data.written == [(0, 1), (1, 0)]
    assert [len(batch) for batch in data.batches(2, seed=0, epoch=0, group_by_length=False)] == [1, 1]


def test_validation_and_evaluation_embed_queries_and_documents_with_their_prompts(prompted, monkeypatch):
    from embedforge.train.checkpointer import validate
    from embedforge.train.losses import loss_for
    from embedforge.train.trainer import TrainConfig

    embedded: list[str] = []
    real_encode = prompted.encode

    def recording_encode(texts, *args, **kwargs):
        embedded.extend(texts)
        return real_encode(texts, *args, **kwargs)

    monkeypatch.setattr(prompted, "encode", recording_encode)
    validate(prompted, PAIRS, 64, loss_for(TrainConfig()))
    expected = {"query: " + p.query for p in PAIRS} | {"passage: " + p.document for p in PAIRS}
    assert set(embedded) == expected
    embedded.clear()
    report = evaluate_model(prompted, PAIRS, ks=(3,), show_progress=False)
    assert set(embedded) == expected
    # The same figures as embedding the prompted texts by hand.
    vectors = {text: row for text, row in zip(sorted(expected), real_encode(sorted(expected)), strict=True)}
    by_hand = evaluate_pairs(PAIRS, lambda batch: np.stack([vectors[t] for t in batch]), ks=(3,),
                             show_progress=False, prompts=PROMPTS)
    assert report["spearman"] == pytest.approx(by_hand["spearman"], abs=1e-6)


@pytest.fixture(scope="module")
def prompted_export(prompted, tmp_path_factory) -> Path:
    """The prompted model saved as a checkpoint (`<dir>/checkpoint`) and exported to fp32 (`<dir>/export`)."""
    from embedforge.export import export_checkpoint

    root = tmp_path_factory.mktemp("prompted_export")
    prompted.save_pretrained(root / "checkpoint")
    export_checkpoint(root / "checkpoint", root / "export", precisions=("fp32",),
                      parity_texts=["how to boil an egg", "rice", "coffee"])
    return root / "export"


def test_the_export_manifest_records_the_prompts(prompted_export):
    assert json.loads((prompted_export / "manifest.json").read_text())["prompts"] == PROMPTS


def test_embed_corpus_input_type_applies_the_prompt_and_counts_its_tokens(prompted, prompted_export, tmp_path):
    """embed-corpus, BertVectorModel.encode and SentenceTransformer agree on a prompted model, per input type."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    st_model = sentence_transformers.SentenceTransformer(str(prompted_export.parent / "checkpoint"), device="cpu")
    texts = ["how to boil an egg", "boil the eggs in hot water for seven minutes", "coffee", "egg " * 100]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"document": text}) + "\n" for text in texts))
    figures = {}
    for input_type in ("document", "query", None):
        out = tmp_path / f"vectors-{input_type}"
        args = ["--model-dir", prompted_export, "--input", corpus, "--output", out, "--no-progress",
                *(["--input-type", input_type] if input_type else [])]
        result = CliRunner().invoke(embed_corpus_command, list(map(str, args)))
        assert result.exit_code == 0, result.output
        assert ("without --input-type" in result.output) == (input_type is None)
        table = pq.read_table(sorted(out.glob("part-*.parquet"))[0])
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        manifest = json.loads((out / "_manifest.json").read_text())
        assert (manifest["input_type"], manifest["prompt"]) == (input_type, PROMPTS.get(input_type, ""))
        ours = prompted.encode(texts, prompt_name=input_type)
        theirs = st_model.encode(texts, prompt_name=input_type)
        figures[input_type] = {"corpus-encode": min_cosine(vectors, ours), "corpus-st": min_cosine(vectors, theirs),
                               "encode-st": min_cosine(ours, theirs)}
        # A random encoder gives similar vectors to every text: the components must agree too, not the angle alone.
        assert np.abs(vectors - ours).max() <= 1e-4 and np.abs(ours - theirs).max() <= 1e-5
        lengths = [len(ids) for ids in prompted.tokenize(prompted.with_prompt(texts, input_type))]
        assert table.column("tokens").to_pylist() == lengths and lengths[-1] == 32
    print(f"min cosine by input type: {figures}")
    assert min(value for row in figures.values() for value in row.values()) >= 0.9999, figures
    assert min(row["encode-st"] for row in figures.values()) >= 0.99999, figures


# ---- the server applies the prompts per request ----

@pytest.fixture(scope="module")
def prompted_server(prompted_export):
    from helpers import ServerThread

    from embedforge.server.runtime import OnnxEmbedder

    with ServerThread(OnnxEmbedder(prompted_export, threads=1), http_port=0, max_chars_per_text=40) as running:
        yield running


def test_the_server_applies_the_prompt_of_the_input_type(prompted, prompted_export, prompted_server):
    """Server, BertVectorModel.encode and SentenceTransformer agree on a prompted model, per input type."""
    from embedforge.client import EmbedClient

    sentence_transformers = pytest.importorskip("sentence_transformers")
    st_model = sentence_transformers.SentenceTransformer(str(prompted_export.parent / "checkpoint"), device="cpu")
    texts = ["how to boil an egg", "boil the eggs in hot water", "coffee"]
    figures = {}
    with EmbedClient(prompted_server.target, timeout=10) as client:
        assert client.info().prompts == PROMPTS
        for input_type in ("query", "document", None):
            served = client.embed(texts, input_type=input_type)
            ours = prompted.encode(texts, prompt_name=input_type)
            theirs = st_model.encode(texts, prompt_name=input_type)
            assert np.abs(served.vectors - ours).max() <= 1e-4 and np.abs(ours - theirs).max() <= 1e-5
            figures[input_type] = {"server-encode": min_cosine(served.vectors, ours),
                                   "server-st": min_cosine(served.vectors, theirs)}
            # the prompt's tokens are counted and used
            assert served.tokens == sum(len(ids) for ids in prompted.tokenize(prompted.with_prompt(texts, input_type)))
        scored = client.score(texts[0], texts[1:])  # Score applies both prompts itself
        query, documents = prompted.encode(texts[:1], prompt_name="query"), prompted.encode(texts[1:],
                                                                                              prompt_name="document")
        np.testing.assert_allclose(scored.scores, (documents @ query.T).ravel(), atol=1e-4)
    print(f"min cosine by input type: {figures}")
    assert min(v for row in figures.values() for v in row.values()) >= 0.9999, figures


def test_the_prompt_counts_towards_the_character_limit_and_http_takes_input_type(prompted, prompted_server):
    import urllib.error
    import urllib.request

    import grpc

    from embedforge.client import EmbedClient

    text = "egg " * 9  # 36 characters: within the limit of 40 alone, over it with "passage: "
    with EmbedClient(prompted_server.target, timeout=10) as client:
        assert client.embed([text]).vectors.shape[0] == 1
        with pytest.raises(grpc.RpcError) as refused:
            client.embed([text], input_type="document")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "its prompt 9" in refused.value.details()
    url = f"http://127.0.0.1:{prompted_server.server.http.port}/v1/embeddings"

    def post(body: dict):
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.load(reply)

    vector = post({"input": ["rice"], "input_type": "query"})["data"][0]["embedding"]
    np.testing.assert_allclose(vector, prompted.encode(["rice"], prompt_name="query")[0], atol=1e-4)
    with pytest.raises(urllib.error.HTTPError) as bad:
        post({"input": ["rice"], "input_type": "passage"})
    assert bad.value.code == 400 and json.load(bad.value)["error"]["param"] == "input_type"


def test_a_model_without_prompts_embeds_every_input_type_alike(server_of_tiny_export):
    from embedforge.client import EmbedClient

    with EmbedClient(server_of_tiny_export.target, timeout=10) as client:
        assert client.info().prompts == {}
        plain = client.embed(["rice", "egg"]).vectors
        for input_type in ("query", "document"):
            np.testing.assert_array_equal(client.embed(["rice", "egg"], input_type=input_type).vectors, plain)


@pytest.fixture(scope="module")
def server_of_tiny_export(embedder):
    from helpers import ServerThread

    with ServerThread(embedder) as running:
        yield running


def test_embed_cli_takes_an_input_type(prompted, prompted_server):
    from embedforge.server.cli import embed_command

    result = CliRunner().invoke(embed_command, ["--target", prompted_server.target, "--json", "--input-type", "query",
                                                "rice"])
    assert result.exit_code == 0, result.output
    vector = json.loads(result.stdout)["vectors"][0]
    np.testing.assert_allclose(vector, prompted.encode(["rice"], prompt_name="query")[0], atol=1e-4)
