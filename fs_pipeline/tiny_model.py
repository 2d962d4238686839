"""Generate a tiny random base model in the release layout (see models.py).

    python -m fs_pipeline.tiny_model --output DIR [--seed N] [--model-version s1-mini|s2-pro]

It holds an LLM, tokenizer and codec of the same classes as a real release, only small (a few MB) and
with random weights, so tests, the demo and benchmarks run the real loading code in seconds on a CPU.
For s2-pro: the release's config.json layout (fish_qwen3_omni), bf16 weights in two safetensors shards with
their index, and a byte-level BPE tokenizer.json built here with the `tokenizers` library.
The output is byte-identical for a given seed.
"""

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import click
import torch

from fs_pipeline import PipelineError, s2pro
from fs_pipeline.models import (
    CODEC_CONFIG_FILE,
    MODEL_CARD,
    DEFAULT_MODEL_VERSION,
    DERIVED_CODEC_BUFFERS,
    build_codec,
    codec_codebook_count,
    get_version,
    package_codec_config,
)

# Common English letter pairs, merged on top of the 256 single bytes so that text takes fewer tokens.
BIGRAMS = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed",
           "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", " t", " a",
           " s", " w", " o", " i", " b", " c", " m", " f"]
# LLM shapes and codebooks. "s1-mini" has the release's sizes (as published for openaudio-s1-mini:
# Qwen3-0.6B-like slow transformer, 4 fast layers, 10 codebooks) with random weights, for GPU runs.
SIZES = {
    "tiny": {
        "codebooks": {"semantic": 64, "residual": 3, "residual_size": 32},
        "llm": dict(n_layer=2, n_head=4, n_local_heads=2, head_dim=16, dim=64, intermediate_size=128, n_fast_layer=1,
                    fast_dim=64, fast_n_head=4, fast_n_local_heads=2, fast_head_dim=16, fast_intermediate_size=128,
                    max_seq_len=2048, rope_base=10000, tie_word_embeddings=False),
    },
    "s1-mini": {
        "codebooks": {"semantic": 4096, "residual": 9, "residual_size": 1024},
        "llm": dict(vocab_size=155776, n_layer=28, n_head=16, n_local_heads=8, head_dim=128, dim=1024, intermediate_size=3072,
                    n_fast_layer=4, fast_dim=1024, fast_n_head=16, fast_n_local_heads=8, fast_head_dim=64,
                    fast_intermediate_size=3072, max_seq_len=8192, rope_base=1_000_000, tie_word_embeddings=True),
    },
}
# S2-Pro LLM shapes ("text" and "audio_decoder" sections of its config.json). "s2-pro" has the release's sizes
# (its published config.json: 36 + 4 layers of dim 2560; the vocabulary size is the one that, with tied
# embeddings, gives the 4,561,852,416 parameters its safetensors index declares), for GPU runs; "tiny" keeps the
# release's structure (fast width = slow width, q/k norms on the slow transformer only, tied embeddings) at test sizes.
S2_SIZES = {
    "tiny": {
        "codebooks": {"semantic": 64, "residual": 3, "residual_size": 32},
        "text": dict(dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=16, intermediate_size=128, max_seq_len=2048,
                     rope_base=1_000_000),
        "audio_decoder": dict(dim=64, n_layer=1, n_head=4, n_local_heads=2, head_dim=16, intermediate_size=128),
    },
    "s2-pro": {
        "codebooks": {"semantic": 4096, "residual": 9, "residual_size": 1024},
        "text": dict(dim=2560, n_layer=36, n_head=32, n_local_heads=8, head_dim=128, intermediate_size=9728,
                     max_seq_len=32768, rope_base=1_000_000, vocab_size=155776),
        "audio_decoder": dict(dim=2560, n_layer=4, n_head=32, n_local_heads=8, head_dim=128, intermediate_size=9728),
    },
}
S2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|text|>", "<|voice|>", "<|interleave|>",
                     "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]


def tokenizer_ranks() -> dict[bytes, int]:
    tokens = [bytes([i]) for i in range(256)] + [pair.encode() for pair in BIGRAMS]
    return {token: rank for rank, token in enumerate(tokens)}


def special_tokens(first_id: int, semantic_codebook_size: int) -> dict[str, int]:
    from fish_speech.tokenizer import ALL_SPECIAL_TOKENS, SEMANTIC_TOKEN_TEMPLATE

    names = [t for t in ALL_SPECIAL_TOKENS if not t.startswith("<|semantic:")]
    names += [SEMANTIC_TOKEN_TEMPLATE.format(i=i) for i in range(semantic_codebook_size)]
    return {name: first_id + i for i, name in enumerate(names)}


