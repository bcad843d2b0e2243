"""hf_regionmm: region-level multimodal LLMs as Hugging Face transformers models."""

__version__ = "0.1.0.dev0"

# Registers every system (config, models, processors) with the registry and the transformers Auto classes.
from . import systems  # noqa: E402, F401
