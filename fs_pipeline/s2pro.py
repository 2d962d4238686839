"""OpenAudio S2-Pro's LLM, written here from its published architecture: config, tokenizer, module tree, weight keys.

S2-Pro is a dual autoregressive transformer like S1-mini, larger and in another file layout:

- slow transformer: Qwen3-like (36 layers of dim 2560 in the release), grouped-query attention with RMS norms on
  queries and keys, RoPE on interleaved pairs, SwiGLU feed-forward, token embeddings tied to the output head;
- fast transformer (4 layers in the release): it reads the slow transformer's last hidden state *after* the slow
  final norm (S1-mini reads it before), then one codebook embedding per step, and predicts the next codebook;
- codebook embeddings summed into the slow input at semantic positions, the sum of token and codebook embeddings
  there divided by sqrt(num_codebooks + 1), as upstream's generation computes it. Its training forward leaves
  that scaling out; we train with generation's definition, the one a fine-tuned model is used with
  (fs_pipeline.modeling.embed is that one definition, for training, scoring and generation alike).

The module tree exposes the attributes our training forward (modeling.py), LoRA (lora.py), merge and synthesis
use on fish-speech's DualARTransformer, so those serve both versions without branching on the version.

Release layout: config.json (model_type "fish_qwen3_omni", a text_config and an audio_decoder_config),
sharded safetensors with model.safetensors.index.json whose keys start with "text_model.model." (slow) and
"audio_decoder." (fast, and the codebook embeddings), and a Hugging Face tokenizer.json whose "<|semantic:i|>"
tokens are contiguous ids. Facts from the public fishaudio/s2-pro model card and config, and upstream
fish-speech's code read for facts only (its licence since 2026-03 forbids copying it).
"""

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fs_pipeline import PipelineError
from fs_pipeline.modeling import attend

MODEL_TYPE = "fish_qwen3_omni"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"
SEMANTIC_TOKEN = "<|semantic:{}|>"
# Release key prefixes: the slow transformer's modules live under SLOW_PREFIX, the fast one's and the codebook
# embeddings under FAST_PREFIX, where the fast transformer's names lack our "fast_" prefix.
SLOW_PREFIX, FAST_PREFIX = "text_model.model.", "audio_decoder."


@dataclass(frozen=True)
class S2ProConfig:
    """The release config.json flattened into the names our code reads on any DualAR config."""

    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_local_heads: int
    head_dim: int
    intermediate_size: int
    rope_base: float
    norm_eps: float
    max_seq_len: int
    tie_word_embeddings: bool
    attention_qk_norm: bool
    attention_qkv_bias: bool
    attention_o_bias: bool
    n_fast_layer: int
    fast_dim: int
    fast_n_head: int
    fast_n_local_heads: int
    fast_head_dim: int
    fast_intermediate_size: int
    fast_rope_base: float
    fast_norm_eps: float
    fast_attention_qk_norm: bool
    fast_attention_qkv_bias: bool
    fast_attention_o_bias: bool
    codebook_size: int
    num_codebooks: int
    semantic_begin_id: int
    semantic_end_id: int
    initializer_range: float = 0.02
    # Always on for S2-Pro: read by modeling.embed, the one definition of the input embedding.
    scale_codebook_embeddings: bool = True

    @classmethod
    def from_release(cls, data: dict, source: Path | str = "config.json") -> "S2ProConfig":
        try:
            text, fast = data["text_config"], data["audio_decoder_config"]
            return cls(
                vocab_size=text["vocab_size"], dim=text["dim"], n_layer=text["n_layer"], n_head=text["n_head"],
                n_local_heads=text["n_local_heads"], head_dim=text["head_dim"], intermediate_size=text["intermediate_size"],
                rope_base=text["rope_base"], norm_eps=text["norm_eps"], max_seq_len=text["max_seq_len"],
                tie_word_embeddings=text["tie_word_embeddings"], attention_qk_norm=text["attention_qk_norm"],
                attention_qkv_bias=text["attention_qkv_bias"], attention_o_bias=text["attention_o_bias"],
                n_fast_layer=fast["n_layer"], fast_dim=fast["dim"], fast_n_head=fast["n_head"],
                fast_n_local_heads=fast["n_local_heads"], fast_head_dim=fast["head_dim"],
                fast_intermediate_size=fast["intermediate_size"], fast_rope_base=fast["rope_base"],
                fast_norm_eps=fast["norm_eps"], fast_attention_qk_norm=fast["attention_qk_norm"],
                fast_attention_qkv_bias=fast["attention_qkv_bias"], fast_attention_o_bias=fast["attention_o_bias"],
                codebook_size=fast["vocab_size"], num_codebooks=fast["num_codebooks"],
                semantic_begin_id=data["semantic_start_token_id"], semantic_end_id=data["semantic_end_token_id"],
                initializer_range=text.get("initializer_range", 0.02),
            )
        except KeyError as e:
            raise PipelineError(f"{source} lacks the key {e.args[0]!r} an S2-Pro config has: re-download the release") from e
        except TypeError as e:  # a section that is not a mapping
            raise PipelineError(f"{source} is not an S2-Pro config ({e}): re-download the release") from e

    def as_dict(self) -> dict:
        return asdict(self)


