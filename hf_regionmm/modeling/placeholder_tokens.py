"""Keep `generate` from emitting placeholder tokens that the model fills from pixel, region or video inputs.

Placeholders such as Groma's `<image>`/`<region>` or u-LLaVA's `<image_patch>` mark where the forward pass writes
visual features, and the forward pass checks that their count matches its visual inputs. A sampled placeholder in a
generated answer would make the next pass (a decode step, or a teacher-forced pass over the answer as in u-LLaVA's
`predict`) expect features that do not exist, so every generative head suppresses them in its generation config.
"""

from collections.abc import Iterable

from transformers import PreTrainedModel

__all__ = ["suppress_placeholder_tokens"]


def suppress_placeholder_tokens(model: PreTrainedModel, token_ids: Iterable[int]) -> None:
    """Add `token_ids` to `model.generation_config.suppress_tokens` (kept sorted, without duplicates)."""
    if model.generation_config is None:
        return
    existing = model.generation_config.suppress_tokens or []
    model.generation_config.suppress_tokens = sorted({*existing, *(int(t) for t in token_ids)})
