"""Neural networks: the amortized encoder h(u, s) and the rate decoder g(c)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Lower bound on predicted standard deviations: keeps q from collapsing to a point.
MIN_SCALE = 1e-4


class WideLinear(nn.Linear):
    """A linear layer whose training-time product may run in bfloat16 on the CPU.

    Used for the layers that touch every gene (the encoder's ``2G -> 500`` input layer,
    the decoder's ``500 -> G`` output layer), which hold almost all of the networks'
    arithmetic. While the layer's :attr:`bf16` is set and gradients are
    recorded, the product runs under ``torch.autocast`` in bfloat16 with float32
    accumulation and the output is returned in the input's dtype; parameters and
    optimiser state keep theirs. Evaluation passes (no gradients: validation, export)
    always run at full precision, so reported results are those of the float32 network.
    """

    #: a per-instance switch: training sets it on the layers it trains while it runs
    #: (see :func:`pyro_velo.inference.stages.speed_settings`)
    bf16: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.bf16 and torch.is_grad_enabled() and x.device.type == "cpu":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward(x).to(x.dtype)
        return super().forward(x)


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 matrix products (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # torch builds without the query
        return False


def mlp(
    n_input: int, hidden: Sequence[int], dropout: float, batch_norm: bool = True,
    input_layer: type[nn.Linear] = nn.Linear,
) -> nn.Sequential:
    """Fully connected body: ``Linear -> [BatchNorm] -> ReLU -> Dropout`` per hidden layer.

    ``input_layer`` is the class of the first linear layer (e.g. :class:`WideLinear`).
    """
    layers: list[nn.Module] = []
    width = n_input
    for n_out in hidden:
        linear = input_layer if not layers else nn.Linear
        layers.append(linear(width, n_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(n_out))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = n_out
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Amortized encoder ``h(u, s)`` of the paper (section 3.3, Figure 3).

    An MLP ``2G -> 500 -> 250`` with batch normalisation and dropout whose bottleneck gives
    the mean and standard deviation of ``q(t | u, s)`` and, when ``latent_dim > 0``, of
    ``q(c | u, s)``.

    Parameters
    ----------
    n_genes
        Number of genes ``G``; the input is ``[u, s]`` of width ``2G``.
    hidden
        Hidden layer widths.
    dropout
        Dropout probability after each hidden layer.
    t_max
        Length of the model's time axis: the posterior mean of t is
        ``t_max * sigmoid(.)``, so it starts inside ``[0, t_max]`` and cannot run away.
    latent_dim
        Dimension of the cell state c (0 for the basic model).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (500, 250),
        dropout: float = 0.2,
        t_max: float = 20.0,
        latent_dim: int = 0,
    ) -> None:
        super().__init__()
        self.t_max = float(t_max)
        self.latent_dim = int(latent_dim)
        self.body = mlp(2 * n_genes, hidden, dropout, input_layer=WideLinear)
        width = hidden[-1] if len(hidden) else 2 * n_genes
        self.t_head = nn.Linear(width, 2)
        self.c_head = nn.Linear(width, 2 * latent_dim) if latent_dim > 0 else None

    @torch.no_grad()
    def mirror_time(self) -> None:
        """Reverse the direction of the encoded time: ``t -> t_max - t`` exactly."""
        self.t_head.weight[0].neg_()
        self.t_head.bias[0].neg_()

    def hidden(self, u: Tensor, s: Tensor) -> Tensor:
        """The bottleneck features ``(B, hidden[-1])`` the heads read (for extra heads)."""
        return self.body(torch.cat([u, s], dim=-1))

    def forward(self, u: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Return ``t_loc, t_scale, c_loc, c_scale`` (the last two None when no cell state)."""
        return self.heads(self.hidden(u, s))

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``t_loc, t_scale, c_loc, c_scale`` from bottleneck features ``h``."""
        t_out = self.t_head(h)
        t_loc = self.t_max * torch.sigmoid(t_out[..., 0])
        t_scale = nn.functional.softplus(t_out[..., 1] - 2.0) + MIN_SCALE
        if self.c_head is None:
            return t_loc, t_scale, None, None
        c_out = self.c_head(h)
        c_loc, c_raw = c_out.split(self.latent_dim, dim=-1)
        return t_loc, t_scale, c_loc, nn.functional.softplus(c_raw - 2.0) + MIN_SCALE


class Decoder(nn.Module):
    """Rate decoder ``g(c)``: cell state to relative transcription rate ``rho`` in (0, 1).

    The mirror image of the encoder (``d -> 250 -> 500 -> G``, paper section 3.4) with a
    sigmoid output, one ``rho`` per gene. It has no batch normalisation: it is part of the
    generative model, whose prediction for a cell must not depend on its minibatch.

    Parameters
    ----------
    latent_dim, n_genes
        Input (cell state) and output (genes) widths.
    hidden
        Hidden layer widths.
    initial_rho
        The network starts near this constant output (small last-layer weights), so a
        model initialised from a fitted basic model (``rho = 1``) starts close to it.
    """

    def __init__(
        self,
        latent_dim: int,
        n_genes: int,
        hidden: Sequence[int] = (250, 500),
        initial_rho: float = 0.9,
    ) -> None:
        super().__init__()
        self.body = mlp(latent_dim, hidden, dropout=0.0, batch_norm=False)
        width = hidden[-1] if len(hidden) else latent_dim
        self.out = WideLinear(width, n_genes)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.fill_(float(torch.logit(torch.tensor(initial_rho))))

    def forward(self, c: Tensor) -> Tensor:
        """``rho`` of shape ``(..., G)`` for cell states ``c`` of shape ``(..., d)``."""
        batch = c.shape[:-1]
        h = self.body(c.reshape(-1, c.shape[-1]))
        return torch.sigmoid(self.out(h)).reshape(*batch, -1)
