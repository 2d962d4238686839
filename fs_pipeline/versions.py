"""The model-version registry: what each Fish Speech generation is, in data.

Kept apart from models.py (the loader) and free of heavy imports, so that the command-line scripts can
offer the versions in --help without importing torch.
"""

from dataclasses import dataclass

from fs_pipeline import PipelineError


@dataclass(frozen=True)
class HubRelease:
    """Where a version's official weights live on the Hugging Face Hub, and what a download must fetch."""

    repo: str  # e.g. "fishaudio/openaudio-s1-mini"; its last part names the folder under checkpoints/
    # Names or glob patterns of the files the release needs, in the layout models.open_model_dir checks, each of
    # which must match at least one file of the repository.
    files: tuple[str, ...]
    # Those fetched when the repository has them: the model card (README.md names the weights' licence) and a codec
    # config of the release's own (codec_config.yaml, which the loader prefers to the version's default).
    optional_files: tuple[str, ...]
    # The Hub serves a gated repository's files only to a logged-in user who accepted its terms on the model page.
    gated: bool
    license_url: str  # the licence's full text

    @property
    def folder(self) -> str:
        return self.repo.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelVersion:
    name: str
    model_type: str  # config.json's model_type
    codec_config: str  # hydra config in fish_speech/configs, used unless the model dir has codec_config.yaml
    # The only classes a codec config may build (its `_target_`s). A model folder comes from the internet and
    # a `_target_` can name any callable, so these are exactly the classes of the version's own codec config.
    codec_classes: frozenset[str]
    # Those of them a config may pass on uncalled (`_partial_: true`), for the codec to call with its sizes.
    codec_partial_classes: frozenset[str]
    sample_rate: int  # the codec's input rate: prepare resamples audio to it
    license: str
    hub: HubRelease
    # The release's tokenizer files, and its LLM weights: one of weight_files (for a sharded release, its index).
    tokenizer_files: tuple[str, ...] = ("special_tokens.json", "tokenizer.tiktoken")
    weight_files: tuple[str, ...] = ("model.pth", "model.safetensors")
    # The block sizes (lengths of the position tables) of the codec's transformers: the one trace of its
    # generation in a codec config or checkpoint, as both generations' codecs have the same layers and codebooks.
    codec_block_sizes: frozenset[int] = frozenset({16384, 4096})


# The modded DAC codec that both generations use: the classes of fish-speech's modded_dac_vq config.
MODDED_DAC_CLASSES = frozenset({
    "fish_speech.models.dac.modded_dac.DAC",
    "fish_speech.models.dac.rvq.DownsampleResidualVectorQuantize",
    "fish_speech.models.dac.modded_dac.WindowLimitedTransformer",
    "fish_speech.models.dac.modded_dac.ModelArgs",
})
MODDED_DAC_PARTIAL_CLASSES = frozenset({"fish_speech.models.dac.modded_dac.ModelArgs"})

MODEL_VERSIONS = {
    "s1-mini": ModelVersion(
        name="s1-mini",
        model_type="dual_ar",
        codec_config="modded_dac_vq",
        codec_classes=MODDED_DAC_CLASSES,
        codec_partial_classes=MODDED_DAC_PARTIAL_CLASSES,
        sample_rate=44100,
        license="CC-BY-NC-SA-4.0 (Fish Audio openaudio-s1-mini weights: non-commercial use only)",
        hub=HubRelease(
            repo="fishaudio/openaudio-s1-mini",
            files=("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth"),
            optional_files=("README.md", "codec_config.yaml"),
            gated=True,
            license_url="https://creativecommons.org/licenses/by-nc-sa/4.0/",
        ),
    ),
    "s2-pro": ModelVersion(
        name="s2-pro",
        model_type="fish_qwen3_omni",
        codec_config="modded_dac_vq",  # the same codec family as s1-mini's: same classes, codebooks and rate
        codec_classes=MODDED_DAC_CLASSES,
        codec_partial_classes=MODDED_DAC_PARTIAL_CLASSES,
        sample_rate=44100,
        license="Fish Audio Research License (Fish Audio s2-pro weights: non-commercial use only, attribution required, "
                "outputs not to be used to train other foundation models)",
        hub=HubRelease(
            repo="fishaudio/s2-pro",
            files=("config.json", "model.safetensors.index.json", "model-*.safetensors", "tokenizer.json", "codec.pth"),
            optional_files=("README.md", "codec_config.yaml", "tokenizer_config.json", "special_tokens_map.json"),
            gated=True,
            license_url="https://github.com/fishaudio/fish-speech/blob/main/LICENSE",
        ),
        tokenizer_files=("tokenizer.json",),
        weight_files=("model.safetensors.index.json",),
        codec_block_sizes=frozenset({8192, 2048}),
    ),
}
DEFAULT_MODEL_VERSION = "s1-mini"

def get_version(name: str) -> ModelVersion:
    if name not in MODEL_VERSIONS:
        raise PipelineError(f"unknown model version '{name}': known versions are {', '.join(MODEL_VERSIONS)}")
    return MODEL_VERSIONS[name]
