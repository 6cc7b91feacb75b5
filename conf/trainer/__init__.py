# Hydra config group 'trainer' (a package so that installed wheels carry it).
