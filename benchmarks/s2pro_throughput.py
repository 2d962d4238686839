"""S2-Pro at release size (random weights): LoRA training tokens/s, MFU and peak memory, and synthesis speed.

    python -m benchmarks.s2pro_throughput [--batch-sizes 1,2] [--length 4096] [--steps 6] [--frames 200]

The LLM is built on the GPU from the release's config.json values (36 + 4 layers of dim 2560, 4.56 B
parameters; fs_pipeline.tiny_model.S2_SIZES["s2-pro"]) without writing its 9 GB of weights. Training: LoRA
r=8 on every target layer, bf16 base weights and fp32 adapters under autocast, gradient checkpointing per
transformer block, AdamW, clipping at 1.0: the train stage's step (modeling.forward, lora.prepare_for_training),
on rows of packed synthetic utterances in the chat format, --length tokens each. Tokens/s count every position
of the rows, steps after two warm-up steps, GPU synced; MFU as common.training_flops counts it. Peak memory is
torch's max allocated. Synthesis: a fresh bf16 model (merged-like, no adapters) through our Synthesizer, the
S2-Pro tiny kit's full-size codec (random) decoding, --frames frames (random weights rarely end a text).
"""

import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.common import peak_flops, publish, training_flops
from fs_pipeline import s2pro
from fs_pipeline.device import select_device
from fs_pipeline.lora import LoraSettings, add_lora, prepare_for_training
from fs_pipeline.modeling import forward, frame_index
from fs_pipeline.models import open_model_dir
from fs_pipeline.prompt import training_example
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import S2_SPECIAL_TOKENS, byte_level_bpe, s2pro_config, write_tiny_model

SEMANTIC, CODEBOOKS, RESIDUAL = 4096, 10, 1024
TEXT = "the quick brown fox jumps over a lazy dog while seven small voices read clear sentences aloud"


def release_model(work: Path, device: torch.device) -> s2pro.S2ProTransformer:
    """The release-sized model with random weights on `device`, in fp32, with a tokenizer of 4096 semantic tokens."""
    bpe = byte_level_bpe(S2_SPECIAL_TOKENS + [s2pro.SEMANTIC_TOKEN.format(i) for i in range(SEMANTIC)])
    bpe.save(str(work / s2pro.TOKENIZER_FILE))
    tokenizer = s2pro.S2Tokenizer(work, SEMANTIC)
    ids = [bpe.token_to_id(t) for t in ("<|im_end|>", "<|pad|>", "<|audio_pad|>")]
    config = s2pro.S2ProConfig.from_release(
        s2pro_config("s2-pro", bpe.get_vocab_size(), tokenizer.semantic_begin_id, SEMANTIC, CODEBOOKS, *ids))
    torch.manual_seed(0)
    with torch.device(device):
        return s2pro.S2ProTransformer(config, tokenizer)


def rows(model, count: int, length: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` rows of `length` positions, each of packed utterances (`frames` frames of random codes)."""
    generator = torch.Generator().manual_seed(0)
    inputs, labels = [], []
    for _ in range(count):
        turns = []
        while True:
            codes = torch.randint(0, RESIDUAL, (CODEBOOKS, frames), generator=generator)
            codes[0] = torch.randint(0, SEMANTIC, (frames,), generator=generator)
            turns.append((TEXT, codes))
            x, y = training_example(model.tokenizer, turns, CODEBOOKS)
            if x.shape[1] >= length:
                break
        inputs.append(x[:, :length])
        labels.append(y[:, :length])
    return torch.stack(inputs), torch.stack(labels)


def train_steps(model, choice, batch: int, length: int, steps: int, lora: LoraSettings) -> tuple[float, float, float]:
    """(tokens/s, MFU, peak GB) of LoRA training steps on `batch` rows of `length` positions."""
    inputs, labels = rows(model, batch, length, frames=400)
    frames = frame_index(model, labels)
    inputs, labels = inputs.to(choice.device), labels.to(choice.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with choice.autocast():
            result = forward(model, inputs, labels, frames.to(choice.device), gradient_checkpointing=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = sum(times[2:]) / len(times[2:])
    flops = training_flops(model.config, [length] * batch, len(frames), lora.r)
    peak = peak_flops(choice.device)
    mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
    del optimizer
    return batch * length / seconds, mfu, torch.cuda.max_memory_allocated() / 2**30


@click.command()
@click.option("--batch-sizes", default="1,2", show_default=True)
@click.option("--length", default=4096, show_default=True, help="Positions per row (upstream's recipe: 4096).")
@click.option("--steps", default=6, show_default=True)
@click.option("--frames", default=200, show_default=True, help="Frames to synthesize (21.5 per second of audio).")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(batch_sizes, length, steps, frames, device, no_record):
    choice = select_device(device)
    lora = LoraSettings()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = release_model(work, choice.device)
        parameters = sum(p.numel() for p in model.parameters())
        add_lora(model, lora)
        prepare_for_training(model, choice.device, choice.dtype)
        model.train()
        table = []
        for batch in (int(b) for b in batch_sizes.split(",")):
            try:
                tokens, mfu, peak = train_steps(model, choice, batch, length, steps, lora)
                table.append([f"training, batch {batch} x {length}", f"{tokens:.0f} tokens/s", mfu, f"{peak:.1f}"])
            except torch.OutOfMemoryError:
                table.append([f"training, batch {batch} x {length}", "out of memory", "", ""])
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()

        model = release_model(work, choice.device).to(dtype=choice.dtype).eval()
        codec_dir = open_model_dir(write_tiny_model(work / "codec", version_name="s2-pro", full_codec=True), "s2-pro")
        torch.cuda.reset_peak_memory_stats()
        synthesizer = Synthesizer(codec_dir, choice, model=model)
        synthesizer.render("Warm up.", SynthesisSettings(max_new_frames=8))
        speech = synthesizer.render("The quick brown fox jumps over the lazy dog.", SynthesisSettings(max_new_frames=frames))
        table.append([f"synthesis (eager), {speech.frames} frames = {speech.audio_seconds:.1f} s of audio",
                      f"{speech.frames / speech.seconds:.1f} frames/s, {speech.realtime_factor:.2f}x realtime", "",
                      f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"])
    caption = (f"S2-Pro-sized LLM ({parameters / 1e9:.2f} B parameters, random weights), LoRA r={lora.r} on all targets, "
               f"{choice.precision}, gradient checkpointing on, {steps} steps (tokens/s from step 3 on); synthesis with "
               "the full-size codec (random), KV caches of the model's 32768 positions")
    publish("S2-Pro throughput", choice.device, caption, ["run", "speed", "MFU", "peak GPU memory (GiB)"], table, record=not no_record)


if __name__ == "__main__":
    main()
