"""Autoregressive prior (unCLIP, Ramesh et al. 2022, section 2.2, the alternative to the diffusion prior).

The CLIP image embedding z_i is reduced by PCA to its first K principal coordinates (ordered by
decreasing eigenvalue; K the fewest whose mean squared reconstruction error stays under
`max_pca_error` of the total variance; the paper keeps 319 of 1024), each coordinate quantized
into `num_buckets` buckets (edges at the data's quantiles). A causal transformer predicts the K
codes one by one after a prefix:
    [text tokens (L), text embedding, similarity token, code_1, ..., code_K]
where the similarity token is the quantized cosine similarity z_i . z_t (its buckets also at the
data's quantiles). At sampling, the similarity bucket is drawn from the top part of its training
distribution (the paper: the top half), which steers toward embeddings that fit the caption.
Codes -> bucket centres -> inverse PCA gives the image embedding.

PCA, buckets and similarity edges are data, fitted once by `fit_statistics` at the start of training
and stored with the weights (frozen parameters, like the diffusion prior's clip_mean / clip_std).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip_cli.models.configs import ARPriorConfig
from unclip_cli.models.prior import MASK_VALUE, Block

PREFIX_EXTRA = 2  # text embedding, similarity token


def _frozen(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class ARPrior(nn.Module):
    """Caption -> logits over the quantized PCA codes of the CLIP image embedding."""

    def __init__(self, cfg: ARPriorConfig):
        super().__init__()
        self.cfg = cfg
        C, D, L = cfg.width, cfg.embed_dim, cfg.num_text_tokens
        self.text_proj = nn.Linear(cfg.text_width, C)  # text hidden states -> tokens
        self.text_embed_proj = nn.Linear(D, C)  # CLIP text embedding -> one token
        self.sim_embed = nn.Embedding(cfg.num_sim_buckets, C)  # quantized z_i . z_t -> one token
        self.code_embed = nn.Embedding(cfg.num_buckets, C)  # one code per PCA coordinate
        self.pos_embed = nn.Parameter(torch.empty(1, L + PREFIX_EXTRA + D, C))  # room for K <= D codes
        self.blocks = nn.ModuleList([Block(C, cfg.num_heads) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.num_buckets)
        # fitted statistics (see fit_statistics); frozen
        self.pca_mean = _frozen(1, D)
        self.pca_components = _frozen(D, D)  # rows: principal directions, decreasing eigenvalue
        self.num_kept = _frozen(1)  # K, as a float
        self.bucket_edges = _frozen(D, cfg.num_buckets - 1)  # per coordinate (rows >= K unused)
        self.bucket_centres = _frozen(D, cfg.num_buckets)
        self.sim_edges = _frozen(cfg.num_sim_buckets - 1)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.02)

    @property
    def kept(self) -> int:
        return int(self.num_kept.item())

    @property
    def fitted(self) -> bool:
        return self.kept > 0

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def fit_statistics(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> dict:
        """Fit PCA, the code buckets and the similarity buckets on (N, D) embeddings; returns a report."""
        cfg = self.cfg
        x = image_embed.double()
        n, d = x.shape
        if n < 2:
            raise ValueError("need at least 2 embeddings to fit the PCA")
        mean = x.mean(0, keepdim=True)
        xc = x - mean
        evals, evecs = torch.linalg.eigh(xc.T @ xc / n)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)  # decreasing eigenvalue
        total = float(evals.sum())
        left = torch.cat([evals.flip(0).cumsum(0).flip(0)[1:], evals.new_zeros(1)])  # variance beyond k+1 dims
        rel = left / total if total > 0 else torch.zeros_like(left)
        kept = int((rel <= cfg.max_pca_error).nonzero()[0]) + 1  # fewest dims under the bound
        comps = evecs.T  # (D, D) rows
        coords = xc @ comps[:kept].T  # (N, K)
        qs = torch.arange(1, cfg.num_buckets, dtype=torch.float64) / cfg.num_buckets
        edges = torch.quantile(coords, qs, dim=0).T.contiguous()  # (K, nb - 1)
        mids = (torch.arange(cfg.num_buckets, dtype=torch.float64) + 0.5) / cfg.num_buckets
        centres = torch.quantile(coords, mids, dim=0).T.contiguous()  # (K, nb): the bucket medians
        sims = F.cosine_similarity(x, text_embed.double(), dim=-1)
        sq = torch.arange(1, cfg.num_sim_buckets, dtype=torch.float64) / cfg.num_sim_buckets
        self.pca_mean.copy_(mean.float())
        self.pca_components.copy_(comps.float())
        self.num_kept.fill_(kept)
        self.bucket_edges.zero_()
        self.bucket_edges[:kept] = edges.float()
        self.bucket_centres.zero_()
        self.bucket_centres[:kept] = centres.float()
        self.sim_edges.copy_(torch.quantile(sims, sq).float())
        codes = self.encode(image_embed.float())
        round_trip = ((self.decode(codes).double() - x) ** 2).sum(-1).mean() / max(total, 1e-30)
        return {
            "embeddings": n, "kept": kept, "dims": d, "pca_error": float(rel[kept - 1]),
            "round_trip_error": float(round_trip),
        }

    def encode(self, image_embed: torch.Tensor) -> torch.Tensor:
        """(B, D) image embeddings -> (B, K) codes in [0, num_buckets)."""
        k = self.kept
        coords = (image_embed.float() - self.pca_mean) @ self.pca_components[:k].T  # (B, K)
        return torch.searchsorted(self.bucket_edges[:k], coords.T.contiguous()).T  # per-row edges; as bucketize

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K) codes -> (B, D) image embeddings: bucket centres, then the inverse PCA."""
        k = self.kept
        coords = torch.gather(self.bucket_centres[:k].expand(codes.shape[0], -1, -1), 2, codes[:, :, None])[:, :, 0]
        return self.pca_mean + coords @ self.pca_components[:k]  # (B, D)

    def similarity_bucket(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """(B,) bucket of the cosine similarity of each image embedding with its text embedding."""
        return torch.bucketize(F.cosine_similarity(image_embed.float(), text_embed.float(), dim=-1), self.sim_edges)

    # ------------------------------------------------------------------ the transformer

    def forward(
        self,
        codes: torch.Tensor,
        sim: torch.Tensor,
        text_embed: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        caches: list[dict] | None = None,
    ) -> torch.Tensor:
        """codes (B, n) with n <= K, sim (B,), text (B, D), (B, L, W), (B, L) bool -> logits (B, n + 1, nb):
        row j predicts code j from the prefix and codes < j. With `caches` (one dict per block), each
        layer's keys and values are kept there for `next_logits`."""
        B, L, _ = text_hidden.shape
        if L != self.cfg.num_text_tokens:
            raise ValueError(f"AR prior expects {self.cfg.num_text_tokens} text tokens, got {L}")
        n = codes.shape[1]
        tokens = torch.cat(
            [
                self.text_proj(text_hidden),  # (B, L, C)
                self.text_embed_proj(text_embed)[:, None],  # (B, 1, C)
                self.sim_embed(sim)[:, None],  # (B, 1, C)
                self.code_embed(codes),  # (B, n, C)
            ],
            dim=1,
        )  # (B, T, C), T = L + 2 + n
        T = tokens.shape[1]
        h = tokens + self.pos_embed[:, :T]
        pad = F.pad(self._text_pad(text_mask, h.dtype), (0, T - L), value=0.0)  # (B, T)
        causal = torch.full((T, T), MASK_VALUE, device=h.device).triu_(1).to(h.dtype)  # (T, T), made per call:
        # a buffer of the longest sequence, (L + 2 + D)^2, would be allocated even in a shapes-only build
        mask = (pad[:, None, :] + causal)[:, None]  # (B, 1, T, T)
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            h = block(h, mask, cache)
        h = self.ln_f(h[:, L + PREFIX_EXTRA - 1 :])  # from the similarity token on: (B, n + 1, C)
        return self.head(h)  # (B, n + 1, nb)

    # ------------------------------------------------------------------ incremental decoding (sampling)

    @torch.no_grad()
    def start_decoding(
        self, sim: torch.Tensor, text_embed: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """Run the prefix once -> (logits (B, nb) of code 1, a state for `next_logits`).

        The state keeps every layer's keys and values, so each further code costs one token's
        forward instead of the whole sequence's; the logits are those of `forward` (to float rounding)."""
        layers = [{} for _ in self.blocks]
        no_codes = torch.zeros(sim.shape[0], 0, dtype=torch.long, device=sim.device)
        logits = self.forward(no_codes, sim, text_embed, text_hidden, text_mask, layers)[:, 0]  # (B, nb)
        pad = F.pad(self._text_pad(text_mask, logits.dtype), (0, PREFIX_EXTRA), value=0.0)  # (B, L + 2)
        return logits, {"layers": layers, "pad": pad}

    @torch.no_grad()
    def next_logits(self, code: torch.Tensor, state: dict) -> torch.Tensor:
        """Append code (B,) to a decoding state -> logits (B, nb) of the code after it."""
        T = state["pad"].shape[1]  # tokens so far
        if T >= self.pos_embed.shape[1]:
            raise ValueError(f"the AR prior's sequence is full ({T} tokens)")
        h = self.code_embed(code)[:, None] + self.pos_embed[:, T : T + 1]  # (B, 1, C)
        state["pad"] = F.pad(state["pad"], (0, 1), value=0.0)  # (B, T + 1): the new token sees every earlier one
        mask = state["pad"][:, None, None, :]  # (B, 1, 1, T + 1)
        for block, cache in zip(self.blocks, state["layers"]):
            h = block(h, mask, cache)
        return self.head(self.ln_f(h[:, -1]))

    @staticmethod
    def _text_pad(text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, L) bool -> additive bias (B, L): MASK_VALUE on padded text columns."""
        return (1 - text_mask.to(dtype)) * MASK_VALUE
