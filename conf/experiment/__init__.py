# Hydra config group 'experiment' (a package so that installed wheels carry it).
