"""Model-version registry and the one loader for base models.

A base model is a directory in the layout of Fish Audio's releases:

    config.json            LLM config; model_type names the architecture ("dual_ar" for s1-mini,
                           "fish_qwen3_omni" for s2-pro)
    LLM weights            s1-mini: model.pth | model.safetensors; s2-pro: model.safetensors.index.json and
                           the safetensors shards it names (memory-mapped, never copied into RAM whole)
    tokenizer              s1-mini: tokenizer.tiktoken (BPE ranks) + special_tokens.json; s2-pro: tokenizer.json
    codec.pth              codec weights
    codec_config.yaml      optional: the codec's hydra config, when it differs from the version's default
                           (untrusted: only the version's codec classes are built from it)

Which files and which LLM class a version has is data: its registry entry (versions.py) and LLM_BUILDERS.
Real releases and the tiny kit from `fs_pipeline.tiny_model` load through the same code below.
"""

import functools
import hashlib
import importlib
import json
import re
import shlex
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from fs_pipeline import PipelineError, s2pro
from fs_pipeline.device import DeviceChoice
from fs_pipeline.fileio import file_hash
from fs_pipeline.versions import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, ModelVersion, get_version


LLM_WEIGHT_FILES = MODEL_VERSIONS[DEFAULT_MODEL_VERSION].weight_files  # the default version's
REQUIRED_FILES = ("config.json", "codec.pth")  # every version's; its tokenizer and weight files come from the registry
CODEC_CONFIG_FILE = "codec_config.yaml"
MODEL_CARD = "README.md"  # a release's model card; its front matter names the weights' licence
# Buffers the codec computes in __init__; checkpoints may leave them out.
DERIVED_CODEC_BUFFERS = ("causal_mask", "freqs_cis")


@dataclass(frozen=True)
class ModelDir:
    """A validated base-model directory: every file is present and the LLM and codec agree."""

    path: Path
    version: ModelVersion
    config: dict  # the LLM config in the flat names of fish-speech's DualAR configs, whatever the file's layout
    weights_file: Path  # the weights, or for a sharded release its index
    codec_cfg: object  # OmegaConf node, checked and resolved (see _checked_codec_tree)
    codec_config_file: Path  # where codec_cfg comes from: the folder's own codec_config.yaml or the package's

    @property
    def num_codebooks(self) -> int:
        return self.config["num_codebooks"]

    @property
    def sharded(self) -> bool:
        """Whether the LLM weights are safetensors shards named by an index (weights_file), as S2-Pro's release has them."""
        return self.weights_file.name == s2pro.INDEX_FILE

    @property
    def weight_files(self) -> list[Path]:
        """Every file the LLM weights are in."""
        return [self.weights_file, *s2pro.shard_files(self.path)] if self.sharded else [self.weights_file]

    @property
    def license(self) -> str:
        """The weights' licence: what the folder's model card (README.md, as on the Hub) declares in its
        front matter, else the model version's."""
        card = self.path / MODEL_CARD
        if card.is_file():
            match = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
            declared = re.search(r"^license:\s*(.+)$", match.group(1), re.MULTILINE) if match else None
            if declared:
                return f"{declared.group(1).strip()} (from {card.name})"
        return self.version.license


def codec_codebook_count(codec_cfg) -> int:
    # One semantic codebook plus the residual ones.
    return 1 + int(codec_cfg.quantizer.n_codebooks)


def package_codec_config(version: ModelVersion) -> Path:
    """The version's codec config file as the fish-speech package ships it."""
    import fish_speech  # a namespace package: it has __path__ but no __file__

    return Path(list(fish_speech.__path__)[0]) / "configs" / f"{version.codec_config}.yaml"


def _codec_config_file(path: Path, version: ModelVersion) -> Path:
    own = path / CODEC_CONFIG_FILE
    return own if own.exists() else package_codec_config(version)


_FIX_OR_DELETE = "fix it, or delete it to use the model version's default codec config"
# For a codec config that names what it may not: the folder may have been made to run code.
_UNTRUSTED = f"don't use a model folder you don't trust; if you wrote this file yourself, {_FIX_OR_DELETE}"


def _load_codec_cfg(file: Path, version: ModelVersion):
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(file)  # a safe YAML loader: python tags are refused, not constructed
    except yaml.YAMLError as e:
        raise PipelineError(f"{file} is not valid YAML ({' '.join(str(e).split())}): {_FIX_OR_DELETE}") from e
    except OmegaConfBaseException as e:  # a malformed ${...}
        raise PipelineError(f"{file}: {e.full_key}: {str(e).splitlines()[0]}: {_FIX_OR_DELETE}") from e
    return OmegaConf.create(_checked_codec_tree(cfg, version, file))


