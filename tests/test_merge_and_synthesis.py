import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fs_pipeline import PipelineError, checkpoints
from fs_pipeline.lora import adapted_layers
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import build_llm, load_llm, load_llm_weights, model_identity, open_model_dir
from fs_pipeline.project import Project
from fs_pipeline.prompt import prompt_values
from fs_pipeline.stages import extract, merge, pack, train
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from tests.conftest import REPO
from tests.test_modeling import upstream_decode

TRAIN = dict(max_steps=8, batch_size=4, learning_rate=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def trained(sample_dataset, tiny_model_path, cpu, tmp_path_factory):
    """A private base model copy and a project trained for a few steps on the sample."""
    root = tmp_path_factory.mktemp("merge")
    base = open_model_dir(shutil.copytree(tiny_model_path, root / "base"))
    data = shutil.copytree(sample_dataset, root / "data")
    project = Project("voice", root=root / "results")
    manifest = Manifest(project.manifest_path)
    extract.run(extract.ExtractSettings(data, num_workers=0), base, cpu, manifest)
    pack.run(pack.PackSettings(data), base, project, manifest)
    train.run(train.TrainSettings(checkpoint_every=4, **TRAIN), base, cpu, project)
    return root, base, project


@pytest.fixture(scope="module")
def trained_bf16(trained, cpu):
    """As with a real release: the base's weights stored in bf16, and a project trained on it (the same codes)."""
    root, base, _ = trained
    path = shutil.copytree(base.path, root / "base_bf16")
    state = torch.load(path / "model.pth", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, path / "model.pth")
    base = open_model_dir(path)
    project = Project("voice16", root=root / "results")
    manifest = Manifest(project.manifest_path)
    extract.run(extract.ExtractSettings(root / "data", num_workers=0), base, cpu, manifest)
    pack.run(pack.PackSettings(root / "data"), base, project, manifest)
    train.run(train.TrainSettings(checkpoint_every=8, **TRAIN), base, cpu, project)
    return base, project


@pytest.fixture
def merged(trained, cpu, tmp_path):
    root, base, project = trained
    result = merge.run(merge.MergeSettings(output_root=tmp_path / "checkpoints"), base, cpu, project)
    return result, base, project


def adapted_model(base, source):
    model = build_llm(base)
    load_llm_weights(model, base)
    model.float()  # as merge computes: the base loads in its stored dtype
    merge.load_adapter(model, source, model_identity(base))
    return model.eval()


def test_merged_logits_equal_base_plus_lora(merged, cpu):
    result, base, _ = merged
    assert not result.skipped and result.max_logit_diff < 1e-3
    reference_model = adapted_model(base, result.checkpoint)
    inputs, labels = merge.probe_batch(reference_model)
    merged_model = load_llm(open_model_dir(result.merged_dir), cpu)
    torch.testing.assert_close(
        merge.probe_logits(merged_model, inputs, labels), merge.probe_logits(reference_model, inputs, labels), rtol=1e-4, atol=1e-4
    )


def test_adapter_export_loads_on_the_base_with_the_same_logits(merged, cpu):
    result, base, _ = merged
    from_export = adapted_model(base, result.adapter_dir)
    from_checkpoint = adapted_model(base, result.checkpoint)
    inputs, labels = merge.probe_batch(from_export)
    assert torch.equal(merge.probe_logits(from_export, inputs, labels), merge.probe_logits(from_checkpoint, inputs, labels))


def test_default_checkpoint_is_the_best_and_manifest_says_so(merged):
    result, _, project = merged
    assert result.checkpoint == checkpoints.best(project.dir / "checkpoints").path
    manifest = json.loads((result.merged_dir / "manifest.json").read_text())
    assert manifest["base_model"]["license"].startswith("none (random weights")  # the tiny kit's model card, copied with the model
    assert (result.merged_dir / "README.md").read_text() == (Path(manifest["base_model"]["path"]) / "README.md").read_text()
    assert manifest["lora_config"] == {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all"}
    assert manifest["scale"] == 1.0 and manifest["inputs"]["scale"] == 1.0
    check = manifest["merge_check"]
    assert check["passed"] is True and check["max_logit_diff"] <= check["tolerance"]
    # stored as the base is, in fp32: the stored model is the checked one
    assert check["storage_dtype"] == "float32" and check["storage_cast_max_logit_diff"] == 0
    assert manifest["checkpoint"]["step"] in (4, 8) and len(manifest["data_sha256"]) == 64


def hidden_siblings(merged_dir):
    return sorted(p.name for p in merged_dir.parent.iterdir() if p.name.startswith(f".{merged_dir.name}."))


def merged_step(merged_dir):
    return json.loads((merged_dir / "manifest.json").read_text())["checkpoint"]["step"]


def other_step(result):
    return 4 if "8" in result.checkpoint.name else 8


def test_rerun_skips_and_a_new_checkpoint_replaces_the_directory(merged, cpu):
    result, base, project = merged
    root = result.merged_dir.parent
    assert result.merged_dir.is_dir() and not result.merged_dir.is_symlink()
    assert hidden_siblings(result.merged_dir) == []
    again = merge.run(merge.MergeSettings(output_root=root), base, cpu, project)
    assert again.skipped
    other = merge.run(merge.MergeSettings(output_root=root, checkpoint_step=other_step(result)), base, cpu, project)
    assert not other.skipped and merged_step(result.merged_dir) == other_step(result)
    assert not result.merged_dir.is_symlink() and hidden_siblings(result.merged_dir) == []  # the old model is deleted


def test_interrupted_merge_leaves_the_old_model(merged, cpu, monkeypatch):
    result, base, project = merged
    root = result.merged_dir.parent
    before = (result.merged_dir / "manifest.json").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_export_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        merge.run(merge.MergeSettings(output_root=root, checkpoint_step=other_step(result)), base, cpu, project)
    assert (result.merged_dir / "manifest.json").read_text() == before
    load_llm(open_model_dir(result.merged_dir), cpu)
    assert hidden_siblings(result.merged_dir) == []


def test_kill_between_the_two_renames_puts_the_old_model_back(merged, cpu, monkeypatch):
    result, base, project = merged
    root, final = result.merged_dir.parent, result.merged_dir
    before = (final / "manifest.json").read_text()
    real_replace = os.replace

    def killed_once_the_old_model_is_aside(source, target):
        real_replace(source, target)
        if os.fspath(source) == os.fspath(final):
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(merge.os, "replace", killed_once_the_old_model_is_aside)
        with pytest.raises(KeyboardInterrupt):
            merge.run(merge.MergeSettings(output_root=root, checkpoint_step=other_step(result)), base, cpu, project)
    assert not final.exists() and hidden_siblings(final) == [".voice-merged.old"]

    # The next merge reads <final>/manifest.json for its skip check: it first puts the old model back,
    # finds it current for its checkpoint, and keeps it.
    again = merge.run(merge.MergeSettings(output_root=root), base, cpu, project)
    assert again.skipped and (final / "manifest.json").read_text() == before
    assert hidden_siblings(final) == []
    load_llm(open_model_dir(final), cpu)


def test_leftovers_of_killed_merges_are_removed_by_the_next_one(merged, cpu):
    result, base, project = merged
    root = result.merged_dir.parent
    staging = root / ".voice-merged.new-k1lled"  # killed while building
    staging.mkdir()
    (staging / "model.pth").write_bytes(b"half")
    shutil.copytree(result.merged_dir, root / ".voice-merged.old")  # killed before deleting the old model
    another_project = root / ".voice-merged.x-merged.old"  # project "voice-merged.x": not ours to delete
    another_project.mkdir()
    again = merge.run(merge.MergeSettings(output_root=root), base, cpu, project)
    assert again.skipped and hidden_siblings(result.merged_dir) == [".voice-merged.x-merged.old"]


def test_the_old_symlink_layout_becomes_a_real_directory(merged, cpu):
    """Until issue 15, <project>-merged was a link to a hidden version beside it."""
    result, base, project = merged
    root, final = result.merged_dir.parent, result.merged_dir
    step = merged_step(final)
    version = root / ".voice-merged.a1b2c3d4"
    final.rename(version)
    final.symlink_to(version.name)
    again = merge.run(merge.MergeSettings(output_root=root), base, cpu, project)
    assert not again.skipped  # rebuilt once, as a directory
    assert final.is_dir() and not final.is_symlink() and hidden_siblings(final) == []
    assert merged_step(final) == step
    assert merge.run(merge.MergeSettings(output_root=root), base, cpu, project).skipped


def test_failed_merge_check_is_an_error(trained, cpu, tmp_path, monkeypatch):
    _, base, project = trained
    real = merge.merged_weights

    def noisy(model):
        state = real(model)
        state["layers.0.attention.wqkv.weight"] += 0.5
        return state

    monkeypatch.setattr(merge, "merged_weights", noisy)
    with pytest.raises(PipelineError, match=r"merge check failed: fp32 merged logits differ .*the merged model was not installed"):
        merge.run(merge.MergeSettings(output_root=tmp_path), base, cpu, project)
    assert not (tmp_path / "voice-merged").exists()


def named_adapted_layers(model) -> list[tuple[str, torch.nn.Module, str]]:
    """adapted_layers(model), each with its name as in the state dict."""
    names = {id(module): name for name, module in model.named_modules()}
    return [(f"{names[id(parent)]}.{attribute}".lstrip("."), parent, attribute) for parent, attribute in adapted_layers(model)]


@pytest.fixture(scope="module")
def layer_effects(trained_bf16):
    """Per adapted layer: how far leaving out its adapter alone moves the probe's logits (max |difference|);
    and the largest probe logit of base+LoRA."""
    base, project = trained_bf16
    model = adapted_model(base, checkpoints.latest(project.dir / "checkpoints").path)
    inputs, labels = merge.probe_batch(model)
    reference = merge.probe_logits(model, inputs, labels)
    effects = {}
    for name, parent, attribute in named_adapted_layers(model):
        lora_B = getattr(parent, attribute).lora_B
        trained_B = lora_B.detach().clone()
        with torch.no_grad():
            lora_B.zero_()
            effects[name] = (merge.probe_logits(model, inputs, labels) - reference).abs().max().item()
            lora_B.copy_(trained_B)
    return effects, reference.abs().max().item()


def test_tolerance_is_far_below_any_one_layers_adapter(layer_effects):
    effects, largest_logit = layer_effects
    tolerance = merge.TOLERANCE * max(1.0, largest_logit)
    weakest = min(effects, key=effects.get)
    assert effects[weakest] >= 100 * tolerance, f"{weakest}'s adapter moves the probe by {effects[weakest]:.3g}, tolerance {tolerance:.3g}"


def test_a_merge_without_one_layers_adapter_fails_and_installs_nothing(trained_bf16, layer_effects, cpu, tmp_path, monkeypatch):
    """The merge leaves out the adapter that moves the probe least. Before issue 16 this passed: the check
    compared the model as stored (bf16) within 3% of the largest logit."""
    base, project = trained_bf16
    effects, _ = layer_effects
    weakest = min(effects, key=effects.get)

    def all_but_the_weakest(model):
        return [(parent, attribute) for name, parent, attribute in named_adapted_layers(model) if name != weakest]

    monkeypatch.setattr(merge, "adapted_layers", all_but_the_weakest)
    message = r"^merge check failed: fp32 merged logits differ from base\+1·LoRA by .*the merged model was not installed"
    with pytest.raises(PipelineError, match=message):
        merge.run(merge.MergeSettings(output_root=tmp_path), base, cpu, project)
    assert list(tmp_path.iterdir()) == []


def test_bf16_rounding_is_recorded_apart_and_fails_nothing(trained_bf16, cpu, tmp_path):
    base, project = trained_bf16
    result = merge.run(merge.MergeSettings(output_root=tmp_path), base, cpu, project)
    check = json.loads((result.merged_dir / "manifest.json").read_text())["merge_check"]
    assert check["passed"] is True and check["storage_dtype"] == "bfloat16"
    assert check["max_logit_diff"] <= check["tolerance"] < check["storage_cast_max_logit_diff"]
    assert all(v.dtype == torch.bfloat16 for v in torch.load(result.merged_dir / "model.pth", weights_only=True).values())
    # The stored model against base+LoRA differs by the cast error, give or take the fp32 merge's own error.
    reference = adapted_model(base, result.checkpoint)
    inputs, labels = merge.probe_batch(reference)
    stored = merge.probe_logits(load_llm(open_model_dir(result.merged_dir), cpu), inputs, labels)
    stored_diff = (stored - merge.probe_logits(reference, inputs, labels)).abs().max().item()
    assert abs(stored_diff - check["storage_cast_max_logit_diff"]) <= check["max_logit_diff"]


def test_merged_dir_loads_in_fish_speech_with_our_logits(merged):
    """fish-speech 0.1.0's own loader and its own inference (KV caches, one position at a time) on the merged
    directory give base+LoRA's probe logits, within the merge check's tolerance."""
    from fish_speech.models.text2semantic.llama import DualARTransformer

    result, base, _ = merged
    upstream = DualARTransformer.from_pretrained(str(result.merged_dir), load_weights=True).eval()
    assert isinstance(upstream, DualARTransformer)
    sequence = prompt_values(upstream.tokenizer, merge.probe_turns(upstream), upstream.config.num_codebooks)
    with torch.inference_mode():
        token_logits, codebook_logits = upstream_decode(upstream, sequence)
    reference = adapted_model(base, result.checkpoint)
    inputs, labels = merge.probe_batch(reference)
    expected = merge.probe_logits(reference, inputs, labels)
    tolerance = merge.TOLERANCE * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(torch.cat([token_logits.flatten(), codebook_logits.flatten()]), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("scale", [0.0, -0.5, 2.5, float("nan"), float("inf")])
def test_merge_scale_out_of_range_is_one_clear_line(scale):
    with pytest.raises(PipelineError, match=r"^--merge-scale must be above 0 and at most 2 \(got [^)]+\): 1 merges the adapters as trained"):
        merge.check(merge.MergeSettings(scale=scale))


@pytest.mark.parametrize("scale", [0.01, 1.0, 2.0])
def test_merge_scale_in_range_passes_the_check(scale):
    merge.check(merge.MergeSettings(scale=scale))


def test_half_scale_merges_half_of_each_adapter(merged, cpu):
    result, base, project = merged
    root = result.merged_dir.parent
    full_merge = load_llm(open_model_dir(result.merged_dir), cpu)
    half = merge.run(merge.MergeSettings(output_root=root, scale=0.5), base, cpu, project)
    assert not half.skipped  # another scale is another merge
    manifest = json.loads((half.merged_dir / "manifest.json").read_text())
    assert manifest["scale"] == 0.5 and manifest["inputs"]["scale"] == 0.5 and manifest["merge_check"]["passed"] is True
    assert merge.run(merge.MergeSettings(output_root=root, scale=0.5), base, cpu, project).skipped

    # base + 0.5·LoRA without loralib's scaling: B·A·alpha/r is linear in B
    half_lora = adapted_model(base, result.checkpoint)
    with torch.no_grad():
        for name, parameter in half_lora.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.5)
    inputs, labels = merge.probe_batch(half_lora)
    logits = {name: merge.probe_logits(model, inputs, labels) for name, model in [
        ("base", load_llm(base, cpu)), ("half lora", half_lora), ("full merge", full_merge),
        ("half merge", load_llm(open_model_dir(half.merged_dir), cpu)), ("export", adapted_model(base, half.adapter_dir)),
    ]}
    tolerance = merge.TOLERANCE * max(1.0, logits["half lora"].abs().max().item())
    torch.testing.assert_close(logits["half merge"], logits["half lora"], rtol=0, atol=tolerance)
    gap = (logits["full merge"] - logits["base"]).abs().max()
    assert (logits["half merge"] - logits["base"]).abs().max() < gap and (logits["half merge"] - logits["full merge"]).abs().max() < gap
    assert torch.equal(logits["export"], merge.probe_logits(adapted_model(base, result.checkpoint), inputs, labels))  # the adapters as trained


@pytest.mark.parametrize("best_by, step", [("val_loss", 1), ("wer", 2), ("similarity", 3), ("combined", 2)])
def test_best_by_chooses_what_merge_folds(best_by, step, tmp_path):
    project = Project("scored", root=tmp_path)
    # combined = similarity - WER: 0.40, 0.70, 0.55
    for at, (val, wer, similarity) in {1: (1.0, 0.3, 0.70), 2: (1.2, 0.1, 0.80), 3: (1.1, 0.4, 0.95)}.items():
        checkpoints.save(project.dir / "checkpoints", {"step": at, "metrics": {"val_loss": val, "wer": wer, "similarity": similarity}})
    assert merge.choose_checkpoint(project, merge.MergeSettings(best_by=best_by)).name == checkpoints.checkpoint_name(step)


def test_best_by_choices_are_the_same_everywhere():
    from tests.conftest import load_script

    option = next(p for p in load_script("finetune_tts").main.params if p.name == "best_by")
    assert list(option.type.choices) == list(checkpoints.BEST_BY)
    with pytest.raises(PipelineError, match=r"^unknown --best-by 'loss': use one of val_loss, wer, similarity, combined$"):
        merge.check(merge.MergeSettings(best_by="loss"))


def test_missing_checkpoint_step(trained, cpu, tmp_path):
    _, base, project = trained
    with pytest.raises(PipelineError, match=r"no checkpoint for step 3 in .* \(steps there: 4, 8\)"):
        merge.run(merge.MergeSettings(output_root=tmp_path, checkpoint_step=3), base, cpu, project)


def test_synthesis_wav_length_matches_frames(merged, cpu, tmp_path):
    result, _, _ = merged
    model_dir = open_model_dir(result.merged_dir)
    speech = Synthesizer(model_dir, cpu).speak("Hello there.", tmp_path / "out.wav", SynthesisSettings(max_new_frames=40))
    info = sf.info(speech.path)
    assert 0 < speech.frames <= 40
    assert info.samplerate == model_dir.version.sample_rate and info.frames == speech.frames * 2048


def test_sampling_is_seeded_in_range_and_leaves_the_global_rng_alone(merged, cpu):
    result, _, _ = merged
    model_dir = open_model_dir(result.merged_dir)
    synthesizer = Synthesizer(model_dir, cpu)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = synthesizer.generate("Hello there.", SynthesisSettings(max_new_frames=30, seed=5))
    assert torch.equal(torch.get_rng_state(), before)
    again = synthesizer.generate("Hello there.", SynthesisSettings(max_new_frames=30, seed=5))
    other = synthesizer.generate("Hello there.", SynthesisSettings(max_new_frames=30, seed=6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape[0] == model_dir.num_codebooks and first.shape[1] > 0
    assert first[0].max() < 64 and first[1:].max() < synthesizer.residual_size and first.min() >= 0


def test_synthesis_reads_its_kv_caches_grouped_with_fish_speechs_codes(tiny_model_dir, cpu):
    """The Synthesizer's slow attention reads the grouped keys and values of its caches (modeling.attend_cached); with
    fish-speech's own Attention.forward put back, which repeats them to every head, every sampled code is the same."""
    synthesizer = Synthesizer(tiny_model_dir, cpu)
    assert all("forward" in vars(block.attention) for block in synthesizer.model.layers)
    settings = SynthesisSettings(max_new_frames=60, seed=3)
    texts = ["Hello there.", "The weather is calm today, and the sea is flat."]
    grouped = [synthesizer.generate(text, settings) for text in texts]
    for block in synthesizer.model.layers:
        del block.attention.forward
    assert sum(codes.shape[1] for codes in grouped) > 40
    for text, codes in zip(texts, grouped):
        assert torch.equal(synthesizer.generate(text, settings), codes)


def run_tts(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "cli_tts.py"), *args], cwd=cwd, capture_output=True, text=True)


def copy_tree(source, target):
    shutil.copytree(source, target)


def copy_cp_r(source, target):
    # Unlike copytree, which follows a link given as its source, cp -r copies the link itself.
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)


def copy_tar(source, target):
    archive = target.parent / "model.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname=target.name)
    with tarfile.open(archive) as tar:
        tar.extractall(target.parent, filter="data")


@pytest.mark.parametrize("copy", [copy_tree, copy_cp_r, copy_tar], ids=["copytree", "cp -r", "tar"])
def test_merged_dir_is_self_contained(copy, merged, tmp_path):
    result, base, _ = merged
    alone = tmp_path / "alone"
    alone.mkdir()
    copy(result.merged_dir, alone / "model")
    hidden_base = base.path.with_name("base_hidden")
    base.path.rename(hidden_base)  # the base is gone while cli_tts runs
    try:
        done = run_tts(["Hello from the merged model.", "--model-path", "model", "-o", "out.wav", "--max-new-frames", "30", "--device", "cpu"], alone)
    finally:
        hidden_base.rename(base.path)
    assert done.returncode == 0, done.stderr
    assert "Wrote out.wav" in done.stdout and "× realtime" in done.stdout
    assert sf.info(alone / "out.wav").frames > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["Hello", "--model-path", "nowhere"], "error: model directory not found: nowhere"),
        (["  ", "--model-path", "."], "error: no text to speak"),
        (["Hello", "--model-path", ".", "--device", "tpu"], "error: unknown device 'tpu': use one of cuda, mps, cpu"),
        (["--text-file", "missing.txt", "--model-path", "."], "error: text file not found: missing.txt"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    done = run_tts(args, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.strip().startswith(message)


def test_tied_embeddings_merge_exactly(sample_dataset, tiny_model_path, cpu, tmp_path):
    """With tied embeddings (as in the S1-mini release) the merged model still computes what base+LoRA did."""
    base_path = shutil.copytree(tiny_model_path, tmp_path / "tied")
    config = json.loads((base_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (base_path / "config.json").write_text(json.dumps(config))
    base = open_model_dir(base_path)
    data = shutil.copytree(sample_dataset, tmp_path / "data")
    project = Project("tied", root=tmp_path / "results")
    manifest = Manifest(project.manifest_path)
    extract.run(extract.ExtractSettings(data, num_workers=0), base, cpu, manifest)
    pack.run(pack.PackSettings(data), base, project, manifest)
    train.run(train.TrainSettings(max_steps=3, checkpoint_every=3, learning_rate=1e-2, warmup_steps=1), base, cpu, project)
    result = merge.run(merge.MergeSettings(output_root=tmp_path / "checkpoints"), base, cpu, project)
    assert result.max_logit_diff < 1e-3
