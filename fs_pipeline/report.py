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


def write_report(project: Project, manifest_path: Path, merged_dir: Path | None, test_clip: Path | None) -> Path:
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"stages": {}}
    metrics_file = project.dir / "logs" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
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

    infos = checkpoints.list_checkpoints(project.dir / "checkpoints")
    if infos:
        best = checkpoints.best(project.dir / "checkpoints")
        lines += ["", "## Checkpoints", "", "| checkpoint | step | validation loss | WER |", "| --- | --- | --- | --- |"]
        for info in infos:
            mark = " (best)" if best and info.path == best.path else ""
            val = f"{info.val_loss:.4f}" if info.val_loss is not None else "-"
            wer = f"{info.wer:.2f}" if info.wer is not None else "-"
            lines.append(f"| {info.path.name}{mark} | {info.step} | {val} | {wer} |")

    if merged_dir:
        lines += ["", "## Model", "", f"Merged model: `{merged_dir}`", "", "Synthesize with it:", "", "```",
                  f'python cli_tts.py "Hello from my new voice." --model-path {merged_dir} -o output/hello.wav', "```"]
    if test_clip and test_clip.is_file():
        lines += ["", f"Test clip: `{test_clip}`"]
    report = project.dir / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
