"""``python -m benchmark`` = ``dfkd-bench``."""
from .cli import main

main()
