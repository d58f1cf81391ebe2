"""Confidence-scheduled verification: the target's measured cost (`cost_profile`), the prefix schedulers
(`schedulers`) and confidence calibration with its metrics (`calibration`)."""
