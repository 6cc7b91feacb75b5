# Hydra config group 'heads' (a package so that installed wheels carry it).
