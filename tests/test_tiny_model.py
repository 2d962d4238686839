import hashlib

from fs_pipeline.models import LLM_WEIGHT_FILES, REQUIRED_FILES, open_model_dir
from fs_pipeline.tiny_model import write_tiny_model


def digests(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_release_layout_small_and_valid(tiny_model_path):
    names = {f.name for f in tiny_model_path.iterdir()}
    assert set(REQUIRED_FILES) <= names and LLM_WEIGHT_FILES[0] in names
    assert sum(f.stat().st_size for f in tiny_model_path.iterdir()) < 10_000_000
    assert open_model_dir(tiny_model_path).num_codebooks == 4


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_path, tmp_path):
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert digests(again) == digests(tiny_model_path)
    assert digests(other)["model.pth"] != digests(tiny_model_path)["model.pth"]
    assert digests(other)["tokenizer.tiktoken"] == digests(tiny_model_path)["tokenizer.tiktoken"]


def test_tokenizer_round_trips_text(tiny_model_dir):
    from fish_speech.tokenizer import FishTokenizer

    tokenizer = FishTokenizer.from_pretrained(str(tiny_model_dir.path))
    text = "The weather is calm, über-nice!"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.semantic_id_to_token_id) == tiny_model_dir.config["codebook_size"]
