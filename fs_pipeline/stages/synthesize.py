"""Synthesize: text -> semantic frames (the LLM) -> audio (the codec decoder).

Reads   a model dir (a merged one, or a base plus --lora adapters), optional reference audio + its text
Writes  with speak(), one 16-bit wav per text; render() only returns the audio (cli_tts.py writes it as -o names)

The prompt is prompt.prompt_values, the sequence training used: optional reference turns (text, codes,
<|im_end|>), then the text, after which the model emits frames until <|im_end|>. Decoding is
constrained: the slow transformer may only emit a semantic token or <|im_end|>, and each residual
codebook is sampled among the codes its codec codebook has. Generation runs on fish-speech's own
inference forward (forward_generate / forward_generate_fast with its KV caches).

Sampling is fish-speech 0.1.0's (models/text2semantic/inference.py): a repetition penalty on the logits of
recent frames' tokens, then top-p on the penalised logits, then the temperature, then a draw, with the
window of recent frames formed as its decode_n_tokens forms it (see _remember, _slow_head and _fast_step).

Speed. A frame is one slow-transformer step (which also samples the token and the first code) and then one
fast-transformer step per further code. With `compile`, torch.compile builds two graphs: the slow step, and
one fast step that takes its position as a tensor and so serves every codebook (ten unrolled copies in one
graph cost ten times the tracing and code generation, for the same kernels). On CUDA the whole frame, slow
step and fast steps, is then captured in one CUDA graph and replayed once per frame. The KV caches hold
SHORT_CONTEXT positions when prompt and frames fit there (the slow attention reads the whole cache at every
step), else the model's whole context; each size is compiled once, and on CUDA the frame's graph is captured again
whenever the caches change size. S1-mini's slow attention reads the grouped keys and values of the caches as they
are (modeling.attend_cached), where fish-speech's repeats the whole cache to every head at every step. A frame is
bound by its kernel launches, so the compiled step makes fewer: the linear layers sum their one row's products, which
inductor fuses with the norms and activations around them (modeling.use_decoding_linears), attention over the caches
runs one Triton kernel and a join on CUDA (modeling.decode_attention), and top-p sums over pairs where fish-speech
sorts (_beyond_top_p_by_pairs). On an H200 an S1-mini frame went from 1309 kernels to 843, and from 4.7 ms to 3.0 ms
in its CUDA graph.
warm_up() compiles before the first text and keeps the kernels in a cache file keyed by the model's shape,
torch's version and the GPU (compile_cache_key), so that a later process loads them instead of compiling them again. The codec decoder
runs eagerly: compiled for any length it took minutes to build on an H100, for a part of the time that is small
next to the frames'. stream() hands out audio while frames are still being generated.
"""

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fs_pipeline import PipelineError
from fs_pipeline.audio.io import read_wav, write_wav
from fs_pipeline.device import DeviceChoice
from fs_pipeline.fileio import atomic_path, user_folder
from fs_pipeline.modeling import use_decoding_linears, use_grouped_attention
from fs_pipeline.models import ModelDir, build_llm, load_codec, load_llm, load_llm_weights, model_identity
from fs_pipeline.prompt import prompt_values


# fish-speech's decode_n_tokens penalises repeats among the last 16 frames (its win_size)
REPETITION_WINDOW = 16
# stream(): the first chunk holds this many frames (0.74 s of s1-mini audio); each later one doubles the audio
FIRST_CHUNK_FRAMES = 16
# warm_up() and CUDA-graph capture run the compiled step this often first (compiled code and the allocator settle)
WARMUP_STEPS = 3
# KV cache positions when the prompt and the frames fit (default max_new_frames 1024 plus a prompt of up to 1024
# tokens): the slow attention reads every cached position at every step, so 2048 reads a quarter of s1-mini's 8192
SHORT_CONTEXT = 2048
COMPILE_CACHE_FORMAT = 2  # part of the cache key: raise it when what is cached changes meaning


