"""Model-version registry and the one loader for base models.

A base model is a directory in the layout of Fish Audio's releases:

    config.json            LLM config; model_type names the architecture ("dual_ar")
    model.pth | model.safetensors   LLM weights
    tokenizer.tiktoken     BPE ranks
    special_tokens.json    special token -> id
    codec.pth              codec weights
    codec_config.yaml      optional: the codec's hydra config, when it differs from the version's default

Real releases (e.g. openaudio-s1-mini) and the tiny kit from `fs_pipeline.tiny_model` load through the
same code below.
"""

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from fs_pipeline import PipelineError
from fs_pipeline.device import DeviceChoice
from fs_pipeline.fileio import file_hash


@dataclass(frozen=True)
class ModelVersion:
    name: str
    model_type: str  # config.json's model_type
    codec_config: str  # hydra config in fish_speech/configs, used unless the model dir has codec_config.yaml
    sample_rate: int  # the codec's input rate: prepare resamples audio to it
    license: str


MODEL_VERSIONS = {
    "s1-mini": ModelVersion(
        name="s1-mini",
        model_type="dual_ar",
        codec_config="modded_dac_vq",
        sample_rate=44100,
        license="CC-BY-NC-SA-4.0 (Fish Audio openaudio-s1-mini weights: non-commercial use only)",
    ),
}
DEFAULT_MODEL_VERSION = "s1-mini"

