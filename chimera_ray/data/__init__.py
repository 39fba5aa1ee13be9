"""Synthetic and small real image datasets with long-tail splits and boxes."""
