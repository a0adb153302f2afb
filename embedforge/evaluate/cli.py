"""`embedforge evaluate`: score checkpoints (or a base model) on a test pair file, pick the best one."""

from __future__ import annotations

from pathlib import Path

import click

from embedforge.checkpoints import SELECT_BY, CheckpointInfo, recorded_select_by, selection_score
from embedforge.cli_options import option
from embedforge.evaluate.metrics import DEFAULT_REL_THRESHOLD
from embedforge.evaluate.runner import MODES, format_output_types, format_table, plot_report, write_report
from embedforge.quantize import OUTPUT_TYPES


def _parse_ks(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(part) for part in value.split(",") if part.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,3,5,10, got {value!r}") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"k values must be integers >= 1, got {value!r}")
    return ks


def _parse_output_types(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    types = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [name for name in types if name not in OUTPUT_TYPES]
    if unknown or not types:
        raise click.BadParameter(f"choose from {', '.join(OUTPUT_TYPES)}, got {value!r}")
    return types


@click.command(name="evaluate")
@option("test_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
        help="Test pairs (JSON or JSONL).")
@option("save_path", type=click.Path(file_okay=False, path_type=Path),
        help="Training output dir: evaluate every complete checkpoint in it.")
@option("checkpoint_dir", type=click.Path(file_okay=False, path_type=Path), help="Evaluate one checkpoint.")
@option("model_name", help="Evaluate a base model before fine-tuning (a local dir, or all-MiniLM-L6-v2 = bundled).")
@option("export_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
        help="Evaluate an ONNX export (what serve and embed-corpus run), for each of --output-types.")
@option("output_types", default=",".join(OUTPUT_TYPES), callback=_parse_output_types, metavar="T1,T2,...",
        help="With --export-dir: also score the vectors as these output types' codes, as a store compares them "
        "(int8/uint8: cosine of the codes, calibrated at export; binary: Hamming).")
@option("select_best", is_flag=True,
        help="With --save-path: record the best checkpoint (by --select-by) in best_checkpoint.json "
             "and copy its model to the save path's root.")
@option("select_by", type=click.Choice(SELECT_BY), default=None, show_default=False,
        help="How the best checkpoint is chosen, on the validation figures each checkpoint recorded (never on "
             "this test file) [default: the run's own train --select-by, else val_loss].")
@option("mode", type=click.Choice(MODES), default="both",
        help="rerank: each query ranks its labelled documents; retrieval: all documents of the file.")
@option("k", "ks", default="1,3,5,10", callback=_parse_ks,
        help="Cut-offs for NDCG/MRR/MAP/Recall.")
@option("rel_threshold", type=float, default=DEFAULT_REL_THRESHOLD,
        help="rel >= this counts as relevant for MRR, MAP and Recall.")
@option("batch_size", type=click.IntRange(min=1), default=64)
@option("output", type=click.Path(dir_okay=False, path_type=Path),
        help="JSON report [default: <save-path>/eval_report.json, beside the checkpoint, "
             "or ./eval_report.json for --model-name]. A PNG plot goes beside it for --save-path.")
@option("device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
def evaluate_command(test_path: Path, save_path: Path | None, checkpoint_dir: Path | None,
                     model_name: str | None, export_dir: Path | None, output_types: tuple[str, ...],
                     select_best: bool, select_by: str | None, mode: str, ks: tuple[int, ...],
                     rel_threshold: float, batch_size: int, output: Path | None, device: str) -> None:
    """Score checkpoints on a test file: NDCG, MRR, MAP, Recall @k (rerank and retrieval) and Spearman.

    \b
    embedforge evaluate --test-path test.jsonl --save-path output/vector_model --select-best
    embedforge evaluate --test-path test.jsonl --checkpoint-dir output/vector_model/checkpoint-step-400
    embedforge evaluate --test-path test.jsonl --model-name all-MiniLM-L6-v2
    embedforge evaluate --test-path test.jsonl --export-dir output/vector_model/export --output-types float32,int8
    """
    sources = [name for name, value in (("--save-path", save_path), ("--checkpoint-dir", checkpoint_dir),
                                        ("--model-name", model_name), ("--export-dir", export_dir))
               if value is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --save-path, --checkpoint-dir, --model-name, --export-dir"
                               + (f" (got {', '.join(sources)})" if sources else ""))
    if select_best and save_path is None:
        raise click.UsageError("--select-best needs --save-path")

    settings = {"ks": ks, "rel_threshold": rel_threshold, "mode": mode, "batch_size": batch_size,
                "device": device}
    try:
        select_by = select_by or recorded_select_by(save_path)
        checkpoints, best, default_output = _checkpoints_to_score(save_path, checkpoint_dir, select_by)
        if export_dir is not None:
            default_output = export_dir.parent / f"eval_report_{export_dir.name}.json"
        results = _score(test_path, checkpoints, model_name, settings, export_dir, output_types)
    except (ValueError, OSError) as error:  # DataError, CheckpointError, ModelError are ValueErrors
        raise click.ClickException(str(error)) from error

    best_name = best.name if best is not None else None
    selected_by = select_by if best is not None and selection_score(best, select_by) is not None else "latest step"
    report = {"test_path": str(test_path), "mode": mode, "ks": list(ks), "rel_threshold": rel_threshold,
              "results": results,
              "best": None if best is None else {"checkpoint": best.name, "step": best.step,
                                                 "val_loss": best.val_loss, "selected_by": selected_by}}
    click.echo(format_table(results, ks, best_name, selected_by))
    for result in results:
        if "output_types" in result["metrics"]:
            click.echo(f"\n{result['name']} by output type:\n" + format_output_types(result["metrics"], ks))
    try:
        _write_outputs(report, output or default_output, save_path, best if select_best else None, selected_by)
    except OSError as error:
        raise click.ClickException(f"cannot write the report or the best model: {error}") from error


def _checkpoints_to_score(save_path: Path | None, checkpoint_dir: Path | None,
                          select_by: str) -> tuple[list[CheckpointInfo], CheckpointInfo | None, Path]:
    """(checkpoints, best or None, default report path) for --save-path, --checkpoint-dir or a base model."""
    from embedforge.checkpoints import EVAL_REPORT, list_checkpoints, read_checkpoint, select_best

    if save_path is not None:
        # select_best raises CheckpointError when there is no complete checkpoint
        return list_checkpoints(save_path), select_best(save_path, select_by), save_path / EVAL_REPORT
    if checkpoint_dir is not None:
        if any(checkpoint_dir.glob("checkpoint-step-*")):
            raise click.UsageError(f"{checkpoint_dir} holds checkpoints: use --save-path {checkpoint_dir}")
        return ([read_checkpoint(checkpoint_dir)], None,
                checkpoint_dir.parent / f"eval_report_{checkpoint_dir.name}.json")
    return [], None, Path("eval_report.json")


def _score(test_path: Path, checkpoints: list[CheckpointInfo], model_name: str | None, settings: dict,
           export_dir: Path | None, output_types: tuple[str, ...]) -> list[dict]:
    """One result row per checkpoint, then one for the base model or the export if asked for."""
    from embedforge.data import read_pairs
    from embedforge.evaluate.runner import evaluate_export, evaluate_model
    from embedforge.model import BertVectorModel

    pairs = read_pairs(test_path)
    results = []
    for info in checkpoints:
        click.echo(f"evaluating {info.path}", err=True)
        metrics = evaluate_model(BertVectorModel.from_pretrained(info.path), pairs, **settings)
        results.append({"name": info.name, "path": str(info.path), "step": info.step,
                        "val_loss": info.val_loss, "metrics": metrics})
    if model_name is not None:
        click.echo(f"evaluating base model {model_name}", err=True)
        results.append({"name": model_name, "path": None, "step": None, "val_loss": None,
                        "metrics": evaluate_model(BertVectorModel.from_base(model_name), pairs, **settings)})
    if export_dir is not None:
        click.echo(f"evaluating export {export_dir}", err=True)
        options = {key: value for key, value in settings.items() if key != "device"}  # the export's provider
        results.append({"name": export_dir.name, "path": str(export_dir), "step": None, "val_loss": None,
                        "metrics": evaluate_export(export_dir, pairs, output_types, **options)})
    return results


def _write_outputs(report: dict, output: Path, save_path: Path | None, best_to_record: CheckpointInfo | None,
                   selected_by: str) -> None:
    """The JSON report, its plot (for a save path) and, with --select-best, best_checkpoint.json and the
    best checkpoint's model copied to the save path's root; a save path's model card is refreshed."""
    write_report(report, output)
    click.echo(f"report: {output}")
    if save_path is not None:
        plot_path = output.with_suffix(".png")
        plot_report(report, plot_path)
        click.echo(f"plot: {plot_path}")
    if best_to_record is not None:
        from embedforge.checkpoints import copy_best_model, write_best_record

        record = write_best_record(save_path, best_to_record, selected_by=selected_by)
        click.echo(f"best checkpoint: {best_to_record.name} (recorded in {record})")
        copy_best_model(save_path, best_to_record)
        click.echo(f"best model: {best_to_record.name}'s model and tokenizer copied to {save_path}")
    if save_path is not None:
        from embedforge.model_card import write_model_card

        card = write_model_card(save_path)
        if card is not None:
            click.echo(f"model card: {card}")
