# Hydra config group 'model' (a package so that installed wheels carry it).
