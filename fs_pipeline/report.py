"""The run report: results/<project>/report.md with PNG plots in results/<project>/plots/."""

import json
from pathlib import Path

from fs_pipeline import checkpoints
from fs_pipeline.fileio import atomic_path, write_text_atomic
from fs_pipeline.project import Project


def _plot(path: Path, draw) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    draw(axes)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def _score(value: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def read_metrics(project: Project) -> list[dict]:
    """The training metrics (logs/metrics.jsonl, one JSON object per step), without a last line still being
    written (or torn by a kill mid-write)."""
    path = project.dir / "logs" / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def write_report(project: Project, manifest_path: Path, merged_dir: Path | None, test_clip: Path | None) -> Path:
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"stages": {}}
    metrics = read_metrics(project)
    qa_file = project.data_dir / "qa.json"
    qa = json.loads(qa_file.read_text()) if qa_file.is_file() else None
    plots = project.dir / "plots"
    lines = [f"# Run report: {project.name}", ""]

    lines += ["## Stages", "", "| stage | completed | seconds (last run) |", "| --- | --- | --- |"]
    timings = manifest.get("timings", {})
    for stage, entry in manifest.get("stages", {}).items():
        lines.append(f"| {stage} | {entry.get('completed_at', 'not finished')} | {timings.get(stage, {}).get('seconds', '-')} |")

    if metrics:
        steps = [m["step"] for m in metrics]
        val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]

        def losses(ax):
            ax.plot(steps, [m["loss"] for m in metrics], label="train loss")
            if val:
                ax.plot(*zip(*val), "o-", label="validation loss")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()

        def speed(ax):
            ax.plot(steps, [m["tokens_per_second"] for m in metrics])
            ax.set_xlabel("step")
            ax.set_ylabel("tokens/s")

        _plot(plots / "loss.png", losses)
        _plot(plots / "tokens_per_second.png", speed)
        lines += ["", "## Training", "", "![loss](plots/loss.png)", "", "![tokens per second](plots/tokens_per_second.png)"]

    if qa:
        def durations(ax):
            names = list(qa["speakers"])
            ax.bar(names, [qa["speakers"][n]["minutes"] for n in names])
            ax.set_ylabel("minutes of speech")

        _plot(plots / "speaker_minutes.png", durations)
        lines += ["", "## Dataset", "", f"{qa['total']['clips']} clips, {qa['total']['minutes']:.1f} minutes, "
                  f"{qa['total']['tokens']} tokens.", "", "![minutes per speaker](plots/speaker_minutes.png)", "", "QA warnings:", ""]
        lines += [f"- {w}" for w in qa["warnings"]] or ["- none"]

    folder = project.dir / "checkpoints"
    infos = checkpoints.list_checkpoints(folder)
    if infos:
        best = {by: checkpoints.best(folder, by, infos) for by in checkpoints.BEST_BY}
        lines += ["", "## Checkpoints", "", "Test clips are scored by word error rate (WER, lower is better), by their voice's similarity to "
                  "the training speaker's (cosine of speaker embeddings, higher is better) and by both combined (similarity - WER); "
                  "the base model's own clips are the reference.", "",
                  "| checkpoint | step | validation loss | WER | similarity | combined | best by |", "| --- | --- | --- | --- | --- | --- | --- |"]
        if (base := checkpoints.base_scores(folder)) is not None:
            wer, similarity = base.get("wer"), base.get("similarity")
            lines.append(f"| base model, before training | 0 | - | {_score(wer)} | {_score(similarity)} | "
                         f"{_score(checkpoints.combined(wer, similarity))} | |")
        for info in infos:
            tops = ", ".join(by for by, top in best.items() if top is not None and top.path == info.path)
            lines.append(f"| {info.path.name} | {info.step} | {_score(info.val_loss, 4)} | {_score(info.wer)} | {_score(info.similarity)} | "
                         f"{_score(info.combined)} | {tops} |")

    if merged_dir:
        lines += ["", "## Model", "", f"Merged model: `{merged_dir}`", "", "Synthesize with it:", "", "```",
                  f'python cli_tts.py "Hello from my new voice." --model-path {merged_dir} -o output/hello.wav', "```"]
    if test_clip and test_clip.is_file():
        lines += ["", f"Test clip: `{test_clip}`"]
    report = project.dir / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
