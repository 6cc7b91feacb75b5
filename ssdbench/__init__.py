"""ssdbench: synthetic and scaling studies of Mamba-1, Mamba-2 (SSD), Transformer++ and Based."""

import time

__version__ = "0.1.0"
# A run's start-up phases (record "startup_s") are timed from here: when this process began
# importing ssdbench, and in a sweep from the end of the previous job (train.main resets it).
STARTUP_FROM = time.time()
