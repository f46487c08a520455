"""posttrain: post-training and continual learning of language models, with a forgetting report per stage."""
__version__ = "0.1.0"
