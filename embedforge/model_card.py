"""The model card: `README.md` at a save path, for people and for the Hugging Face hub.

Written by `train` at the end of a run and refreshed by `evaluate --save-path` and `export --save-path`, from the
files already there (nothing else is recorded for it): the root model's embedforge.json, train_config.json,
best_model.json and that checkpoint's trainer_state.json (data sizes, validation figures), eval_report.json
(test figures of that checkpoint) and export/manifest.json (precisions and their parity with PyTorch, when that
export was made from the same checkpoint). YAML front matter in the hub's conventions, then the model, its
training, its figures and how to use it: sentence-transformers, embedforge, and the OpenAI SDK against
`embedforge serve --http-port`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from embedforge import checkpoints
from embedforge.io import write_text_atomic
from embedforge.model import CONFIG_FILE, DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID

IN_BATCH_OPTIONS = ("in_batch_weight", "scale", "positive_threshold", "negative_threshold", "rel_power", "symmetric",
                    "false_negative_margin")
EXAMPLE = {"query": "how to boil an egg", "document": "Boil the eggs in hot water for 7 minutes."}


def write_model_card(save_path: str | Path) -> Path | None:
    """Write (or refresh) `<save_path>/README.md`; None, and nothing written, when the root holds no model."""
    save_path = Path(save_path)
    if not (save_path / CONFIG_FILE).is_file():
        return None
    return write_text_atomic(save_path / checkpoints.MODEL_CARD, render(gather(save_path)))


def _read(path: Path) -> dict:
    """A JSON object, or {} when the file is missing or unreadable (a card shows what there is)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def gather(save_path: Path) -> dict:
    """The facts the card shows, read from the save path's files (see the module docstring)."""
    best = _read(save_path / checkpoints.BEST_MODEL_RECORD)
    checkpoint = best.get("checkpoint")
    facts = {"path": str(save_path), "model": _read(save_path / CONFIG_FILE),
             "config": _read(save_path / checkpoints.CONFIG_RECORD), "best": best,
             "state": _read(save_path / checkpoint / checkpoints.STATE_FILE) if checkpoint else {}, "test": None,
             "export": None}
    report = _read(save_path / checkpoints.EVAL_REPORT)
    for result in report.get("results", []):
        if checkpoint and result.get("name") == checkpoint:
            facts["test"] = {"path": report.get("test_path"), "ks": report.get("ks", [10]), **result}
    manifest = _read(save_path / checkpoints.EXPORT_DIR / checkpoints.EXPORT_MANIFEST)
    if checkpoint and manifest.get("source_checkpoint") == str((save_path / checkpoint).resolve()):
        facts["export"] = manifest
    return facts


def _hub_id(name: str) -> str | None:
    """A hub model id for base_model (the bundled default's own), None for a local path."""
    if name in ("", DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID):
        return DEFAULT_MODEL_HUB_ID
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()
    return None if looks_local else name


def front_matter(facts: dict) -> str:
    """The YAML block (values written as JSON strings, which YAML reads as they are)."""
    config, test = facts["config"], facts["test"]
    base = _hub_id(str(facts["model"].get("base_model", "")))
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "embedforge"]
    if config.get("loss"):
        tags.append(f"loss:{config['loss']}")
    datasets = [Path(path).name for path in (config.get("train_path"),) if path] or ["embedforge-sample-data"]
    metrics = ["spearman_cosine", "ndcg@10"] if facts["state"] or test else []
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    for key, values in (("tags", tags), ("datasets", datasets), ("metrics", metrics)):
        if values:
            lines += [f"{key}:", *(f"- {json.dumps(value)}" for value in values)]
    return "\n".join([*lines, "---"])


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows if value not in (None, ""))]


def _prompts(model: dict) -> dict[str, str]:
    return {name: text for name, text in (model.get("prompts") or {}).items() if text}


def model_section(facts: dict) -> list[str]:
    model, config, state, best = facts["model"], facts["config"], facts["state"], facts["best"]
    prompts = _prompts(model)
    rows = [("base model", f"`{model.get('base_model') or DEFAULT_MODEL}`"), ("pooling", model.get("pooling")),
            ("dimensions", f"{model.get('dim')}" + (" (linear projection)" if model.get("projection_dim") else "")),
            ("Matryoshka sizes", ", ".join(map(str, model.get("matryoshka_dims") or [])) or None),
            ("max length", f"{model.get('max_length')} tokens, the prompt included"),
            ("prompts", ", ".join(f"{name} `{json.dumps(text)}`" for name, text in prompts.items()) or "none"),
            ("similarity", "cosine (vectors are L2-normalised)")]
    lines = ["## Model", "", *_table(rows), "", "## Training", ""]
    loss = config.get("loss")
    options = [f"{name.replace('_', '-')} {_value(config[name])}" for name in IN_BATCH_OPTIONS
               if loss and "in-batch" in loss and name in config]
    train_rows = [("training data", _data(config.get("train_path"), state.get("train_pairs"))),
                  ("validation data", _data(config.get("val_path"), state.get("val_pairs"))),
                  ("loss", f"`{loss}`" + (f" ({', '.join(options)})" if options else "")
                   + (f", preset `{config['preset']}`" if config.get("preset") else "") if loss else None),
                  ("optimisation", _optimisation(config) if config else None),
                  ("best checkpoint", f"{best['checkpoint']} (best by {config.get('select_by', 'val_loss')} on the "
                   "validation data)" if best.get("checkpoint") else None)]
    lines += _table(train_rows)
    return lines


