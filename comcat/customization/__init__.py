"""The customization side: per-head low-rank attention adapters for text-to-image models
(adapter/), the pipelines and concept images (diffusion/), training one (customize) and
generating with it (generate). Imports only comcat.core from the rest of comcat."""
