"""The model-version registry: what each Fish Speech generation is, in data.

Kept apart from models.py (the loader) and free of heavy imports, so that the command-line scripts can
offer the versions in --help without importing torch.
"""

from dataclasses import dataclass

from fs_pipeline import PipelineError


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


MODEL_VERSIONS = {
    "s1-mini": ModelVersion(
        name="s1-mini",
        model_type="dual_ar",
        codec_config="modded_dac_vq",
        codec_classes=frozenset({
            "fish_speech.models.dac.modded_dac.DAC",
            "fish_speech.models.dac.rvq.DownsampleResidualVectorQuantize",
            "fish_speech.models.dac.modded_dac.WindowLimitedTransformer",
            "fish_speech.models.dac.modded_dac.ModelArgs",
        }),
        codec_partial_classes=frozenset({"fish_speech.models.dac.modded_dac.ModelArgs"}),
        sample_rate=44100,
        license="CC-BY-NC-SA-4.0 (Fish Audio openaudio-s1-mini weights: non-commercial use only)",
    ),
}
DEFAULT_MODEL_VERSION = "s1-mini"

def get_version(name: str) -> ModelVersion:
    if name not in MODEL_VERSIONS:
        raise PipelineError(f"unknown model version '{name}': known versions are {', '.join(MODEL_VERSIONS)}")
    return MODEL_VERSIONS[name]