def _checked_codec_tree(cfg, version: ModelVersion, source: Path | str) -> dict:
    """`cfg` (an OmegaConf node) resolved to plain dicts and lists, once it is known to build only `version`'s
    codec classes. A model folder's codec config is untrusted input, so nothing in it may call anything else:
    no OmegaConf resolver (fish-speech registers `eval` as one), no `_target_` outside the allowlist, no
    `_target_` inside a list, and none of hydra's other underscore keys. Raises PipelineError naming `source`
    and the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.is_dict(cfg):
        raise PipelineError(f"{source} is not a mapping of keys to values: {_FIX_OR_DELETE}")
    _refuse_resolvers(OmegaConf.to_container(cfg), source, key="")
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)  # safe now: interpolations can only copy other keys
    except OmegaConfBaseException as e:
        raise PipelineError(f"{source}: {e.full_key}: cannot resolve its interpolation ({str(e).splitlines()[0]}): "
                            f"{_FIX_OR_DELETE}") from e
    if "_target_" not in tree:
        raise PipelineError(f"{source} names no codec class (_target_): {_FIX_OR_DELETE}")
    _check_codec_node(tree, version, source, key="", in_list=False)
    return tree


def _refuse_resolvers(node, source, key: str) -> None:
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    if isinstance(node, dict | list):
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            _refuse_resolvers(v, source, _key_path(key, k, isinstance(node, list)))
    elif isinstance(node, str) and "${" in node:  # OmegaConf parses exactly these strings as interpolations
        # with the parser OmegaConf resolves with; OmegaConf checked the syntax when it made the node
        nodes = [grammar_parser.parse(node)]
        while nodes:
            tree = nodes.pop()
            if isinstance(tree, OmegaConfGrammarParser.InterpolationResolverContext):
                raise PipelineError(f"{source}: {key} {node!r} calls the resolver '{tree.resolverName().getText()}', "
                                    f"and a codec config may only refer to its own keys (${{key}}); {_UNTRUSTED}")
            nodes.extend(getattr(tree, "children", None) or ())


def _check_codec_node(node, version: ModelVersion, source, key: str, in_list: bool) -> None:
    if isinstance(node, str) and "${" in node:
        # An escaped \${...} resolves to a live interpolation, which the checked config would resolve later.
        raise PipelineError(f"{source}: {key} resolves to {node!r}, which would be resolved again; {_UNTRUSTED}")
    if isinstance(node, list):
        for i, v in enumerate(node):
            _check_codec_node(v, version, source, _key_path(key, i, True), in_list=True)
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    allowed = isinstance(target, str) and target in version.codec_classes
    for k, v in node.items():
        where = _key_path(key, k, False)
        if k == "_target_" and in_list:
            raise PipelineError(f"{source}: {where} {v!r} is a class inside a list, which no {version.name} codec "
                                f"config builds; {_UNTRUSTED}")
        if k == "_target_" and not allowed:
            raise PipelineError(f"{source}: {where} {v!r} is not a class that model version '{version.name}' builds "
                                f"codecs from; {_UNTRUSTED}")
        if k == "_partial_" and (v is not True or not allowed or target not in version.codec_partial_classes):
            raise PipelineError(f"{source}: {where} may only be true, and only on "
                                f"{', '.join(sorted(version.codec_partial_classes))}; {_UNTRUSTED}")
        if isinstance(k, str) and k.startswith("_") and k.endswith("_") and k not in ("_target_", "_partial_"):
            # hydra's other keys (_args_, _recursive_, _convert_, ...) change what a class is called with
            raise PipelineError(f"{source}: {where} is a hydra option that changes how a class is called, which a "
                                f"codec config may not set; {_UNTRUSTED}")
        _check_codec_node(v, version, source, where, in_list)


def _key_path(parent: str, key, in_list: bool) -> str:
    if in_list:
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def open_model_dir(path: Path | str, version_name: str = DEFAULT_MODEL_VERSION) -> ModelDir:
    """Check a base-model directory without loading weights. Raises PipelineError naming what is wrong, among it
    an LLM, tokenizer or codec of another model generation than `version_name` (the era check)."""
    path = Path(path)
    version = get_version(version_name)
    if path.is_file():
        raise PipelineError(f"{path} is a file, not a model directory: pass the folder that holds config.json, the weights and codec.pth")
    if (path / "adapter_config.json").is_file():
        raise PipelineError(
            f"{path} holds LoRA adapters, not a model: pass them with --lora {path} and the base model they were trained on as "
            "--model-path, or use the merged model (checkpoints/PROJECT-merged)"
        )
    if not path.is_dir():
        raise PipelineError(
            f"model directory not found: {path}: download a release there with `python finetune_tts.py --download-model "
            f"--model-version {version_name} --pretrained-ckpt-path {shlex.quote(str(path))}`, or make a tiny test model with "
            "`python -m fs_pipeline.tiny_model --output DIR`"
        )
    config = _read_config(path, version)
    _check_files(path, version)
    weights = next(path / name for name in version.weight_files if (path / name).is_file())

    codec_config_file = _codec_config_file(path, version)
    codec_cfg = _load_codec_cfg(codec_config_file, version)
    if codec_config_file.parent == path:  # the package's default is the version's own by definition
        _check_codec_era(version, _block_sizes(codec_cfg), path, codec_config_file)
    _check_codec_era(version, _checkpoint_block_sizes(path / "codec.pth"), path, path / "codec.pth")
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
    return ModelDir(path=path, version=version, config=config, weights_file=weights, codec_cfg=codec_cfg,
                    codec_config_file=codec_config_file)


def _version_of(model_type) -> ModelVersion | None:
    return next((v for v in MODEL_VERSIONS.values() if v.model_type == model_type), None)


def _read_config(path: Path, version: ModelVersion) -> dict:
    """config.json in the flat names our code reads, once it is known to be `version`'s LLM."""
    file = path / "config.json"
    if not file.is_file():
        raise PipelineError(f"model directory {path} is missing config.json: copy the complete {version.name} release into it")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{file} is not valid JSON ({e}): re-download the model") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != version.model_type:
        other = _version_of(model_type)
        if other is not None:
            raise PipelineError(f"{path} holds an {other.name} LLM (config.json model_type '{model_type}'), not an "
                                f"{version.name} one: pass --model-version {other.name}, or point the model path at a {version.name} release")
        raise PipelineError(
            f"{file} has model_type '{model_type}', but model version '{version.name}' "
            f"needs '{version.model_type}': point --pretrained-ckpt-path at a {version.name} release "
            "or pass the matching --model-version"
        )
    return s2pro.S2ProConfig.from_release(config, file).as_dict() if model_type == s2pro.MODEL_TYPE else config


