# Hydra configs of ssdbench, installed as the package ssdbench.conf so that Hydra finds them
# through `pkg://ssdbench.conf` in an installed wheel as well as in an editable install.
