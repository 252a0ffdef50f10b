"""MedEyes over the network: an OpenEnv-compatible server (``medeyes serve``) and its client.

Needs the ``serve`` extra (``pip install "medeyes[serve]"``: ``openenv``, which brings FastAPI,
uvicorn and websockets). Nothing here imports torch. Import the pieces from their modules:

- :mod:`medeyes_env.serving.wire`: the action, observation and state models on the wire, and the
  PNG data-URL codec for views;
- :mod:`medeyes_env.serving.server`: the OpenEnv ``Environment`` and ``build_app`` / ``serve``;
- :mod:`medeyes_env.serving.client`: ``MedEyesClient``, OpenEnv's ``EnvClient`` for MedEyes.
"""