def codec_config(sample_rate: int, semantic: int, residual: int, residual_size: int,
                 block_size: int = max(get_version(DEFAULT_MODEL_VERSION).codec_block_sizes)) -> dict:
    """The release codec's hydra config, scaled down: same classes and hop, no transformer layers. The
    transformers' block size is the version's, the trace of its generation that open_model_dir checks."""
    encoder_dim = 4
    return {
        "_target_": "fish_speech.models.dac.modded_dac.DAC",
        "sample_rate": sample_rate,
        "encoder_dim": encoder_dim,
        "encoder_rates": [2, 4, 8, 8],
        "decoder_dim": 32,
        "decoder_rates": [8, 8, 4, 2],
        "encoder_transformer_layers": [0, 0, 0, 0],
        "decoder_transformer_layers": [0, 0, 0, 0],
        "transformer_general_config": {"_target_": "fish_speech.models.dac.modded_dac.ModelArgs", "_partial_": True,
                                       "block_size": block_size},
        "quantizer": {
            "_target_": "fish_speech.models.dac.rvq.DownsampleResidualVectorQuantize",
            "input_dim": encoder_dim * 2**4,
            "n_codebooks": residual,
            "codebook_size": residual_size,
            "codebook_dim": 8,
            "quantizer_dropout": 0.0,
            "downsample_factor": [2, 2],
            "semantic_codebook_size": semantic,
        },
    }


def llm_config(size: str, vocab_size: int, codebook_size: int, num_codebooks: int):
    from fish_speech.models.text2semantic.llama import DualARModelArgs

    shape = {"vocab_size": vocab_size, **SIZES[size]["llm"]}
    shape["vocab_size"] = max(shape["vocab_size"], vocab_size)
    return DualARModelArgs(
        **shape,
        norm_eps=1e-6,
        attention_qk_norm=True,
        codebook_size=codebook_size,
        num_codebooks=num_codebooks,
        scale_codebook_embeddings=True,
        use_gradient_checkpointing=False,
    )


