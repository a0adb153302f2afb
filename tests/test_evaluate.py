"""The evaluation runner and `embedforge evaluate`, on the tiny random BERT and small pair files."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SAMPLE_PAIRS, make_checkpoint, write_jsonl
from sklearn.metrics import ndcg_score

from embedforge.checkpoints import BEST_RECORD, read_best_record
from embedforge.data import Pair, read_pairs
from embedforge.evaluate.cli import evaluate_command
from embedforge.evaluate.runner import embed_texts, evaluate_model, evaluate_pairs


def _lookup_embed_fn(table: dict[str, np.ndarray], calls: list[list[str]]):
    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.stack([table[text] for text in texts])

    return embed


def _random_pairs(rng: np.random.Generator) -> tuple[list[Pair], dict[str, np.ndarray]]:
    queries = [f"q{i}" for i in range(12)]
    documents = [f"d{i}" for i in range(20)] + ["q0"]  # one text is both a query and a document
    pairs = []
    for query in queries:
        for document in rng.choice(documents, size=4, replace=False):
            pairs.append(Pair(query, str(document), float(rng.choice([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))))
    table = {text: rng.normal(size=8) * rng.uniform(0.5, 3.0) for text in queries + documents}  # not normalised
    return pairs, table


def test_evaluate_pairs_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    pairs, table = _random_pairs(rng)
    calls: list[list[str]] = []
    report = evaluate_pairs(pairs, _lookup_embed_fn(table, calls), ks=(3, 10), batch_size=5, show_progress=False)

    texts = {p.query for p in pairs} | {p.document for p in pairs}
    embedded = [text for call in calls for text in call]
    assert sorted(embedded) == sorted(texts)  # each text exactly once
    assert max(len(call) for call in calls) == 5

    unit = {text: vector / np.linalg.norm(vector) for text, vector in table.items()}
    queries = sorted({p.query for p in pairs})
    documents = sorted({p.document for p in pairs})
    labels = {(p.query, p.document): p.rel for p in pairs}
    retrieval, rerank = [], []
    for query in queries:
        rels = np.array([labels.get((query, d), 0.0) for d in documents])
        if rels.max() == 0:
            continue  # nothing to find: left out of the mean
        retrieval.append(ndcg_score([rels], [[unit[query] @ unit[d] for d in documents]], k=10))
        mine = [d for d in documents if (query, d) in labels]  # 4 labelled documents per query
        rerank.append(ndcg_score([[labels[(query, d)] for d in mine]], [[unit[query] @ unit[d] for d in mine]], k=3))
    assert report["retrieval"]["ndcg@10"] == pytest.approx(100 * np.mean(retrieval))
    assert report["rerank"]["ndcg@3"] == pytest.approx(100 * np.mean(rerank))
    assert report["retrieval"]["queries"] == len(queries)
    assert report["documents"] == len(documents)

    from scipy import stats

    cosines = [unit[p.query] @ unit[p.document] for p in pairs]
    rels = [p.rel for p in pairs]
    assert report["spearman"] == pytest.approx(100 * stats.spearmanr(cosines, rels).statistic)
    assert report["pearson"] == pytest.approx(100 * stats.pearsonr(cosines, rels).statistic)


def test_perfect_embeddings_score_100_and_modes_select_sections():
    # Each query's vector equals its one relevant document's; unrelated documents are orthogonal.
    pairs = [Pair("qa", "da", 1.0), Pair("qa", "db", 0.0), Pair("qb", "db", 0.9), Pair("qb", "dc", 0.0)]
    table = {"qa": np.eye(3)[0], "da": np.eye(3)[0], "qb": np.eye(3)[1], "db": np.eye(3)[1], "dc": np.eye(3)[2]}
    report = evaluate_pairs(pairs, _lookup_embed_fn(table, []), ks=(1,), mode="retrieval", show_progress=False)
    assert "rerank" not in report
    for name in ("ndcg@1", "mrr@1", "map@1", "recall@1"):
        assert report["retrieval"][name] == pytest.approx(100.0)
    rerank_only = evaluate_pairs(pairs, _lookup_embed_fn(table, []), ks=(1,), mode="rerank", show_progress=False)
    assert "retrieval" not in rerank_only and rerank_only["rerank"]["mrr@1"] == pytest.approx(100.0)


def test_repeated_labels_take_the_mean_rel():
    pairs = [Pair("q", "a", 1.0), Pair("q", "a", 0.0), Pair("q", "b", 0.4)]
    table = {"q": np.array([1.0, 0.0]), "a": np.array([0.0, 1.0]), "b": np.array([1.0, 0.1])}
    report = evaluate_pairs(pairs, _lookup_embed_fn(table, []), ks=(1,), mode="rerank", show_progress=False)
    # "b" ranks first; with "a" at mean rel 0.5 (relevant at 0.5) MRR@1 is 0, NDCG@1 = 0.4 / 0.5.
    assert report["rerank"]["mrr@1"] == 0.0
    assert report["rerank"]["ndcg@1"] == pytest.approx(80.0)


def test_embed_texts_rejects_bad_embed_fn_output():
    with pytest.raises(ValueError, match="shape"):
        embed_texts(["a", "b"], lambda texts: np.zeros((1, 4)), show_progress=False)


def test_evaluate_pairs_rejects_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        evaluate_pairs([Pair("q", "d", 1.0)] * 2, lambda texts: np.ones((len(texts), 2)), mode="fast")


def test_evaluate_model_uses_the_model(tiny_model_dir, pairs_file):
    from embedforge.model import BertVectorModel

    pairs = read_pairs(pairs_file)
    model = BertVectorModel.from_pretrained(tiny_model_dir)
    report = evaluate_model(model, pairs, ks=(1, 3), device="cpu", show_progress=False)
    vectors = model.encode([p.query for p in pairs] + [p.document for p in pairs])
    n = len(pairs)
    cosines = np.einsum("ij,ij->i", vectors[:n], vectors[n:])
    from scipy import stats

    assert report["spearman"] == pytest.approx(100 * stats.spearmanr(cosines, [p.rel for p in pairs]).statistic,
                                               abs=1e-3)
    assert report["queries"] == 3 and report["pairs"] == len(SAMPLE_PAIRS)
    assert set(report["retrieval"]) >= {"ndcg@1", "ndcg@3", "mrr@3", "map@3", "recall@3", "queries_binary"}


# -- the command -------------------------------------------------------------------------------


@pytest.fixture
def save_path(tmp_path, tiny_model_dir):
    """A training output dir with three complete checkpoints (step 2 has the lowest val_loss) and junk."""
    root = tmp_path / "run"
    for step, val_loss in ((1, 0.30), (2, 0.10), (3, 0.20)):
        shutil.copytree(tiny_model_dir, root / f"checkpoint-step-{step}")
        make_checkpoint(root / f"checkpoint-step-{step}", step=step, val_loss=val_loss)
    shutil.copytree(tiny_model_dir, root / ".tmp-checkpoint-step-4-x")  # an unfinished write: ignored
    return root


@pytest.mark.slow
def test_cli_save_path_evaluates_all_and_selects_best(save_path, pairs_file):
    result = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--save-path", str(save_path),
                                                   "--select-best", "--k", "1,5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    marked = [line for line in lines if line.startswith("*") and "checkpoint-step" in line]
    assert len(marked) == 1 and "checkpoint-step-2" in marked[0]
    assert sum("checkpoint-step-" in line for line in lines) >= 3
    report = json.loads((save_path / "eval_report.json").read_text())
    assert [r["step"] for r in report["results"]] == [1, 2, 3]
    assert report["best"]["checkpoint"] == "checkpoint-step-2"
    assert report["ks"] == [1, 5]
    assert "ndcg@5" in report["results"][0]["metrics"]["retrieval"]
    assert (save_path / "eval_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_best_record(save_path).step == 2
    # The save path's root now holds checkpoint-step-2's model, and says so.
    assert json.loads((save_path / "best_model.json").read_text())["checkpoint"] == "checkpoint-step-2"
    assert (save_path / "model.safetensors").read_bytes() == (save_path / "checkpoint-step-2" /
                                                              "model.safetensors").read_bytes()


def test_cli_without_select_best_records_nothing(save_path, pairs_file, tmp_path):
    output = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(evaluate_command, ["--test_path", str(pairs_file), "--save_path", str(save_path),
                                                   "--mode", "rerank", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert not (save_path / BEST_RECORD).exists()
    report = json.loads(output.read_text())
    assert "retrieval" not in report["results"][0]["metrics"]
    assert output.with_suffix(".png").exists()


def test_cli_checkpoint_dir_writes_report_beside_it(tiny_model_dir, pairs_file, tmp_path):
    checkpoint = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-step-7")
    make_checkpoint(checkpoint, step=7, val_loss=0.25)
    result = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--checkpoint-dir",
                                                   str(checkpoint), "--rel-threshold", "0.95"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval_report_checkpoint-step-7.json").read_text())
    assert report["results"][0]["step"] == 7 and report["rel_threshold"] == 0.95
    assert report["results"][0]["metrics"]["retrieval"]["queries_binary"] == 1  # only rel 1.0 passes 0.95


def test_cli_model_name_evaluates_a_base_model(tiny_model_dir, pairs_file, tmp_path):
    output = tmp_path / "base.json"
    result = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--model-name",
                                                   str(tiny_model_dir), "--output", str(output)])
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    assert report["results"][0]["name"] == str(tiny_model_dir) and report["best"] is None


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, pairs, model: ["--save-path", str(tmp / "empty")], "no complete checkpoint"),
        (lambda tmp, pairs, model: ["--checkpoint-dir", str(tmp / "broken")], "missing model.safetensors"),
        (lambda tmp, pairs, model: ["--checkpoint-dir", str(model), "--test-path", str(tmp / "bad.jsonl")],
         "line 2"),
        (lambda tmp, pairs, model: ["--checkpoint-dir", str(model), "--model-name", "x"], "exactly one"),
        (lambda tmp, pairs, model: ["--checkpoint-dir", str(model), "--select-best"], "--select-best needs"),
        (lambda tmp, pairs, model: ["--checkpoint-dir", str(model), "--k", "0,5"], "k values"),
    ],
)
def test_cli_errors_are_clear(make_args, message, tmp_path, tiny_model_dir, pairs_file):
    (tmp_path / "empty").mkdir()
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    write_jsonl(tmp_path / "bad.jsonl", [SAMPLE_PAIRS[0], {"query": "q", "document": "d", "rel": 3}])
    args = make_args(tmp_path, pairs_file, tiny_model_dir)
    if "--test-path" not in args:
        args = ["--test-path", str(pairs_file), *args]
    result = CliRunner().invoke(evaluate_command, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, OSError))
    assert not list(tmp_path.glob("*.json"))