@dataclass(frozen=True)
class SynthesisSettings:
    temperature: float = 0.8
    top_p: float = 0.8
    repetition_penalty: float = 1.1  # fish-speech's default; 1.0 turns the penalty off
    max_new_frames: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class Synthesis:
    audio: np.ndarray  # mono float32 at sample_rate
    sample_rate: int
    frames: int
    # None when the model ended the text itself; else what stopped it first: "max_new_frames" (the
    # setting) or "max_seq_len" (the model's context is full). Either way the audio may be cut short.
    cut_off: str | None
    seconds: float  # wall time of generation alone: LLM frames and codec decoding, no start-up, no writing
    path: Path | None = None  # where speak() wrote it
    first_audio: float | None = None  # seconds from the start of generation to the first audio handed out (render(): all at the end)

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio per second of generation ("× realtime"): above 1 is faster than playback."""
        return self.audio_seconds / self.seconds if self.seconds else 0.0


def default_compile_cache(environ: dict) -> Path:
    """Where compiled kernels are kept between runs: $XDG_CACHE_HOME/fs-pipeline/compile, or
    ~/.cache/fs-pipeline/compile where XDG_CACHE_HOME is unset."""
    return user_folder("cache", environ) / "compile"


def compile_cache_key(config, codec_cfg, choice: DeviceChoice) -> str:
    """What decides the compiled kernels: the LLM's shape (its config, not its weights), the codec's config,
    the precision, torch's version and the GPU model. Kernels compiled for another of any of these are of no
    use (torch checks each graph again when it loads them; the key keeps unrelated ones apart)."""
    from omegaconf import OmegaConf

    shape = asdict(config) if is_dataclass(config) else dict(vars(config))
    if choice.type == "cuda":
        major, minor = torch.cuda.get_device_capability(choice.device)
        device = f"{torch.cuda.get_device_name(choice.device)} sm{major}{minor}"
    else:
        device = choice.type
    material = json.dumps({"format": COMPILE_CACHE_FORMAT, "llm": shape, "codec": OmegaConf.to_container(codec_cfg, resolve=True),
                           "dtype": str(choice.dtype), "torch": torch.__version__, "device": device}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


class Synthesizer:
    """A loaded model and codec, ready to speak any number of texts."""

    def __init__(self, model_dir: ModelDir, choice: DeviceChoice, lora: Path | None = None, model=None, compile: bool = False,
                 compile_cache: Path | None = None):
        """Loads the model of `model_dir` (plus `lora` adapters), or speaks with `model`, one already in
        memory (training uses this for its test clips). `compile` compiles the per-frame step (torch.compile)
        and on CUDA captures each frame in a CUDA graph: much faster frames once warm_up() has compiled them,
        which `compile_cache` (a folder) keeps for the next process. The codec decoder runs eagerly."""
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
        use_grouped_attention(self.model)  # the slow attention reads its KV caches without repeating them to every head
        self.codec = load_codec(model_dir, choice)
        self.residual_size = int(model_dir.codec_cfg.quantizer.codebook_size)
        self.reference: list[tuple[str, torch.Tensor]] = []
        # one tensor per codebook: the compiled fast step gets its position as an input, not as a constant
        self.fast_positions = [torch.tensor([i], device=choice.device) for i in range(self.model.config.num_codebooks)]
        self.end_id = self.model.tokenizer.get_token_id("<|im_end|>")
        self.compiled = compile
        if compile:
            use_decoding_linears(self.model)
        self.cache_file = None
        if compile and compile_cache is not None:
            self.cache_file = Path(compile_cache) / f"synthesis-{compile_cache_key(self.model.config, model_dir.codec_cfg, choice)}.bin"
            if self.cache_file.is_file():  # before anything compiles: torch then finds these kernels instead of building them
                # a damaged file is torch's warning (checksum), not an error: everything compiles afresh and warm_up() rewrites it
                torch.compiler.load_cache_artifacts(self.cache_file.read_bytes())
        # dynamic=False: another KV cache size is another graph with static shapes, not a slower dynamic one
        self._slow = torch.compile(self._slow_step, fullgraph=True, dynamic=False) if compile else self._slow_step
        self._fast = torch.compile(self._fast_step, fullgraph=True, dynamic=False) if compile else self._fast_step
        self._graph: _FrameGraph | None = None  # compile on CUDA: the frame as one CUDA graph, over the caches it was captured on

    def warm_up(self) -> float:
        """Compile (or load from the cache) the step for the SHORT_CONTEXT caches, on dummy inputs, capture its
        CUDA graph (on CUDA) and run the codec decoder once, so that the first text runs at full speed; then stop
        inductor's compile workers and save the compiled kernels to the cache file. Returns the seconds it took.
        Without `compile` there is nothing to warm up."""
        if not self.compiled:
            return 0.0
        started = time.perf_counter()
        self._ensure_caches(min(SHORT_CONTEXT, self.model.config.max_seq_len))
        device = self.choice.device
        # The inputs are made under inference_mode, as generation makes its own: compiled code is specialised on
        # that too, and a tensor made outside it would make the first real text compile again.
        # What the dummy steps write into the KV caches is overwritten by the next prompt, which starts at 0.
        with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.choice.autocast():
            frame, window, sampling = self._example_frame(), self._empty_window(), self._sampling(SynthesisSettings())
            step = self._step_function(sampling)
            for position in range(WARMUP_STEPS):
                step(frame, torch.tensor([position], device=device), window, *sampling)
            self._decode(torch.zeros(self.model.config.num_codebooks, FIRST_CHUNK_FRAMES, dtype=torch.long, device=device))  # first-call set-up
        # Nothing more to compile: inductor's worker processes would otherwise go on taking CPU time and memory
        # (on a cached start they are still starting up, next to the first texts).
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
        if self.cache_file is not None:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(self.cache_file) as tmp:
                    Path(tmp).write_bytes(artifacts[0])
        return time.perf_counter() - started

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
        """Drop the KV caches (and the CUDA graph that uses them), so the model can run its training forward again."""
        for layer in [*self.model.layers, *self.model.fast_layers]:
            layer.attention.kv_cache = None
        self.model.max_seq_len = self.model.max_batch_size = -1
        self._graph = None

    def speak(self, text: str, output: Path, settings: SynthesisSettings) -> Synthesis:
        """render(), then write the audio to `output` as a 16-bit wav, even when it is empty (no frames)."""
        speech = self.render(text, settings)
        write_wav(output, speech.audio, speech.sample_rate)
        return replace(speech, path=Path(output))

    def render(self, text: str, settings: SynthesisSettings) -> Synthesis:
        """`text` spoken, in memory. Its `seconds` time the LLM and the codec decoder, and setting up KV caches
        of another size where this text needs another than the last text's (and, compiled on CUDA, capturing the
        frame's CUDA graph over them again)."""
        if not text.strip():
            raise PipelineError("the text to speak is empty: pass some words")
        started = time.perf_counter()
        codes, cut_off = self._generate(text.strip(), settings)
        samples = self._decode(codes)
        seconds = time.perf_counter() - started
        return Synthesis(samples, self.model_dir.version.sample_rate, codes.shape[1], cut_off, seconds, first_audio=seconds)

    def stream(self, text: str, settings: SynthesisSettings, on_audio: Callable[[np.ndarray], None],
               first_chunk: int = FIRST_CHUNK_FRAMES) -> Synthesis:
        """render(), handing the audio to `on_audio` in chunks while the frames are generated: the first after
        `first_chunk` frames, each later one as long as all before it together, the rest at the end.

        The codec's decoder is causal (causal convolutions, causal attention), so the audio of the first k
        frames depends on those frames alone: each chunk decodes all frames so far and hands out the samples
        past the last chunk's, which is the one-shot decode's audio (the chunks joined equal render()'s up to
        fp32 rounding), and doubling the chunks keeps the decoding within twice one-shot's."""
        if not text.strip():
            raise PipelineError("the text to speak is empty: pass some words")
        chunks: list[np.ndarray] = []
        first_audio: list[float] = []
        started = time.perf_counter()

        def deliver(codes: torch.Tensor) -> None:
            done = sum(len(chunk) for chunk in chunks)
            chunk = self._decode(codes)[done:]
            chunks.append(chunk)
            if not first_audio:
                first_audio.append(time.perf_counter() - started)
            on_audio(chunk)

        codes, cut_off = self._generate(text.strip(), settings, on_chunk=deliver, first_chunk=first_chunk)
        seconds = time.perf_counter() - started
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return Synthesis(audio, self.model_dir.version.sample_rate, codes.shape[1], cut_off, seconds,
                         first_audio=first_audio[0] if first_audio else None)

    def generate(self, text: str, settings: SynthesisSettings) -> torch.Tensor:
        """Codes (num_codebooks, frames) for `text`."""
        return self._generate(text, settings)[0]

    def _decode(self, codes: torch.Tensor) -> np.ndarray:
        """The codec's audio (float32, mono) for codes (num_codebooks, frames), in fp32: also when called from
        inside generation's autocast, as stream() does."""
        if not codes.shape[1]:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode(), torch.autocast(self.choice.type, enabled=False):
            codes = codes.to(self.choice.device)
            audio, _ = self.codec.decode(codes[None], torch.tensor([codes.shape[1]], device=codes.device))
        return audio[0, 0].float().cpu().numpy()

    def _sampling(self, settings: SynthesisSettings) -> list[torch.Tensor]:
        # 0-d tensors on the device, as fish-speech passes them: the compiled step takes new values without recompiling
        return [torch.tensor(value, device=self.choice.device) for value in (settings.temperature, settings.top_p, settings.repetition_penalty)]

    @torch.inference_mode()
    def _generate(self, text: str, settings: SynthesisSettings,
                  on_chunk: Callable[[torch.Tensor], None] | None = None, first_chunk: int = FIRST_CHUNK_FRAMES,
                  ) -> tuple[torch.Tensor, str | None]:
        """Codes (num_codebooks, frames) for `text`, and what cut generation off (Synthesis.cut_off). Sampling
        stays on the device: the only wait for it is one look per frame at whether the model ended the text,
        made while the next frame is already queued (if the model did end, that frame is dropped).
        `on_chunk` gets the codes so far (on the device) after `first_chunk` frames, again whenever their
        number has doubled, and at the end if frames came after its last call."""
        model, device = self.model, self.choice.device
        tokenizer, n = model.tokenizer, model.config.num_codebooks
        prompt = prompt_values(tokenizer, [*self.reference, (text, None)], n).to(device)
        length = prompt.shape[1]
        context_left = model.config.max_seq_len - length - 1
        if context_left < 1:
            raise PipelineError(f"the prompt takes {length} tokens, the model's limit is {model.config.max_seq_len}: use a shorter text or reference")
        budget = min(settings.max_new_frames, context_left)
        cut_off = "max_new_frames" if budget == settings.max_new_frames else "max_seq_len"
        # positions 0 .. length + budget - 2 are written (the last frame is sampled, never fed back)
        self._ensure_caches(min(SHORT_CONTEXT, model.config.max_seq_len) if length + budget <= SHORT_CONTEXT else model.config.max_seq_len)
        sampling = self._sampling(settings)
        window = self._empty_window()
        frames = []
        chunk_end, delivered = first_chunk, 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.choice.autocast():
            step_function = self._step_function(sampling)  # before the seed: a capture's trial steps draw random numbers
            torch.manual_seed(settings.seed)
            result = model.forward_generate(prompt[None], torch.arange(length, device=device))
            # the first frame has no penalty, as fish-speech's prefill, and never enters the window; eager, as the
            # compiled parts are built for a window
            head = self._slow_head(result.logits[0, -1], result.hidden_states[:, -1:], None, *sampling)
            frame = self._frame(head, None, sampling, self._fast_step)
            for step, position in enumerate(range(length, length + budget)):
                # queued before the host waits for `frame`, so that the GPU has the next frame's work meanwhile;
                # cloned, as a CUDA graph's output is overwritten by its next replay
                following = step_function(frame, torch.tensor([position], device=device), window, *sampling).clone() if step + 1 < budget else None
                if int(frame[0]) == self.end_id:
                    cut_off = None
                    break
                frames.append(frame)
                if on_chunk is not None and len(frames) == chunk_end:
                    on_chunk(_codes(frames))
                    chunk_end, delivered = 2 * chunk_end, len(frames)
                if following is not None:
                    frame = following
                    window = _remember(window, frame, step)
        if not frames:
            return torch.zeros(n, 0, dtype=torch.long), cut_off
        codes = _codes(frames)
        if on_chunk is not None and len(frames) > delivered:
            on_chunk(codes)
        return codes.cpu(), cut_off

    def _ensure_caches(self, positions: int) -> None:
        """KV caches of `positions` positions (the slow transformer's), made anew where they have another size."""
        model = self.model
        if model.layers[0].attention.kv_cache is not None and model.max_seq_len == positions:
            return
        self.release_caches()
        with torch.device(self.choice.device):  # the caches are created where this says
            model.setup_caches(max_batch_size=1, max_seq_len=positions, dtype=next(model.parameters()).dtype)

    def _step_function(self, sampling: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
        """What computes a frame from the last one: _step, or, compiled on CUDA, its CUDA graph over the current
        KV caches (captured here when there is none for them; its trial steps write position 0 of the caches,
        which a prompt overwrites)."""
        if not (self.compiled and self.choice.type == "cuda"):
            return self._step
        caches = self.model.layers[0].attention.kv_cache
        if self._graph is None or self._graph.caches is not caches:
            position = torch.zeros(1, dtype=torch.long, device=self.choice.device)
            self._graph = _FrameGraph(self._step, caches, self._example_frame(), position, self._empty_window(), sampling)
        return self._graph

    def _example_frame(self) -> torch.Tensor:
        """A frame to compile and capture the step on: the first semantic token, codes 0."""
        frame = torch.zeros(self.model.config.num_codebooks + 1, dtype=torch.long, device=self.choice.device)
        frame[0] = self.model.tokenizer.semantic_begin_id
        return frame

    def _empty_window(self) -> torch.Tensor:
        # fish-speech starts its window as zeros, so code 0 counts as recent until 16 frames exist
        return torch.zeros(self.model.config.num_codebooks + 1, REPETITION_WINDOW, dtype=torch.long, device=self.choice.device)

    def _step(self, frame: torch.Tensor, position: torch.Tensor, window: torch.Tensor, temperature: torch.Tensor,
              top_p: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """Feed `frame` at `position`, and sample the next frame: the slow step, then a fast step per further code."""
        head = self._slow(frame, position, window, temperature, top_p, penalty)
        return self._frame(head, window, [temperature, top_p, penalty], self._fast)

    def _frame(self, head: torch.Tensor, window: torch.Tensor | None, sampling: list[torch.Tensor], fast: Callable) -> torch.Tensor:
        """(token id, code 0, .., code n-1): `head` (token id, code 0) and the further codes, each sampled by
        `fast` (the fast step, compiled or not) from the one before it."""
        codes = [head[1]]
        for position in self.fast_positions[1:]:
            codes.append(fast(codes[-1], position, window, *sampling))
        return torch.cat([head, torch.stack(codes[1:])])

    def _slow_step(self, frame: torch.Tensor, position: torch.Tensor, window: torch.Tensor, temperature: torch.Tensor,
                   top_p: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """Feed `frame` at `position` to the slow transformer; (token id, code 0) of the next frame (_slow_head)."""
        result = self.model.forward_generate(frame[None, :, None], position)
        return self._slow_head(result.logits[0, -1], result.hidden_states[:, -1:], window, temperature, top_p, penalty)

    def _slow_head(self, logits: torch.Tensor, hidden: torch.Tensor, window: torch.Tensor | None, temperature: torch.Tensor,
                   top_p: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """(token id, code 0) sampled from the slow transformer's last logits, with the repetition penalty over
        `window` (recent frames, one per column; None: no penalty), and the fast transformer started on `hidden`
        (its position 0). The token is a semantic token or <|im_end|> (then the codes are meaningless); code 0 is
        the semantic token's index."""
        model, tokenizer = self.model, self.model.tokenizer
        first, last, end_id = tokenizer.semantic_begin_id, tokenizer.semantic_end_id, self.end_id
        logits = logits.float()
        if window is not None:
            # fish-speech's decode_one_token_ar penalises the slow transformer's logits at window[:, 0]: the
            # window's oldest frame (its token, and its codes read as token ids), not the window's token row.
            # The same here, so that a model samples as under fish-speech's own generate.
            logits = _penalise(logits, window[:, 0], penalty)
        candidates = torch.cat([logits[first : last + 1], logits[end_id : end_id + 1]])
        pick = _draw(_probabilities(candidates, None, penalty, temperature, top_p))
        token = torch.where(pick == last + 1 - first, end_id, first + pick)
        model.forward_generate_fast(hidden, self.fast_positions[0])
        return torch.stack([token, pick.clamp(max=last - first)])

    def _fast_step(self, code: torch.Tensor, position: torch.Tensor, window: torch.Tensor | None, temperature: torch.Tensor,
                   top_p: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """The code of codebook `position` (a 1-element tensor, 1 .. n-1) from `code`, the one before it, through
        the fast transformer, with the repetition penalty over this codebook's codes in `window`. One compiled
        graph serves every codebook: they differ only by `position`'s value."""
        x = self.model.fast_embeddings(code[None])
        logits = self.model.forward_generate_fast(x, position)
        recent = None if window is None else window.index_select(0, position + 1)[0]  # this codebook's codes in the recent frames
        return _draw(_probabilities(logits[0, 0, : self.residual_size].float(), recent, penalty, temperature, top_p))


class _FrameGraph:
    """A frame step captured in one CUDA graph: called like the step, it copies its arguments into the graph's
    input tensors and replays it, returning the graph's output tensor (overwritten by the next call). `caches`:
    the KV caches it reads and writes, for its owner to tell whether it still fits them."""

    def __init__(self, step: Callable[..., torch.Tensor], caches, frame: torch.Tensor, position: torch.Tensor, window: torch.Tensor,
                 sampling: list[torch.Tensor]):
        self.caches = caches
        self.inputs = [tensor.clone() for tensor in (frame, position, window, *sampling)]
        # compiled code runs its first calls outside the capture (and off the current stream, as capture asks)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, *arguments: torch.Tensor) -> torch.Tensor:
        for destination, value in zip(self.inputs, arguments):
            destination.copy_(value)
        self.graph.replay()
        return self.output


def _codes(frames: list[torch.Tensor]) -> torch.Tensor:
    """Codes (num_codebooks, frames) of generated frames (token id, code 0, .., code n-1), where they are."""
    return torch.stack(frames)[:, 1:].T


def _remember(window: torch.Tensor, frame: torch.Tensor, step: int) -> torch.Tensor:
    """The window after decoding step `step` gave `frame`, as fish-speech's decode_n_tokens forms it: the
    first REPETITION_WINDOW steps fill the zeroed columns in order, later ones push out the oldest."""
    if step < REPETITION_WINDOW:
        window[:, step] = frame
        return window
    return torch.cat([window[:, 1:], frame[:, None]], dim=1)


def _penalise(logits: torch.Tensor, previous: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """fish-speech's repetition penalty: the logit of each index in `previous` (repeats count once) is
    divided by `penalty` where it is positive and multiplied by it where negative."""
    score = logits.gather(0, previous)
    return logits.scatter(0, previous, torch.where(score < 0, score * penalty, score / penalty))


def _probabilities(logits: torch.Tensor, previous: torch.Tensor | None, penalty: torch.Tensor, temperature: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """fish-speech's logits_to_probs: the repetition penalty on `previous`, then top-p on the penalised
    logits (the tokens past the first whose cumulative probability exceeds top_p go; the most likely one
    always stays), then the temperature, then softmax. Static shapes and no host sync, for --compile."""
    if previous is not None:
        logits = _penalise(logits, previous, penalty)
    remove = _beyond_top_p_by_pairs(logits, top_p) if torch.compiler.is_compiling() else _beyond_top_p(logits, top_p)
    logits = logits.masked_fill(remove, -float("inf"))
    return torch.softmax(logits / torch.clip(temperature, min=1e-5), dim=-1)


def _beyond_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Where top-p removes a token, as fish-speech finds it: the probabilities sorted, their running sums."""
    sorted_logits, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1) > top_p
    remove[0] = False
    return remove.scatter(0, order, remove)


def _beyond_top_p_by_pairs(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """_beyond_top_p without a sort, for compiled code: a token's running sum in the sorted order is its probability
    plus those of the tokens before it, one sum over all pairs, which inductor computes in one reduction without
    holding the pairs (the sort took 22 us a call on an H200, ten calls a frame). Tied logits come in index order,
    as a stable sort puts them; fish-speech's sort orders ties as it happens to, so where logits tie (bf16 heads make
    many) the same number of each tied group go, perhaps other ones. Otherwise the same tokens go, up to the rounding
    of the sums' order."""
    probs = torch.softmax(logits, dim=-1)
    index = torch.arange(logits.shape[-1], device=logits.device)
    before = (logits[None, :] > logits[:, None]) | ((logits[None, :] == logits[:, None]) & (index[None, :] < index[:, None]))
    running = torch.where(before, probs[None, :], 0.0).sum(-1) + probs
    return (running > top_p) & (index != logits.argmax())  # the first of the likeliest always stays


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """An index drawn with probability probs[i], as a 0-d tensor: the argmax of p / Exp(1) noise, with no
    wait for the host (fish-speech's multinomial_sample_one_no_sync, drawing the same noise)."""
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1))