class S2Tokenizer:
    """The release's Hugging Face tokenizer (tokenizer.json), read with the `tokenizers` library, with the
    semantic-token range our code reads on fish-speech's FishTokenizer."""

    def __init__(self, path: Path | str, codebook_size: int):
        from tokenizers import Tokenizer

        file = Path(path) / TOKENIZER_FILE
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises its own exception type for a malformed file
            raise PipelineError(f"cannot read the tokenizer {file} ({' '.join(str(e).split())}): re-download the release") from e
        ids = [self._tokenizer.token_to_id(SEMANTIC_TOKEN.format(i)) for i in range(codebook_size)]
        if None in ids:
            raise PipelineError(f"{file} lacks the token {SEMANTIC_TOKEN.format(ids.index(None))}: the tokenizer does "
                                f"not belong to this model (config.json has {codebook_size} semantic codes); re-download the release")
        # codes become ids by one addition (code + semantic_begin_id), in training and synthesis alike
        if ids != list(range(ids[0], ids[0] + codebook_size)):
            raise PipelineError(f"{file}: the semantic tokens do not have consecutive ids: re-download the release")
        self.semantic_begin_id, self.semantic_end_id = ids[0], ids[-1]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it included as single ids, with no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def get_token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise PipelineError(f"the tokenizer has no token {token}: re-download the release")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and returned in the input's dtype before the gain, as the release
    was trained."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        return (wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(length: int, head_dim: int, base: float) -> torch.Tensor:
    """(length, head_dim / 2, 2): cos and sin of each position's angle per rotated pair. Rounded to bf16, as the
    tables the release was trained and is run with upstream: an fp32 table would shift every logit."""
    inverse = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), inverse)
    unit = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([unit.real, unit.imag], dim=-1).to(torch.bfloat16)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """RoPE on x (batch, length, heads, head_dim), rotating the pairs (x[2i], x[2i+1]) in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1).flatten(3).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, heads, length, head_dim, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, heads, length, head_dim, dtype=dtype))

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache[:, :, positions] = k
        self.v_cache[:, :, positions] = v
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_local_heads, head_dim, qk_norm: bool, eps: float, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = n_head, n_local_heads, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=o_bias)
        if qk_norm:  # per head, before RoPE
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps), nn.RMSNorm(head_dim, eps)
        self.qk_norm = qk_norm
        self.kv_cache: KVCache | None = None

    def forward(self, x, table, mask, positions=None):
        batch, length, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim] + [self.n_local_heads * self.head_dim] * 2, dim=-1)
        q = q.view(batch, length, self.n_head, self.head_dim)
        k = k.view(batch, length, self.n_local_heads, self.head_dim)
        v = v.view(batch, length, self.n_local_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = rotate(q, table).transpose(1, 2), rotate(k, table).transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(positions, k, v)
        # no mask: plain causal attention (modeling.causal_mask passes None where SDPA's flash kernel exists)
        y = attend(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, n_head, n_local_heads, head_dim, hidden, qk_norm, eps, qkv_bias, o_bias):
        super().__init__()
        self.attention = Attention(dim, n_head, n_local_heads, head_dim, qk_norm, eps, qkv_bias, o_bias)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, table, mask, positions=None):
        x = x + self.attention(self.attention_norm(x), table, mask, positions)
        return x + self.feed_forward(self.ffn_norm(x))


class FastInput(nn.Module):
    """The fast transformer's input from a slow hidden state: the slow final norm, then a projection to the
    fast width where the widths differ. The norm is the slow transformer's own module, held without being
    registered here, so its weight has one key (norm.weight) and one value."""

    def __init__(self, slow_norm: RMSNorm, dim: int, fast_dim: int):
        super().__init__()
        self._slow_norm = (slow_norm,)  # a tuple: nn.Module would register a module attribute as a child
        self.projection = nn.Linear(dim, fast_dim) if fast_dim != dim else None

    def forward(self, hidden):
        x = self._slow_norm[0](hidden)
        return x if self.projection is None else self.projection(x)


class CausalMask(nn.Module):
    """mask[..., i, j] = (j <= i), made per lookup from positions: stored, S2-Pro's 32768 positions would take
    1 GiB for what two aranges give. Indexed like the stored mask of fish-speech's models: [None, None, rows, cols]."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("anchor", torch.zeros(0, dtype=torch.bool), persistent=False)  # follows the model's device

    def __getitem__(self, index: tuple):
        *leading, rows, cols = index
        positions = torch.arange(self.size, device=self.anchor.device)
        mask = positions[rows][:, None] >= positions[cols][None, :]
        return mask[(*leading, Ellipsis)]


