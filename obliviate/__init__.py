"""obliviate: DeepObliviate machine unlearning (He et al., 2021) as a reproducible pipeline."""

__version__ = "0.1.0"
