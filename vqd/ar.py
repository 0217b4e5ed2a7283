"""VQ-AR: the autoregressive baseline of the paper's Table 3, built from the denoiser's own blocks.

Same embeddings, blocks (self-attention, cross-attention to the text, MLP) and head as vqd/transformer.py,
but the self-attention is causal over image tokens in raster order and there is no timestep (plain
LayerNorms where the denoiser has AdaLN(t)). The input is [BOS, z_0, ..., z_{N-2}] (BOS takes the
[MASK] slot, id K) and output position i predicts z_i from z_{<i} and the text.

Sampling draws one token at a time, either recomputing the whole prefix each step (`use_cache=False`) or
with a KV cache (`use_cache=True`); both give the same tokens for the same torch.Generator. (The paper
does not say which its speed comparison used.) Without the timestep's AdaLN layers this network is ~21%
smaller than the denoiser at the same depth and width: the VQ-AR sizes of vqd/network.py give the
parameters back in a wider MLP, so that the Table 3 comparison is between models of equal size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vqd.errors import UserError
from vqd.network import ComposedModel, NetworkConfig
from vqd.text import TextEncoder, tokenize
from vqd.transformer import KVCache, TokenGridTransformer, TransformerConfig, check_ids, check_text


@dataclass
class VQARConfig(NetworkConfig):
    """The VQ-AR baseline: the same network fields as VQ-Diffusion, no diffusion."""

    KIND: ClassVar[str] = "vq-ar"
    # The paper's baseline reads text only; these mirror VQDiffusionConfig for code that reads any model's config.
    condition: ClassVar[str] = "text"
    classes: ClassVar[tuple[str, ...]] = ()

    @property
    def condition_length(self) -> int:
        """L, the length of the text sequence the network attends to."""
        return self.text.context_length

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            num_codes=self.num_codes, grid=self.grid, depth=self.depth, width=self.width, heads=self.heads,
            text_dim=self.text.width, mlp_ratio=self.mlp_ratio, num_timesteps=0, causal=True,
            dropout=self.dropout, checkpoint=self.checkpoint,
        )


class ARTransformer(TokenGridTransformer):
    """Causal next-token network: tokens Long [B, N] in [0, K), text [B, L, D] -> logits [B, K, N]."""

    def __init__(self, cfg: TransformerConfig):
        if not cfg.causal or cfg.num_timesteps != 0:
            raise UserError("cfg: the AR network needs causal=True and num_timesteps=0")
        super().__init__(cfg)

    @property
    def bos(self) -> int:
        return self.cfg.num_codes  # the [MASK] slot of the shared embedding serves as BOS

    def _with_bos(self, prefix: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S+1] with BOS in front."""
        return F.pad(prefix, (1, 0), value=self.bos)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits[:, :, i] predicts tokens[:, i] from tokens[:, :i]. [B, N] -> [B, K, N]."""
        check_ids("tokens", tokens, self.seq_len, self.cfg.num_codes - 1)
        check_text("text", text, tokens.shape[0], self.cfg.text_dim)
        return self.trunk(self._with_bos(tokens[:, :-1]), None, text)

    def next_logits(self, prefix: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Full recompute: logits of the token after `prefix` [B, S] (S < N) -> [B, K]."""
        return self.trunk(self._with_bos(prefix), None, text)[:, :, -1]

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def cached_step(self, previous: torch.Tensor, position: int, text: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One step with the KV cache: the input at `position` ([B, 1], BOS at 0) -> logits [B, K]."""
        return self.trunk(previous, None, text, start=position, caches=caches)[:, :, -1]


def sample_next(
    logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0, top_r: float = 1.0
) -> torch.Tensor:
    """Draw one token per row from logits [B, K] with temperature and top-r truncation -> Long [B].

    Truncation keeps the smallest set of most likely tokens whose cumulative probability reaches r.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass of the strictly likelier tokens
    keep_sorted = before < top_r
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    net: ARTransformer,
    text: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_r: float = 1.0,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Sample image tokens in raster order: text [B, L, D] -> Long [B, N] in [0, K)."""
    check_text("text", text, text.shape[0] if text.dim() == 3 else -1, net.cfg.text_dim)
    if not temperature > 0:
        raise UserError(f"temperature: expected > 0, got {temperature}")
    if not 0.0 < top_r <= 1.0:
        raise UserError(f"top_r: expected a value in (0, 1], got {top_r}")

    batch, n = text.shape[0], net.seq_len
    tokens = torch.full((batch, n), net.bos, dtype=torch.long, device=text.device)
    caches = net.new_caches() if use_cache else None
    previous = tokens[:, :1]  # BOS
    for i in tqdm(range(n), desc="VQ-AR sampling", disable=not progress):
        if use_cache:
            logits = net.cached_step(previous, i, text, caches)
        else:
            logits = net.next_logits(tokens[:, :i], text)
        tokens[:, i] = sample_next(logits, generator, temperature, top_r)
        previous = tokens[:, i:i + 1]
    return tokens


class VQARModel(ComposedModel):
    """ARTransformer + frozen text tower; saved and loaded as a model folder with kind "vq-ar"."""

    CONFIG: ClassVar[type] = VQARConfig

    def __init__(self, config: VQARConfig, load_text_weights: bool = True):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config.text, load_weights=load_text_weights)
        self.transformer = ARTransformer(config.transformer_config())

    def logits(self, tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits: tokens Long [B, N], text [B, L, D] -> float [B, K, N]."""
        return self.transformer(tokens, text_features)

    forward = logits

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> frozen text features [B, 77, D] on the model's device."""
        device = next(self.transformer.parameters()).device
        return self.encode_text(tokenize(list(prompts), self.config.text.context_length).to(device))

    def loss(self, tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, mean over tokens (nats): scalar."""
        return F.cross_entropy(self.logits(tokens, text_features), tokens)

    def generate(
        self,
        text_features: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_r: float = 1.0,
        use_cache: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample tokens Long [B, N] for text features [B, L, D] (see `generate`)."""
        return generate(self.transformer, text_features, generator, temperature, top_r, use_cache, progress)

    @torch.no_grad()
    def sample_captions(self, captions: list[str], top_r: float = 1.0, temperature: float = 1.0, *,
                        batch_size: int = 32, generator: torch.Generator | None = None,
                        progress: bool = False) -> torch.Tensor:
        """Captions -> token grids Long [len(captions), h*w], in batches of `batch_size` (KV cache)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise UserError("captions must be a list of strings")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        out = [self.generate(self.encode_prompts(list(captions[i:i + batch_size])), generator, temperature, top_r,
                             use_cache=True, progress=progress) for i in range(0, len(captions), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.grid[0] * self.grid[1], dtype=torch.long)
