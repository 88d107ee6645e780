"""bupo: Bottom-up Policy Optimization (arXiv 2512.19673).

Conventions used everywhere in this package:
- layers are 0-based as in the official code: internal layer ``k`` is paper layer ``l = k + 1``;
- entropies are in nats;
- the projection of a hidden state onto the vocabulary is recorded with every output
  (``raw`` = lm_head(h), the paper's; ``final_norm`` = lm_head(final_norm(h)), the logit lens).
"""

__version__ = "0.1.0"
