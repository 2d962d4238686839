"""Our S2-Pro forward against upstream fish-speech's S2 model code, on the same random weights, in fp32.

    python -m benchmarks.s2pro_vs_upstream --upstream .upstream

--upstream is a checkout of the upstream repository (its fish_speech/ package at S2, 2026-03 or later), copied
beside the repo into the git-ignored .upstream/ and never committed: its code is under the Fish Audio Research
License, so it is run here, not copied. Upstream's model is built in a subprocess (its fish_speech package would
shadow the fish-speech 0.1.0 we depend on) from the S2-Pro config.json our tiny kit writes, its weights
re-drawn at unit scale (norm gains too) so that logits are O(1) and 1e-5 is a tight tolerance, then saved.

Compared at every position of a packed two-utterance training example in our chat format:
- slow (token) logits: ours (modeling.slow_forward) against upstream's generation forward over the whole
  sequence (forward_generate with return_all, the code path its inference runs);
- fast (codebook) logits at every frame and codebook: ours (modeling.fast_forward, teacher-forced) against
  upstream's forward_generate_fast stepped through its KV caches with the same codes.
Also printed: how far upstream's *training* forward is from its generation forward (it leaves the codebook
embedding scaling out), the difference our training avoids by using generation's definition.
Run for two configs: the release's structure (fast width = slow width) and one with a projection to the fast width.
"""

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import click
import torch

from fs_pipeline.modeling import fast_forward, frame_index, slow_forward
from fs_pipeline.models import load_tokenizer, open_model_dir
from fs_pipeline.prompt import training_example
from fs_pipeline.s2pro import S2ProConfig, S2ProTransformer
from fs_pipeline.tiny_model import write_tiny_model

TOLERANCE = 1e-5

UPSTREAM = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from fish_speech.models.text2semantic.llama import BaseModelArgs, BaseTransformer, DualARTransformer

    config_file, batch_file, out_file = sys.argv[2:5]
    args = BaseModelArgs._from_fish_qwen3_omni(json.load(open(config_file)))
    torch.manual_seed(0)
    model = DualARTransformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    batch = torch.load(batch_file, weights_only=True)
    inputs, labels = batch["inputs"], batch["labels"]
    n = args.num_codebooks
    with torch.no_grad():
        # the base class's generation forward over the whole sequence (DualAR's own wrapper returns the last position)
        generation = BaseTransformer.forward_generate(model, inputs, return_all=True)
        training = model(inputs, labels=labels)
        is_frame = (labels[0, 0] >= args.semantic_begin_id) & (labels[0, 0] <= args.semantic_end_id)
        hidden = model.fast_project_in(generation.hidden_states[0, is_frame])  # as DualAR's forward_generate does
        codes = labels[0, 1:, is_frame].T  # (frames, n)
        model.setup_caches(max_batch_size=hidden.shape[0], max_seq_len=inputs.shape[-1], dtype=torch.float32)
        steps = [model.forward_generate_fast(hidden, torch.tensor([0]))]
        for i in range(1, n):
            steps.append(model.forward_generate_fast(model.fast_embeddings(codes[:, i - 1]), torch.tensor([i])))
    weights = {k: v for k, v in model.state_dict().items() if ".kv_cache." not in k}
    torch.save({"state": weights, "token_logits": generation.logits[0],
                "codebook_logits": torch.cat(steps, dim=1), "training_token_logits": training.token_logits[0]}, out_file)
    """
)


def compare(upstream: Path, model_dir, config: dict, work: Path) -> dict:
    config_file, batch_file, out_file = work / "config.json", work / "batch.pt", work / "upstream.pt"
    config_file.write_text(json.dumps(config))
    ours_config = S2ProConfig.from_release(config)
    tokenizer = load_tokenizer(model_dir)
    generator = torch.Generator().manual_seed(1)
    n, size = ours_config.num_codebooks, ours_config.codebook_size
    turns = [(text, torch.randint(0, size, (n, frames), generator=generator))
             for text, frames in (("The quick brown fox jumps over the lazy dog.", 23), ("A second sentence.", 11))]
    inputs, labels = training_example(tokenizer, turns, n)
    torch.save({"inputs": inputs[None], "labels": labels[None]}, batch_file)
    subprocess.run([sys.executable, "-c", UPSTREAM, str(upstream), str(config_file), str(batch_file), str(out_file)], check=True)
    reference = torch.load(out_file, weights_only=True)

    ours = S2ProTransformer(ours_config, tokenizer).eval()
    state = {k.replace("fast_project_in.", "fast_project_in.projection."): v for k, v in reference["state"].items()}
    ours.load_state_dict(state)
    with torch.no_grad():
        token_logits, hidden = slow_forward(ours, inputs[None])
        frames = frame_index(ours, labels[None])
        codes = labels[None, 1:].transpose(1, 2).flatten(0, 1).index_select(0, frames)
        codebook_logits = fast_forward(ours, hidden.flatten(0, 1).index_select(0, frames), codes)
    return {
        "positions": inputs.shape[1], "frames": len(frames),
        "token_logit_scale": reference["token_logits"].abs().max().item(),
        "token_max_diff": (token_logits[0] - reference["token_logits"]).abs().max().item(),
        "codebook_logit_scale": reference["codebook_logits"].abs().max().item(),
        "codebook_max_diff": (codebook_logits - reference["codebook_logits"]).abs().max().item(),
        "upstream_training_vs_generation": (reference["training_token_logits"] - reference["token_logits"]).abs().max().item(),
    }


@click.command()
@click.option("--upstream", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkout of upstream fish-speech (S2), e.g. .upstream")
def main(upstream: Path) -> None:
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = open_model_dir(write_tiny_model(Path(tmp) / "s2", version_name="s2-pro"), "s2-pro")
        release = json.loads((model_dir.path / "config.json").read_text())
        projected = json.loads(json.dumps(release))
        projected["audio_decoder_config"] |= {"dim": 48, "n_head": 3, "n_local_heads": 1, "intermediate_size": 96}
        failed = False
        for name, config in (("release structure", release), ("projected fast width", projected)):
            work = Path(tmp) / name.replace(" ", "_")
            work.mkdir()
            result = compare(upstream, model_dir, config, work)
            passed = max(result["token_max_diff"], result["codebook_max_diff"]) <= TOLERANCE
            failed |= not passed
            click.echo(f"{name}: {'PASS' if passed else 'FAIL'} (tolerance {TOLERANCE:g}) {json.dumps(result)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
