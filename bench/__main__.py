"""`python -m bench <suite>`: bench/run.py's runner."""
import sys

from bench.run import main

main(sys.argv[1:])
