"""Data specs and the calibration / fine-tune / test splits every run uses."""

from shrinkml.data.arrays import ArrayData, Splits, SplitFractions, make_splits
from shrinkml.data.load import load_data

__all__ = ["ArrayData", "SplitFractions", "Splits", "load_data", "make_splits"]
