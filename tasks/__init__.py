"""Data sources for the studies: one module per task, each deterministic per seed.

Installed as ``ssdbench.tasks``. Every task module exposes a LightningDataModule whose
constructor takes the fields of its Hydra config (``conf/task/<name>.yaml``).
"""
