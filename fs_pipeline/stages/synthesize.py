"""Synthesize: text -> semantic frames (the LLM) -> audio (the codec decoder).

Reads   a model dir (a merged one, or a base plus --lora adapters), optional reference audio + its text
Writes  one wav per line of text, at the codec's sample rate

The prompt is prompt.prompt_values, the sequence training used: optional reference turns (text, codes,
<|im_end|>), then the text, after which the model emits frames until <|im_end|>. Decoding is
constrained: the slow transformer may only emit a semantic token or <|im_end|>, and each residual
codebook is sampled among the codes its codec codebook has. Generation runs on fish-speech's own
inference forward (forward_generate / forward_generate_fast with its KV caches).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fs_pipeline import PipelineError
from fs_pipeline.audio.io import read_wav, write_wav
from fs_pipeline.device import DeviceChoice
from fs_pipeline.models import ModelDir, build_llm, load_codec, load_llm, load_llm_weights, model_identity
from fs_pipeline.prompt import prompt_values


@dataclass(frozen=True)
class SynthesisSettings:
    temperature: float = 0.8
    top_p: float = 0.8
    max_new_frames: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class Synthesis:
    path: Path
    frames: int
    audio_seconds: float
    seconds: float  # wall time for generation and decoding

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.seconds if self.seconds else 0.0


class Synthesizer:
    """A loaded model and codec, ready to speak any number of texts."""

    def __init__(self, model_dir: ModelDir, choice: DeviceChoice, lora: Path | None = None, model=None, compile: bool = False):
        """Loads the model of `model_dir` (plus `lora` adapters), or speaks with `model`, one already in
        memory (training uses this for its test clips). `compile` captures the per-frame step in CUDA
        graphs (torch.compile): much faster frames after a slow first text."""
        self.model_dir, self.choice = model_dir, choice
        if model is not None:
            self.model = model
        elif lora is None:
            self.model = load_llm(model_dir, choice)
        else:
            from fs_pipeline.stages.merge import load_adapter

            self.model = build_llm(model_dir)
            load_llm_weights(self.model, model_dir)
            load_adapter(self.model, lora, model_identity(model_dir))
            self.model = self.model.to(device=choice.device, dtype=choice.dtype).eval()
        self.codec = load_codec(model_dir, choice)
        self.residual_size = int(model_dir.codec_cfg.quantizer.codebook_size)
        self.reference: list[tuple[str, torch.Tensor]] = []
        self.fast_positions = torch.arange(self.model.config.num_codebooks, device=choice.device)
        self.end_id = self.model.tokenizer.get_token_id("<|im_end|>")
        self._decode_step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True) if compile else self._step

    def set_reference(self, audio: Path, text: str) -> None:
        """Voice prompting: the model continues in the voice of this clip, whose transcript is `text`."""
        if not Path(audio).is_file():
            raise PipelineError(f"reference audio not found: {audio}")
        if not text.strip():
            raise PipelineError("--reference-audio needs --reference-text, the exact words spoken in it")
        wav = torch.from_numpy(read_wav(audio, self.model_dir.version.sample_rate)).to(self.choice.device)
        with torch.inference_mode():
            codes, frames = self.codec.encode(wav[None, None])
        self.reference = [(text.strip(), codes[0, :, : frames[0]].cpu())]

    def release_caches(self) -> None:
        """Drop the KV caches, so the model can run its training forward again."""
        for layer in [*self.model.layers, *self.model.fast_layers]:
            layer.attention.kv_cache = None
        self.model.max_seq_len = self.model.max_batch_size = -1

    def speak(self, text: str, output: Path, settings: SynthesisSettings) -> Synthesis:
        if not text.strip():
            raise PipelineError("the text to speak is empty: pass some words")
        started = time.perf_counter()
        codes = self.generate(text.strip(), settings)
        with torch.inference_mode():
            if codes.shape[1]:
                audio, _ = self.codec.decode(codes[None].to(self.choice.device), torch.tensor([codes.shape[1]], device=self.choice.device))
                samples = audio[0, 0].float().cpu().numpy()
            else:
                samples = np.zeros(0, dtype=np.float32)
        rate = self.model_dir.version.sample_rate
        write_wav(output, samples, rate)
        return Synthesis(Path(output), codes.shape[1], len(samples) / rate, time.perf_counter() - started)

    @torch.inference_mode()
    def generate(self, text: str, settings: SynthesisSettings) -> torch.Tensor:
        """Codes (num_codebooks, frames) for `text`. Sampling stays on the device: the only wait for it is
        one look per frame at whether the model ended the utterance."""
        model, device = self.model, self.choice.device
        tokenizer, n = model.tokenizer, model.config.num_codebooks
        prompt = prompt_values(tokenizer, [*self.reference, (text, None)], n).to(device)
        length = prompt.shape[1]
        budget = min(settings.max_new_frames, model.config.max_seq_len - length - 1)
        if budget < 1:
            raise PipelineError(f"the prompt takes {length} tokens, the model's limit is {model.config.max_seq_len}: use a shorter text or reference")
        self._ensure_caches()
        sampling = (max(settings.temperature, 1e-5), settings.top_p)
        frames = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.choice.autocast():
            torch.manual_seed(settings.seed)
            result = model.forward_generate(prompt[None], torch.arange(length, device=device))
            frame = self._next_frame(result.logits[0, -1], result.hidden_states[:, -1:], *sampling)
            for position in range(length, length + budget):
                if int(frame[0]) == self.end_id:
                    break
                frames.append(frame)
                if len(frames) < budget:
                    # cloned: a CUDA-graph step's output buffer is overwritten by its next replay
                    frame = self._decode_step(frame, torch.tensor([position], device=device), *sampling).clone()
        if not frames:
            return torch.zeros(n, 0, dtype=torch.long)
        return torch.stack(frames)[:, 1:].T.cpu()

    def _ensure_caches(self) -> None:
        model = self.model
        if model.layers[0].attention.kv_cache is None:
            with torch.device(self.choice.device):  # the caches are created where this says
                model.setup_caches(max_batch_size=1, max_seq_len=model.config.max_seq_len, dtype=next(model.parameters()).dtype)

    def _step(self, frame: torch.Tensor, position: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """Feed `frame` at `position`, and sample the next frame."""
        result = self.model.forward_generate(frame[None, :, None], position)
        return self._next_frame(result.logits[0, -1], result.hidden_states[:, -1:], temperature, top_p)

    def _next_frame(self, logits: torch.Tensor, hidden: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """(token id, code 0, .., code n-1) sampled from the slow transformer's last logits and hidden state.
        The token is a semantic token or <|im_end|> (then the codes are meaningless); each code is one that
        its codec codebook has."""
        model, tokenizer = self.model, self.model.tokenizer
        first, last, end_id = tokenizer.semantic_begin_id, tokenizer.semantic_end_id, self.end_id
        candidates = torch.cat([logits[first : last + 1], logits[end_id : end_id + 1]]).float()
        pick = _sample(candidates, temperature, top_p)
        token = torch.where(pick == last + 1 - first, end_id, first + pick)
        codes = [pick.clamp(max=last - first)]
        model.forward_generate_fast(hidden, self.fast_positions[:1])
        for codebook in range(1, model.config.num_codebooks):
            x = model.fast_embeddings(codes[-1][None])
            logits = model.forward_generate_fast(x, self.fast_positions[codebook : codebook + 1])
            codes.append(_sample(logits[0, 0, : self.residual_size].float(), temperature, top_p))
        return torch.stack([token, *codes])


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Nucleus sampling at a temperature, on the device: the index drawn, as a 0-d tensor."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely one
    # the argmax of p / Exp(1) noise draws index i with probability p_i, with no wait for the host
    choice = (sorted_probs * keep / torch.empty_like(sorted_probs).exponential_()).argmax()
    return order.gather(0, choice.view(1)).squeeze(0)
