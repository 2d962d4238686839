"""What the benchmark scripts share: where results go and how a row is written."""

import platform
import sys
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def publish(benchmark: str, device: torch.device, caption: str, columns: list[str], rows: list[list], record: bool) -> str:
    """Print a captioned markdown table and, when `record`, append it to RESULTS.md. Returns the table."""
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    if record:
        append_result(benchmark, device, table)
    return table


def append_result(benchmark: str, device: torch.device, table: str, notes: str = "") -> None:
    """Append a dated section: the benchmark, device, torch version, the command that produced it, the table."""
    command = f"python -m benchmarks.{Path(sys.argv[0]).stem} " + " ".join(sys.argv[1:])
    section = [
        f"### {benchmark} — {date.today().isoformat()}",
        "",
        f"Device: {device_name(device)}; torch {torch.__version__}; command: `{command}`",
        "",
        table,
    ]
    if notes:
        section += ["", notes]
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n\n")