def _check_files(path: Path, version: ModelVersion) -> None:
    missing = [name for name in (*version.tokenizer_files, "codec.pth") if not (path / name).is_file()]
    if not any((path / name).is_file() for name in version.weight_files):
        missing.append(" or ".join(version.weight_files))
    if not missing:
        return
    others = [v for v in MODEL_VERSIONS.values() if v is not version and all((path / f).is_file() for f in v.tokenizer_files)]
    if others and any(name in version.tokenizer_files for name in missing):
        raise PipelineError(f"{path} holds {', '.join(others[0].tokenizer_files)}, the {others[0].name} tokenizer, but its "
                            f"config.json is an {version.name} LLM, whose tokenizer is {', '.join(version.tokenizer_files)}: "
                            f"the files come from different model versions; copy the complete {version.name} release into it")
    raise PipelineError(
        f"model directory {path} is missing {', '.join(missing)}: copy the complete release (for {version.name}: config.json, "
        f"{' or '.join(version.weight_files)}, {', '.join(version.tokenizer_files)} and codec.pth) into it"
    )


def _block_sizes(codec_cfg) -> set[int]:
    """Every block_size a codec config gives its transformers."""
    from omegaconf import OmegaConf

    found, nodes = set(), [OmegaConf.to_container(codec_cfg)]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            found |= {int(node["block_size"])} if "block_size" in node else set()
            nodes.extend(node.values())
        elif isinstance(node, list):
            nodes.extend(node)
    return found


def _checkpoint_block_sizes(file: Path) -> set[int]:
    """Lengths of the position tables a codec checkpoint holds (none when it left them out): read from the
    checkpoint's index of tensors, its storage memory-mapped, not read."""
    state = _read_state_dict(file)
    return {int(v.shape[0]) for k, v in state.items() if k.endswith(".freqs_cis")}


def _check_codec_era(version: ModelVersion, block_sizes: set[int], path: Path, source: Path) -> None:
    """Refuse a codec of another generation than the LLM's: both generations' codecs have the same layers and
    codebooks, and differ in the lengths of their transformers' position tables."""
    if not block_sizes or block_sizes <= version.codec_block_sizes:
        return
    era = next((v for v in MODEL_VERSIONS.values() if block_sizes <= v.codec_block_sizes), None)
    what = f"an {era.name} codec" if era else "a codec of no known model version"
    raise PipelineError(f"{source} is {what} (transformer block sizes {', '.join(map(str, sorted(block_sizes)))}), but "
                        f"config.json in {path} is an {version.name} LLM: the LLM and codec come from different model "
                        f"versions; use the codec.pth (and codec_config.yaml, if any) that ships with this LLM")


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    if file.name == s2pro.INDEX_FILE:
        return s2pro.read_sharded(file.parent)
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
    # A model built without storage (build_llm) takes the file's tensors as they are: memory-mapped, in the stored
    # dtype, so a 4B-parameter release is never copied into RAM whole.
    assign = any(p.is_meta for p in module.parameters())
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=assign)
    if left := [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]:
        raise PipelineError(f"{file} left {len(left)} weights of the model unset (first: {left[0]}): load the release weights "
                            "before adding adapters")


