"""`embedforge train`: every option of the original script, spelled with dashes (underscores accepted)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from embedforge.checkpoints import SELECT_BY
from embedforge.cli_options import option
from embedforge.model import DEFAULT_MAX_LENGTH
from embedforge.train.losses import LOSSES
from embedforge.train.presets import LOSS_OPTIONS, PRESETS, describe, preset_config
from embedforge.train.trainer import TrainConfig

DEFAULTS = TrainConfig()


def _parse_dims(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated sizes such as 384,256,128, got {value!r}") from None
    if min(dims) < 1:
        raise click.BadParameter(f"sizes must be >= 1, got {value!r}")
    return dims


@click.command(name="train")
@option("train_path", type=click.Path(dir_okay=False), default=None,
        help="Training pairs (JSON or JSONL). Default: the bundled sample set.")
@option("val_path", type=click.Path(dir_okay=False), default=None,
        help="Validation pairs. Default: the bundled sample set.")
@option("model_name", default=None, help="Base model: a local directory or cached hub id. Default: the bundled "
        "all-MiniLM-L6-v2.")
@option("max_length", type=int, default=DEFAULTS.max_length, show_default=False,
        help="Truncate texts (prompt included) at this many tokens [default: the base model's max_seq_length "
        f"(sentence-transformers), else {DEFAULT_MAX_LENGTH}].")
@option("batch_size", type=int, default=DEFAULTS.batch_size)
@option("learning_rate", type=float, default=DEFAULTS.learning_rate)
@option("num_epochs", type=int, default=DEFAULTS.num_epochs)
@option("warmup_steps", type=int, default=DEFAULTS.warmup_steps)
@option("save_steps", type=int, default=DEFAULTS.save_steps, help="Validate and checkpoint every N optimizer steps.")
@option("save_path", type=click.Path(file_okay=False), default=DEFAULTS.save_path)
@option("device", default=DEFAULTS.device, help="auto (cuda if available), cpu, cuda or cuda:N.")
@option("pooling", type=click.Choice(["auto", "cls", "mean"]), default=DEFAULTS.pooling,
        help="auto: the model's sentence-transformers pooling config if it has one, else cls.")
@option("projection_dim", type=int, default=None, help="Add a linear projection to this many dimensions.")
@option("seed", type=int, default=DEFAULTS.seed)
@option("grad_accum_steps", type=int, default=DEFAULTS.grad_accum_steps)
@option("max_steps", type=int, default=None, help="Stop after this many optimizer steps.")
@option("max_bad_steps", type=click.IntRange(1), default=DEFAULTS.max_bad_steps,
        help="A step whose loss or gradient norm is not finite is skipped (the weights do not change); stop the "
        "run after this many such steps in a row.")
@option("amp", type=click.Choice(["auto", "off", "bf16", "fp16"]), default=DEFAULTS.amp,
        help="Mixed precision. auto: bf16 (or fp16) on CUDA, off on CPU.")
@option("save_total_limit", type=int, default=None, help="Keep only the newest N checkpoints (and the best).")
@option("select_by", type=click.Choice(SELECT_BY), default=DEFAULTS.select_by,
        help="Which checkpoint is the best (copied to the save path, kept by --save-total-limit, exported): the "
        "lowest validation loss, or the highest validation Spearman, NDCG@10, or mean of the two. Chosen on the "
        "validation split, never the test split; `evaluate --select-best` follows it.")
@option("early_stopping_patience", type=int, default=None,
        help="Stop after N checkpoints without a better validation loss.")
@option("resume", is_flag=False, flag_value="latest", default=None,
        help="Continue from the latest checkpoint in --save-path, or from the given checkpoint dir.")
@option("group_by_length", off="no_group_by_length", default=True,
        help="Batch texts of similar length together (less padding).")
@option("freeze_word_embeddings", off="train_word_embeddings", default=True,
        help="Keep the vocabulary matrix fixed (half of MiniLM's weights; faster, "
        "same quality on STS-B).")
@option("frozen_layers", type=click.IntRange(0), default=DEFAULTS.frozen_layers,
        help="Freeze the embeddings and this many of the lowest transformer layers (backward stops above them).")
@option("fast_cpu_dropout", off="torch_dropout", default=True,
        help="On CPU, draw dropout masks from 16-bit random numbers (same dropout, 2x fewer random draws "
        "than torch's Bernoulli sampling).")
@option("pack_tokens", off="no_pack_tokens", default=True,
        help="Run the encoder on real tokens only, re-padding just around attention (BERT and RoBERTa "
        "layouts; the same model, less work: STS-B batches are 17% padding).")
@option("attention_dropout", type=float, default=DEFAULTS.attention_dropout,
        help="Dropout on attention probabilities while training (the base models use 0.1; 0 is faster on CPU "
        "at equal quality on STS-B).")
@option("preset", type=click.Choice(list(PRESETS)), default=None,
        help="A fixed set of loss options, chosen on validation data (docs/training.md); options given beside it "
        "win. balanced is the recommendation for graded data; similarity for calibrated scores alone; retrieval "
        "for ranking alone. " + "; ".join(f"{name}: {describe(name)}" for name in PRESETS) + ".")
@option("loss", type=click.Choice(LOSSES), default=DEFAULTS.loss,
        help="weighted-mse: cosine fitted to rel (calibrated scores); in-batch: contrastive with the batch's other "
        "documents as negatives (ranking); weighted-mse+in-batch: both (recommended for retrieval).")
@option("in_batch_weight", type=click.FloatRange(min=0), default=DEFAULTS.in_batch_weight,
        help="weighted-mse+in-batch: the in-batch term's factor.")
@option("scale", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.scale,
        help="In-batch: cosines are multiplied by this before the softmax (inverse temperature).")
@option("positive_threshold", type=click.FloatRange(0, 1), default=DEFAULTS.positive_threshold,
        help="In-batch: pairs with rel at least this are positives.")
@option("rel_power", type=click.FloatRange(min=0), default=DEFAULTS.rel_power,
        help="In-batch: each positive pair weighs rel^this (0: all alike; 2 with --positive-threshold 0.01: "
        "graded positives, which rank better at some cost in Spearman, see docs/training.md).")
@option("negative_threshold", type=click.FloatRange(0, 1), default=DEFAULTS.negative_threshold,
        help="In-batch: a document of the same query with rel below this joins the batch as a hard negative.")
@option("symmetric", is_flag=True, help="In-batch: also rank the queries for each document.")
@option("false_negative_margin", type=click.FloatRange(-1, 1), default=None, metavar="MARGIN",
        help="In-batch: leave out of a query's negatives the other documents the model already scores above its "
        "positive's cosine minus MARGIN (probably related, not negatives; 0: those scored above the positive). "
        "Labelled hard negatives always stay. Default: off.")
@option("gather_across_ranks", is_flag=True,
        help="In-batch under torchrun: every rank's embeddings are negatives for every query (global batch).")
@option("matryoshka_dims", default=None, callback=_parse_dims, metavar="D1,D2,...",
        help="Train these vector prefixes (each renormalised) as embeddings too, e.g. 384,256,128,64.")
@option("query_prompt", default=DEFAULTS.query_prompt, show_default=False, metavar="TEXT",
        help="Prefix every query with this prompt (e.g. 'query: ') in training, validation and evaluation; saved with "
        "the model [default: the base model's prompt, if it has one; '' for none].")
@option("document_prompt", default=DEFAULTS.document_prompt, show_default=False, metavar="TEXT",
        help="Prefix every document with this prompt (e.g. 'passage: '), likewise.")
@click.pass_context
def train_command(ctx: click.Context, preset: str | None, **options) -> None:
    """Fine-tune an encoder so that cosine(query, document) matches rel."""
    from embedforge.checkpoints import CheckpointError
    from embedforge.data import DataError
    from embedforge.devices import DeviceError
    from embedforge.model import ModelError
    from embedforge.train.checkpointer import CheckpointFailed, NonFiniteError
    from embedforge.train.trainer import TrainError, train

    # the loss options come from the preset (or TrainConfig) unless given: explicit options win
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    chosen = {**{name: value for name, value in options.items() if name not in LOSS_OPTIONS}, **given}
    try:
        config = preset_config(preset, **chosen)
        result = train(config)
    except (TrainError, DataError, ModelError, CheckpointError, DeviceError, NonFiniteError,
            CheckpointFailed) as error:
        raise click.ClickException(str(error)) from error
    if result.best_checkpoint is not None:
        click.echo(f"trained {result.global_step} steps; {len(result.checkpoints)} checkpoint(s) in "
                   f"{result.save_path}; best by {config.select_by}: {result.best_checkpoint.name}, its model copied "
                   f"to {result.save_path} (BertVectorModel.from_pretrained({str(result.save_path)!r}))")
