"""ssdbench: synthetic and scaling studies of Mamba-1, Mamba-2 (SSD), Transformer++ and Based."""

import time

__version__ = "0.1.0"
# When this process began importing ssdbench: a run's start-up phases (record "startup_s") are
# timed from here.
PROCESS_START = time.time()
