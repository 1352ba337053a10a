"""python -m stem_cli."""

from stem_cli.main import main

main()
