"""One transformers model build at a time in this process.

transformers (5.x) swaps process-wide state for the length of a ``from_pretrained`` or ``from_config``: it
replaces ``PreTrainedModel.tie_weights`` and the ``torch.nn.init`` functions with no-ops and sets torch's default
dtype, then puts back what it found. Two builds in two threads can each put back the other's stand-in, which
leaves weight tying (or initialisation) switched off for the rest of the process: every later model with
``tie_word_embeddings=True`` comes out untied. deltatune builds its models under :data:`MODEL_BUILD_LOCK`, so
a program that loads adapters from several threads (a server, a test) gets whole models.
"""

from __future__ import annotations

import threading

MODEL_BUILD_LOCK = threading.RLock()
"""Held around every transformers model build deltatune makes (re-entrant: a build may build another)."""
