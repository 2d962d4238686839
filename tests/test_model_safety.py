"""A model folder's codec_config.yaml is untrusted input (issue 15): it may build the version's codec classes
and nothing else. Each payload here writes a marker file if anything runs it."""

import dataclasses
import re

import click
import pytest
import torch
import yaml
from click.testing import CliRunner
from omegaconf import OmegaConf

from fs_pipeline import PipelineError
from fs_pipeline.models import CODEC_CONFIG_FILE, build_codec, get_version, load_codec, open_model_dir, package_codec_config
from fs_pipeline.tiny_model import codec_config
from tests.conftest import load_script

TINY_WINDOW_TRANSFORMER = {  # a valid, allow-listed module with room for a payload in its `config`
    "_target_": "fish_speech.models.dac.modded_dac.WindowLimitedTransformer",
    "input_dim": 64,
}


class TouchOnUnpickle:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def torch_load_of_a_pickle(marker):
    pickle_file = marker.with_name("weights.pt")
    torch.save(TouchOnUnpickle(marker), pickle_file)
    return {"_target_": "torch.load", "f": str(pickle_file), "weights_only": False}


def os_system(marker):
    return {"_target_": "os.system", "command": f"touch {marker}"}


# id -> (edit of the tiny kit's config that plants the payload, the key the error must name)
PAYLOADS = {
    "torch.load": (
        lambda cfg, m: cfg["quantizer"].update(pre_module=torch_load_of_a_pickle(m)), "quantizer.pre_module._target_"
    ),
    "os.system": (lambda cfg, m: cfg["quantizer"].update(pre_module=os_system(m)), "quantizer.pre_module._target_"),
    "subprocess.run": (
        lambda cfg, m: cfg["quantizer"].update(post_module={"_target_": "subprocess.run", "args": ["touch", str(m)]}),
        "quantizer.post_module._target_",
    ),
    "builtins.exec via _args_": (
        lambda cfg, m: cfg["quantizer"].update(
            pre_module={"_target_": "builtins.exec", "_args_": [f"open({str(m)!r}, 'w').close()"]}
        ),
        "quantizer.pre_module._target_",
    ),
    "the whole file": (lambda cfg, m: (cfg.clear(), cfg.update(os_system(m))), "_target_"),
    "nested in a valid module": (
        lambda cfg, m: cfg["quantizer"].update(pre_module={**TINY_WINDOW_TRANSFORMER, "config": os_system(m)}),
        "quantizer.pre_module.config._target_",
    ),
    "inside a list": (lambda cfg, m: cfg.update(encoder_rates=[2, 4, os_system(m), 8]), "encoder_rates[2]._target_"),
    "_target_ by interpolation": (
        lambda cfg, m: (
            cfg.update(name="os.system"), cfg["quantizer"].update(pre_module={**os_system(m), "_target_": "${name}"})
        ),
        "quantizer.pre_module._target_",
    ),
    "_args_ on an allowed class": (lambda cfg, m: cfg.update(_args_=[f"touch {m}"]), "_args_"),
    "_recursive_": (lambda cfg, m: cfg.update(_recursive_=False), "_recursive_"),
    "_convert_": (lambda cfg, m: cfg["quantizer"].update(_convert_="all"), "quantizer._convert_"),
    "_partial_ on the codec itself": (lambda cfg, m: cfg.update(_partial_=True), "_partial_"),
}


def plant(model, payload, marker):
    """Rewrites the model's codec_config.yaml with the payload planted; returns the file."""
    file = model / CODEC_CONFIG_FILE
    cfg = yaml.safe_load(file.read_text())
    PAYLOADS[payload][0](cfg, marker)
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return file


def refusal(file, key):
    return re.escape(f"{file}: {key} ")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_open_model_dir_refuses_the_payload(tiny_model_copy, tmp_path, payload):
    marker = tmp_path / "marker"
    file = plant(tiny_model_copy, payload, marker)
    with pytest.raises(PipelineError, match=refusal(file, PAYLOADS[payload][1])):
        open_model_dir(tiny_model_copy)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_load_codec_refuses_a_config_that_skipped_open_model_dir(tiny_model_copy, tmp_path, cpu, payload):
    marker = tmp_path / "marker"
    model_dir = open_model_dir(tiny_model_copy)
    file = plant(tiny_model_copy, payload, marker)
    unchecked = dataclasses.replace(model_dir, codec_cfg=OmegaConf.load(file))
    with pytest.raises(PipelineError, match=refusal(file, PAYLOADS[payload][1])):
        load_codec(unchecked, cpu)
    assert not marker.exists()


@pytest.fixture
def eval_resolver():
    """The resolver fish_speech.models.dac.inference registers on import: any process that imported it
    would evaluate `${eval:...}` in a config."""
    OmegaConf.register_new_resolver("eval", eval)
    yield
    OmegaConf.clear_resolver("eval")


