"""python -m stem_cli."""

from stem_cli._entry import main

main()