def _build_dual_ar(model_dir: ModelDir):
    from fish_speech.models.text2semantic.llama import BaseModelArgs, DualARTransformer, precompute_freqs_cis

    args = BaseModelArgs.from_pretrained(str(model_dir.path / "config.json"))
    tokenizer = load_tokenizer(model_dir)
    # No storage and no random draws (seconds at S1-mini size, every start-up): load_llm_weights assigns the release's tensors.
    with torch.device("meta"):
        model = DualARTransformer(args, tokenizer=tokenizer)
    # The tables fish-speech computes rather than stores, made as its __init__ makes them.
    model.freqs_cis = precompute_freqs_cis(args.max_seq_len, args.head_dim, args.rope_base)
    model.causal_mask = torch.tril(torch.ones(args.max_seq_len, args.max_seq_len, dtype=torch.bool))
    model.fast_freqs_cis = precompute_freqs_cis(args.num_codebooks, args.fast_head_dim, args.rope_base)
    return model


def _build_s2pro(model_dir: ModelDir):
    config = s2pro.S2ProConfig(**model_dir.config)
    tokenizer = load_tokenizer(model_dir)
    if (tokenizer.semantic_begin_id, tokenizer.semantic_end_id) != (config.semantic_begin_id, config.semantic_end_id):
        raise PipelineError(
            f"{model_dir.path}: tokenizer.json has the semantic tokens at ids {tokenizer.semantic_begin_id}..{tokenizer.semantic_end_id}, "
            f"config.json at {config.semantic_begin_id}..{config.semantic_end_id}: the files come from different releases; re-download it"
        )
    with torch.device("meta"):  # no storage: load_llm_weights assigns the memory-mapped release tensors
        return s2pro.S2ProTransformer(config, tokenizer)


# model_type -> the LLM class's builder
LLM_BUILDERS = {"dual_ar": _build_dual_ar, s2pro.MODEL_TYPE: _build_s2pro}


def build_llm(model_dir: ModelDir):
    """The LLM of `model_dir`'s config, with its tokenizer, its parameters not yet allocated (meta) until
    load_llm_weights assigns them; its derived tables (RoPE, causal mask) on the CPU."""
    return LLM_BUILDERS[model_dir.version.model_type](model_dir)


def load_tokenizer(model_dir: ModelDir):
    """The version's tokenizer: fish-speech's FishTokenizer (tiktoken) for s1-mini, s2pro.S2Tokenizer for s2-pro."""
    if model_dir.version.model_type == s2pro.MODEL_TYPE:
        return s2pro.S2Tokenizer(model_dir.path, model_dir.config["codebook_size"])
    from fish_speech.tokenizer import FishTokenizer

    return FishTokenizer.from_pretrained(str(model_dir.path))


def read_weights(model_dir: ModelDir) -> dict[str, torch.Tensor]:
    """The LLM weights as stored (memory-mapped), under the keys of our module trees."""
    return _read_state_dict(model_dir.weights_file)


def load_llm_weights(model, model_dir: ModelDir) -> None:
    """Fill `model` (built by build_llm) with the release weights: it then holds the release's memory-mapped tensors in
    their stored dtype (bf16 for the releases), which callers cast where they compute. Adapters go on after this."""
    state = read_weights(model_dir)
    # Lightning checkpoints prefix every key with "model."; adapters (lora_*) are not in a release
    state = {k.removeprefix("model."): v for k, v in state.items()}
    _fill_from_state(model, state, model_dir.weights_file, optional=("lora_A", "lora_B"))


def load_llm(model_dir: ModelDir, choice: DeviceChoice):
    """The LLM with its release weights, in eval mode, on the chosen device and dtype."""
    model = build_llm(model_dir)
    load_llm_weights(model, model_dir)
    return model.to(device=choice.device, dtype=choice.dtype).eval()


def build_codec(
    codec_cfg, version: ModelVersion = MODEL_VERSIONS[DEFAULT_MODEL_VERSION], source: Path | str = "the codec config"
):
    """The codec `codec_cfg` describes, randomly initialised, built from `version`'s codec classes only (see
    _checked_codec_tree). `source` names the config in errors."""
    tree = _checked_codec_tree(codec_cfg, version, source)
    with warnings.catch_warnings():
        # The codec's layers use torch's older weight_norm helper; nothing for a user to act on.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm.*")
        return _build(tree, source, key="")


