"""`python -m tramontane.controller`: run the operator."""

from tramontane.controller.main import run

run()
