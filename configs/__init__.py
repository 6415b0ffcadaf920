"""Recipe and demo configurations (YAML), shipped with the package so that a wheel has them."""