def _embedding(count: int, dim: int) -> nn.Embedding:
    """An embedding table left for _init_weights to fill: nn.Embedding's own initial draw, on the meta device,
    imports torch's reference-op machinery (seconds) for nothing."""
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


@dataclass
class GenerateResult:
    logits: torch.Tensor
    hidden_states: torch.Tensor


class S2ProTransformer(nn.Module):
    """S2-Pro's dual AR transformer, randomly initialised. Attribute names follow fish-speech's DualARTransformer."""

    def __init__(self, config: S2ProConfig, tokenizer: S2Tokenizer):
        super().__init__()
        c = self.config = config
        self.tokenizer = tokenizer
        self.embeddings = _embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = _embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(
            Block(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size, c.attention_qk_norm, c.norm_eps,
                  c.attention_qkv_bias, c.attention_o_bias) for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_word_embeddings:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.fast_project_in = FastInput(self.norm, c.dim, c.fast_dim)
        self.fast_embeddings = _embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(
            Block(c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim, c.fast_intermediate_size,
                  c.fast_attention_qk_norm, c.fast_norm_eps, c.fast_attention_qkv_bias, c.fast_attention_o_bias)
            for _ in range(c.n_fast_layer)
        )
        self.fast_norm = RMSNorm(c.fast_dim, c.fast_norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)
        # derived tables, made on the CPU where the parameters are built without storage (models.build_llm)
        without_storage = torch.empty(0).is_meta
        with torch.device("cpu") if without_storage else contextlib.nullcontext():
            self.register_buffer("freqs_cis", rope_table(c.max_seq_len, c.head_dim, c.rope_base), persistent=False)
            self.register_buffer("fast_freqs_cis", rope_table(c.num_codebooks, c.fast_head_dim, c.fast_rope_base), persistent=False)
            self.causal_mask = CausalMask(max(c.max_seq_len, c.num_codebooks))
        self.max_batch_size = self.max_seq_len = -1  # the KV caches' size; -1: none
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.embeddings.weight.is_meta:  # built without storage, to be assigned the release's tensors
            return
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, self.config.initializer_range)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """KV caches for generation: max_seq_len positions for the slow transformer, one per codebook for the fast."""
        if self.max_seq_len >= max_seq_len and self.max_batch_size >= max_batch_size:
            return
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        c = self.config
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, c.n_local_heads, c.head_dim, dtype)
        for layer in self.fast_layers:
            layer.attention.kv_cache = KVCache(max_batch_size, c.num_codebooks, c.fast_n_local_heads, c.fast_head_dim, dtype)

    def forward_generate(self, inputs: torch.Tensor, positions: torch.Tensor) -> GenerateResult:
        """Token logits and the fast transformer's input at the last of `positions` for inputs (batch, codebooks + 1,
        len(positions)), through the KV caches."""
        from fs_pipeline.modeling import embed  # the embedding training uses: one definition of the scaling

        x = embed(self, inputs)
        mask = self.causal_mask[None, None, positions, : self.max_seq_len]
        for layer in self.layers:
            x = layer(x, self.freqs_cis[positions], mask, positions)
        x = x[:, -1:]
        normed = self.norm(x)
        logits = F.linear(normed, self.embeddings.weight) if self.config.tie_word_embeddings else self.output(normed)
        return GenerateResult(logits=logits, hidden_states=self.fast_project_in(x))

    def forward_generate_fast(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Codebook logits (batch, 1, codebook_size) after feeding x (the fast input, or the previous code's fast
        embedding) at codebook position `positions`."""
        x = x.view(x.shape[0], 1, -1)
        mask = self.causal_mask[None, None, positions, : self.config.num_codebooks]
        for layer in self.fast_layers:
            x = layer(x, self.fast_freqs_cis[positions], mask, positions)
        return self.fast_output(self.fast_norm(x))


def release_key(key: str) -> str:
    """Our state-dict key -> the release's."""
    if key.startswith("fast_"):
        return FAST_PREFIX + key.removeprefix("fast_").replace("project_in.projection.", "project_in.")
    if key.startswith("codebook_embeddings."):
        return FAST_PREFIX + key
    return SLOW_PREFIX + key


def our_key(key: str) -> str | None:
    """The release's state-dict key -> ours (None for a key outside both transformers)."""
    if key.startswith(SLOW_PREFIX):
        return key.removeprefix(SLOW_PREFIX)
    if key.startswith(FAST_PREFIX + "codebook_embeddings."):
        return key.removeprefix(FAST_PREFIX)
    if key.startswith(FAST_PREFIX):
        rest = key.removeprefix(FAST_PREFIX)
        return "fast_" + (rest.replace("project_in.", "project_in.projection.") if rest.startswith("project_in.") else rest)
    return None


def read_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """The release's weights under our keys, memory-mapped from its shards (nothing is copied into RAM here)."""
    from safetensors import safe_open

    index_file = folder / INDEX_FILE
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise PipelineError(f"{index_file} is not a safetensors index ({type(e).__name__}): re-download the release") from e
    state = {}
    for shard in sorted(set(weight_map.values())):
        file = folder / shard
        if Path(shard).name != shard or not file.is_file():
            raise PipelineError(f"{index_file} names the shard {shard!r}, which is not a file in {folder}: re-download the release")
        try:
            with safe_open(str(file), "pt") as f:
                state |= {our_key(k) or k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own types for a damaged file
            raise PipelineError(f"cannot read weights from {file} ({type(e).__name__}): the file is damaged; re-download it") from e
    return state


def shard_files(folder: Path) -> list[Path]:
    """The shard files the index of `folder` names, in order."""
    weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    return [folder / name for name in sorted(set(weight_map.values()))]


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write `state` (our keys) as the release does: safetensors shards of at most `shard_bytes` each (a tensor
    larger than that gets a shard of its own), under the release's keys, and the index naming each key's shard.
    `folder` is a staging directory that is renamed into place whole; each file is still written atomically."""
    from safetensors.torch import save_file

    from fs_pipeline.fileio import atomic_path, write_json_atomic

    groups, size = [[]], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map, files = {}, []
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        with atomic_path(folder / name) as tmp:
            save_file({release_key(k): state[k].contiguous() for k in keys}, str(tmp), metadata={"format": "pt"})
        weight_map |= {release_key(k): name for k in keys}
        files.append(folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json_atomic(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return files
