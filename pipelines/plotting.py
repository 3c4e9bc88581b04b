"""matplotlib for every figure the platform draws: files only, no display, so the backend is Agg, chosen here once.

    from pipelines.plotting import plt
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

__all__ = ["plt"]
