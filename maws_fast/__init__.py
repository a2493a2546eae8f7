"""maws_fast: MAE pre-pretraining -> weakly supervised pretraining -> transfer, for ViTs."""

__version__ = "0.1.0"
