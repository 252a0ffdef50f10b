"""The phantom source: procedural medical images where small findings need a closer look (the default data).

``open_source("phantom[:easy|medium|look|hard]")`` opens it; the benchmark (modalities, question families,
seeding, what drilling buys) is described in :mod:`~medeyes_env.sources.phantom.source`. Import the pieces
from their modules:

- :mod:`medeyes_env.sources.phantom.source`: ``PhantomSource`` (cases, their questions and gold answers,
  ``swapped_case``), ``open_phantom`` and ``open_phantom_with_options``, registered as ``phantom``;
- :mod:`medeyes_env.sources.phantom.config`: ``PhantomConfig``, ``PRESETS``, the question ``FAMILIES`` and
  the constants behind the questions (``SALT``, ``SPLIT_CODES``, size classes, wording per modality);
- :mod:`medeyes_env.sources.phantom.layout`: where things go: ``organ_sdf``, ``lesion_site``, the
  ``SceneBuilder`` that places findings and mimics from the case RNG, gold boxes of extended findings;
- :mod:`medeyes_env.sources.phantom.render`: ``render``, a scene to an RGB image (the layers of a picture);
- :mod:`medeyes_env.sources.phantom.scene`: the drawing kit: ``Anatomy``, ``Focal``, ``Extended``, shape,
  noise and lesion/mimic profile tools;
- :mod:`medeyes_env.sources.phantom.chest`, :mod:`~medeyes_env.sources.phantom.brain`,
  :mod:`~medeyes_env.sources.phantom.ct`: each modality's anatomy (``sample_*``, organ SDFs) and renderer.

Imports run one way: source -> layout, render, config -> chest, brain, ct -> scene.
"""
