# Hydra config group 'task' (a package so that installed wheels carry it).
