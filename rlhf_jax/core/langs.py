"""The languages the recipe trains on and measures, defined once.

Everything per-language (batches' language ids, per-language metrics, the report's columns,
the feedback store's check) iterates over `LANGS`. Adding a language means adding it here,
giving it data sources (data/sources.py), gold and check scorers (data/labelers.py) and a
script rule (eval/diagnostics.py); no other module names languages.
"""
LANGS = ("en", "zh")


def lang_id(lang: str) -> int:
  """The index of a language in LANGS (what batches carry), -1 for one outside it."""
  return LANGS.index(lang) if lang in LANGS else -1
