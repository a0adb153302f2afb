"""`embedforge export`: a checkpoint -> an optimized, parity-checked ONNX directory."""

from __future__ import annotations

from pathlib import Path

import click

from embedforge.cli_options import option
from embedforge.export import (
    MIN_COSINE,
    PRECISIONS,
    ExportError,
    default_output_dir,
    default_precisions,
    export_checkpoint,
)
from embedforge.export.onnx import DEFAULT_OPSET, SUPPORTED_OPSETS
from embedforge.export.parity import format_parity_table


@click.command(name="export")
@option("save_path", type=click.Path(path_type=Path, file_okay=False),
        help="Training output dir: exports its recorded best checkpoint (else the lowest val_loss).")
@option("checkpoint_dir", type=click.Path(path_type=Path),
        help="Export this checkpoint directory.")
@option("output", type=click.Path(path_type=Path, file_okay=False),
        help="Export dir [default: <save-path>/export or <checkpoint-dir>/../export].")
@option("precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
        help="Precision(s) to write, repeatable; fp32 is always written "
             "[default: fp32 and int8, plus fp16 where CUDA is available].")
@option("parity_path", type=click.Path(path_type=Path, dir_okay=False),
        help="Pair file for the parity check [default: the checkpoint's val file, else the sample set].")
@option("max_parity_texts", type=click.IntRange(min=2), default=512,
        help="Most unique texts embedded for the parity check.")
@option("min_cosine", "min_cosines", multiple=True, metavar="PRECISION=VALUE",
        help="Parity floor for one precision, repeatable: the export fails when that precision's min cosine to "
             f"PyTorch is lower [defaults: {', '.join(f'{p}={v}' for p, v in MIN_COSINE.items())}].")
@option("opset", type=click.Choice([str(v) for v in SUPPORTED_OPSETS]), default=str(DEFAULT_OPSET),
        help="ONNX opset.")
def export_command(save_path: Path | None, checkpoint_dir: Path | None, output: Path | None,
                   precisions: tuple[str, ...], parity_path: Path | None, max_parity_texts: int,
                   min_cosines: tuple[str, ...], opset: str) -> None:
    """Export a checkpoint to ONNX (pooling and L2 norm inside), optimize it, check parity with PyTorch.

    Example: embedforge export --save-path output/vector_model --precision fp32 --precision int8
    """
    from embedforge.checkpoints import CheckpointError, resolve_checkpoint
    from embedforge.data import DataError
    from embedforge.model import ModelError

    if (save_path is None) == (checkpoint_dir is None):
        raise click.UsageError("give exactly one of --save-path and --checkpoint-dir")
    floors = _parse_floors(min_cosines)
    try:
        info = resolve_checkpoint(save_path=save_path, checkpoint_dir=checkpoint_dir)
        output = output or default_output_dir(info.path, save_path)
        click.echo(f"exporting {info.path} -> {output}", err=True)
        manifest = export_checkpoint(info.path, output, precisions or default_precisions(),
                                     parity_path=parity_path, max_parity_texts=max_parity_texts, opset=int(opset),
                                     show_progress=True, min_cosine=floors)
    except (CheckpointError, ModelError, DataError, ExportError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error

    fusion = manifest["fusion"]
    fused = ", ".join(f"{op} {count}" for op, count in fusion["with_pooling"].items())
    click.echo(f"fused ops ({fusion['num_layers']} layers): {fused}")
    if not fusion["complete"] or not fusion["kept_by_pooling"]:
        click.echo(f"warning: not every layer was fused (encoder alone: {fusion['encoder_only']}); "
                   "the graph runs correctly but slower", err=True)
    data = manifest["parity_data"]
    click.echo(f"parity vs PyTorch on {data['texts']} texts ({data.get('path', 'given texts')}):")
    click.echo(format_parity_table(manifest["models"]))
    files = ", ".join(entry["file"] for entry in manifest["models"].values())
    click.echo(f"wrote {output}: {files}, manifest.json, tokenizer files")
    if save_path is not None:
        from embedforge.model_card import write_model_card

        card = write_model_card(save_path)  # lists this export when it is the save path's own (<save-path>/export)
        if card is not None:
            click.echo(f"model card: {card}")


def _parse_floors(values: tuple[str, ...]) -> dict[str, float]:
    """`("int8=0.99",)` -> `{"int8": 0.99}`; a malformed value is a usage error naming it."""
    floors = {}
    for value in values:
        precision, _, number = value.partition("=")
        try:
            floors[precision.strip()] = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected PRECISION=VALUE, e.g. int8=0.99",
                                     param_hint="--min-cosine") from None
    return floors
