"""Listing checkpoints: what `--list-checkpoints`, choosing the best and pruning cost with 20 checkpoints
of an S1-mini-sized LoRA run (r=8 on every adapted layer, fp32 adapters with Adam's two moments, as the
train stage saves them), read from the small records beside them, against loading every checkpoint
(how listing worked before the records).

    python -m benchmarks.checkpoint_listing [--count 20] [--lora-config r_8_alpha_16] [--no-record]
"""

import shutil
import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.common import publish
from fs_pipeline import checkpoints
from fs_pipeline.lora import LoraSettings, add_lora, lora_state_dict
from fs_pipeline.tiny_model import llm_config, write_tiny_model


def s1_mini_adapters(lora: LoraSettings) -> dict[str, torch.Size]:
    """The adapter shapes of an S1-mini-sized model, built on the meta device (no memory, no weights)."""
    from fish_speech.models.text2semantic.llama import DualARTransformer
    from fish_speech.tokenizer import FishTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tiny = write_tiny_model(Path(folder) / "tiny")  # for its tokenizer
        tokenizer = FishTokenizer.from_pretrained(str(tiny))
        config = llm_config("s1-mini", tokenizer.vocab_size, 4096, 10)
    with torch.device("meta"):
        model = DualARTransformer(config, tokenizer=tokenizer)
        add_lora(model, lora)
    return {k: v.shape for k, v in lora_state_dict(model).items()}


@click.command()
@click.option("--count", default=20, show_default=True, help="Checkpoints in the folder.")
@click.option("--lora-config", default="r_8_alpha_16", show_default=True)
@click.option("--no-record", is_flag=True, help="Print only; don't append to RESULTS.md.")
def main(count: int, lora_config: str, no_record: bool) -> None:
    shapes = s1_mini_adapters(LoraSettings.from_name(lora_config))
    folder = Path(tempfile.mkdtemp(prefix="ckpt-listing-"))
    try:
        for step in range(1, count + 1):
            lora = {k: torch.randn(shape) for k, shape in shapes.items()}
            optimizer = {"state": {i: {"exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)} for i, s in enumerate(shapes.values())}}
            checkpoints.save(folder, {"step": step * 100, "lora": lora, "optimizer": optimizer, "metrics": {"val_loss": 1.0 / step}})
        size_mb = sum(p.stat().st_size for p in folder.glob(checkpoints.PATTERN)) / count / 1e6

        started = time.perf_counter()
        for path in sorted(folder.glob(checkpoints.PATTERN)):
            checkpoints.load(path)
        loading = time.perf_counter() - started
        started = time.perf_counter()
        infos = checkpoints.list_checkpoints(folder)
        checkpoints.best(folder, infos=infos)
        records = time.perf_counter() - started
        assert len(infos) == count
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    publish("Checkpoint listing", torch.device("cpu"),
            f"{count} checkpoints of S1-mini-sized LoRA training ({lora_config}, {size_mb:.0f} MB each), listed and best chosen",
            ["how", "seconds", "× faster"],
            [["load every checkpoint (before)", f"{loading:.3f}", "1.00"], ["read the records beside them", f"{records:.4f}", f"{loading / records:.0f}"]],
            record=not no_record)


if __name__ == "__main__":
    main()