LLM_WEIGHT_FILES = ("model.pth", "model.safetensors")
REQUIRED_FILES = ("config.json", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
CODEC_CONFIG_FILE = "codec_config.yaml"
# Buffers the codec computes in __init__; checkpoints may leave them out.
DERIVED_CODEC_BUFFERS = ("causal_mask", "freqs_cis")


def get_version(name: str) -> ModelVersion:
    if name not in MODEL_VERSIONS:
        raise PipelineError(f"unknown model version '{name}': known versions are {', '.join(MODEL_VERSIONS)}")
    return MODEL_VERSIONS[name]


@dataclass(frozen=True)
class ModelDir:
    """A validated base-model directory: every file is present and the LLM and codec agree."""

    path: Path
    version: ModelVersion
    config: dict
    weights_file: Path
    codec_cfg: object  # OmegaConf node

    @property
    def num_codebooks(self) -> int:
        return self.config["num_codebooks"]


def codec_codebook_count(codec_cfg) -> int:
    # One semantic codebook plus the residual ones.
    return 1 + int(codec_cfg.quantizer.n_codebooks)


def package_codec_config(version: ModelVersion) -> Path:
    """The version's codec config file as the fish-speech package ships it."""
    import fish_speech  # a namespace package: it has __path__ but no __file__

    return Path(list(fish_speech.__path__)[0]) / "configs" / f"{version.codec_config}.yaml"


def _load_codec_cfg(path: Path, version: ModelVersion):
    from omegaconf import OmegaConf

    own = path / CODEC_CONFIG_FILE
    return OmegaConf.load(own if own.exists() else package_codec_config(version))


def open_model_dir(path: Path | str, version_name: str = DEFAULT_MODEL_VERSION) -> ModelDir:
    """Check a base-model directory without loading weights. Raises PipelineError naming what is wrong."""
    path = Path(path)
    version = get_version(version_name)
    if not path.is_dir():
        raise PipelineError(
            f"model directory not found: {path}: download a release (e.g. openaudio-s1-mini) there, "
            "or make a tiny test model with `python -m fs_pipeline.tiny_model --output DIR`"
        )
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    weights = [path / name for name in LLM_WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        missing.append(" or ".join(LLM_WEIGHT_FILES))
    if missing:
        raise PipelineError(
            f"model directory {path} is missing {', '.join(missing)}: "
            "copy the complete release (all of config.json, model weights, tokenizer.tiktoken, "
            "special_tokens.json, codec.pth) into it"
        )

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path / 'config.json'} is not valid JSON ({e}): re-download the model") from e
    model_type = config.get("model_type")
    if model_type != version.model_type:
        raise PipelineError(
            f"{path / 'config.json'} has model_type '{model_type}', but model version '{version.name}' "
            f"needs '{version.model_type}': point --pretrained-ckpt-path at a {version.name} release "
            "or pass the matching --model-version"
        )

    codec_cfg = _load_codec_cfg(path, version)
    codec_codebooks = codec_codebook_count(codec_cfg)
    if config.get("num_codebooks") != codec_codebooks:
        raise PipelineError(
            f"codebook mismatch in {path}: the LLM (config.json) expects {config.get('num_codebooks')} codebooks "
            f"but the codec produces {codec_codebooks}: the LLM and codec come from different model versions; "
            "use the codec.pth that ships with this LLM"
        )
    if int(codec_cfg.sample_rate) != version.sample_rate:
        raise PipelineError(
            f"the codec in {path} runs at {codec_cfg.sample_rate} Hz, but model version '{version.name}' "
            f"uses {version.sample_rate} Hz: pass the matching --model-version"
        )
    return ModelDir(path=path, version=version, config=config, weights_file=weights[0], codec_cfg=codec_cfg)


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        raise PipelineError(f"cannot read weights from {file} ({type(e).__name__}): the file is damaged; re-download it") from e
    if "state_dict" in state:  # a Lightning checkpoint
        state = state["state_dict"]
    return state


def _fill_from_state(module: torch.nn.Module, state: dict, file: Path, optional=()) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    if missing:
        raise PipelineError(
            f"{file} lacks {len(missing)} weights the config needs (first: {missing[0]}): "
            "the weights don't match config.json; re-download the release"
        )
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong:
        raise PipelineError(
            f"{file}: weight {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, config.json implies "
            f"{tuple(expected[wrong[0]].shape)}: the weights don't match config.json; re-download the release"
        )
    unused = [k for k in state if k not in expected]
    if unused:
        logger.warning(f"{file}: ignoring {len(unused)} weights this model has no place for (first: {unused[0]})")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def build_llm(model_dir: ModelDir):
    """The DualARTransformer of `model_dir`'s config and tokenizer, randomly initialised, on CPU in fp32."""
    from fish_speech.models.text2semantic.llama import BaseModelArgs, DualARTransformer
    from fish_speech.tokenizer import FishTokenizer

    args = BaseModelArgs.from_pretrained(str(model_dir.path / "config.json"))
    tokenizer = FishTokenizer.from_pretrained(str(model_dir.path))
    return DualARTransformer(args, tokenizer=tokenizer)


def load_llm_weights(model, model_dir: ModelDir) -> None:
    """Fill `model` (built by build_llm, possibly with LoRA adapters added) with the release weights."""
    state = _read_state_dict(model_dir.weights_file)
    # Lightning checkpoints prefix every key with "model."; adapters (lora_*) are not in a release
    state = {k.removeprefix("model."): v for k, v in state.items()}
    _fill_from_state(model, state, model_dir.weights_file, optional=("lora_A", "lora_B"))


def load_llm(model_dir: ModelDir, choice: DeviceChoice):
    """The LLM with its release weights, in eval mode, on the chosen device and dtype."""
    model = build_llm(model_dir)
    load_llm_weights(model, model_dir)
    return model.to(device=choice.device, dtype=choice.dtype).eval()


def build_codec(codec_cfg):
    """The codec a hydra config describes, randomly initialised."""
    from hydra.utils import instantiate

    with warnings.catch_warnings():
        # The codec's layers use torch's older weight_norm helper; nothing for a user to act on.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm.*")
        return instantiate(codec_cfg)


def load_codec(model_dir: ModelDir, choice: DeviceChoice):
    """The codec with its release weights, in eval mode. It runs in fp32: it is small next to the LLM,
    and its quantizer's nearest-codeword search is sensitive to rounding."""
    codec = build_codec(model_dir.codec_cfg)
    file = model_dir.path / "codec.pth"
    state = _read_state_dict(file)
    if any(k.startswith("generator.") for k in state):  # a full GAN training checkpoint
        state = {k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")}
    _fill_from_state(codec, state, file, optional=DERIVED_CODEC_BUFFERS)
    if choice.device.type != "cuda":
        _use_in_place_snakes(codec)
    return codec.to(choice.device).eval()


class InPlaceSnake(torch.nn.Module):
    """dac's Snake1d activation, x + sin(alpha * x)^2 / alpha, computed in one temporary. The library's
    TorchScript version allocates a tensor per op wherever TorchScript doesn't fuse it (CPU, MPS); this
    gives the same values bit for bit, with the codec's encode 1.14x and decode 1.4x faster on CPU."""

    def __init__(self, alpha: torch.nn.Parameter):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.alpha).sin_().square_().mul_((self.alpha + 1e-9).reciprocal()).add_(x)


def _use_in_place_snakes(codec: torch.nn.Module) -> None:
    """Swaps every Snake1d for an InPlaceSnake holding the same alpha (state-dict keys unchanged)."""
    from dac.nn.layers import Snake1d

    for module in list(codec.modules()):
        for name, child in module.named_children():
            if isinstance(child, Snake1d):
                setattr(module, name, InPlaceSnake(child.alpha))


def model_identity(model_dir: ModelDir, hash_file=file_hash) -> str:
    """A content hash of the base model's files: checkpoints record it, so LoRA weights are never
    applied to a base they were not trained on."""
    h = hashlib.sha256()
    for name in ("config.json", model_dir.weights_file.name, "special_tokens.json", "tokenizer.tiktoken", "codec.pth"):
        h.update(name.encode() + hash_file(model_dir.path / name).encode())
    return h.hexdigest()[:16]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def codec_identity(model_dir: ModelDir, hash_file=file_hash) -> str:
    """A hash of what decides the codes: codec weights, codec config and the sample rate. `hash_file` may be
    a caching hasher such as Manifest.hash."""
    from omegaconf import OmegaConf

    h = hashlib.sha256()
    h.update(hash_file(model_dir.path / "codec.pth").encode())
    h.update(OmegaConf.to_yaml(model_dir.codec_cfg).encode())
    h.update(str(model_dir.version.sample_rate).encode())
    return h.hexdigest()[:16]
