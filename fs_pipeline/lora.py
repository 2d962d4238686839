"""LoRA on the DualAR transformer: which layers get adapters, their config, and moving their weights.

The same layers as fish-speech's `setup_lora` get adapters: the token, codebook and fast embeddings,
every attention (wqkv, wo) and feed-forward (w1, w2, w3) projection of the slow and fast transformers,
and the output heads. The same for both model versions: S2-Pro's module tree (fs_pipeline.s2pro) has these
layers under the same names. Adapters are added after the release weights are loaded and keep them (upstream's
S2 code re-randomised the wrapped layers when it did this the other way round, its issue #1163).
Unlike `setup_lora`, it works on configs with tied word embeddings (the S1-mini and S2-Pro releases have
them): there the token embedding matrix is also the output head, and it gets no adapter,
because fish-speech's forward reads the bare matrix for the head, so merged weights would not compute
what base+adapter computed (the merge check caught exactly that).
Adapters never merge themselves in eval mode (loralib's default), so the frozen base weights stay
bit-identical through training; merging is an explicit step (see merge).
"""

import re
from dataclasses import asdict, dataclass

import loralib
import torch
from torch import nn

from fs_pipeline import PipelineError

LORA_CONFIG_NAMES = ("r_8_alpha_16", "r_4_alpha_8", "r_16_alpha_32")
# Which transformer gets adapters: the slow one (text and the first codebook of each frame, with the token
# and codebook embeddings it reads and its output head), the fast one (the other codebooks), or both.
LORA_TARGETS = ("all", "slow", "fast")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # fish-speech's recipe uses 0.01; none saves a full-size mask per adapted layer per step
    targets: str = "all"  # one of LORA_TARGETS

    @classmethod
    def from_name(cls, name: str) -> "LoraSettings":
        match = re.fullmatch(r"r_(\d+)_alpha_(\d+)", name)
        if not match or int(match.group(1)) < 1:
            raise PipelineError(f"unknown --lora-config '{name}': use one like {', '.join(LORA_CONFIG_NAMES)}")
        return cls(r=int(match.group(1)), alpha=int(match.group(2)))

    @property
    def name(self) -> str:
        return f"r_{self.r}_alpha_{self.alpha}"

    def as_dict(self) -> dict:
        return asdict(self)


def _linear(old: nn.Linear, lora: LoraSettings) -> loralib.Linear:
    new = loralib.Linear(
        old.in_features, old.out_features, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        bias=old.bias is not None, merge_weights=False,
    )
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    return new


def _embedding(old: nn.Embedding, lora: LoraSettings) -> loralib.Embedding:
    new = loralib.Embedding(old.num_embeddings, old.embedding_dim, r=lora.r, lora_alpha=lora.alpha, merge_weights=False)
    new.weight = old.weight
    return new


def target_layers(model, targets: str = "all") -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every layer that gets an adapter for `targets` (see LORA_TARGETS)."""
    if targets not in LORA_TARGETS:
        raise PipelineError(f"unknown --lora-targets '{targets}': use one of {', '.join(LORA_TARGETS)}")
    slow, fast = [(model, "codebook_embeddings")], [(model, "fast_embeddings"), (model, "fast_output")]
    if not model.config.tie_word_embeddings:
        slow += [(model, "embeddings"), (model, "output")]
    for layers, blocks in ((slow, model.layers), (fast, model.fast_layers)):
        for block in blocks:
            layers += [(block.attention, "wqkv"), (block.attention, "wo")]
            layers += [(block.feed_forward, name) for name in ("w1", "w2", "w3")]
    return {"all": slow + fast, "slow": slow, "fast": fast}[targets]


def adapted_layers(model) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every layer that has an adapter now."""
    return [(parent, name) for parent, name in target_layers(model) if isinstance(getattr(parent, name), loralib.LoRALayer)]


def add_lora(model, lora: LoraSettings) -> None:
    """Wrap the target layers in LoRA adapters, keeping their weights, and make only the adapters trainable."""
    for parent, name in target_layers(model, lora.targets):
        old = getattr(parent, name)
        setattr(parent, name, _embedding(old, lora) if isinstance(old, nn.Embedding) else _linear(old, lora))
    loralib.mark_only_lora_as_trainable(model, bias="none")


def set_adapter_scale(model, scale: float) -> None:
    """Make every adapted layer compute W·x + scale·(B·A·x)·alpha/r: loralib's forward multiplies by the
    layer's `scaling` (alpha/r as built), so the layers as they are become base + scale·LoRA."""
    for parent, name in adapted_layers(model):
        layer = getattr(parent, name)
        layer.scaling = scale * layer.lora_alpha / layer.r


def prepare_for_training(model, device: torch.device, dtype: torch.dtype) -> None:
    """Base weights in the compute dtype; adapters in fp32, so optimizer updates don't lose precision."""
    model.to(device)
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if "lora_" in name else dtype)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state(model, state: dict[str, torch.Tensor], source) -> None:
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if set(state) != set(expected):
        raise PipelineError(f"{source} holds adapters for other layers than this model has: it was trained on another base model")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise PipelineError(
                f"{source}: adapter {key} has shape {tuple(value.shape)}, this model needs {tuple(expected[key].shape)}: "
                "its LoRA rank or base model differs; pass the matching --lora-config"
            )
    model.load_state_dict(state, strict=False)
