"""``cai review``: people label judged pairs blind on a local page, and what their labels say
about the judge.

    cai review RUN_DIR [--annotator NAME] [--sample margin] [--limit 50]   the page
    cai review stats RUN_DIR                                               agreement, kappa, ...
    cai review export RUN_DIR --out human.jsonl                            pairs for load_pairs

``items.py`` (the pairs and their review order), ``labels.py`` (``review/labels.jsonl``,
append-only), ``stats.py`` (agreement, kappa, reliability, length, inter-annotator),
``preferences.py`` (the labels as preference pairs), ``labelstudio.py`` (Label Studio tasks and
annotations), ``app.py`` (the page's HTTP side) and ``page.py`` (the page).
"""

from cai.review.items import Item, ReviewError, load_items, sample
from cai.review.labels import LabelLog, live_labels, read_labels, side_shown
from cai.review.stats import review_stats

__all__ = [
    "Item",
    "LabelLog",
    "ReviewError",
    "live_labels",
    "load_items",
    "read_labels",
    "review_stats",
    "sample",
    "side_shown",
]
