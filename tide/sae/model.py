"""The sparse autoencoder: plain, TIDE-modulated, or one per timestep bucket.

With input normalisation x_n = (x - mu_t) / sigma_t (sigma a scalar, or one scale per dimension) and,
for TIDE, (s, h) = MLP(emb(t)):

    x~  = x_n * (1 + s) + h
    z   = sparsity(W_enc (x~ - b_dec) + b_enc)
    x^_n = (W_dec^T z + b_dec - h) / (1 + s)
    x^  = x^_n * sigma_t + mu_t

The decoder directions are shared across t, so a latent means the same thing at every timestep.
Every map above is affine in x at a fixed t, so :meth:`SAE.fold` turns the model at t into an
exactly equivalent plain SAE on raw activations (normalisation included).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn

from tide.errors import TideError
from tide.sae import sparsity as sp
from tide.sae.config import SAEConfig
from tide.sae.kernels import SparseCode, selected_encode, sparse_decode, topk_encode_code
from tide.sae.timestep import TimestepModulation
from tide.timesteps import bucket_index


class ForwardOutput(NamedTuple):
    x_hat_BD: torch.Tensor
    """Reconstruction in the input's (raw) space."""
    x_hat_n_BD: torch.Tensor
    """Reconstruction in normalised space (what the loss compares)."""
    x_n_BD: torch.Tensor
    """Normalised input (the training target)."""
    latents: sp.Latents
    """Active latents."""
    pre_BF: torch.Tensor
    """Pre-activations (AuxK chooses its dead latents from them). For TopK they are detached: the sparse
    backward differentiates only selected entries (re-encode a choice with :meth:`SAE.encode_selected`);
    inside :meth:`SAE.reuse_buffers` they live in a buffer that the next forward overwrites."""
    penalty: torch.Tensor
    """Sparsity penalty (L1 for relu, L0 for jumprelu; 0 otherwise), already weighted."""
    out_scale_BD: torch.Tensor | None
    """TIDE: 1 + scale(t), the divisor of the decoder output (AuxK decodes through it); None otherwise."""
    x_in_BD: torch.Tensor | None = None
    """The encoder's input before the decoder bias is subtracted (normalised and, for TIDE, modulated)."""


