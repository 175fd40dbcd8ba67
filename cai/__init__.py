"""cai: Constitutional AI / RLAIF.

Principles in YAML constitutions and Jinja prompt templates drive a batched generation engine
(``cai.engine``) that produces critique→revision SFT data and AI-judged preference pairs.
"""

__version__ = "0.1.0"
