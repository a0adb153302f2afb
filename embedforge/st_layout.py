"""The sentence-transformers directory layout: what `SentenceTransformer(path)`, TEI, Infinity, vLLM, LangChain and
LlamaIndex read to know how a model pools, projects, normalises and prompts.

An embedforge model directory carries, beside its encoder and tokenizer (the Transformer module, path "")::

    modules.json                        Transformer, Pooling, [Dense], Normalize: the modules in order
    sentence_bert_config.json           {"max_seq_length", "do_lower_case"}
    1_Pooling/config.json               cls or mean pooling (include_prompt: true, prompt tokens are pooled)
    2_Dense/config.json, model.safetensors    the projection when there is one (identity activation)
    3_Normalize/config.json             the L2 norm (2_Normalize without a projection)
    config_sentence_transformers.json   prompts {"query", "document"}, default_prompt_name null, similarity cosine

The classic type names (`sentence_transformers.models.Pooling`) and config keys are written: every
sentence-transformers release since 3.0 and the servers above read them. Reading (:func:`read_layout`, for
`--model-name`) takes both the classic names and those of sentence-transformers 6; a module or an option that
embedforge cannot represent is refused by name. This module reads and writes JSON only (no torch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
DENSE_WEIGHTS_FILE = "model.safetensors"
DENSE_WEIGHT_KEYS = ("linear.weight", "linear.bias")
IDENTITY = "torch.nn.modules.linear.Identity"
PROMPT_NAMES = ("query", "document")
FORMAT_VERSION = "3.0.0"
"""Written as `__version__.sentence_transformers`: the oldest release that reads every field written here
(prompts, similarity_fn_name). sentence-transformers warns only when this is newer than the one installed."""
_PREFIX = "sentence_transformers."
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                  "lasttoken")
_POOLING_NAMES = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean"}


class LayoutError(ValueError):
    """A sentence-transformers directory embedforge cannot represent; the message names the file and the field."""


@dataclass
class Layout:
    """What a sentence-transformers directory says about its model (:func:`read_layout`)."""

    transformer_path: str = ""  # the encoder's subfolder ("" for the directory itself)
    pooling: str | None = None  # "cls" or "mean"; None without a Pooling module
    dense_dir: Path | None = None  # the Dense module's folder (config.json, model.safetensors)
    dense_features: tuple[int, int] | None = None  # (in, out)
    dense_bias: bool = True
    normalize: bool = False
    max_length: int | None = None  # sentence_bert_config.json max_seq_length
    prompts: dict[str, str] = field(default_factory=dict)


def module_dirs(projection: bool) -> dict[str, str]:
    """The folder of each module after the Transformer, in order: Pooling, [Dense], Normalize."""
    dirs = {"Pooling": POOLING_DIR}
    if projection:
        dirs["Dense"] = "2_Dense"
    dirs["Normalize"] = f"{len(dirs) + 1}_Normalize"
    return dirs


def layout_files(hidden: int, pooling: str, projection_dim: int | None, max_length: int,
                 prompts: Mapping[str, str], versions: Mapping[str, str]) -> dict[str, dict | list]:
    """Every JSON file of the layout by relative path (the Dense weights are written by the caller, into
    `2_Dense/model.safetensors` as `linear.weight` and `linear.bias`)."""
    dirs = module_dirs(projection_dim is not None)
    modules = [{"idx": 0, "name": "0", "path": "", "type": f"{_PREFIX}models.Transformer"}]
    modules += [{"idx": i, "name": str(i), "path": path, "type": f"{_PREFIX}models.{kind}"}
                for i, (kind, path) in enumerate(dirs.items(), start=1)]
    pooling_config = {"word_embedding_dimension": hidden, **{f"pooling_mode_{mode}": False for mode in _POOLING_MODES},
                      "include_prompt": True}
    pooling_config[f"pooling_mode_{'cls_token' if pooling == 'cls' else 'mean_tokens'}"] = True
    files: dict[str, dict | list] = {
        MODULES_FILE: modules,
        TRANSFORMER_CONFIG_FILE: {"max_seq_length": max_length, "do_lower_case": False},
        f"{dirs['Pooling']}/config.json": pooling_config,
        f"{dirs['Normalize']}/config.json": {},
        MODEL_CONFIG_FILE: {"__version__": {"sentence_transformers": FORMAT_VERSION, **versions},
                            "prompts": {name: prompts.get(name, "") for name in PROMPT_NAMES},
                            "default_prompt_name": None, "similarity_fn_name": "cosine",
                            "model_type": "SentenceTransformer"},
    }
    if projection_dim is not None:
        files[f"{dirs['Dense']}/config.json"] = {"in_features": hidden, "out_features": projection_dim, "bias": True,
                                                 "activation_function": IDENTITY}
    return files


def write_layout(path: Path, files: Mapping[str, dict | list]) -> None:
    """Write `layout_files` output under `path` (plain writes: callers build directories atomically)."""
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content, indent=2) + "\n")


def read_layout(path: str | Path) -> Layout | None:
    """The modules of the sentence-transformers directory `path`, or None when it has no modules.json.

    Accepted, in this order: Transformer, Pooling (cls or mean, prompt tokens pooled), at most one Dense
    (identity activation), Normalize. Anything else raises LayoutError naming the module type or option.
    """
    path = Path(path)
    if not (path / MODULES_FILE).is_file():
        return None
    modules = _read_json(path / MODULES_FILE)
    if not isinstance(modules, list) or not modules:
        raise LayoutError(f"{path / MODULES_FILE}: expected a list of modules")
    layout = Layout()
    order = ["Transformer", "Pooling", "Dense", "Normalize"]
    last = -1
    for module in modules:
        kind = _module_kind(path, module)
        position = order.index(kind)
        if position <= last or (position > 0 and last < 0) or (kind in ("Dense", "Normalize") and last < 1):
            raise LayoutError(f"{path / MODULES_FILE}: module {module.get('type')!r} at {module.get('path')!r} is "
                              f"out of order: embedforge models are {' -> '.join(order)} (Dense optional)")
        last = position
        folder = path / str(module.get("path", ""))
        if kind == "Transformer":
            layout.transformer_path = str(module.get("path", ""))
            layout.max_length = _max_length(folder / TRANSFORMER_CONFIG_FILE)
        elif kind == "Pooling":
            layout.pooling = _pooling(folder / "config.json")
        elif kind == "Dense":
            layout.dense_dir = folder
            layout.dense_features, layout.dense_bias = _dense(folder / "config.json")
        else:
            layout.normalize = True
    if layout.pooling is None:
        raise LayoutError(f"{path / MODULES_FILE}: no Pooling module (embedforge needs cls or mean pooling)")
    layout.prompts = _prompts(path / MODEL_CONFIG_FILE, layout.normalize)
    return layout


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutError(f"{path}: missing") from None
    except ValueError as error:
        raise LayoutError(f"{path}: not valid JSON ({error})") from None


def _module_kind(path: Path, module: object) -> str:
    """Transformer, Pooling, Dense or Normalize for a modules.json entry; any other type is refused by name."""
    if not isinstance(module, dict) or not isinstance(module.get("type"), str):
        raise LayoutError(f"{path / MODULES_FILE}: each module needs a 'type' string, got {module!r}")
    kind = module["type"].rsplit(".", 1)[-1]
    if not module["type"].startswith(_PREFIX) or kind not in ("Transformer", "Pooling", "Dense", "Normalize"):
        raise LayoutError(f"{path / MODULES_FILE}: module type {module['type']!r} is not supported: embedforge "
                          "represents Transformer, Pooling (cls or mean), Dense (identity activation) and Normalize")
    relative = Path(str(module.get("path", "")))
    if relative.is_absolute() or ".." in relative.parts:
        raise LayoutError(f"{path / MODULES_FILE}: module path {module.get('path')!r} leaves the model directory")
    return kind


def _max_length(config_file: Path) -> int | None:
    if not config_file.is_file():
        return None
    value = _read_json(config_file)
    length = value.get("max_seq_length") if isinstance(value, dict) else None
    if length is not None and (type(length) is not int or length < 1):
        raise LayoutError(f"{config_file}: max_seq_length must be a positive integer, got {length!r}")
    return length


def _pooling(config_file: Path) -> str:
    """cls or mean from a Pooling config (the classic pooling_mode_* flags or sentence-transformers 6's
    pooling_mode); other modes, several at once, or prompt tokens left out of the pool are refused."""
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise LayoutError(f"{config_file}: expected a JSON object")
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    elif isinstance(config.get("pooling_mode"), list):
        modes = list(config["pooling_mode"])
    else:
        modes = [mode for mode in _POOLING_MODES if config.get(f"pooling_mode_{mode}")]
    if len(modes) != 1 or modes[0] not in _POOLING_NAMES:
        raise LayoutError(f"{config_file}: pooling {' + '.join(map(str, modes)) or 'none'} is not supported "
                          "(embedforge pools with cls or mean alone)")
    if config.get("include_prompt", True) is False:
        raise LayoutError(f"{config_file}: include_prompt false (prompt tokens left out of the mean) is not "
                          "supported: embedforge pools the prompt's tokens with the text's")
    return _POOLING_NAMES[modes[0]]


def _dense(config_file: Path) -> tuple[tuple[int, int], bool]:
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise LayoutError(f"{config_file}: expected a JSON object")
    activation = config.get("activation_function", IDENTITY)
    if activation not in (IDENTITY, "torch.nn.Identity", None):
        raise LayoutError(f"{config_file}: activation_function {activation!r} is not supported (embedforge's "
                          f"projection is linear: {IDENTITY})")
    features = (config.get("in_features"), config.get("out_features"))
    if not all(type(value) is int and value > 0 for value in features):
        raise LayoutError(f"{config_file}: in_features and out_features must be positive integers, got {features}")
    return (features[0], features[1]), bool(config.get("bias", True))


def _prompts(config_file: Path, normalized: bool) -> dict[str, str]:
    """The query and document prompts ("passage" stands for "document" when there is no "document")."""
    if not config_file.is_file():
        return {}
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise LayoutError(f"{config_file}: expected a JSON object")
    similarity = config.get("similarity_fn_name")
    if similarity not in (None, "cosine") and not (similarity == "dot" and normalized):
        raise LayoutError(f"{config_file}: similarity_fn_name {similarity!r} is not supported (embedforge "
                          "vectors are L2-normalised and compared by cosine)")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(value, str) for value in prompts.values()):
        raise LayoutError(f"{config_file}: prompts must map names to strings, got {prompts!r}")
    if config.get("default_prompt_name") is not None:
        raise LayoutError(f"{config_file}: default_prompt_name {config['default_prompt_name']!r} is not supported: "
                          "embedforge applies a prompt only when asked for one (prompt_name, --input-type); set it "
                          "to null to start from this model")
    chosen = {"query": prompts.get("query", ""), "document": prompts.get("document", prompts.get("passage", ""))}
    return {name: text for name, text in chosen.items() if text}
