"""igdrec: LLM sequential recommendation with Information-Gain Debiasing.

`from igdrec import Recommender` is the Python API (igdrec.api); it is imported on first use, so that
`import igdrec` stays light (no torch).
"""

__all__ = ["Recommender", "Recommendation"]


def __getattr__(name: str):
    if name in __all__:
        from igdrec import api

        return getattr(api, name)
    raise AttributeError(f"module 'igdrec' has no attribute {name!r}")