class SAE(nn.Module):
    """A sparse autoencoder over (x, t) rows; ``forward(x_BD, t_B)``."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg.validate()
        n = cfg.num_buckets if cfg.conditioning == "bucket" else 1
        d, f = cfg.d_in, cfg.d_sae
        w_dec = torch.randn(n, f, d)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)           # (N, F, D), unit-norm rows
        self.W_enc = nn.Parameter(w_dec.clone())   # (N, F, D), tied at init
        self.b_enc = nn.Parameter(torch.zeros(n, f))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.modulation = TimestepModulation(d, cfg.t_embed_dim, cfg.t_hidden) if cfg.conditioning == "tide" else None
        if cfg.sparsity == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, f), float(torch.tensor(cfg.jumprelu_init_threshold).log())))
        if cfg.sparsity == "batchtopk":
            self.register_buffer("threshold", torch.zeros(n))
            self.register_buffer("threshold_steps", torch.zeros(n, dtype=torch.long))
        # normalisation table: rows = recorded timesteps (one row for global / none)
        self.register_buffer("norm_t_T", torch.zeros(1))
        self.register_buffer("norm_mean_TD", torch.zeros(1, d))
        self.register_buffer("norm_scale_TD", torch.ones(1, d))
        self._scratch: dict[str, torch.Tensor] = {}  # see reuse_buffers
        self._reusing = False

    # ------------------------------------------------------------------ scratch memory
    @contextmanager
    def reuse_buffers(self) -> Iterator[None]:
        """Within this block, TopK forwards on CPU write ``pre_BF`` into a (B, F) buffer that the SAE keeps
        between calls instead of fresh memory, so that the operating system need not map and zero B*F*4
        bytes again on every step (on small CPUs that costs as much as a third of the encoder product).
        ``pre_BF`` of an output is then valid only until the next forward. The training step
        (:func:`tide.train.objective.train_step`) runs its forward in this block."""
        previous, self._reusing = self._reusing, True
        try:
            yield
        finally:
            self._reusing = previous

    def _buffer(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor | None:
        if not self._reusing or like.device.type != "cpu":
            return None
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != like.dtype:
            buf = self._scratch[name] = like.new_empty(rows, cols)
        return buf[:rows]

    # ------------------------------------------------------------------ normalisation
    def set_normalization(self, stats) -> None:
        """Fill the normalisation table from :class:`tide.data.TimestepStats` of the training data.

        ``global`` / ``per_timestep``: one scale per row, sqrt(total variance / d), so the average dimension has unit
        variance; ``per_dimension`` / ``per_timestep_dimension``: every dimension standardised to unit variance (the
        few high-variance dimensions of a DiT residual no longer dominate the squared error)."""
        d = self.cfg.d_in
        mode = self.cfg.normalization
        if mode == "none":
            return
        if mode in ("global", "per_dimension"):
            t = torch.zeros(1)
            mean = torch.as_tensor(stats.mean_D, dtype=torch.float32)[None]
            var = torch.as_tensor(stats.var_D, dtype=torch.float32)[None] if mode == "per_dimension" else \
                torch.full((1, d), float(stats.var) / d)
        else:
            t = torch.as_tensor(stats.timesteps_T, dtype=torch.float32)
            mean = torch.as_tensor(stats.mean_TD, dtype=torch.float32)
            var = torch.as_tensor(stats.var_TD, dtype=torch.float32) if mode == "per_timestep_dimension" else \
                (torch.as_tensor(stats.var_T, dtype=torch.float32) / d)[:, None].expand(-1, d)
        if mean.shape[-1] != d:
            raise TideError(f"normalisation statistics have width {mean.shape[-1]} but the SAE's d_in is {d}")
        # a dimension that never varies keeps a tiny floor relative to the others (no division by zero)
        floor = var.mean(-1, keepdim=True).clamp_min(1e-30) * 1e-6
        device = self.W_enc.device
        self.norm_t_T = t.to(device)
        self.norm_mean_TD = mean.to(device)
        self.norm_scale_TD = torch.maximum(var, floor).sqrt().clamp_min(1e-8).contiguous().to(device)

    def _norm(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_BD, sigma_BD) at each row's timestep (nearest recorded timestep for the per-timestep modes)."""
        if self.norm_t_T.numel() == 1:
            return self.norm_mean_TD.expand(len(t_B), -1), self.norm_scale_TD.expand(len(t_B), -1)
        # on device, in float32; an exact tie takes the first table row (the higher timestep for a table in
        # step order), unlike tide.timesteps.nearest_index (the lower timestep)
        row = (t_B.float()[:, None] - self.norm_t_T[None]).abs().argmin(-1)
        return self.norm_mean_TD[row], self.norm_scale_TD[row]

    # ------------------------------------------------------------------ forward
    def check_width(self, width: int, where: str | None = None) -> None:
        """Refuse activations of another width than the SAE's ``d_in``, naming where they came from."""
        if width != self.cfg.d_in:
            where = where or f"the input (hook {self.cfg.hook or '?'})"
            raise TideError(f"{where} has activations of width {width} but the SAE was built for d_in={self.cfg.d_in}: "
                            "load an SAE trained on this hook of this backbone")

    def forward(self, x_BD: torch.Tensor, t_B: torch.Tensor) -> ForwardOutput:
        self.check_width(x_BD.shape[-1])
        t_B = t_B.to(x_BD.device)
        identity = self.cfg.normalization == "none"  # skip two passes over the batch
        mu_BD, sigma_BD = self._norm(t_B)
        x_n = x_BD if identity else (x_BD - mu_BD) / sigma_BD
        if self.modulation is not None:
            scale_BD, shift_BD = self.modulation(t_B)
            x_in, out_scale = x_n * (1 + scale_BD) + shift_BD, 1 + scale_BD
        else:
            x_in, shift_BD, out_scale = x_n, None, None
        if self.cfg.conditioning == "bucket":
            y, latents, pre, penalty = self._bucketed(x_in, t_B)
        else:
            y, latents, pre, penalty = self._code(x_in, 0)
        x_hat_n = y if out_scale is None else (y - shift_BD) / out_scale
        x_hat = x_hat_n if identity else x_hat_n * sigma_BD + mu_BD
        return ForwardOutput(x_hat, x_hat_n, x_n, latents, pre, penalty, out_scale, x_in)

    def _code(self, x_BD: torch.Tensor, b: int):
        """Encode and decode rows with bucket ``b``'s parameters (b = 0 without buckets)."""
        cfg = self.cfg
        if cfg.sparsity == "topk":  # sparse backward: only the k selected latents per row are differentiated
            buf = self._buffer("pre", len(x_BD), cfg.d_sae, x_BD) if cfg.conditioning != "bucket" else None
            b_dec = self._param("b_dec", b)
            acts, idx, pre, code = topk_encode_code(x_BD, self._param("W_enc", b), self._param("b_enc", b), cfg.k, b_dec, out=buf)
            y = sparse_decode(idx, acts, self._param("W_dec", b), code) + b_dec
            return y, sp.Latents(acts, idx), pre, pre.new_zeros(())
        pre = torch.addmm(self.b_enc[b], x_BD - self.b_dec[b], self.W_enc[b].T)
        penalty = pre.new_zeros(())
        if cfg.sparsity == "batchtopk":
            if self.training:
                latents, smallest = sp.batch_topk(pre, cfg.k)
                with torch.no_grad():  # running mean of the smallest kept activation = the inference threshold
                    n = self.threshold_steps[b] = self.threshold_steps[b] + 1
                    self.threshold[b] += (smallest - self.threshold[b]) / n.clamp(max=1000)
            else:
                latents = sp.threshold(pre, self.threshold[b])
        elif cfg.sparsity == "relu":
            latents = sp.Latents(torch.relu(pre), None)
            penalty = cfg.l1_coefficient * (latents.acts * self.W_dec[b].norm(dim=-1)).sum(-1).mean()
        else:
            latents, l0_B = sp.jumprelu(pre, self.log_threshold[b].exp(), cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coefficient * l0_B.mean()
        return self.decode_latents(latents, b) + self.b_dec[b], latents, pre, penalty

    def _bucketed(self, x_BD, t_B):
        bucket_B = bucket_index(t_B, self.cfg.num_buckets, self.cfg.t_max)
        y = torch.empty_like(x_BD)
        pre = x_BD.new_empty(len(x_BD), self.cfg.d_sae)
        dense = x_BD.new_zeros(len(x_BD), self.cfg.d_sae)
        penalty = x_BD.new_zeros(())
        for b in bucket_B.unique().tolist():
            rows = torch.nonzero(bucket_B == b).flatten()
            y_b, lat_b, pre_b, pen_b = self._code(x_BD[rows], b)
            y = y.index_copy(0, rows, y_b)
            pre = pre.index_copy(0, rows, pre_b)
            dense = dense.index_copy(0, rows, lat_b.dense(self.cfg.d_sae))
            penalty = penalty + pen_b * len(rows) / len(x_BD)
        return y, sp.Latents(dense, None), pre, penalty

    def decode_latents(self, latents: sp.Latents, b: int = 0, code: SparseCode | None = None) -> torch.Tensor:
        """sum_i z_i W_dec[i] (no bias), sparse when the latents are k-sparse (``code``: their
        :class:`~tide.sae.kernels.SparseCode`, to share its sort with :meth:`encode_selected`)."""
        if latents.idx is None:
            return latents.acts @ self._param("W_dec", b)
        return sparse_decode(latents.idx, latents.acts, self._param("W_dec", b), code)

    def _param(self, name: str, b: int) -> torch.Tensor:
        """Bucket ``b``'s slice of a stacked parameter; without buckets a view whose backward is a reshape
        (indexing would zero-fill and copy the whole gradient)."""
        p = getattr(self, name)
        return p.squeeze(0) if p.shape[0] == 1 else p[b]

    def encode_selected(self, x_in_BD: torch.Tensor, idx_BK: torch.Tensor, vals_BK: torch.Tensor, b: int = 0,
                        code: SparseCode | None = None) -> torch.Tensor:
        """Differentiable pre-activations of chosen latents ``idx_BK`` (values ``vals_BK`` already known, e.g.
        from ``pre_BF``) of rows ``x_in_BD`` (:attr:`ForwardOutput.x_in_BD`); the backward costs B*K*D."""
        return selected_encode(x_in_BD, self._param("b_dec", b), self._param("W_enc", b), self._param("b_enc", b),
                               idx_BK, vals_BK, code=code)

    # ------------------------------------------------------------------ convenience
    def encode(self, x_BD: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Dense latents (B, F)."""
        return self(x_BD, t_B).latents.dense(self.cfg.d_sae)

    def reconstruct(self, x_BD: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        return self(x_BD, t_B).x_hat_BD

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component parallel to each (unit) decoder row."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    # ------------------------------------------------------------------ folding
    @torch.no_grad()
    def _affine_at(self, t: float):
        """(bucket, mu_D, sigma_D, s_D, h_D): everything timestep-dependent, at one timestep."""
        cfg = self.cfg
        t_B = torch.tensor([float(t)], device=self.W_enc.device)
        b = int(bucket_index(t_B, cfg.num_buckets, cfg.t_max)) if cfg.conditioning == "bucket" else 0
        mu_BD, sigma_BD = self._norm(t_B)
        mu, sigma = mu_BD[0], sigma_BD[0]
        if self.modulation is not None:
            s, h = (v[0] for v in self.modulation(t_B))
        else:
            s, h = torch.zeros_like(mu), torch.zeros_like(mu)
        return b, mu, sigma, s, h

    @torch.no_grad()
    def fold_decoder(self, t: float, features: torch.Tensor) -> torch.Tensor:
        """(K, D) decoder rows of ``features`` of the SAE folded at timestep ``t`` — what ``fold(t).W_dec[0][features]``
        gives, computed from those K rows alone."""
        b, _, sigma, s, _ = self._affine_at(t)
        return self.W_dec[b][features] * (sigma / (1 + s))

    @torch.no_grad()
    def fold(self, t: float) -> "SAE":
        """The model at timestep ``t`` as an exactly equivalent plain SAE on raw activations."""
        cfg = self.cfg
        device = self.W_enc.device
        b, mu, sigma, s, h = self._affine_at(t)
        a = (1 + s) / sigma                       # encoder input scale per dimension
        w_enc = self.W_enc[b] * a                  # (F, D)
        w_dec = self.W_dec[b] * (sigma / (1 + s))  # (F, D)
        b_dec = mu + sigma * (self.b_dec[b] - h) / (1 + s)
        folded_cfg = SAEConfig(**{**cfg.__dict__, "conditioning": "none", "normalization": "none"})
        out = SAE(folded_cfg).to(device=device, dtype=self.W_enc.dtype)
        out.W_enc.copy_(w_enc[None])
        out.W_dec.copy_(w_dec[None])
        out.b_enc.copy_(self.b_enc[b][None])
        out.b_dec.copy_(b_dec[None])
        if cfg.sparsity == "jumprelu":
            out.log_threshold.copy_(self.log_threshold[b][None])
        if cfg.sparsity == "batchtopk":
            out.threshold.copy_(self.threshold[b][None])
            out.threshold_steps.copy_(self.threshold_steps[b][None])
        return out.train(self.training)