def _value(value: object) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def _data(path: str | None, pairs: int | None) -> str:
    name = f"`{path}`" if path else "the bundled sample set"
    return f"{name}, {pairs} pairs" if pairs is not None else name


def _optimisation(config: dict) -> str:
    steps = f", at most {config['max_steps']} steps" if config.get("max_steps") else ""
    return (f"AdamW, learning rate {config.get('learning_rate')}, weight decay {config.get('weight_decay')}, "
            f"warmup {config.get('warmup_steps')} steps, batch size {config.get('batch_size')} x "
            f"{config.get('grad_accum_steps')} accumulated, {config.get('num_epochs')} epochs{steps}, "
            f"seed {config.get('seed')}")


def figures_section(facts: dict) -> list[str]:
    """Validation, test and export figures, each when there is one."""
    lines: list[str] = []
    validation = facts["state"].get("val_metrics") or {}
    if validation:
        lines += ["## Validation (the best checkpoint, during training; metrics x100)", "", *_table(
            [(name, f"{value:.4f}" if name == "val_loss" else f"{value:.2f}") for name, value in validation.items()]),
            ""]
    test = facts["test"]
    if test:
        rows = [(name, f"{value:.2f}") for name, value in _test_figures(test["metrics"], test["ks"]).items()]
        lines += ["## Test (`embedforge evaluate`, metrics x100)", "",
                  f"`{test['path']}`: {test['metrics'].get('pairs')} pairs, {test['metrics'].get('queries')} queries.",
                  "", *_table(rows), ""]
    export = facts["export"]
    if export:
        lines += ["## Export (ONNX; parity with PyTorch on the parity texts)", "",
                  "| precision | file | min cosine | mean cosine | NDCG@10 change | checked |",
                  "|---|---|---|---|---|---|"]
        for precision, entry in export.get("models", {}).items():
            parity = entry.get("parity", {})
            if "skipped" in parity:
                lines.append(f"| {precision} | `{entry.get('file')}` | - | - | - | no: {parity['skipped']} |")
                continue
            ndcg = parity.get("ndcg@10", {}).get("delta")
            lines.append(f"| {precision} | `{entry.get('file')}` | {parity.get('min_cosine', 0):.6f} | "
                         f"{parity.get('mean_cosine', 0):.6f} | {'-' if ndcg is None else f'{ndcg:+.2f}'} | "
                         f"{'yes' if parity.get('checked') else 'no'} |")
        lines.append("")
    return lines


USAGE = """## Usage

With sentence-transformers (the prompts come from config_sentence_transformers.json):

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer({path})
queries = model.encode([{query}], prompt_name="query")
documents = model.encode([{document}], prompt_name="document")
print(model.similarity(queries, documents))
```

With embedforge:

```python
from embedforge.model import BertVectorModel

model = BertVectorModel.from_pretrained({path})
queries = model.encode([{query}], prompt_name="query")
documents = model.encode([{document}], prompt_name="document")
print(queries @ documents.T)
```

Served by embedforge (an OpenAI-compatible HTTP API), with the OpenAI SDK:

```bash
embedforge export --save-path {shell_path}
embedforge serve --save-path {shell_path} --http-port 8080
```

```python
import openai

client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
model = client.models.list().data[0].id
{note}response = client.embeddings.create(model=model, input=[{client_query}])
vector = response.data[0].embedding
```
"""


def _test_figures(metrics: dict, ks: list[int]) -> dict[str, float]:
    """Spearman and Pearson, then NDCG, Recall and MRR at 10 (or the largest k) of each ranking evaluated."""
    k = 10 if 10 in ks else max(ks)
    figures = {name: metrics[name] for name in ("spearman", "pearson") if metrics.get(name) is not None}
    for mode in ("retrieval", "rerank"):
        for name in ("ndcg", "recall", "mrr"):
            value = (metrics.get(mode) or {}).get(f"{name}@{k}")
            if value is not None:
                figures[f"{mode} {name}@{k}"] = value
    return figures


def usage_section(facts: dict) -> list[str]:
    """How to use the model: sentence-transformers, embedforge, and the OpenAI SDK against `embedforge serve`."""
    path, prompts = facts["path"], _prompts(facts["model"])
    note = (f"# the model's query prompt {json.dumps(prompts['query'])} goes before the text (here, by the client)\n"
            if prompts.get("query") else "")
    return USAGE.format(path=json.dumps(path), shell_path=shlex.quote(path), query=json.dumps(EXAMPLE["query"]),
                        document=json.dumps(EXAMPLE["document"]), note=note,
                        client_query=json.dumps(prompts.get("query", "") + EXAMPLE["query"])).splitlines()


def render(facts: dict) -> str:
    """The whole card as Markdown."""
    title = f"# {Path(facts['path']).name}: a sentence-embedding model fine-tuned with embedforge"
    return "\n".join([front_matter(facts), "", title, "", *model_section(facts), "", *figures_section(facts),
                      *usage_section(facts)])
