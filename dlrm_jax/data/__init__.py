"""Data: Criteo readers, synthetic click logs, input pipelines."""