def _build(node, source, key: str):
    """What hydra's instantiate makes of a checked tree, without hydra: a mapping with `_target_` is that class
    called with its other keys, built first in their order (which decides the random initial weights)."""
    if isinstance(node, list):
        return [_build(v, source, _key_path(key, i, True)) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    kwargs = {
        k: _build(v, source, _key_path(key, k, False)) for k, v in node.items() if k not in ("_target_", "_partial_")
    }
    if "_target_" not in node:
        return kwargs
    module, _, name = node["_target_"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if node.get("_partial_"):
        return functools.partial(cls, **kwargs)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a key the class doesn't take, or one it needs is missing
        where = _key_path(key, "_target_", False)
        raise PipelineError(f"{source}: {where} {node['_target_']}: {e}: {_FIX_OR_DELETE}") from e


def load_codec(model_dir: ModelDir, choice: DeviceChoice):
    """The codec with its release weights, weight norm folded, in eval mode. It runs in fp32: it is small next to the LLM,
    and its quantizer's nearest-codeword search is sensitive to rounding. Its Snake activations are computed by
    FusedSnake on CUDA where Triton works there, by InPlaceSnake off CUDA, and by the library's own version otherwise;
    the first two write straight into the padded input of the causal convolution after them (SnakeThenCausalConv; not
    on MPS), and on CUDA the causal residual units add their convolutions' biases in the kernels after them
    (FusedResidualUnit); its causal transformers make their attention masks where they run (_make_masks_on_device)."""
    codec = codec_skeleton(model_dir.codec_cfg, model_dir.version, model_dir.codec_config_file)
    file = model_dir.path / "codec.pth"
    state = _read_state_dict(file)
    if any(k.startswith("generator.") for k in state):  # a full GAN training checkpoint
        state = {k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")}
    # The codec computes these from its config; a checkpoint's copies may be of another length (open_model_dir
    # checked that their lengths are this version's)
    built = codec.state_dict()
    # each weight in the dtype the codec's classes make it (fp32), whatever the file stores
    state = {k: v.to(built[k].dtype) if k in built else v for k, v in state.items() if not k.endswith(DERIVED_CODEC_BUFFERS)}
    _fill_from_state(codec, state, file, optional=DERIVED_CODEC_BUFFERS)
    snakes = InPlaceSnake if choice.device.type != "cuda" else FusedSnake if fused_snake_works(choice.device) else None
    return faster_layers(codec, snakes, choice.device).eval()


def faster_layers(codec: torch.nn.Module, snakes: type | None, device: torch.device) -> torch.nn.Module:
    """load_codec's changes to the library codec's layers, on `device`: its Snake1d activations swapped for `snakes`
    (None: kept), each of those joined to the causal convolution after it, FusedSnake's residual units fused, and
    weight norm folded. Not joined on MPS: there InPlaceSnake would write through a strided view of the padded
    buffer, which only a Mac could test."""
    if snakes is not None:
        _swap_snakes(codec, snakes)
    if device.type != "mps":
        _join_snakes_to_convs(codec)
    _fuse_residual_units(codec)
    codec = codec.to(device)
    # folded where the codec runs: the weights the library would compute there on every call, the CPU spared the work
    _fold_weight_norm(codec)
    return codec


def codec_skeleton(codec_cfg, version: ModelVersion, source: Path | str):
    """build_codec's codec with its weights not yet allocated (meta) until load_codec assigns the file's, so that
    no random initial weights are drawn (seconds at S1-mini size, every start-up); the tables its transformers
    compute rather than store (RoPE, causal mask) made on the CPU as their __init__ makes them, but for the causal
    transformers that make their masks where they run (_make_masks_on_device), whose stored mask stays empty."""
    from fish_speech.models.dac.modded_dac import Transformer, precompute_freqs_cis

    with torch.device("meta"):
        codec = build_codec(codec_cfg, version, source)
    for module in codec.modules():
        if isinstance(module, Transformer):
            config = module.config
            rope = config.pos_embed_type == "rope"
            module.freqs_cis = precompute_freqs_cis(config.block_size, config.head_dim, config.rope_base) if rope else None
            if not _makes_own_masks(module):  # (those get an empty one below) in place: tril's copy doubles the time
                module.causal_mask = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril_()
    _make_masks_on_device(codec)
    return codec


def _fold_weight_norm(codec: torch.nn.Module) -> None:
    """Each weight-normed layer's weight computed once and kept as a plain weight: the codec recomputes
    g * v / |v| on every call otherwise, which gives the same values. The codec is only ever used for
    inference (nothing saves its state dict, whose keys this changes)."""
    from torch.nn.utils import parametrize

    for module in codec.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def snake(x: torch.Tensor, alpha: torch.Tensor, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """dac's Snake1d formula (dac.nn.layers.snake), op for op, in plain torch ops; with pad[0] zeros before and pad[1]
    after along the last dimension."""
    out = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    return torch.nn.functional.pad(out, pad) if pad != (0, 0) else out


class InPlaceSnake(torch.nn.Module):
    """dac's Snake1d activation, x + sin(alpha * x)^2 / alpha, computed in one temporary. The library's
    TorchScript version allocates a tensor per op wherever TorchScript doesn't fuse it (CPU, MPS); this
    gives the same values bit for bit, with the codec's encode 1.14x and decode 1.4x faster on CPU."""

    def __init__(self, alpha: torch.nn.Parameter):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """The activation of x, with pad[0] zeros before and pad[1] after along the last dimension. Where autograd
        records, the library's formula in torch ops (in-place ops into a buffer are not differentiable)."""
        if torch.is_grad_enabled():
            return snake(x, self.alpha, pad)
        out = x.new_empty(*x.shape[:-1], pad[0] + x.shape[-1] + pad[1])
        out[..., : pad[0]].zero_()
        out[..., pad[0] + x.shape[-1] :].zero_()
        body = out[..., pad[0] : pad[0] + x.shape[-1]]  # all of out where nothing is padded
        torch.mul(x, self.alpha, out=body).sin_().square_().mul_((self.alpha + 1e-9).reciprocal()).add_(x)
        return out


class FusedSnake(torch.nn.Module):
    """dac's Snake1d activation on CUDA as one Triton kernel (fused_snake): it reads the feature map once and
    writes it once, where the library's runs an elementwise kernel per op wherever TorchScript doesn't fuse
    them. Where autograd records, or torch.compile traces (which fuses the formula itself), it computes the
    library's formula in torch ops."""

    def __init__(self, alpha: torch.nn.Parameter):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """The activation of x, with pad[0] zeros before and pad[1] after along the last dimension."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return snake(x, self.alpha, pad)
        return fused_snake(x, self.alpha, pad)


SNAKE_BLOCK = 1024  # elements of one (batch, channel) row per Triton program
MAX_GRID_ROWS = 65535  # CUDA's limit on a grid's second dimension


@functools.cache
def _bias_snake_residual_kernel():
    """The codec's elementwise Triton kernel, built on first use: Triton is imported only where a FusedSnake runs.
    Per (batch, channel) row: the channel's bias added (HAS_BIAS), the Snake activation (SNAKE), the residual added
    (HAS_RESIDUAL), written `left` columns into an output row of `out_length` whose other columns are zeros."""
    import triton
    import triton.language as tl

    @triton.jit
    def bias_snake_residual_kernel(x_ptr, bias_ptr, alpha_ptr, residual_ptr, out_ptr, first_row, channels, length, left,
                                   out_length, HAS_BIAS: tl.constexpr, SNAKE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                   BLOCK: tl.constexpr):
        row = tl.program_id(1)
        channel = (first_row + row) % channels
        columns = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # of the output row
        sources = columns - left
        inside = (sources >= 0) & (sources < length)
        offsets = row.to(tl.int64) * length + sources
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        if HAS_BIAS:
            x = tl.where(inside, x + tl.load(bias_ptr + channel), 0.0)  # the padding stays 0
        if SNAKE:  # 0 (the padding) stays 0
            alpha = tl.load(alpha_ptr + channel)
            sine = tl.sin(alpha * x)  # libdevice's sinf on NVIDIA, as torch's
            # div_rn: IEEE division, as torch's reciprocal (Triton's `/` is approximate)
            x = x + tl.div_rn(1.0, alpha + 1e-9) * (sine * sine)
        if HAS_RESIDUAL:
            x = tl.load(residual_ptr + offsets, mask=inside, other=0.0) + x
        tl.store(out_ptr + row.to(tl.int64) * out_length + columns, x, mask=columns < out_length)

    return bias_snake_residual_kernel


def _run_bias_snake_residual(x: torch.Tensor, pad: tuple[int, int] = (0, 0), bias=None, alpha=None,
                             residual=None) -> torch.Tensor:
    """_bias_snake_residual_kernel over x (batch, channels, length); bias and alpha hold a value per channel (or are
    None: left out), residual is x's shape (or None)."""
    batch, channels, length = x.shape
    rows, out_length = batch * channels, pad[0] + length + pad[1]
    out = x.new_empty(batch, channels, out_length)
    flat_x, flat_out = x.contiguous().view(rows, length), out.view(rows, out_length)
    flags = {"HAS_BIAS": bias is not None, "SNAKE": alpha is not None, "HAS_RESIDUAL": residual is not None}
    # what a flag leaves out is never read: x stands in for it
    bias, alpha = (t.contiguous() if t is not None else x for t in (bias, alpha))
    flat_residual = residual.contiguous().view(rows, length) if residual is not None else flat_x
    for first in range(0, rows, MAX_GRID_ROWS):
        count = min(MAX_GRID_ROWS, rows - first)
        grid = ((out_length + SNAKE_BLOCK - 1) // SNAKE_BLOCK, count)
        _bias_snake_residual_kernel()[grid](flat_x[first:], bias, alpha, flat_residual[first:], flat_out[first:], first, channels,
                              length, pad[0], out_length, **flags, BLOCK=SNAKE_BLOCK, enable_fp_fusion=False)
    return out


def fused_snake(x: torch.Tensor, alpha: torch.Tensor, pad: tuple[int, int] = (0, 0), bias=None) -> torch.Tensor:
    """snake(x + bias, alpha) (bias a value per channel, or none) for x of shape (batch, channels, length) and alpha of
    shape (1, channels, 1), in one pass, with pad[0] zeros before and pad[1] after along the last dimension: op for op
    as the library's formula, each rounded alone (no fused multiply-add), so equal to it within fp32 rounding (Triton
    flushes denormals to zero)."""
    return _run_bias_snake_residual(x, pad, bias=bias, alpha=alpha)


def fused_bias_residual(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + (x + bias) in one pass, for x and residual of shape (batch, channels, length) and a bias per channel."""
    return _run_bias_snake_residual(x, bias=bias, residual=residual)


@functools.cache
def fused_snake_works(device: torch.device) -> bool:
    """Whether fused_snake runs on `device` and gives snake()'s values there (checked once per device). It
    needs Triton, a C compiler for Triton's launcher, and a GPU that Triton supports; where any is missing,
    the codec keeps the library's activation."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = (4 * torch.randn(2, 3, 5000, generator=generator)).to(device)
        alpha = (0.5 + torch.rand(1, 3, 1, generator=generator)).to(device)
        bias, residual = alpha.flatten() - 1, torch.randn(x.shape, generator=generator).to(device)
        with torch.inference_mode():  # each kind of call a FusedResidualUnit makes
            torch.testing.assert_close(fused_snake(x, alpha, (7, 2)), snake(x, alpha, (7, 2)))
            torch.testing.assert_close(fused_snake(x, alpha, (7, 0), bias), snake(x + bias[:, None], alpha, (7, 0)))
            torch.testing.assert_close(fused_bias_residual(x, bias, residual), residual + (x + bias[:, None]))
    except Exception as e:  # ImportError, Triton's compile and launch errors, a wrong value: all mean "don't use it"
        logger.warning(f"the codec keeps the library's Snake activation on {device}: the fused one failed its check "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return False
    return True


class SnakeThenCausalConv(torch.nn.Module):
    """A Snake activation (FusedSnake or InPlaceSnake) and the causal convolution after it, as one step: the
    activation writes its output into the zero-padded buffer the convolution reads. fish-speech's CausalConvNet
    pads its input itself, a copy of the whole feature map (at the full sample rate, the largest the codec makes),
    also where it adds no padding. Same values: the convolution reads the same input."""

    def __init__(self, snake: torch.nn.Module, conv: torch.nn.Module):
        super().__init__()
        self.snake, self.conv = snake, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.conv(self.snake(x, _causal_padding(self.conv, x)))


class FusedResidualUnit(torch.nn.Module):
    """fish-speech's causal ResidualUnit (x + conv(snake(conv(snake(x))))) with FusedSnakes, in three passes over the
    feature map besides the convolutions: each convolution's bias is added by the kernel after it (the next Snake, or
    the residual's sum), where PyTorch's cuDNN convolution adds it in a pass of its own. Same operations, each
    rounded as before. Where autograd records or torch.compile traces, the unit's own forward."""

    def __init__(self, unit: torch.nn.Module):
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.unit(x)
        first, _, second, _ = self.unit.block
        x = x.contiguous()  # once: the first Snake and the residual read it
        y = _conv_without_bias(first.conv, first.snake(x, _causal_padding(first.conv, x)))
        y = fused_snake(y, second.snake.alpha, _causal_padding(second.conv, y), bias=first.conv.conv.bias)
        y = _conv_without_bias(second.conv, y)
        return fused_bias_residual(y, second.conv.conv.bias, x)  # a causal unit keeps the length: no crop


def _causal_padding(conv: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """The zeros fish-speech's CausalConvNet `conv` puts before and after x."""
    from fish_speech.models.dac.modded_dac import get_extra_padding_for_conv1d

    return conv.padding, get_extra_padding_for_conv1d(x, conv.kernel_size, conv.stride, conv.padding)


def _conv_without_bias(conv: torch.nn.Module, padded: torch.Tensor) -> torch.Tensor:
    """CausalConvNet `conv`'s convolution of its already padded input, without the bias."""
    layer = conv.conv
    return torch.nn.functional.conv1d(padded, layer.weight, None, layer.stride, 0, layer.dilation, layer.groups)


def _fuse_residual_units(codec: torch.nn.Module) -> None:
    """Each causal ResidualUnit whose Snakes are FusedSnakes (after _join_snakes_to_convs) runs as a FusedResidualUnit."""
    from fish_speech.models.dac.modded_dac import ResidualUnit

    for module in list(codec.modules()):
        for name, child in module.named_children():
            if isinstance(child, ResidualUnit) and child.causal and _fusable(child.block):
                setattr(module, name, FusedResidualUnit(child))


def _fusable(block: torch.nn.Sequential) -> bool:
    """Whether a ResidualUnit's block is two FusedSnakes, each joined to a causal convolution without padding of its own."""
    joined = [block[0], block[2]] if len(block) == 4 else []
    return bool(joined) and all(
        isinstance(step, SnakeThenCausalConv) and isinstance(step.snake, FusedSnake) and step.conv.conv.padding == (0,)
        for step in joined
    )


def _join_snakes_to_convs(codec: torch.nn.Module) -> None:
    """Each FusedSnake or InPlaceSnake followed by a CausalConvNet in a Sequential becomes a SnakeThenCausalConv, the
    convolution's place an Identity (the codec's state-dict keys change: nothing saves it)."""
    from fish_speech.models.dac.modded_dac import CausalConvNet

    for sequence in [m for m in codec.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(sequence) - 1):
            if isinstance(sequence[i], (FusedSnake, InPlaceSnake)) and isinstance(sequence[i + 1], CausalConvNet):
                sequence[i], sequence[i + 1] = SnakeThenCausalConv(sequence[i], sequence[i + 1]), torch.nn.Identity()


def _swap_snakes(codec: torch.nn.Module, cls) -> None:
    """Swaps every Snake1d for a `cls` holding the same alpha (state-dict keys unchanged)."""
    from dac.nn.layers import Snake1d

    for module in list(codec.modules()):
        for name, child in module.named_children():
            if isinstance(child, Snake1d):
                setattr(module, name, cls(child.alpha))


def causal_window_mask(length: int, window_size: int | None, device: torch.device) -> torch.Tensor:
    """The attention mask of fish-speech's causal WindowLimitedTransformer over `length` positions, (1, 1, length,
    length) bool, made on `device`: position i attends to i and the window_size - 1 before it (all before it
    without a window), as make_window_limited_mask and make_mask give it."""
    positions = torch.arange(length, device=device)
    rows, columns = positions[:, None], positions[None, :]
    window = window_size or length  # as fish-speech's: no window (None, or 0) reaches back to the start
    return ((columns <= rows) & (columns >= (rows - window + 1).clamp(min=0)))[None, None]


def _causal_transformer_forward(self, x: torch.Tensor, x_lens: torch.Tensor | None = None) -> torch.Tensor:
    """WindowLimitedTransformer.forward (fish-speech 0.1.0) of a causal transformer, op for op, with its mask made by
    causal_window_mask on x's device. fish-speech's builds it on the CPU (a float ones(n, n), tril, comparisons) at
    every call and copies it over with mask.to(x.device), a blocking copy: on CUDA the host waits there for all the
    work queued before it, and the GPU then idles while the host builds the next mask and queues the next kernels
    (a profiled extract run kept the GPU busy 73% of its time, most of the host's in those waits)."""
    from fish_speech.models.dac.modded_dac import Transformer

    if self.channels_first:
        x = x.transpose(1, 2)
    x = self.look_ahead_conv(self.input_proj(x))  # (B, T, D)
    input_pos = torch.arange(x.shape[1], device=x.device)
    x = Transformer.forward(self, x, input_pos, causal_window_mask(x.shape[1], self.window_size, x.device))
    x = self.output_proj(x)
    return x.transpose(1, 2) if self.channels_first else x


def _make_masks_on_device(codec: torch.nn.Module) -> None:
    """Gives every causal WindowLimitedTransformer _causal_transformer_forward (state-dict keys unchanged). A
    non-causal one keeps fish-speech's forward, which this doesn't reproduce (no release has one)."""
    for module in codec.modules():
        if _makes_own_masks(module):
            module.forward = types.MethodType(_causal_transformer_forward, module)
            # its stored mask (block_size squared: 268 MB for the release encoder's) is never read now
            module.causal_mask = torch.empty(0, 0, dtype=torch.bool)


def _makes_own_masks(module: torch.nn.Module) -> bool:
    """Whether _make_masks_on_device gives `module` _causal_transformer_forward: a causal WindowLimitedTransformer."""
    from fish_speech.models.dac.modded_dac import WindowLimitedTransformer

    return isinstance(module, WindowLimitedTransformer) and module.causal


def model_identity(model_dir: ModelDir, hash_file=file_hash) -> str:
    """A content hash of the base model's files: checkpoints record it, so LoRA weights are never
    applied to a base they were not trained on."""
    h = hashlib.sha256()
    files = [model_dir.path / "config.json", *model_dir.weight_files, *(model_dir.path / f for f in model_dir.version.tokenizer_files),
             model_dir.path / "codec.pth"]
    for file in files:
        h.update(file.name.encode() + hash_file(file).encode())
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
