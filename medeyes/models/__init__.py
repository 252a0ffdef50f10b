"""Locally built vision-language models (random weights, real architectures), model loading and tokenising.

Importing this package does not import torch or transformers; the functions that need them do. Import the
pieces from their modules:

- :mod:`medeyes.models.factory`: ``build_tiny_model``, ``ensure_tiny_model`` (build once into the cache),
  ``load_policy_model`` (a directory, an alias such as ``tiny``, or a named remote id), ``resolve_model_path``,
  ``model_aliases``, ``cache_dir``;
- :mod:`medeyes.models.presets`: the architectures and sizes as data (``ModelPreset``, ``get_preset``, ``ARCHS``);
- :mod:`medeyes.models.processors`: ``load_processor``, without torchvision where need be;
- :mod:`medeyes.models.tokenizer`: the byte-level BPE tokenizer trained on the protocol's vocabulary;
- :mod:`medeyes.models.chat`: what backends and the trainer read off a conversation and its chat template;
- :mod:`medeyes.models.episodes`: a whole episode to training tensors with an exact loss mask;
- :mod:`medeyes.models.vision_dedupe`: one vision-encoder pass per distinct image of a batch.
"""
