"""Optional integrations with other libraries (each needs its extra, e.g. ``pip install expressive-attention[hf]``).

- `expressive_attention.integrations.transformers`: expressive attention inside Hugging Face models.
"""
