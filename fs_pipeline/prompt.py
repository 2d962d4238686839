"""The sequence format the s1-mini LLM is trained and prompted with, shared by training and synthesis.

    <|interleave|><|speaker:0|>{text}<semantic frames...><|im_end|>

A sequence may hold several such turns of one speaker (training packs utterances this way; synthesis
puts reference turns before the text to speak).

Each semantic frame is one token position whose row 0 is the semantic token id and rows 1..n are the
frame's codebook codes. Loss is taken on the frames and the closing <|im_end|>, not on the text.
Synthesis feeds the same prefix up to and including the text, optionally after reference turns
(reference text + its codes + <|im_end|>), and lets the model continue.
"""

import torch


def _content(turns: list[tuple[str, torch.Tensor | None]]):
    from fish_speech.content_sequence import ContentSequence, TextPart, VQPart

    sequence = ContentSequence(modality="interleave")
    for text, codes in turns:
        parts = [TextPart(text=text)]
        if codes is not None:
            parts.append(VQPart(codes=codes, cal_loss=True))
        sequence.append(parts, add_end=codes is not None, speaker=0)
    return sequence


def training_example(tokenizer, turns: list[tuple[str, torch.Tensor]], num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for one or more utterances (text, codes) of one speaker, both of shape
    (num_codebooks + 1, length - 1), next-token shifted.

    inputs row 0 holds token ids, rows 1.. the codes of semantic positions (0 elsewhere). labels row 0 holds
    the token to predict (-100 where there is no loss), rows 1.. the codes to predict at those positions.
    Every turn's frames and <|im_end|> carry loss."""
    values = prompt_values(tokenizer, turns, num_codebooks)
    encoded = _content(turns).encode(tokenizer, add_shift=True)
    labels = torch.full_like(values[:, 1:], -100)
    labels[0] = encoded.labels
    is_semantic = encoded.vq_mask_labels
    labels[1:, is_semantic] = values[1:, 1:][:, is_semantic]
    return values[:, :-1].long(), labels.long()


def prompt_values(tokenizer, turns: list[tuple[str, torch.Tensor | None]], num_codebooks: int) -> torch.Tensor:
    """The model input (num_codebooks + 1, length) for the given turns, unshifted. A turn without codes
    is the open turn that synthesis asks the model to continue."""
    values, _, _ = _content(turns).encode_for_inference(tokenizer, num_codebooks)
    return values


def sequence_length(tokenizer, text: str, frames: int) -> int:
    """Token positions one training utterance takes."""
    return len(_content([(text, None)]).encode(tokenizer, add_shift=False).tokens) + frames + 1
