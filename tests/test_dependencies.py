"""fish-speech and the codec packages are installed without their declared deps (README, "Dependencies").
These imports prove pyproject.toml declares everything the modules we use really need."""

import importlib

import pytest

MODULES = [
    "fish_speech.models.text2semantic.llama",
    "fish_speech.models.text2semantic.lora",
    "fish_speech.tokenizer",
    "fish_speech.content_sequence",
    "fish_speech.models.dac.modded_dac",
    "fish_speech.models.dac.rvq",
    "whisper",
    "yt_dlp",
    "librosa",
    "soundfile",
    "google.protobuf",
    "loralib",
    "safetensors.torch",
    "resemblyzer",
    "webrtcvad",
    "huggingface_hub",
    "tokenizers",
    "starlette",
    "uvicorn",
    "playwright.sync_api",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    assert importlib.import_module(name) is not None


def test_dual_ar_classes_are_there():
    from fish_speech.models.text2semantic.llama import DualARModelArgs, DualARTransformer
    from fish_speech.models.text2semantic.lora import LoraConfig, setup_lora

    assert DualARModelArgs().model_type == "dual_ar"
    assert callable(setup_lora) and LoraConfig(r=8, lora_alpha=16).r == 8
    assert issubclass(DualARTransformer, importlib.import_module("torch").nn.Module)
