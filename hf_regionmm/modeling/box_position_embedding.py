"""A small MLP that turns normalized box coordinates into an embedding added to region features.

Two papers use the same shape of block:

* Groma (section 3.1, "Region Encoder"): ``pos_embedd`` = Linear(4, 256) -> ReLU -> LayerNorm -> Linear(256, 1024)
  -> ReLU -> LayerNorm on the normalized box, added to the pooled region feature. Checkpoint keys
  ``pos_embedd.{0,2,3,5}``.
* RegionBLIP (section 3.1, PaFE "position-assisted feature extraction"): Linear(4, 128) -> GELU -> Linear(128, 768)
  for image boxes (normalized xyxy) and Linear(24, 128) -> GELU -> Linear(128, 768) for point-cloud boxes (8 corners
  x xyz), added to every Q-Former query token.

The layers live in one ``nn.Sequential`` named ``layers`` whose indices never depend on anything but the options,
so original checkpoints convert by renaming the prefix only.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["BoxPositionEmbedding"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class BoxPositionEmbedding(nn.Module):
    """``Linear(in, hidden) -> act -> [LayerNorm(hidden)] -> Linear(hidden, out) -> [act] -> [LayerNorm(out)]``.

    Args:
        in_features: coordinates per box: 4 for an image box, 24 for the 8 corners of a 3-D box.
        hidden_size: width of the hidden layer (Groma 256, RegionBLIP 128).
        out_features: embedding size, i.e. the width of the features it is added to (Groma 1024, RegionBLIP 768).
        activation: ``"relu"``, ``"gelu"`` (exact erf GELU), ``"silu"`` or ``"tanh"``.
        layer_norm: insert a LayerNorm after the hidden activation and at the end (Groma: True, RegionBLIP: False).
        final_activation: apply the activation after the second Linear too (Groma: True, RegionBLIP: False).
        layer_norm_eps: epsilon of both LayerNorms (PyTorch's default matches Groma's ``nn.LayerNorm``).

    Module indices in ``self.layers``: Groma's options give Linear 0, ReLU 1, LayerNorm 2, Linear 3, ReLU 4,
    LayerNorm 5; RegionBLIP's give Linear 0, GELU 1, Linear 2.
    """

    def __init__(
        self,
        in_features: int = 4,
        hidden_size: int = 256,
        out_features: int = 1024,
        activation: str = "relu",
        layer_norm: bool = True,
        final_activation: bool = True,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("hidden_size", hidden_size),
            ("out_features", out_features),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; got {activation!r}.")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.activation = activation

        layers: list[nn.Module] = [nn.Linear(in_features, hidden_size), _ACTIVATIONS[activation]()]
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_size, eps=layer_norm_eps))
        layers.append(nn.Linear(hidden_size, out_features))
        if final_activation:
            layers.append(_ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(nn.LayerNorm(out_features, eps=layer_norm_eps))
        self.layers = nn.Sequential(*layers)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        """Embed boxes.

        Args:
            boxes: ``(..., in_features)`` float, normalized coordinates (image boxes: xyxy divided by the image
                width/height, in ``[0, 1]``; 3-D boxes: the 8 corners flattened corner by corner).

        Returns:
            ``(..., out_features)`` in the dtype of the module's weights.
        """
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(f"`boxes` must be a torch.Tensor of shape (..., {self.in_features}); got {type(boxes)}.")
        if not boxes.is_floating_point():
            raise TypeError(f"`boxes` must be a floating point tensor; got {boxes.dtype}. Use `boxes.float()`.")
        if boxes.ndim == 0 or boxes.shape[-1] != self.in_features:
            raise ValueError(
                f"`boxes` must have {self.in_features} coordinates in the last dim (shape (..., {self.in_features})); "
                f"got shape {tuple(boxes.shape)}."
            )
        first_linear = self.layers[0]
        return self.layers(boxes.to(dtype=first_linear.weight.dtype))
