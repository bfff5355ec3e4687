//! `gems-metrics`: ranking metrics, evaluation records and run reports.
