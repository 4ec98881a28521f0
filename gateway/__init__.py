"""A self-hosted live market-data gateway speaking Databento's Live Raw API."""

__version__ = "0.1.0"

__all__ = ["__version__"]
