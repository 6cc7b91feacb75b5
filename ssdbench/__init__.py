"""ssdbench: synthetic and scaling studies of Mamba-1, Mamba-2 (SSD), Transformer++ and Based."""

__version__ = "0.1.0"
