"""``python -m bench`` (full), ``python -m bench --quick``, ``python -m bench --gpu``."""
from .run import main

main()
