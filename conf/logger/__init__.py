# Hydra config group 'logger' (a package so that installed wheels carry it).
