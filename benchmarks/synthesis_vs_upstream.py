"""Synthesis speed: our decoding loop against upstream fish-speech's inference `generate`, same model and prompt.

    python -m benchmarks.synthesis_vs_upstream [--llm-size s1-mini] [--frames 300]

Upstream's loop is `fish_speech.models.text2semantic.inference.generate` from the fish-speech 0.1.0
package (eager, as its CLI runs without --compile). Ours is Synthesizer.generate. Both get the same
prompt (prompt.prompt_values) and produce --frames frames (random weights rarely emit the end token;
our constrained decoding may stop earlier, which the frames column shows). Only the LLM is timed: both
then decode with the same codec, and neither streams, so time to first audio is this time plus one
codec decode. Realtime factor = seconds of audio (frames / 21.5) per second of generation.

Upstream's loop samples the slow token from the whole vocabulary and indexes the codebook embedding
with it; with random weights it soon picks an id past the semantic range and trips a CUDA assert. So
the model here has its vocabulary cut to the tokenizer's ids (about 4.4k instead of 155776), which
makes the output head, and both loops, faster than at release size. On CUDA both also run compiled into CUDA
graphs, upstream's decode step as its CLI compiles it with --compile, ours with --compile (compilation
happens in the warm-up, not timed).
"""

import shutil
import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.common import publish
from fs_pipeline.device import select_device
from fs_pipeline.models import open_model_dir
from fs_pipeline.prompt import prompt_values
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import write_tiny_model

FRAMES_PER_SECOND = 44100 / 2048
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet woods."


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fit_vocabulary_to_tokenizer(path: Path) -> None:
    import json

    specials = json.loads((path / "special_tokens.json").read_text())
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = max(specials.values()) + 1
    (path / "config.json").write_text(json.dumps(config))
    state = torch.load(path / "model.pth", weights_only=True)
    for key in ("embeddings.weight", "output.weight"):
        if key in state:
            state[key] = state[key][: config["vocab_size"]].clone()
    torch.save(state, path / "model.pth")


@click.command()
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="s1-mini", show_default=True)
@click.option("--frames", default=300, show_default=True)
@click.option("--device", default=None)
@click.option("--upstream-compile/--no-upstream-compile", default=True, show_default=True,
              help="Also time upstream's compiled decode (its compilation takes minutes).")
@click.option("--no-record", is_flag=True)
def main(llm_size, frames, upstream_compile, device, no_record):
    from fish_speech.models.text2semantic.inference import decode_one_token_ar, generate

    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-synth-"))
    try:
        path = write_tiny_model(work / "model", llm_size=llm_size)
        _fit_vocabulary_to_tokenizer(path)
        model_dir = open_model_dir(path)
        synthesizer = Synthesizer(model_dir, choice)
        model = synthesizer.model
        prompt = prompt_values(model.tokenizer, [(TEXT, None)], model.config.num_codebooks).to(choice.device)
        settings = SynthesisSettings(max_new_frames=frames)
        rows = []

        def upstream_run(decode_one_token):
            def run(n):
                with torch.inference_mode():
                    result = generate(model=model, prompt=prompt, max_new_tokens=n, audio_masks=None, audio_parts=None,
                                      decode_one_token=decode_one_token, temperature=0.8, top_p=0.8, repetition_penalty=1.1)
                return result.shape[1] - prompt.shape[1]
            return run

        def ours_run(speaker):
            return lambda n: speaker.generate(TEXT, SynthesisSettings(max_new_frames=n)).shape[1]

        runs = [("upstream generate (eager)", upstream_run(decode_one_token_ar)), ("fs-pipeline Synthesizer.generate (eager)", ours_run(synthesizer))]
        if choice.type == "cuda" and upstream_compile:  # compiled as upstream's CLI does with --compile
            upstream_compiled = torch.compile(decode_one_token_ar, mode="reduce-overhead", fullgraph=True)
            runs.append(("upstream generate (--compile, CUDA graphs)", upstream_run(upstream_compiled)))
        if choice.type == "cuda":
            compiled = Synthesizer(model_dir, choice, model=model, compile=True)
            runs.append(("fs-pipeline Synthesizer.generate (--compile, CUDA graphs)", ours_run(compiled)))
        for name, run in runs:
            synthesizer.release_caches()
            run(32)  # warm-up (and compilation, whose CUDA graphs keep these caches)
            synchronize(choice.device)
            started = time.perf_counter()
            made = run(settings.max_new_frames)
            synchronize(choice.device)
            seconds = time.perf_counter() - started
            rows.append((name, made, seconds))
            print(f"{name}: {made} frames in {seconds:.2f} s", flush=True)
        base = rows[0][1] / rows[0][2]
        publish("Synthesis vs upstream", choice.device,
                f"{llm_size} LLM with random weights, vocabulary cut to the tokenizer's, {choice.precision}, one prompt, up to {frames} frames",
                ["decoder", "frames", "seconds", "frames/s", "× upstream", "realtime factor"],
                [[n, m, f"{s:.2f}", f"{m / s:.1f}", f"{(m / s) / base:.2f}", f"{m / FRAMES_PER_SECOND / s:.2f}x"] for n, m, s in rows],
                record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
