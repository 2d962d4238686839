"""Our forward pass against fish-speech's own inference code, and the shared prompt format."""

import torch

from fs_pipeline.modeling import fast_forward, slow_forward
from fs_pipeline.models import load_llm
from fs_pipeline.prompt import prompt_values, training_example


def codes_for(model, frames: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 32, (model.config.num_codebooks, frames))


def test_slow_forward_matches_fish_speech_inference(tiny_model_dir, cpu):
    model = load_llm(tiny_model_dir, cpu)
    inputs, _ = training_example(model.tokenizer, [("Hello there.", codes_for(model, 6))], model.config.num_codebooks)
    with torch.inference_mode():
        ours, hidden = slow_forward(model, inputs[None])
        theirs = model.forward_generate(inputs[None])  # no KV cache: the whole prompt, last position out
    torch.testing.assert_close(ours[:, -1:], theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[:, -1:], theirs.hidden_states, rtol=1e-5, atol=1e-5)


def test_fast_forward_matches_fish_speech_inference(tiny_model_dir, cpu):
    model = load_llm(tiny_model_dir, cpu)
    n = model.config.num_codebooks
    torch.manual_seed(1)
    hidden = torch.randn(1, model.config.dim)
    codes = torch.randint(0, 32, (1, n))
    with torch.inference_mode():
        ours = fast_forward(model, hidden, codes)[0]
        model.setup_caches(max_batch_size=1, max_seq_len=16, dtype=torch.float32)
        steps = [hidden] + [model.fast_embeddings(codes[:, i]) for i in range(n - 1)]
        theirs = [model.forward_generate_fast(x, torch.tensor([i]))[0, 0] for i, x in enumerate(steps)]
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=1e-5, atol=1e-5)


def test_synthesis_prompt_is_the_training_sequence_up_to_the_audio(tiny_model_dir, cpu):
    model = load_llm(tiny_model_dir, cpu)
    text, n = "The weather is calm.", model.config.num_codebooks
    codes = codes_for(model, 5)
    inputs, labels = training_example(model.tokenizer, [(text, codes)], n)
    prompt = prompt_values(model.tokenizer, [(text, None)], n)
    assert torch.equal(inputs[:, : prompt.shape[1]], prompt)
    # right after the prompt come the frames: first semantic token, with its codes
    assert inputs[0, prompt.shape[1]] == model.tokenizer.semantic_begin_id + codes[0, 0]
    assert torch.equal(inputs[1:, prompt.shape[1]], codes[:, 0])
    # loss only on the frames and the closing <|im_end|>
    assert (labels[0] != -100).sum() == codes.shape[1] + 1
    assert labels[0, -1] == model.tokenizer.get_token_id("<|im_end|>")
