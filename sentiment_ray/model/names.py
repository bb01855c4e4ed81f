"""The names a config gives for the two base models this package builds itself rather than loads from a hub.

Here, below `config` and `hub_id` alike: the config defaults to one of them, and `hub_id` tells them apart.
"""

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"  # SmolLM2-135M-Instruct, converted from the GGUF of a PyPI package
TINY_MODEL = "embedded:tiny-random-mistral"  # built locally in a second; for tests and smoke runs
