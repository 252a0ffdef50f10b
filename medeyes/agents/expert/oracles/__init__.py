"""Region oracles: what the expert asks before it moves its gaze (METHOD.md section 3).

One small protocol, :class:`~medeyes.agents.expert.oracles.base.RegionOracle`, with the two calls of the
paper's GRN:

- ``scan(image, question) -> [ScoredRegion(box, confidence), ...]``: "Please locate all abnormal regions";
- ``drill(image, box, question) -> confidence``: "Is any abnormality in this region?"

and an optional third, ``read(image, question, options, focus) -> str | None``, for facts that
regions cannot tell (the imaging modality, say); an oracle that cannot read returns ``None``.

Import the pieces from their modules:

- :mod:`medeyes.agents.expert.oracles.base`: ``RegionOracle``, ``ScoredRegion``, ``OracleError`` and the
  helpers the oracles share (``clip01``, ``rng_or_default``);
- :mod:`medeyes.agents.expert.oracles.factory`: ``make_oracle(name, **options)``, ``OracleName``, ``ORACLES``;
- :mod:`medeyes.agents.expert.oracles.annotation`: ``AnnotationOracle``, the case's gold regions seen through
  calibrated noise, plus plausible distractor regions inside the anatomy. Needs labels; the only oracle that
  sees ``case``;
- :mod:`medeyes.agents.expert.oracles.image`: ``ImageOracle``, no labels. A classical blob detector
  (scale-normalised determinant of the Hessian over a few scales, FFT Gaussian filtering, robust z-scores
  against the image's own background) with confidence from the score; the drill re-measures the region at full
  resolution and checks that the blob is solid (a filled nodule, not a ring such as a vessel seen end-on);
- :mod:`medeyes.agents.expert.oracles.vlm`: ``VLMOracle``, any OpenAI-compatible chat endpoint
  (``vllm serve``): boxes as JSON for a scan, the probability of "yes" from the first token's
  log-probabilities for a drill.

Every call takes ``case`` and ``rng`` keywords: the annotation oracle reads ``case`` and draws its
noise from ``rng`` (so one seed gives one trajectory); the others ignore what they do not need.
"""
