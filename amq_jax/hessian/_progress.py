"""Progress bars for the estimators: ``tqdm.auto``, quiet about a missing ipywidgets."""
from __future__ import annotations

import warnings

__all__ = ["bar"]


def bar(enabled: bool, **kwargs):
  """A ``tqdm.auto`` bar, or None when ``enabled`` is false.

  In a notebook without ipywidgets ``tqdm.auto`` falls back to the text bar with a
  warning; the fallback is fine, so the warning is silenced.
  """
  if not enabled:
    return None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm
    return tqdm(dynamic_ncols=True, **kwargs)
