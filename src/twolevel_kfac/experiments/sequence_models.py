"""Transformer models of the sequence and vision problems: ``tiny_gpt`` and ``vit``.

Both stack ``depth`` pre-norm encoder layers (``nn.TransformerEncoderLayer(width, heads,
4·width, dropout=0, activation="gelu", batch_first=True, norm_first=True)``):

    h ← h + MHA(LN₁(h)),   h ← h + W₂ GELU(W₁ LN₂(h) + b₁) + b₂

on ``h`` of shape ``[N, T, width]``, batch first (every module keeps the batch as the first
dimension of its inputs, which KFAC's hooks need).

| name | input → output | layers |
|---|---|---|
| ``tiny_gpt`` | ids ``[N, T]`` (``T ≤ context``) → ``[N, T, vocab]`` | Embedding + positions, |
| | | causal encoder layers, LayerNorm, Linear head |
| ``vit`` | ``[N, C·S²]`` or ``[N, C, S, S]`` → ``[N, classes]`` | patches (Conv2d, stride = |
| | | patch) + positions, encoder layers, mean over patches, LayerNorm, Linear head |

Which parameters KFAC preconditions: the token embedding (a Kronecker block on one-hot
tokens), the attention's packed input projection and output projection, both feed-forward
Linears, the patch Conv2d and the head; the LayerNorms and the positional tensors have no
block and take the optimizer's ``fallback`` step.

Init: :func:`~twolevel_kfac.experiments.initialization.init_weights` (Xavier-uniform Linear
and Conv2d weights, zero biases; the attention's packed ``in_proj`` keeps torch's
Xavier-uniform), LayerNorm weight 1 and bias 0, and N(0, 0.02²) token embeddings and
positions (GPT-2's).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twolevel_kfac.experiments.initialization import init_weights

__all__ = ["TinyGPT", "ViT", "encoder_layers", "tiny_gpt", "vit"]

EMBEDDING_STD = 0.02  # GPT-2's init of the token embeddings and positions


def encoder_layers(width: int, depth: int, heads: int) -> nn.ModuleList:
    """``depth`` pre-norm GELU encoder layers of width ``width``, feed-forward ``4·width``.

    Args:
        width: Model width ``d`` (a multiple of ``heads``).
        depth: Number of layers.
        heads: Attention heads per layer.

    Returns:
        The layers (batch first, no dropout).

    Raises:
        ValueError: ``width`` is not a multiple of ``heads``, or a size below 1.
    """
    if min(width, depth, heads) < 1 or width % heads:
        raise ValueError(
            f"width={width}, depth={depth}, heads={heads}: need positive sizes and a width "
            "that is a multiple of heads"
        )
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            width,
            heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        for _ in range(depth)
    )


def _init(model: nn.Module, *tables: Tensor) -> None:
    """``init_weights``, then N(0, ``EMBEDDING_STD``²) for embeddings and ``tables``."""
    init_weights(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, EMBEDDING_STD)
        for table in tables:
            table.normal_(0.0, EMBEDDING_STD)


class TinyGPT(nn.Module):
    """Character-level GPT: ``logits = W_o LN(f_L ∘ … ∘ f_1(E[x] + P)) + b_o`` with causal
    self-attention, so the logits at position ``t`` depend on ``x_1 … x_t`` only."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int) -> None:
        """Build the model.

        Args:
            vocab: Number of token ids ``V``.
            context: Longest input ``T_max`` (rows of the positional table).
            width: Model width ``d``.
            depth: Encoder layers ``L``.
            heads: Attention heads.

        Raises:
            ValueError: A size below 1 (or see :func:`encoder_layers`).
        """
        super().__init__()
        if min(vocab, context) < 1:
            raise ValueError(f"vocab={vocab}, context={context}: need positive sizes")
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, context, width))  # P, batch first
        self.layers = encoder_layers(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        _init(self, self.position)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``[N, T, V]`` of token ids ``[N, T]``.

        Raises:
            ValueError: Inputs that are not ``[N, T]`` or longer than ``context``.
        """
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise ValueError(
                f"tiny_gpt takes token ids [N, T] with T <= context {self.context}; "
                f"got shape {list(tokens.shape)}"
            )
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.embed(tokens) + self.position[:, :length]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class ViT(nn.Module):
    """Vision Transformer: ``logits = W_o LN(mean_p f_L ∘ … ∘ f_1(patches(x) + P)) + b_o``,
    the patches a ``Conv2d`` with kernel = stride = ``patch`` (one token per patch)."""

    def __init__(
        self, image_size: int, patch: int, channels: int, width: int, depth: int, heads: int,
        classes: int,
    ) -> None:  # fmt: skip
        """Build the model.

        Args:
            image_size: Side ``S`` of the square input images.
            patch: Side of a patch (divides ``S``); ``(S / patch)²`` tokens.
            channels: Input channels ``C``.
            width: Model width ``d``.
            depth: Encoder layers ``L``.
            heads: Attention heads.
            classes: Output classes.

        Raises:
            ValueError: ``patch`` does not divide ``image_size``, or a size below 1.
        """
        super().__init__()
        if min(image_size, patch, channels, classes) < 1 or image_size % patch:
            raise ValueError(
                f"image_size={image_size}, patch={patch}, channels={channels}, "
                f"classes={classes}: need positive sizes and a patch dividing the image size"
            )
        self.image_size, self.channels = image_size, channels
        self.patches = nn.Conv2d(channels, width, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, width))
        self.layers = encoder_layers(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        _init(self, self.position)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, classes]`` of images ``[N, C·S²]`` (flat) or ``[N, C, S, S]``."""
        x = x.reshape(len(x), self.channels, self.image_size, self.image_size)
        h = self.patches(x).flatten(2).transpose(1, 2) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h.mean(dim=1)))


def tiny_gpt(
    vocab: int = 128, context: int = 128, width: int = 128, depth: int = 4, heads: int = 4
) -> TinyGPT:
    """Character-level GPT (registry name ``tiny_gpt``); see :class:`TinyGPT`.

    Args:
        vocab: Number of token ids (``stdlib_chars``: 128).
        context: Longest input (the data set's ``context``).
        width: Model width.
        depth: Encoder layers.
        heads: Attention heads.

    Returns:
        The initialised model.
    """
    return TinyGPT(vocab, context, width, depth, heads)


def vit(
    image_size: int = 28,
    patch: int = 7,
    channels: int = 1,
    width: int = 64,
    depth: int = 4,
    heads: int = 4,
    classes: int = 10,
) -> ViT:
    """Small vision Transformer (registry name ``vit``; MNIST defaults); see :class:`ViT`.

    Args:
        image_size: Side of the square images.
        patch: Side of a patch.
        channels: Input channels.
        width: Model width.
        depth: Encoder layers.
        heads: Attention heads.
        classes: Output classes.

    Returns:
        The initialised model.
    """
    return ViT(image_size, patch, channels, width, depth, heads, classes)
