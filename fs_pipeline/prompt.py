"""The sequence formats the LLMs are trained and prompted with, shared by training and synthesis.

s1-mini (fish-speech's interleaved content sequence):

    <|interleave|><|speaker:0|>{text}<semantic frames...><|im_end|>

s2-pro (a chat, as upstream's S2 inference prompts it):

    <|im_start|>system\\nconvert the provided text to speech<|im_end|>\\n
    <|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n<|voice|><semantic frames...><|im_end|>\\n

A sequence may hold several turns of one speaker (training packs utterances this way). Synthesis feeds the
same prefix up to the text's turn, open where the frames begin, and lets the model continue. Reference turns
(text + codes of a clip in the voice to speak in): s1-mini reads them as earlier turns; s2-pro reads them in
the system turn, as upstream's S2 inference puts a reference ("...speech reference to the following:\\n\\nText:\\n
<|speaker:0|>{reference text}\\n\\nSpeech:\\n<frames>").

Each semantic frame is one token position whose row 0 is the semantic token id (code 0 + the first semantic id)
and rows 1..n are the frame's codebook codes. Loss is taken on the frames and the closing <|im_end|>, not on the
text. Which format a model has follows from its tokenizer: s2-pro's is fs_pipeline.s2pro.S2Tokenizer.
"""

import torch

from fs_pipeline.modeling import IGNORE, is_semantic


class InterleaveFormat:
    """s1-mini's sequences, built by fish-speech's ContentSequence."""

    @staticmethod
    def _content(turns: list[tuple[str, torch.Tensor | None]]):
        from fish_speech.content_sequence import ContentSequence, TextPart, VQPart

        sequence = ContentSequence(modality="interleave")
        for text, codes in turns:
            parts = [TextPart(text=text)]
            if codes is not None:
                parts.append(VQPart(codes=codes, cal_loss=True))
            sequence.append(parts, add_end=codes is not None, speaker=0)
        return sequence

    def training_example(self, tokenizer, turns, num_codebooks):
        values = self.prompt_values(tokenizer, turns, num_codebooks)
        encoded = self._content(turns).encode(tokenizer, add_shift=True)
        labels = torch.full_like(values[:, 1:], IGNORE)
        labels[0] = encoded.labels
        is_semantic = encoded.vq_mask_labels
        labels[1:, is_semantic] = values[1:, 1:][:, is_semantic]
        return values[:, :-1].long(), labels.long()

    def prompt_values(self, tokenizer, turns, num_codebooks):
        values, _, _ = self._content(turns).encode_for_inference(tokenizer, num_codebooks)
        return values

    def sequence_length(self, tokenizer, text, frames):
        return len(self._content([(text, None)]).encode(tokenizer, add_shift=False).tokens) + frames + 1


class ChatFormat:
    """s2-pro's sequences: segments of text (no loss) and frames (with loss), concatenated."""

    SYSTEM = "convert the provided text to speech"
    REFERENCE = " reference to the following:\n\nText:\n"

    def _segments(self, turns: list[tuple[str, torch.Tensor | None]]) -> list[tuple[str, torch.Tensor | None]]:
        """(text, None) and (closing text, codes) pieces in order: codes come before their closing text, and the
        piece of codes carries the loss with its first closing token (<|im_end|>)."""
        *references, last = turns
        open_turn = last[1] is None
        history = references if open_turn else []
        spoken = [last] if open_turn else turns
        system = f"<|im_start|>system\n{self.SYSTEM}"
        if history:
            texts = "\n".join(f"<|speaker:0|>{text}" for text, _ in history)
            codes = torch.cat([c for _, c in history], dim=1)
            segments = [(f"{system}{self.REFERENCE}{texts}\n\nSpeech:\n", None), ("", codes), ("<|im_end|>\n", None)]
        else:
            segments = [(f"{system}<|im_end|>\n", None)]
        for text, codes in spoken:
            segments.append((f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<|voice|>", None))
            if codes is not None:
                segments += [("<|im_end|>", codes), ("\n", None)]
        return segments

    def _encode(self, tokenizer, turns, num_codebooks):
        """(values (num_codebooks + 1, length), loss mask (length,)): where a position's token is to be predicted."""
        ids, codes, loss = [], [], []
        for text, frames in self._segments(turns):
            if frames is not None:
                semantic = frames[0].long() + tokenizer.semantic_begin_id
                ids.append(semantic)
                codes.append(frames.long())
                # the reference's frames (then the closing text is "") are context, not a target
                loss.append(torch.full_like(semantic, bool(text), dtype=torch.bool))
            tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
            if len(tokens):
                ids.append(tokens)
                codes.append(torch.zeros(num_codebooks, len(tokens), dtype=torch.long))
                # <|im_end|> after frames closes them and is a target; other text is not
                target = torch.zeros(len(tokens), dtype=torch.bool)
                target[0] = frames is not None
                loss.append(target)
        return torch.cat([torch.cat(ids)[None], torch.cat(codes, dim=1)]), torch.cat(loss)

    def training_example(self, tokenizer, turns, num_codebooks):
        values, loss = self._encode(tokenizer, turns, num_codebooks)
        target = values[:, 1:].clone()
        target[:, ~loss[1:]] = IGNORE
        target[1:, ~is_semantic(tokenizer, target[0])] = IGNORE
        return values[:, :-1], target

    def prompt_values(self, tokenizer, turns, num_codebooks):
        return self._encode(tokenizer, turns, num_codebooks)[0]

    def sequence_length(self, tokenizer, text, frames):
        # as the only turn of its sequence, system turn included: packing then never overfills a row
        return sum(len(tokenizer.encode(t)) for t, _ in self._segments([(text, None)])) + frames + 2


def _format(tokenizer):
    from fs_pipeline.s2pro import S2Tokenizer

    return ChatFormat() if isinstance(tokenizer, S2Tokenizer) else InterleaveFormat()


def training_example(tokenizer, turns: list[tuple[str, torch.Tensor]], num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for one or more utterances (text, codes) of one speaker, both of shape
    (num_codebooks + 1, length - 1), next-token shifted.

    inputs row 0 holds token ids, rows 1.. the codes of semantic positions (0 elsewhere). labels row 0 holds
    the token to predict (-100 where there is no loss), rows 1.. the codes to predict at those positions.
    Every turn's frames and <|im_end|> carry loss."""
    return _format(tokenizer).training_example(tokenizer, turns, num_codebooks)


def prompt_values(tokenizer, turns: list[tuple[str, torch.Tensor | None]], num_codebooks: int) -> torch.Tensor:
    """The model input (num_codebooks + 1, length) for the given turns, unshifted. A turn without codes
    is the open turn that synthesis asks the model to continue; turns before it are references."""
    return _format(tokenizer).prompt_values(tokenizer, turns, num_codebooks)


def sequence_length(tokenizer, text: str, frames: int) -> int:
    """Token positions one training utterance takes."""
    return _format(tokenizer).sequence_length(tokenizer, text, frames)
