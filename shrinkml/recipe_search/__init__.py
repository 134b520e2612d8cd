"""``shrinkml search``: give it targets, get the best recipe (see ``shrinkml.recipe_search.run``).

>>> from shrinkml.recipe_search import search  # doctest: +SKIP
>>> result = search("mypkg:make_net", weights="net.safetensors", data="data.npz", out="search-out",
...                 max_size_bytes=10_000_000, max_latency_ms=50, trials=30)  # doctest: +SKIP
>>> result.best_recipe, result.met  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["SearchResult", "search"]


def __getattr__(name: str) -> Any:  # light: Optuna and the pipeline load when a search runs
    if name in __all__:
        from shrinkml.recipe_search import run

        return getattr(run, name)
    raise AttributeError(f"module 'shrinkml.recipe_search' has no attribute {name!r}")
