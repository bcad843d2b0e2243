"""Model-card hook: plain `model.save_pretrained(dir)` / `model.push_to_hub(repo)` write the system's own card.

transformers writes no card on `save_pretrained`, and `push_to_hub` uploads the repository's existing README or, when
there is none, a generic "automatically generated" card. A user of this library who publishes with the plain
transformers calls should get the system's card (`hub_cards/<system>.md`: usage snippet, training stages, citation)
instead.

The card templates live in the `hf_regionmm` package, which this flat folder must not import (it ships as Hub remote
code). So the hook is a class attribute, `model_card_writer`, that `hf_regionmm.registry.register_system` fills in
for every registered model class; where `hf_regionmm` is not installed (remote code) it stays `None` and the classes
behave exactly like transformers' own.

- `save_pretrained(dir)`: after transformers has saved, writes `dir/README.md` with the writer, unless a README is
  already there (a card the user wrote or `hf_regionmm.hub.publish.save_pretrained` filled in is never overwritten)
  or this is not the main process, or the folder holds no config.json (an adapter-only save).
- `push_to_hub(repo)` (and `save_pretrained(dir, push_to_hub=True)`): right before the upload, a README that is
  transformers' generic auto-generated card is replaced by the system's card; a card already on the Hub repository
  (loaded by transformers) is kept.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

# The sentence transformers puts into the card it generates when a repository has none (transformers.utils.hub).
_GENERIC_CARD_MARKER = "This model card has been automatically generated."


class ModelCardHookMixin:
    """Mixin for the `PreTrainedModel` bases of this folder; put it before `PreTrainedModel` in the bases.

    `model_card_writer(model, directory, model_id)` writes `directory/README.md` for the repository id `model_id`
    (None: the folder name); None (the default, and remote code) keeps transformers' behaviour.
    """

    model_card_writer: ClassVar[Callable[[Any, Path, str | None], Any] | None] = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        is_main_process = kwargs.get("is_main_process", True)
        writer = type(self).model_card_writer
        readme = Path(save_directory) / "README.md"
        had_readme = readme.exists()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # An adapter-only save (transformers' PEFT integration) has no config.json: its card is peft's business.
        saved_model = (Path(save_directory) / "config.json").is_file()
        if writer is not None and is_main_process and saved_model and not had_readme and not readme.exists():
            writer(self, Path(save_directory), None)
        return result

    def _upload_modified_files(self, working_dir: str | os.PathLike, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        # transformers' push path: save_pretrained(tmp) -> README.md = repo card or generic card -> this upload.
        writer = type(self).model_card_writer
        readme = Path(working_dir) / "README.md"
        generic = not readme.exists() or _GENERIC_CARD_MARKER in readme.read_text(encoding="utf-8")
        if writer is not None and generic and (Path(working_dir) / "config.json").is_file():
            readme.unlink(missing_ok=True)
            writer(self, Path(working_dir), repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)