def byte_level_bpe(specials: list[str]):
    """A byte-level BPE tokenizer (the kind of Qwen's): the 256 bytes as their GPT-2 printable characters, BIGRAMS
    merged on top, then `specials` as single-id special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {char[b]: b for b in range(256)}
    merges = []
    for pair in BIGRAMS:
        first, second = (char[b] for b in pair.encode())
        merges.append((first, second))
        vocab[first + second] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def _write_s1_llm(staging: Path, llm_size: str, semantic_size: int, num_codebooks: int) -> None:
    from fish_speech.models.text2semantic.llama import DualARTransformer
    from fish_speech.tokenizer import FishTokenizer

    ranks = tokenizer_ranks()
    with open(staging / "tokenizer.tiktoken", "w") as f:
        f.writelines(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    specials = special_tokens(first_id=len(ranks), semantic_codebook_size=semantic_size)
    (staging / "special_tokens.json").write_text(json.dumps(specials, indent=2))
    tokenizer = FishTokenizer.from_pretrained(str(staging))
    config = llm_config(llm_size, max(specials.values()) + 1, semantic_size, num_codebooks)
    config.save(staging / "config.json")
    llm = DualARTransformer(config, tokenizer=tokenizer)
    torch.save(llm.state_dict(), staging / "model.pth")


def s2pro_config(llm_size: str, vocab_size: int, semantic_begin_id: int, codebook_size: int, num_codebooks: int,
                 eos_id: int, pad_id: int, audio_pad_id: int) -> dict:
    """config.json of an S2-Pro release, with the sizes of S2_SIZES[llm_size]."""
    shape = S2_SIZES[llm_size]
    common = dict(dropout=0.0, norm_eps=1e-6, rope_base=1_000_000, initializer_range=0.02, attention_qkv_bias=False,
                  attention_o_bias=False, use_gradient_checkpointing=True)
    text = {**common, "model_type": "fish_qwen3", "attention_qk_norm": True, "tie_word_embeddings": True,
            **shape["text"], "vocab_size": max(vocab_size, shape["text"].get("vocab_size", 0))}
    audio_decoder = {**common, "model_type": "fish_qwen3_audio_decoder", "attention_qk_norm": False,
                     "tie_word_embeddings": False, "text_dim": text["dim"], "max_seq_len": num_codebooks + 1,
                     **shape["audio_decoder"], "vocab_size": codebook_size, "num_codebooks": num_codebooks}
    return {
        "model_type": s2pro.MODEL_TYPE, "dtype": "bfloat16", "text_config": text, "audio_decoder_config": audio_decoder,
        "semantic_start_token_id": semantic_begin_id, "semantic_end_token_id": semantic_begin_id + codebook_size - 1,
        "eos_token_id": eos_id, "pad_token_id": pad_id, "audio_pad_token_id": audio_pad_id,
    }


def _write_s2_llm(staging: Path, llm_size: str, semantic_size: int, num_codebooks: int) -> None:
    specials = S2_SPECIAL_TOKENS + [s2pro.SEMANTIC_TOKEN.format(i) for i in range(semantic_size)]
    bpe = byte_level_bpe(specials)
    bpe.save(str(staging / s2pro.TOKENIZER_FILE))
    tokenizer = s2pro.S2Tokenizer(staging, semantic_size)
    ids = {name: bpe.token_to_id(name) for name in ("<|im_end|>", "<|pad|>", "<|audio_pad|>")}
    config = s2pro_config(llm_size, bpe.get_vocab_size(), tokenizer.semantic_begin_id, semantic_size, num_codebooks,
                          ids["<|im_end|>"], ids["<|pad|>"], ids["<|audio_pad|>"])
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    llm = s2pro.S2ProTransformer(s2pro.S2ProConfig.from_release(config), tokenizer)
    state = {k: v.to(torch.bfloat16) for k, v in llm.state_dict().items()}  # the release stores bf16
    # two shards, as the release has: the first filled to at most 2/3 of the whole, the rest in the second
    total = sum(v.numel() * v.element_size() for v in state.values())
    s2pro.write_sharded(staging, state, shard_bytes=total * 2 // 3)


# version -> (LLM shapes, the writer of its config, tokenizer and weights)
LLM_KITS = {"s1-mini": (SIZES, _write_s1_llm), "s2-pro": (S2_SIZES, _write_s2_llm)}


def write_tiny_model(
    output: Path, seed: int = 0, version_name: str = DEFAULT_MODEL_VERSION, full_codec: bool = False, llm_size: str = "tiny"
) -> Path:
    """Write the tiny model to `output` atomically (built in a temp dir beside it, then renamed).

    With `full_codec`, the codec is the version's own full-size architecture (random weights) and the
    model dir has no codec_config.yaml, as in a real release. `llm_size` "s1-mini" (or "s2-pro" for that
    version) makes the LLM release-sized (random weights, ~2 GB; ~9 GB for s2-pro). Benchmarks and GPU runs use these."""
    from omegaconf import OmegaConf

    version = get_version(version_name)
    sizes, write_llm = LLM_KITS[version.name]
    if llm_size not in sizes:
        raise PipelineError(f"--llm-size {llm_size} is not a size of {version.name}: use one of {', '.join(sizes)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        codebooks = sizes[llm_size]["codebooks"]
        codec_cfg = (
            OmegaConf.load(package_codec_config(version))
            if full_codec
            else OmegaConf.create(codec_config(version.sample_rate, **codebooks, block_size=max(version.codec_block_sizes)))
        )
        semantic_size = int(codec_cfg.quantizer.semantic_codebook_size)
        (staging / MODEL_CARD).write_text(
            "---\nlicense: none (random weights generated by fs-pipeline's tiny_model; no terms attach to them)\n---\n"
            "A tiny random Fish Speech model for tests and the demo: it speaks noise.\n"
        )
        torch.manual_seed(seed)
        write_llm(staging, llm_size, semantic_size, codec_codebook_count(codec_cfg))

        if not full_codec:
            OmegaConf.save(codec_cfg, staging / CODEC_CONFIG_FILE)
        codec = build_codec(codec_cfg, version)
        state = {k: v for k, v in codec.state_dict().items() if not k.endswith(DERIVED_CODEC_BUFFERS)}
        torch.save(state, staging / "codec.pth")

        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory to write the model to.")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives identical files.")
@click.option("--model-version", default=DEFAULT_MODEL_VERSION, show_default=True, help="Layout and codec rate to imitate.")
@click.option("--full-codec", is_flag=True, help="Use the version's full-size codec architecture (random weights, ~1.5 GB) for benchmarks.")
@click.option("--llm-size", type=click.Choice(sorted({*SIZES, *S2_SIZES})), default="tiny", show_default=True,
              help="s1-mini or s2-pro (with that --model-version): a release-sized LLM with random weights, for GPU runs.")
def main(output: Path, seed: int, model_version: str, full_codec: bool, llm_size: str) -> None:
    """Write a tiny random Fish Speech base model (LLM + tokenizer + codec) in the release layout."""
    path = write_tiny_model(output, seed, model_version, full_codec, llm_size)
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    click.echo(f"Tiny {model_version} model written to {path} ({size_mb:.1f} MB, seed {seed})")


if __name__ == "__main__":
    main()
