"""Our sampling against fish-speech 0.1.0's own code (fish_speech/models/text2semantic/inference.py): the same
logits, previous tokens and random draws give the same probabilities and the same tokens, and the window of
previous frames is the one its decode_n_tokens forms."""

from types import SimpleNamespace

import pytest
import torch
from fish_speech.models.text2semantic.inference import decode_n_tokens, logits_to_probs, multinomial_sample_one_no_sync

from fs_pipeline.stages.synthesize import (REPETITION_WINDOW, SynthesisSettings, _beyond_top_p, _beyond_top_p_by_pairs, _draw, _probabilities,
                                          _remember)

TEMPERATURES = [0.0, 1e-6, 1e-5, 0.1, 0.7, 0.8, 1.0, 1.5, 1.99]
TOP_PS = [1e-6, 0.1, 0.5, 0.8, 0.95, 0.999, 1.0]
PENALTIES = [1.0, 1.1, 1.5, 0.5, 1.99]


def random_logits(case: int, generator: torch.Generator) -> torch.Tensor:
    size = int(torch.randint(1, 70, (1,), generator=generator))
    kind = case % 4
    if kind == 0:  # spread from nearly flat to nearly one-hot
        return torch.randn(size, generator=generator) * [0.05, 1.0, 5.0, 40.0][case // 4 % 4]
    if kind == 1:  # few distinct values: ties inside and across the top-p boundary
        return torch.randint(-3, 4, (size,), generator=generator).float()
    if kind == 2:  # all tied
        return torch.full((size,), float(torch.randint(-2, 3, (1,), generator=generator)))
    logits = torch.randn(size, generator=generator) * 3  # some codes impossible
    logits[torch.rand(size, generator=generator) < 0.3] = -float("inf")
    logits[int(torch.randint(0, size, (1,), generator=generator))] = 0.5
    return logits


def upstream(logits, previous, temperature, top_p, penalty, seed):
    # As fish-speech's generate_long passes them: float32 tensors.
    probs = logits_to_probs(logits.clone(), temperature=torch.tensor(temperature), top_p=torch.tensor(top_p),
                            repetition_penalty=torch.tensor(penalty), previous_tokens=previous)
    torch.manual_seed(seed)
    return probs, int(multinomial_sample_one_no_sync(probs))


def ours(logits, previous, temperature, top_p, penalty, seed):
    probs = _probabilities(logits.clone(), previous, torch.tensor(penalty), torch.tensor(temperature), torch.tensor(top_p))
    torch.manual_seed(seed)
    return probs, int(_draw(probs))


def test_same_probabilities_and_tokens_as_upstream():
    generator = torch.Generator().manual_seed(0)
    for case in range(800):
        logits = random_logits(case, generator)
        count = int(torch.randint(0, 24, (1,), generator=generator))
        previous = None if case % 7 == 0 else torch.randint(0, len(logits), (count,), generator=generator)  # repeats too
        pick = torch.randint(0, 1000, (3,), generator=generator)
        settings = (TEMPERATURES[pick[0] % len(TEMPERATURES)], TOP_PS[pick[1] % len(TOP_PS)], PENALTIES[pick[2] % len(PENALTIES)])
        expected_probs, expected_token = upstream(logits, previous, *settings, seed=case)
        probs, token = ours(logits, previous, *settings, seed=case)
        assert torch.equal(probs, expected_probs), (case, logits, previous, settings)
        assert token == expected_token, (case, logits, previous, settings)


def test_top_p_by_pairs_removes_what_a_stable_sort_removes():
    """Compiled decoding's top-p (a sum over pairs, no sort) against the sorted one with ties in index order (a stable
    sort), on every kind of random logits, ties included: the same logits stay, except where a token's running sum
    lies within rounding of top_p (the two sum in other orders: with top_p 1.0 the sorted sum of a tail token can
    come to 1.0000001 and remove it). Against fish-speech's own sort, which orders ties as it happens to: the same
    number of tokens stay."""
    generator = torch.Generator().manual_seed(1)
    compared = exempt = 0
    for case in range(800):
        logits = random_logits(case, generator)
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        running = torch.empty_like(logits).scatter_(0, order, torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1))
        for top_p in TOP_PS:
            stable = running > top_p
            stable[order[0]] = False
            got = _beyond_top_p_by_pairs(logits, torch.tensor(top_p))
            clear = (running - top_p).abs() > 1e-6
            assert torch.equal(got[clear], stable[clear]), (case, logits, top_p)
            if clear.all():
                assert int(got.sum()) == int(_beyond_top_p(logits, torch.tensor(top_p)).sum()), (case, logits, top_p)
            compared, exempt = compared + len(logits), exempt + int((~clear).sum())
    assert exempt < 0.1 * compared  # 5% here: in the nearly one-hot cases whole tails lie within 1e-6 of top_p 1.0


def test_top_p_comes_before_the_temperature():
    """Top-p on the logits as they are: code 0 alone has probability 0.38, above top-p 0.35, so it is the
    nucleus. Tempered first (1.9), code 0 would have 0.17 and the nucleus three codes."""
    logits = torch.tensor([3.0, 2.5] + [0.0] * 20)
    probs, _ = ours(logits, None, temperature=1.9, top_p=0.35, penalty=1.0, seed=0)
    assert probs.tolist() == [1.0] + [0.0] * 21
    assert torch.equal(probs, upstream(logits, None, 1.9, 0.35, 1.0, seed=0)[0])


def test_the_penalty_comes_before_top_p():
    """Code 0 alone is the nucleus until it is penalised: then code 1 joins it."""
    logits = torch.tensor([4.0, 1.0, 0.5])  # probabilities 0.93, 0.05, 0.03; penalised 0.77, 0.14, 0.09
    alone, _ = ours(logits, None, temperature=1.0, top_p=0.95, penalty=1.5, seed=0)
    penalised, _ = ours(logits, torch.tensor([0]), temperature=1.0, top_p=0.95, penalty=1.5, seed=0)
    assert alone.tolist() == [1.0, 0.0, 0.0]
    assert penalised[0] > 0 and penalised[1] > 0 and penalised[2] == 0


def test_window_of_previous_frames_is_upstreams():
    """fish-speech's decode_n_tokens, driven by a stand-in for one decoding step, shows the window of
    previous frames it penalises at each step; _remember must give the same windows."""
    rows, steps = 5, 3 * REPETITION_WINDOW
    frames = torch.randint(1, 1000, (steps, rows), generator=torch.Generator().manual_seed(0))
    seen = []

    def one_step(previous_tokens, **_):
        seen.append(previous_tokens.clone())
        return frames[len(seen) - 1].view(rows, 1)

    stand_in = SimpleNamespace(config=SimpleNamespace(num_codebooks=rows - 1, max_seq_len=steps + 10),
                               tokenizer=SimpleNamespace(get_token_id=lambda token: -1))
    decode_n_tokens(stand_in, frames[0].view(1, rows, 1), torch.tensor([0]), steps, temperature=None, top_p=None,
                    repetition_penalty=None, audio_masks=None, audio_parts=None, decode_one_token=one_step)
    assert len(seen) == steps
    window = torch.zeros(rows, REPETITION_WINDOW, dtype=torch.long)
    for step, upstream_window in enumerate(seen):
        assert torch.equal(window, upstream_window.long()), step
        window = _remember(window, frames[step], step)


@pytest.mark.parametrize("name, value", [("temperature", 0.8), ("top_p", 0.8), ("repetition_penalty", 1.1)])
def test_defaults_are_upstreams(name, value):
    """fish-speech's generate_long and its CLI default to these."""
    assert getattr(SynthesisSettings(), name) == value
