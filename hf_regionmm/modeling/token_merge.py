"""2-D token merge (space-to-depth): fold each ``f x f`` block of patch tokens into one wider token.

Groma (section 3.1, "Image Encoder") merges every 2x2 neighbourhood of DINOv2 patch tokens (32 x 32 x 1024 at 448
pixels) into one token (16 x 16 x 4096) before the projector, to cut the image tokens the LLM sees by four. The
released code concatenates ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]`` -- the row offset varies
fastest ("column_major" here). The projector weights depend on this channel order, so it is a named option rather
than a detail.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["merge_tokens_2d", "TokenMerge2d"]

_ORDERS = ("column_major", "row_major")


def merge_tokens_2d(
    tokens: torch.Tensor,
    grid_size: tuple[int, int] | None = None,
    factor: int = 2,
    order: str = "column_major",
) -> torch.Tensor:
    """Merge ``factor x factor`` blocks of a token grid into single tokens.

    Args:
        tokens: ``(B, H * W, C)`` patch tokens in row-major patch order (no CLS token), or a ``(B, H, W, C)`` grid.
        grid_size: ``(H, W)`` of a ``(B, H * W, C)`` input; ``None`` means a square grid. Must match the grid of a
            4-D input if given.
        factor: block side ``f``; ``H`` and ``W`` must be divisible by it.
        order: order of the ``f * f`` sub-grids concatenated along channels. ``"column_major"`` (Groma):
            (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1) -- row offset fastest.
            ``"row_major"``: (0, 0), (0, 1), (1, 0), (1, 1) -- column offset fastest.

    Returns:
        ``(B, (H / f) * (W / f), f * f * C)``: merged tokens in row-major order over the merged grid; channels
        ``[k * C, (k + 1) * C)`` hold the ``k``-th sub-grid in ``order``.
    """
    if order not in _ORDERS:
        raise ValueError(f"`order` must be one of {_ORDERS}; got {order!r}.")
    if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"`factor` must be an integer >= 1; got {factor!r}.")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"`tokens` must be a torch.Tensor of shape (B, H*W, C) or (B, H, W, C); got {type(tokens)}.")
    if tokens.ndim == 4:
        batch_size, height, width, channels = tokens.shape
        if grid_size is not None and tuple(grid_size) != (height, width):
            raise ValueError(
                f"`grid_size` {tuple(grid_size)} does not match the (H, W) = {(height, width)} of the 4-D `tokens`; "
                f"drop `grid_size` or fix it."
            )
    elif tokens.ndim == 3:
        batch_size, num_tokens, channels = tokens.shape
        if grid_size is None:
            side = int(round(num_tokens**0.5))
            if side * side != num_tokens:
                raise ValueError(
                    f"`tokens` has {num_tokens} tokens, which is not a square grid; pass `grid_size=(H, W)` "
                    f"(and drop any CLS token first)."
                )
            height = width = side
        else:
            if len(grid_size) != 2 or not all(isinstance(side, numbers.Integral) and side > 0 for side in grid_size):
                raise ValueError(f"`grid_size` must be (H, W) with two positive integers; got {grid_size!r}.")
            height, width = int(grid_size[0]), int(grid_size[1])
            if height * width != num_tokens:
                raise ValueError(
                    f"`grid_size` {(height, width)} gives {height * width} tokens but `tokens` has {num_tokens}; "
                    f"pass the patch grid of the image (and drop any CLS token first)."
                )
    else:
        raise ValueError(f"`tokens` must have shape (B, H*W, C) or (B, H, W, C); got {tuple(tokens.shape)}.")
    if height % factor or width % factor:
        raise ValueError(
            f"the token grid (H, W) = {(height, width)} must be divisible by `factor` = {factor}; "
            f"resize the image so the patch grid is a multiple of {factor}."
        )

    merged_height, merged_width = height // factor, width // factor
    blocks = tokens.reshape(batch_size, merged_height, factor, merged_width, factor, channels)
    # dims: (B, merged_row, row_offset, merged_col, col_offset, C); the last two offsets flattened become channels,
    # and whichever offset sits later in the permutation varies fastest.
    if order == "column_major":
        blocks = blocks.permute(0, 1, 3, 4, 2, 5)
    else:
        blocks = blocks.permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch_size, merged_height * merged_width, factor * factor * channels)


class TokenMerge2d(nn.Module):
    """Module wrapper of :func:`merge_tokens_2d` (no parameters); see it for shapes and the ``order`` option."""

    def __init__(self, factor: int = 2, order: str = "column_major", grid_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if order not in _ORDERS:
            raise ValueError(f"`order` must be one of {_ORDERS}; got {order!r}.")
        if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"`factor` must be an integer >= 1; got {factor!r}.")
        self.factor = int(factor)
        self.order = order
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))

    def extra_repr(self) -> str:
        return f"factor={self.factor}, order={self.order!r}, grid_size={self.grid_size}"

    def forward(self, tokens: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, H * W, C)`` or ``(B, H, W, C)`` -> ``(B, (H / f) * (W / f), f * f * C)``.

        ``grid_size`` overrides the one given at construction (e.g. for a different input resolution).
        """
        return merge_tokens_2d(
            tokens,
            grid_size=grid_size if grid_size is not None else self.grid_size,
            factor=self.factor,
            order=self.order,
        )
