"""hf_regionmm: region-level multimodal LLMs as Hugging Face transformers models."""
__version__ = "0.1.0.dev0"