@pytest.mark.parametrize(
    "escape, refused", [("", "calls the resolver 'eval'"), ("\\", "which would be resolved again")], ids=["called", "escaped"]
)
def test_resolvers_are_never_called(tiny_model_copy, tmp_path, eval_resolver, escape, refused):
    """Called directly, or escaped (\\${...}) so that resolving the config would bring the call to life."""
    marker = tmp_path / "marker"
    file = tiny_model_copy / CODEC_CONFIG_FILE
    cfg = yaml.safe_load(file.read_text())
    cfg["sample_rate"] = escape + f"""${{eval:'open("{marker}", "w").close() or 44100'}}"""
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(PipelineError, match=refusal(file, "sample_rate") + f".*{re.escape(refused)}"):
        open_model_dir(tiny_model_copy)
    with pytest.raises(PipelineError, match=refusal("the codec config", "sample_rate")):
        build_codec(OmegaConf.load(file))
    assert not marker.exists()


def test_references_between_keys_still_work(tiny_model_copy, cpu):
    file = tiny_model_copy / CODEC_CONFIG_FILE
    cfg = yaml.safe_load(file.read_text())
    assert cfg["quantizer"]["codebook_dim"] == cfg["encoder_rates"][2]
    cfg["quantizer"]["codebook_dim"] = "${encoder_rates[2]}"
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    model_dir = open_model_dir(tiny_model_copy)
    assert model_dir.codec_cfg.quantizer.codebook_dim == 8
    load_codec(model_dir, cpu)  # codec.pth fits what the reference resolved to


def test_a_key_the_class_does_not_take_is_named(tiny_model_copy, cpu):
    file = tiny_model_copy / CODEC_CONFIG_FILE
    cfg = yaml.safe_load(file.read_text())
    cfg["quantizer"]["bogus"] = 1
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(PipelineError, match=refusal(file, "quantizer._target_") + ".*unexpected keyword argument 'bogus'"):
        load_codec(open_model_dir(tiny_model_copy), cpu)


def test_python_yaml_tags_are_not_constructed(tiny_model_copy, tmp_path):
    marker = tmp_path / "marker"
    file = tiny_model_copy / CODEC_CONFIG_FILE
    file.write_text(file.read_text() + f"payload: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(PipelineError, match=re.escape(f"{file} is not valid YAML")):
        open_model_dir(tiny_model_copy)
    assert not marker.exists()


def test_check_model_cli_refuses_with_one_red_line(tiny_model_copy, tmp_path):
    marker = tmp_path / "marker"
    file = plant(tiny_model_copy, "torch.load", marker)
    args = ["--check-model", "--pretrained-ckpt-path", str(tiny_model_copy), "--device", "cpu"]
    result = CliRunner().invoke(load_script("finetune_tts").main, args, color=True)
    assert result.exit_code == 1
    assert result.output.startswith(click.style("error: ", fg="red", reset=False))
    lines = click.unstyle(result.output).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {file}: quantizer.pre_module._target_ 'torch.load' ")
    assert not marker.exists()


def targets(node) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(targets, node))
    if isinstance(node, dict):
        own = {node["_target_"]} if "_target_" in node else set()
        return own.union(*map(targets, node.values()))
    return set()


def test_allowlist_is_what_the_versions_configs_use():
    version = get_version("s1-mini")
    package = targets(OmegaConf.to_container(OmegaConf.load(package_codec_config(version))))
    assert version.codec_classes == package
    assert targets(codec_config(version.sample_rate, semantic=64, residual=3, residual_size=32)) <= version.codec_classes


def small_package_config():
    """The package's s1-mini codec config with every size cut down, so that building it twice is quick."""
    cfg = OmegaConf.load(package_codec_config(get_version("s1-mini")))
    cfg.encoder_dim, cfg.decoder_dim = 4, 128
    cfg.encoder_transformer_layers, cfg.decoder_transformer_layers = [0, 0, 0, 1], [1, 0, 0, 0]
    cfg.quantizer.input_dim = cfg.quantizer.post_module.input_dim = cfg.quantizer.pre_module.input_dim = 64
    for transformer in (cfg.quantizer.post_module.config, cfg.quantizer.pre_module.config):
        transformer.update(n_layer=1, n_head=4, dim=64, intermediate_size=128, head_dim=16, block_size=256)
    cfg.transformer_general_config.update(head_dim=16, block_size=256)
    return cfg


@pytest.mark.parametrize("config", ["tiny kit", "package, scaled down"])
def test_builds_what_hydra_builds_from_the_trusted_configs(config):
    from hydra.utils import instantiate

    if config == "tiny kit":
        cfg = OmegaConf.create(codec_config(44100, semantic=64, residual=3, residual_size=32))
    else:
        cfg = small_package_config()
    torch.manual_seed(0)
    ours = build_codec(cfg)
    torch.manual_seed(0)
    reference = instantiate(cfg)
    assert repr(ours) == repr(reference)
    expected = reference.state_dict()
    assert ours.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in ours.state_dict().items())
