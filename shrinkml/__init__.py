"""shrinkml: make trained neural networks smaller, faster and cheaper, and prove it with measurements.

>>> import shrinkml
>>> result = shrinkml.compress(  # doctest: +SKIP
...     model, [{"technique": "prune.channels", "channel_ratio": 0.5},
...             {"technique": "finetune", "epochs": 3},
...             {"technique": "quantize.dynamic"}], data="data.npz")

The import stays light: heavy libraries load when a verb is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Budget", "CompressResult", "Recipe", "RunSettings", "SearchResult", "bench", "compress", "explain", "search",
           "__version__"]

if TYPE_CHECKING:
    from shrinkml.api import Budget, CompressResult, RunSettings, bench, compress, explain
    from shrinkml.recipe import Recipe
    from shrinkml.recipe_search.run import SearchResult, search


def __getattr__(name: str) -> Any:
    if name in {"Budget", "CompressResult", "RunSettings", "bench", "compress", "explain"}:
        from shrinkml import api

        return getattr(api, name)
    if name in {"search", "SearchResult"}:
        from shrinkml.recipe_search import run

        return getattr(run, name)
    if name == "Recipe":
        from shrinkml.recipe import Recipe

        return Recipe
    raise AttributeError(f"module 'shrinkml' has no attribute {name!r}")
